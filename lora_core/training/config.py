"""``TrainConfig``: the hyper-parameters of ``lc.train``, type- and range-checked at construction.

Every number must be a finite real of the right kind (``lr="1e-3"`` is a TypeError, ``weight_decay=nan`` a
ValueError, each naming the field): a NaN hyper-parameter would otherwise train on silently and write NaN
weights into checkpoints.

``fingerprint()`` is what a checkpoint records about the run, and what a resume compares: the fields that
change the trajectory (``_TRAJECTORY_FIELDS``) plus ``fingerprint_extra``, where a caller puts what lies
outside this config but changes the trajectory or the meaning of the weights (``lora-core finetune`` passes
the model, the LoRA settings, the sequence length and a digest of the training data).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("CAUSAL_LM", "SEQ_CLS")
SCHEDULES = ("cosine", "linear", "constant")
# Fields that change the trajectory: a checkpoint refuses to resume under different values.
_TRAJECTORY_FIELDS = (
    "task",
    "lr",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "max_grad_norm",
    "loraplus_lr_ratio",
    "lr_groups",
    "seed",
)
_JSON_SCALARS = (str, int, float, bool, type(None))


def _real(name: str, value: Any, *, low: float, low_ok: bool, high: float = math.inf, high_ok: bool = True,
          optional: bool = False) -> None:  # fmt: skip
    """``TrainConfig.name`` must be a finite real (not a bool or a string) in the given interval."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "None or a number" if optional else "a number"
        raise TypeError(f"TrainConfig.{name} must be {kind}, got {type(value).__name__} {value!r}")
    lo, hi = ("[" if low_ok else "(") + f"{low}", f"{high}" + ("]" if high_ok else ")")
    inside = (value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)
    if not (math.isfinite(value) and inside):
        raise ValueError(f"TrainConfig.{name} must be a finite number in {lo}, {hi}, got {value!r}")


def _int(name: str, value: Any, *, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "None or an int" if optional else "an int"
        raise ValueError(f"TrainConfig.{name} must be {kind} >= {low}, got {value!r}")


def _json_like(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, _JSON_SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_like(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _json_like(v) for k, v in value.items())


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``; validated at construction (TypeError / ValueError naming the field).

    Args:
        output_dir: where ``checkpoint.pt``, ``metrics.jsonl`` and ``loss_curve.png`` go (None: nothing).
        task: ``"CAUSAL_LM"`` (next-token loss on ``labels``, ``-100`` ignored) or ``"SEQ_CLS"`` (one label
            per example).
        lr, weight_decay, adam_betas, adam_eps: AdamW (Loshchilov & Hutter 2019); decay only on ≥2-D weights.
        batch_size: examples per micro-batch *per process*. grad_accum: micro-batches per optimizer step.
        epochs, max_steps: train for ``max_steps`` steps if given, else ``epochs`` passes over the data.
        warmup_steps, schedule, min_lr_ratio: the learning-rate schedule (see ``lora_core.training.loop``).
        max_grad_norm: clip the global grad norm to this (None: no clipping).
        mixed_precision: ``"bf16"`` autocast, ``"no"``, or ``"auto"`` (bf16 on a CUDA device that has it).
        gradient_checkpointing: recompute activations in backward (the model must offer
            ``gradient_checkpointing_enable``, as transformers models and the tiny model do).
        fsdp: under ``torchrun``, shard the frozen base over the processes (FSDP2) instead of giving each
            a whole copy (DDP); adapters stay whole (``lora_core.training.fsdp``). One process: no effect.
        cpu_offload: with ``fsdp``, keep the base's shards in CPU memory between uses.
        loraplus_lr_ratio: LoRA+ — parameters named ``lora_B`` get ``lr × ratio`` (the paper suggests 16).
        lr_groups: per-layer learning rates, ``{regex: multiplier}`` matched with ``re.search`` against
            parameter names, first match wins (e.g. ``{r"layers\\.(0|1)\\.": 0.1}``).
        chunked_loss: for a transformers causal LM with a plain ``nn.Linear`` head, compute the loss from
            the hidden states chunk by chunk (same value and gradients up to float rounding, far less
            memory); False always materialises the logits.
        eval_every, checkpoint_every: every N optimizer steps (None: only at the end / never).
        seed: data order and dropout. resume: continue from ``output_dir/checkpoint.pt`` if it exists.
        fingerprint_extra: more entries (str keys, JSON-like values) for the checkpoint's fingerprint:
            settings outside this config that change the trajectory or the meaning of the weights (LoRA
            rank and alpha, the model, a digest of the data). A resume under other values is refused.
        log_every: a metrics line every N steps. progress: draw the progress bar on stderr.
        on_step: called after every optimizer step with ``(step, metrics)`` (rank 0 only).
    """

    output_dir: str | Path | None = None
    task: str = "CAUSAL_LM"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    cpu_offload: bool = False
    loraplus_lr_ratio: float | None = None
    lr_groups: dict[str, float] = field(default_factory=dict)
    chunked_loss: bool = True
    eval_every: int | None = None
    eval_batch_size: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    resume: bool = False
    fingerprint_extra: dict[str, Any] = field(default_factory=dict)
    log_every: int = 1
    progress: bool = True
    on_step: Callable[[int, dict[str, float]], None] | None = None

    def __post_init__(self) -> None:
        if self.output_dir is not None and not isinstance(self.output_dir, (str, Path)):
            raise TypeError(f"TrainConfig.output_dir must be None, a str or a Path, got {self.output_dir!r}")
        choices = {"task": TASKS, "schedule": SCHEDULES, "mixed_precision": ("auto", "bf16", "no")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "epochs", "log_every"):
            _int(name, getattr(self, name), low=1)
        for name in ("max_steps", "eval_every", "checkpoint_every", "eval_batch_size"):
            _int(name, getattr(self, name), low=1, optional=True)
        _int("warmup_steps", self.warmup_steps, low=0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"TrainConfig.seed must be an int, got {self.seed!r}")
        for name in ("gradient_checkpointing", "fsdp", "cpu_offload", "chunked_loss", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.cpu_offload and not self.fsdp:
            raise ValueError("TrainConfig.cpu_offload=True offloads FSDP's shards: it needs fsdp=True")
        _real("lr", self.lr, low=0.0, low_ok=False)
        _real("weight_decay", self.weight_decay, low=0.0, low_ok=True)
        _real("adam_eps", self.adam_eps, low=0.0, low_ok=False)
        _real("min_lr_ratio", self.min_lr_ratio, low=0.0, low_ok=True, high=1.0)
        _real("max_grad_norm", self.max_grad_norm, low=0.0, low_ok=False, optional=True)
        _real("loraplus_lr_ratio", self.loraplus_lr_ratio, low=0.0, low_ok=False, optional=True)
        if not isinstance(self.adam_betas, (tuple, list)) or len(self.adam_betas) != 2:
            raise TypeError(f"TrainConfig.adam_betas must be a pair of numbers, got {self.adam_betas!r}")
        for i, beta in enumerate(self.adam_betas):
            _real(f"adam_betas[{i}]", beta, low=0.0, low_ok=True, high=1.0, high_ok=False)
        self.adam_betas = tuple(self.adam_betas)
        if not isinstance(self.lr_groups, dict):
            raise TypeError(f"TrainConfig.lr_groups must be a dict {{regex: scale}}, got {self.lr_groups!r}")
        for pattern, scale in self.lr_groups.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"TrainConfig.lr_groups: {pattern!r} is not a valid regex ({e})") from None
            _real(f"lr_groups[{pattern!r}]", scale, low=0.0, low_ok=False)
        if not isinstance(self.fingerprint_extra, dict) or not _json_like(self.fingerprint_extra):
            raise TypeError(
                "TrainConfig.fingerprint_extra must be a dict with str keys and JSON-like values (str, int, "
                f"finite float, bool, None, lists and dicts of them), got {self.fingerprint_extra!r}"
            )
        if clash := sorted(set(self.fingerprint_extra) & set(_TRAJECTORY_FIELDS)):
            raise ValueError(f"TrainConfig.fingerprint_extra must not redefine TrainConfig fields: {clash}")
        if self.on_step is not None and not callable(self.on_step):
            raise TypeError(f"TrainConfig.on_step must be None or callable, got {self.on_step!r}")

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records and a resume compares: trajectory fields plus ``fingerprint_extra``."""
        d = asdict(self)
        own = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _TRAJECTORY_FIELDS}
        return {**own, **json.loads(json.dumps(self.fingerprint_extra))}  # tuples -> lists, as saved
