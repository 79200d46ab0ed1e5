"""The training checkpoint behind ``lc.train``'s exact resume: ``checkpoint.pt`` in the run's folder.

A run killed at any point and resumed must end with the weights an uninterrupted run ends with, so a
checkpoint holds everything the trajectory depends on after step ``s``::

    step s │ trainable weights │ optimizer (AdamW moments) │ scheduler │ RNG of every rank │ config │ history

The data order needs no state: it is a function of ``(seed, epoch)`` (see ``lora_core.training.loop``).
The RNG states (torch CPU, every CUDA device, Python's ``random``) are gathered from every rank, because
dropout masks differ per rank. The file is written by rank 0 atomically (temp file, fsync, rename) and
read back with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lora_core.atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def _rng_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(internal),
        "python_gauss_next": gauss_next,  # random.gauss() caches its second value
        "python_version": version,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((rng.get("python_version", 3), tuple(rng["python"]), rng.get("python_gauss_next")))


def save_checkpoint(
    path: Path,
    step: int,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fingerprint: dict[str, Any],
    history: list[dict[str, float]],
    world: int,
    rank: int,
) -> None:
    """Write ``path`` after optimizer step ``step``; every rank calls it (its RNG state is gathered)."""
    rngs = [_rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state())
    if rank == 0:
        state = {
            "step": step,
            "trainable": {n: p.detach().cpu().clone() for n, p in named},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "config": fingerprint,
            "world_size": world,
            "history": json.dumps(history),
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    if world > 1:
        dist.barrier()


def load_checkpoint(
    path: Path,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fingerprint: dict[str, Any],
    world: int,
    rank: int,
) -> tuple[int, list[dict[str, float]]]:
    """Restore weights, optimizer, scheduler and this rank's RNG from ``path``; ``(step, history)``.

    Raises:
        ValueError: the checkpoint was written under other trajectory settings, another world size, or for
            other trainable parameters.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != fingerprint or state["world_size"] != world:
        keys = set(state["config"]) | set(fingerprint)
        diff = sorted(k for k in keys if state["config"].get(k) != fingerprint.get(k))
        if state["world_size"] != world:
            diff.append(f"world_size {state['world_size']} != {world}")
        raise ValueError(
            f"{path} was written by a run with different settings ({diff}); "
            "resume with the same settings or start a new output directory"
        )
    names = [n for n, _ in named]
    if sorted(state["trainable"]) != sorted(names):
        raise ValueError(
            f"{path} holds other trainable parameters than this model "
            f"(e.g. {sorted(set(state['trainable']) ^ set(names))[:3]})"
        )
    with torch.no_grad():
        for n, p in named:
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][rank])
    return int(state["step"]), json.loads(state["history"])
