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
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lora_core.atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
_MISSING = object()


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
    random.setstate(_python_state(rng))


def _python_state(rng: dict[str, Any]) -> tuple[Any, ...]:
    return rng.get("python_version", 3), tuple(rng["python"]), rng.get("python_gauss_next")


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


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint's dict; a file that is not one (empty, truncated, another pickle) is a ValueError."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # the disk, not the content: the caller reports it as such
        raise
    except Exception as e:  # any failure to parse untrusted bytes means "not a checkpoint"
        why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        why = f"{type(e).__name__}: {why[:120]}" if why else type(e).__name__
        raise ValueError(f"{path} is not a readable lora_core checkpoint ({why})") from None
    kinds = {"step": int, "trainable": dict, "optimizer": dict, "scheduler": dict, "rng": list,
             "config": dict, "world_size": int, "history": str}  # fmt: skip
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a lora_core checkpoint (it holds a {type(state).__name__})")
    bad = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
    if bad:
        raise ValueError(f"{path} is not a lora_core checkpoint (missing or malformed: {', '.join(bad)})")
    return state


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_settings(path: Path, state: dict[str, Any], fingerprint: dict[str, Any], world: int) -> None:
    saved, none = state["config"], "<not recorded>"
    diff = [
        f"{k} (checkpoint {_short(saved.get(k, none))}, now {_short(fingerprint.get(k, none))})"
        for k in sorted(set(saved) | set(fingerprint))
        if saved.get(k, _MISSING) != fingerprint.get(k, _MISSING)
    ]
    if state["world_size"] != world:
        diff.append(f"world_size (checkpoint {state['world_size']}, now {world})")
    if diff:
        raise ValueError(
            f"{path} was written by a run with different settings: {'; '.join(diff)}. "
            "Resume with the same settings or start a new output directory"
        )


def check_checkpoint_settings(path: Path, fingerprint: dict[str, Any], world: int = 1) -> None:
    """Raise ``ValueError`` unless ``path`` is a readable checkpoint written under ``fingerprint`` and
    ``world`` processes (``TrainConfig.fingerprint()``): lets a caller refuse a resume before it does work."""
    _check_settings(path, _read(path), fingerprint, world)


def _check_tensor(path: Path, what: str, t: Any, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path}: {what} is a {type(t).__name__}, not a tensor")
    if t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(
            f"{path}: {what} is {t.dtype} {tuple(t.shape)}, the model has {like.dtype} {tuple(like.shape)}"
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{path}: {what} holds NaN or inf values")


def _check_optimizer(path: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """The saved AdamW state fits this optimizer: same groups, same parameter counts, moments of the right
    shapes (what ``load_state_dict`` would otherwise find out half-way, or not at all)."""
    groups, state = saved.get("param_groups"), saved.get("state")
    ours = [g["params"] for g in optimizer.param_groups]
    if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(ours):
        raise ValueError(f"{path}: the optimizer state does not fit this model's {len(ours)} param groups")
    by_id = {}
    for group, params in zip(groups, ours):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(params):
            raise ValueError(f"{path}: the optimizer state's parameter groups differ from this model's")
        by_id.update(zip(ids, params))
    for pid, moments in state.items():
        if pid not in by_id or not isinstance(moments, dict):
            raise ValueError(f"{path}: the optimizer state names a parameter this model does not have")
        for key, t in moments.items():
            if key != "step":
                _check_tensor(path, f"optimizer state {key!r} of parameter {pid}", t, by_id[pid].detach())


def _check_rng(path: Path, rngs: list[Any], world: int, rank: int) -> None:
    try:
        rng = rngs[rank]
        torch.Generator().set_state(rng["torch"])
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng["cuda"]):
            raise TypeError("cuda states must be uint8 tensors")
        random.Random().setstate(_python_state(rng))
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the RNG state of rank {rank} is malformed ({e})") from None
    if len(rngs) != world:
        raise ValueError(f"{path}: RNG states for {len(rngs)} processes, this run has {world}")


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

    The whole file is checked first (settings, parameter names, shapes, dtypes, finite values, the optimizer
    and RNG states, the history); nothing is changed unless all of it fits.

    Raises:
        ValueError: the file is not a checkpoint (empty, truncated, another pickle), was written under other
            settings (every differing one is named), another world size, or for other trainable parameters.
    """
    state = _read(path)
    _check_settings(path, state, fingerprint, world)
    names = [n for n, _ in named]
    if sorted(state["trainable"]) != sorted(names):
        raise ValueError(
            f"{path} holds other trainable parameters than this model "
            f"(e.g. {sorted(set(state['trainable']) ^ set(names))[:3]})"
        )
    for n, p in named:
        _check_tensor(path, f"weight {n!r}", state["trainable"][n], p.detach())
    _check_optimizer(path, state["optimizer"], optimizer)
    _check_rng(path, state["rng"], world, rank)
    try:
        history = json.loads(state["history"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the metrics history is not valid JSON ({e})") from None
    if not isinstance(history, list) or not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"{path}: malformed step or metrics history")

    before = optimizer.state_dict(), scheduler.state_dict()
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # what the checks above could not foresee
        optimizer.load_state_dict(before[0])
        scheduler.load_state_dict(before[1])
        raise ValueError(f"{path}: the optimizer or scheduler state does not fit ({e})") from None
    _set_rng_state(state["rng"][rank])
    with torch.no_grad():
        for n, p in named:
            p.copy_(state["trainable"][n])
    return state["step"], history
