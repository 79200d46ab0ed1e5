"""A minimal, exact training loop: ``lc.train(model, train_data, eval_data, config)``.

It trains exactly the parameters with ``requires_grad`` (after ``apply_lora`` those are the adapters and
``modules_to_save``), on any ``nn.Module`` whose forward takes ``input_ids`` (and ``attention_mask``) and
returns logits — a tensor, a dict with ``"logits"``, or an object with ``.logits`` (transformers models).

**One optimizer step** over a global batch of ``G = batch_size × grad_accum × world_size`` examples::

    step s → epoch e = s // S, position p = s % S          (S = steps per epoch, last partial batch dropped)
    perm_e  = randperm(N, seed + e)                        (stateless: no sampler state to save)
    global  = perm_e[p·G : (p+1)·G]; micro-batch m of rank r = global[(m·W + r)·B : … + B]
    loss    = Σ_tokens CE / n_target_tokens(global)        (every rank knows the global count)

Because the loss is normalized by the token count of the *whole* global batch, the gradient is the same
whether the batch is split over micro-batches, ranks, or neither: 2 DDP processes (or 2 with the frozen base
sharded, ``fsdp=True``: ``lora_core.training.fsdp``) equal 1 process with the same global batch, and grad
accumulation equals a bigger batch (up to float summation order).

**Checkpoints** (``checkpoint.pt``, every ``checkpoint_every`` steps; ``lora_core.training.state``) hold the
trainable weights, optimizer, scheduler, step and RNG states; they are written atomically (temp file, fsync,
rename). Resuming restores all of it, so a run killed at any point and resumed ends with the same weights
as an uninterrupted run.

**The causal-LM loss** of a transformers model with a plain ``nn.Linear`` head is computed chunk by chunk
from the final hidden states (``lora_core.training.losses``): the same sum, without the (tokens × vocab)
fp32 logits that dominate peak memory for large vocabularies. Other models (the tiny model, custom heads)
go through ``model(input_ids).logits``.

**Learning rate**: linear warm-up to ``lr`` over ``warmup_steps``, then cosine / linear decay to
``min_lr_ratio × lr``, or constant. LoRA+ (Hayou et al. 2024) trains ``B`` with ``lr × loraplus_lr_ratio``.

**On a CPU** glibc's malloc is told to keep what a step frees for the next one (``host_memory``: no page
faults after the first step, ≈ 15 % of a SmolLM2 step) and gives it back when training ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lora_core.atomic import atomic_write_text
from lora_core.lora.optim import loraplus_optimizer, loraplus_param_groups
from lora_core.training.config import TrainConfig
from lora_core.training.data import IGNORE_INDEX, collate
from lora_core.training.fsdp import average_gradients, is_sharded, shard_model
from lora_core.training.host_memory import keep_freed_memory, release_freed_memory
from lora_core.training.losses import causal_lm_hidden_and_head, chunked_causal_lm_loss, decoder_and_head
from lora_core.training.progress import ProgressBar, plot_loss_curve
from lora_core.training.state import CHECKPOINT_NAME, load_checkpoint, save_checkpoint


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the updated weights became NaN or inf.

    A NaN / inf loss or gradient norm is caught before the update: the weights in memory are those of the
    last good step. Weights that overflow in the update itself (a huge learning rate) are caught right after
    it, so the weights in memory are not usable then. Either way no checkpoint with non-finite weights is
    written: ``checkpoint.pt`` keeps the last good step (the message names it).
    """


@dataclass
class TrainResult:
    """What ``train`` returns: steps done, the last train / eval loss, throughput and the metric history."""

    steps: int
    train_loss: float
    eval_loss: float | None
    tokens_per_s: float
    train_tokens: int
    history: list[dict[str, float]]
    checkpoint: Path | None


# ----------------------------------------------------------------------------------------------- pieces


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"]
    return out.logits


def _n_targets(labels: torch.Tensor, task: str) -> int:
    """How many loss terms a batch contributes: target tokens (causal LM) or examples (classification)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if task == "CAUSAL_LM" else labels.shape[0]


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Summed cross-entropy. Causal LM: logits ``(B, T, V)`` at t predict ``labels[:, t+1]`` ``(B, T)``."""
    if task == "CAUSAL_LM":
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    return F.cross_entropy(logits.float(), labels, reduction="sum")  # (B, n_labels) vs (B,)


def _chunked_loss_applies(model: nn.Module, cfg: TrainConfig) -> bool:
    """Whether ``losses.chunked_causal_lm_loss`` computes exactly this model's causal-LM loss."""
    if not cfg.chunked_loss or cfg.task != "CAUSAL_LM" or is_sharded(model):  # FSDP: see training.fsdp
        return False
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if transformers is None or not isinstance(base, transformers.PreTrainedModel):
        return False
    try:
        decoder_and_head(model)
    except (TypeError, ValueError):  # an adapted or missing head, soft-capped logits: use the logits
        return False
    return True


class _LossSum(nn.Module):
    """``model`` and its summed loss as one module, so that DDP wraps the forward that makes the loss."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.task, self.chunked = model, cfg.task, _chunked_loss_applies(model, cfg)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.chunked:
            return loss_sum(_logits(self.model, batch), batch["labels"], self.task)
        kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
        hidden, weight, bias = causal_lm_hidden_and_head(self.model, batch["input_ids"], **kwargs)
        return chunked_causal_lm_loss(
            hidden.to(weight.dtype), weight, batch["labels"], lm_head_bias=bias, reduction="sum"
        )


def _has_a_target(data: Dataset) -> bool:
    """Whether any causal-LM example has a label other than -100 (``PackedDataset``: one tensor check)."""
    labels = getattr(data, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and len(labels) == len(data):
        return bool((labels[:, 1:] != IGNORE_INDEX).any())
    return any(bool((torch.as_tensor(data[i]["labels"])[1:] != IGNORE_INDEX).any()) for i in range(len(data)))


def _all_finite(params: list[nn.Parameter]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one device sync


def _can_fuse_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel over all tensors, CPU and CUDA) can take ``params``: floating
    point, all on one CPU or CUDA device. It is the same update as the for-loop AdamW up to rounding
    (~1e-8) and much cheaper for many small adapter tensors (420 SmolLM2 adapters, 2 CPU threads, quiet
    machine: 9 ms a step instead of 36)."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the base lr for optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups keyed by (lr multiplier, weight decay): LoRA+, ``lr_groups``, no decay on 1-D params
    (`lora_core.lora.optim.loraplus_param_groups`, the one copy)."""
    ratio = cfg.loraplus_lr_ratio if cfg.loraplus_lr_ratio is not None else 1.0
    return loraplus_param_groups(model, cfg.lr, ratio, cfg.weight_decay, cfg.lr_groups)


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, config: TrainConfig | None = None) -> float:
    """Mean loss per target (token or example) over ``data``, summed across DDP ranks if running.

    Raises:
        ValueError: ``data`` holds no target at all.
    """
    cfg = config or TrainConfig()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bs = cfg.eval_batch_size or cfg.batch_size
    loss_of = _LossSum(model, cfg)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, count)
    idx = list(range(rank, len(data), world))
    for i in range(0, math.ceil(len(data) / world), bs):  # as many batches on every rank: FSDP's forwards
        part = idx[i : i + bs]  # gather together, so a rank out of data runs a batch that counts nothing
        batch = {k: v.to(device) for k, v in collate([data[j] for j in part or [0]]).items()}
        with _autocast(device, cfg):
            loss = loss_of(batch).double()
        if part:
            total[0] += loss
            total[1] += _n_targets(batch["labels"], cfg.task)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    if total[1] == 0:  # a loss of 0 would read as a perfect model
        raise ValueError("evaluate: the data has no target (every label is -100, or it is empty)")
    return float(total[0] / total[1])


def _autocast(device: torch.device, cfg: TrainConfig) -> Any:
    on = cfg.mixed_precision == "bf16" or (
        cfg.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


# ----------------------------------------------------------------------------------------- the loop


def train(
    model: nn.Module, train_data: Dataset, eval_data: Dataset | None = None, config: TrainConfig | None = None
) -> TrainResult:
    """Train the ``requires_grad`` parameters of ``model`` in place; see the module docstring."""
    cfg = config or TrainConfig()
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # under torchrun
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    G = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = len(train_data) // G
    if steps_per_epoch == 0:
        raise ValueError(
            f"train_data has {len(train_data)} examples, fewer than one global batch of {G} "
            f"(batch_size {cfg.batch_size} × grad_accum {cfg.grad_accum} × {world} processes)"
        )
    if cfg.task == "CAUSAL_LM" and not _has_a_target(train_data):  # else every step reports a loss of 0
        raise ValueError("train_data has no target: every label is -100, so there is nothing to learn")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    out_dir = Path(cfg.output_dir) if cfg.output_dir is not None else None
    writer = rank == 0 and out_dir is not None
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)

    if cfg.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError("gradient_checkpointing=True needs a model with gradient_checkpointing_enable()")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.type == "cpu":  # the freed activations serve the next step: no page faults (host_memory.py)
        keep_freed_memory()
    sharded = cfg.fsdp and world > 1  # one process: nothing to shard
    if sharded:
        shard_model(model, cpu_offload=cfg.cpu_offload)  # the frozen base; adapters stay whole
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = loraplus_optimizer(
        model, lr=cfg.lr, ratio=cfg.loraplus_lr_ratio if cfg.loraplus_lr_ratio is not None else 1.0,
        optimizer_cls=torch.optim.AdamW, weight_decay=cfg.weight_decay, lr_groups=cfg.lr_groups,
        betas=cfg.adam_betas, eps=cfg.adam_eps, fused=_can_fuse_adamw([p for _, p in named]),
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    )
    torch.manual_seed(cfg.seed + rank)  # dropout masks; the data order has its own generator per epoch
    random.seed(cfg.seed + rank)

    start, history = 0, []
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    if cfg.resume and ckpt_path is not None and ckpt_path.is_file():
        start, history = load_checkpoint(
            ckpt_path, named, optimizer, scheduler, cfg.fingerprint(), world, rank
        )
    last_good = start if start > 0 else None
    loss_of: nn.Module = _LossSum(model, cfg)
    if world > 1 and not sharded:
        loss_of = nn.parallel.DistributedDataParallel(loss_of)
    metrics_path = out_dir / "metrics.jsonl" if writer else None
    if metrics_path is not None:  # drop lines from beyond the checkpoint (a killed run logged them)
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    progress = ProgressBar(total, cfg.progress and rank == 0)
    model.train()
    train_time, train_tokens, loss_val, eval_loss = 0.0, 0, float("nan"), None
    params = [p for _, p in named]
    for step in range(start, total):
        t0 = time.perf_counter()
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        global_idx = perm[pos * G : (pos + 1) * G].tolist()
        gb = collate([train_data[i] for i in global_idx])  # the global batch, (G, T)
        n_global = _n_targets(gb["labels"], cfg.task)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for m in range(cfg.grad_accum):
            lo = (m * world + rank) * cfg.batch_size
            batch = {k: v[lo : lo + cfg.batch_size].to(device) for k, v in gb.items()}
            sync = m == cfg.grad_accum - 1 or world == 1 or sharded  # DDP's no_sync; FSDP: see below
            ctx = loss_of.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with _autocast(device, cfg):
                    loss = loss_of(batch) / max(n_global, 1)
                (loss * world).backward()  # DDP averages over ranks; × world makes that a sum
            step_loss += loss.detach().double()
            train_tokens += batch["input_ids"].numel() * world
        if sharded:  # the adapters are replicated under FSDP: average their gradients as DDP would
            average_gradients(params)
        if world > 1:
            dist.all_reduce(step_loss)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # inf: measure, do not clip
        loss_val = float(step_loss)
        if not (math.isfinite(loss_val) and math.isfinite(float(grad_norm))):
            where = f"{ckpt_path} (step {last_good})" if last_good else "none was written"
            raise TrainingDiverged(
                f"loss became {loss_val} (grad norm {float(grad_norm)}) at step {step + 1}; "
                f"stopped before updating the weights. Last good checkpoint: {where}"
            )
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not _all_finite(params):  # a checkpoint must never hold these
            where = f"{ckpt_path} (step {last_good})" if last_good else "none was written"
            raise TrainingDiverged(
                f"the weights became NaN or inf in the update of step {step + 1} (loss {loss_val}, grad norm "
                f"{float(grad_norm)}, lr {lr_now:.3g}: too high?). Last good checkpoint: {where}"
            )
        train_time += time.perf_counter() - t0
        tok_s = train_tokens / max(train_time, 1e-9)
        done = step + 1
        record = {
            "step": done,
            "epoch": epoch,
            "loss": loss_val,
            "lr": lr_now,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tok_s,
        }
        if eval_data is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            eval_loss = evaluate(model, eval_data, cfg)
            record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50.0)))
        if done % cfg.log_every == 0 or done == total or "eval_loss" in record:
            history.append(record)
            if metrics_path is not None:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        progress.update(done, loss_val, lr_now, tok_s)
        if cfg.on_step is not None and rank == 0:
            cfg.on_step(done, record)
        if ckpt_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save_checkpoint(
                ckpt_path, done, named, optimizer, scheduler, cfg.fingerprint(), history, world, rank
            )
            last_good = done

    if eval_data is not None:
        eval_loss = evaluate(model, eval_data, cfg)
        final = {"step": total, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}
        history.append(final)
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(final) + "\n")
    if writer:
        plot_loss_curve(history, out_dir / "loss_curve.png")
    if device.type == "cpu":
        release_freed_memory()  # what the steps held, back to the system; malloc keeps the thresholds
    return TrainResult(
        steps=total,
        train_loss=loss_val,
        eval_loss=eval_loss,
        tokens_per_s=train_tokens / max(train_time, 1e-9),
        train_tokens=train_tokens,
        history=history,
        checkpoint=ckpt_path if last_good else None,
    )
