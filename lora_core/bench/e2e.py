"""End-to-end fine-tuning benchmark: one model trained four ways, tokens/s and peak GPU memory.

    a  lora_core QLoRA       NF4 base (``apply_lora(quantize="nf4", device=...)``), fused LoRA, chunked loss
    b  PEFT + bitsandbytes   ``from_pretrained(BitsAndBytesConfig(nf4, double quant, bf16 compute))``,
                             ``prepare_model_for_kbit_training``, ``get_peft_model``, the model's own loss
    c  lora_core LoRA        bf16 base, fused LoRA, chunked loss
    d  PEFT LoRA             bf16 base, ``get_peft_model``, the model's own loss
    b0 (optional)            b without ``prepare_model_for_kbit_training`` (its fp32 norms/embeddings/head)

The model is a transformers ``LlamaForCausalLM`` from a config with random weights (no download), written
once to a temporary safetensors checkpoint that every case loads fresh, as a user would load a pretrained
model: ``default``: hidden 2048, intermediate 5632, 12 layers, 16 heads, vocab 32000, bf16, batch 4 × 1024,
no gradient checkpointing; ``7b``: hidden 4096, intermediate 11008, 32 layers, 32 heads, batch 1 × 2048,
gradient checkpointing. LoRA r = 16, α = 32 on q, k, v, o, gate, up, down; AdamW (fused on CUDA, the same
for every case). Every case trains on the same random token batches (labels = inputs).

Each case is timed by its own plain step loop — forward, loss, backward, ``AdamW.step``, ``zero_grad`` —
so it measures the library, not a trainer. Warm-up steps are excluded; the timed steps run between two
``torch.cuda.synchronize()``; ``torch.cuda.max_memory_allocated`` is reset after loading (the weights count,
they are allocated) and read after the last step. The setup's own peak (``load_peak_gib``) is recorded too:
case a quantizes on the GPU one layer at a time from a CPU copy, so it never holds the bf16 model there.

Checks, printed as pass/fail: ``default``: a ≥ 1.3 × b's tokens/s at ≤ b's peak memory; ``7b``: a uses less
memory than b and is faster. The first step's loss of every case is recorded: a ≈ b and c ≈ d show that the
cases train the same model (B = 0 at the start, so it is the base model's loss).

Writes ``bench_e2e_<case>.json`` (device, versions, config, every number) and ``bench_e2e_<case>.png``.
Needs CUDA (exit 2 without), except ``--device cpu --tiny``: a 2-layer, hidden-64 smoke run on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.atomic import atomic_write_text
from lora_core.bench.common import versions, write_json
from lora_core.bench.e2e_report import H100_REFERENCE, evaluate_targets, format_table, loss_agreement, plot

MODELS: dict[str, dict[str, Any]] = {
    "default": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12,
                "num_attention_heads": 16, "vocab_size": 32000, "batch": 4, "seq": 1024, "grad_ckpt": False},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "vocab_size": 32000, "batch": 1, "seq": 2048, "grad_ckpt": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 512, "batch": 2, "seq": 64, "grad_ckpt": False},
}  # fmt: skip
CASES: dict[str, str] = {
    "a": "lora_core QLoRA (NF4)",
    "b": "PEFT + bitsandbytes QLoRA",
    "c": "lora_core bf16 LoRA",
    "d": "PEFT bf16 LoRA",
    "b0": "PEFT + bnb QLoRA, no prepare_model_for_kbit_training",
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


# ----------------------------------------------------------------------------- the model, once on disk


def llama_config(spec: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"], vocab_size=spec["vocab_size"],
        max_position_embeddings=max(2048, spec["seq"]), tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip


def write_checkpoint(spec: dict[str, Any], folder: Path, device: torch.device, seed: int) -> None:
    """A random-weight bf16 checkpoint (transformers' init, seeded), built on ``device`` for speed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: no fp32 copy of a 7B model
    try:
        with device:
            model = LlamaForCausalLM(llama_config(spec))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    del model
    _free(device)


# ----------------------------------------------------------------------------- the four ways to train


def model_dtype(spec: dict[str, Any]) -> torch.dtype:
    """The dtype every case loads (and bitsandbytes computes) in: ``spec["dtype"]``, bfloat16 by default."""
    return getattr(torch, spec.get("dtype", "bfloat16"))


def _lora_core_model(ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
                     quantize: bool) -> tuple[nn.Module, Callable[..., torch.Tensor]]:  # fmt: skip
    from transformers import LlamaForCausalLM

    from lora_core import LoraConfig, apply_lora, causal_lm_loss

    cfg = LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=TARGET_MODULES,
                     quantize="nf4" if quantize else "none")  # fmt: skip
    dtype = model_dtype(spec)
    if quantize:  # dense weights stay on the CPU; each layer is moved, quantized on the GPU, the next...
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype)
        apply_lora(model, cfg, device=device)
    else:
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map={"": device})
        apply_lora(model, cfg)
    if spec["grad_ckpt"]:
        _checkpointing(model, {"use_reentrant": False})  # non-reentrant: no input-requires-grad hook

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(m, ids, ids, chunk_size=args.loss_chunk)

    return model, loss_fn


def _peft_model(ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
                quantize: bool, prepare: bool = True,
                ) -> tuple[nn.Module, Callable[..., torch.Tensor]]:  # fmt: skip
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    dtype = model_dtype(spec)
    if quantize:  # the QLoRA recipe of PEFT's docs (compute dtype: the model's)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)  # fmt: skip
        model = LlamaForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device})  # fmt: skip
        if prepare:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["grad_ckpt"])
        elif spec["grad_ckpt"]:
            _checkpointing(model, None)
    else:
        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map={"": device})
        if spec["grad_ckpt"]:
            _checkpointing(model, None)  # transformers' default kwargs, what a PEFT user gets
    cfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                          target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, cfg)

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    return model, loss_fn


BUILDERS: dict[str, Callable[..., tuple[nn.Module, Callable[..., torch.Tensor]]]] = {
    "a": lambda *a: _lora_core_model(*a, quantize=True),
    "b": lambda *a: _peft_model(*a, quantize=True),
    "c": lambda *a: _lora_core_model(*a, quantize=False),
    "d": lambda *a: _peft_model(*a, quantize=False),
    "b0": lambda *a: _peft_model(*a, quantize=True, prepare=False),
}


def _checkpointing(model: nn.Module, kwargs: dict[str, Any] | None) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


# ----------------------------------------------------------------------------- measuring one case


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def param_dtype(model: nn.Module, suffix: str) -> str | None:
    for name, p in model.named_parameters():
        if name.endswith(suffix):
            return str(p.dtype).replace("torch.", "")
    return None


def train_step(model: nn.Module, loss_fn: Callable[..., torch.Tensor], opt: torch.optim.Optimizer,
          ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One plain training step: forward, loss, backward, AdamW step, zero_grad. Returns the loss."""
    loss = loss_fn(model, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def profile_steps(step: Callable[[int], Any], cuda: bool, path: Path) -> dict[str, Any]:
    """Run two steps under ``torch.profiler``; write the top-30 operator table to ``path``; return the
    wall time and the summed device-kernel time per step (kernel time ≪ wall time: launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(2):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 2
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort, row_limit=30, max_name_column_width=60)
    atomic_write_text(path, table + "\n")
    kernel_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 2 if cuda else None
    return {"wall_ms_per_step": 1e3 * wall, "device_kernel_ms_per_step": None if kernel_us is None
            else kernel_us / 1e3, "table": path.name}  # fmt: skip


def build_case(key: str, ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
               ) -> tuple[nn.Module, Callable[..., torch.Tensor], torch.optim.Optimizer, list[nn.Parameter],
                          float]:  # fmt: skip
    """Case ``key``'s model (training mode), loss, AdamW over its trainable parameters, those parameters and
    the seconds loading took."""
    t0 = time.perf_counter()
    model, loss_fn = BUILDERS[key](ckpt, spec, args, device)
    load_s = time.perf_counter() - t0
    model.train()  # from_pretrained returns eval mode; checkpointing only acts in training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    return model, loss_fn, opt, params, load_s


def run_case(key: str, ckpt: Path, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
             batches: Sequence[torch.Tensor]) -> dict[str, Any]:  # fmt: skip
    """Load a fresh model, train ``warmup + steps`` steps; tokens/s, peak memory, losses."""
    cuda = device.type == "cuda"
    _free(device)
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    model, loss_fn, opt, params, load_s = build_case(key, ckpt, spec, args, device)
    load_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, events, t_start = [], [], 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        ids = batches[step % len(batches)]
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        t_step = time.perf_counter()
        if ev:
            ev[0].record()
        loss = train_step(model, loss_fn, opt, ids)
        losses.append(loss)
        if ev:
            ev[1].record()
            events.append(ev)
        else:
            events.append(time.perf_counter() - t_step)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    profile = None
    if args.profile:  # two more steps under the profiler: where the time goes (not in the numbers above)
        profile = profile_steps(lambda i: train_step(model, loss_fn, opt, batches[i % len(batches)]), cuda,
                                 args.out / f"bench_e2e_{args.case_name}_profile_{key}.txt")  # fmt: skip
    step_ms = [e[0].elapsed_time(e[1]) if cuda else 1e3 * e for e in events][args.warmup :]
    tokens = args.steps * batches[0].numel()
    row = {
        "case": key, "label": CASES[key], "ran": True, "tokens_per_s": tokens / elapsed,
        "step_ms_median": float(torch.tensor(step_ms).median()), "step_ms": step_ms,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "load_peak_gib": load_peak / GIB if load_peak is not None else None,
        "start_allocated_gib": start_alloc / GIB, "load_s": load_s,
        "trainable_params": sum(p.numel() for p in params),
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        "profile": profile,
        "dtypes": {"embed": param_dtype(model, "embed_tokens.weight"),
                   "lm_head": param_dtype(model, "lm_head.weight"),
                   "final_norm": param_dtype(model, "model.norm.weight")},  # prepare_model_... casts to fp32
    }  # fmt: skip
    return row  # the model dies with this frame; the next case's `_free` returns its memory


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["default", "7b"], default="default", help="model size (see module doc)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model (smoke test)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu needs --tiny or --model")
    p.add_argument("--model", choices=["smollm2", "tiny"], default=None,
                   help="CPU only: the real SmolLM2-135M (float32, batch 4×128), or a tiny random Llama; "
                   "each case in its own process, rounds interleaved (lora_core.bench.e2e_cpu)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="--model: interleaved rounds (--steps over them)")
    p.add_argument("--threads", type=int, default=None, help="--model: torch threads per case (default all)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=["a", "b", "c", "d"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels compile, AdamW state)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss-chunk", type=int, default=None, help="tokens per chunk of lora_core's loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also profile 2 steps per case (tables to --out)")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="reuse/keep the random checkpoint here")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    return p


def meta(case: str, spec: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    meta_versions = versions()
    for pkg in ("transformers", "peft", "accelerate"):
        try:
            meta_versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            meta_versions[pkg] = None
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name, "versions": meta_versions, "case": case, "model": spec,
        "target_modules": TARGET_MODULES,
        "r": args.r, "alpha": args.alpha, "dropout": args.dropout, "lr": args.lr, "optimizer": "AdamW",
        "steps": args.steps, "warmup": args.warmup, "loss_chunk": args.loss_chunk,
        "dtype": str(model_dtype(spec)).removeprefix("torch."),
        "timer": "perf_counter between cuda.synchronize() over the timed steps; per-step CUDA events",
        "memory": "torch.cuda.max_memory_allocated, reset after loading, read after the last step",
        "reference_h100": H100_REFERENCE.get(case), "cases": {k: CASES[k] for k in args.cases},
    }  # fmt: skip


def quiet_libraries() -> None:
    """No progress bars, info logs or FutureWarnings from transformers in the benchmark's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _run_cpu_model(args: argparse.Namespace) -> int:
    """``--model``: the per-process, interleaved CPU harness (``lora_core.bench.e2e_cpu``)."""
    problems = [msg for bad, msg in (
        (args.device != "cpu", "--model runs on the CPU: add --device cpu"),
        (args.tiny, "--model and --tiny are two different runs; give one"),
        (args.rounds < 1 or args.steps < args.rounds, "--rounds must be ≥ 1 and --steps ≥ --rounds"),
        (args.warmup < 1, "--warmup must be ≥ 1"),
        (args.threads is not None and args.threads < 1, "--threads must be ≥ 1"),
    ) if bad]  # fmt: skip
    if problems:
        print(f"bench_e2e: {problems[0]}", file=sys.stderr)
        return 2
    from lora_core.bench import e2e_cpu  # it imports this module: imported here, not at the top

    quiet_libraries()
    args.case_name, args.steps_per_round = args.model, args.steps // args.rounds
    args.steps = args.steps_per_round * args.rounds
    return e2e_cpu.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is not None:
        return _run_cpu_model(args)
    if args.device == "cpu" and not args.tiny:
        print("bench_e2e: --device cpu runs the --tiny smoke configuration or a --model "
              "(smollm2: the real SmolLM2-135M)", file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_e2e: needs a CUDA GPU (torch.cuda.is_available() is False); nothing timed. "
              "For a CPU smoke run: --device cpu --tiny", file=sys.stderr)  # fmt: skip
        return 2
    if args.steps < 1 or args.warmup < 1:
        print("bench_e2e: --steps and --warmup must be ≥ 1", file=sys.stderr)
        return 2
    quiet_libraries()
    case = args.case_name = "tiny" if args.tiny else args.case
    spec, device = MODELS[case], torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt_dir or Path(tempfile.mkdtemp(prefix="bench_e2e_ckpt_"))
    try:
        if not (ckpt / "config.json").exists():
            ckpt.mkdir(parents=True, exist_ok=True)
            write_checkpoint(spec, ckpt, device, args.seed)
        gen = torch.Generator().manual_seed(args.seed + 1)
        shape = (spec["batch"], spec["seq"])
        batches = [torch.randint(0, spec["vocab_size"], shape, generator=gen).to(device) for _ in range(4)]
        rows = []
        for key in args.cases:
            print(f"bench_e2e [{case}] case {key}: {CASES[key]} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_case(key, ckpt, spec, args, device, batches))
            except (ImportError, RuntimeError, ValueError, TypeError) as err:  # bnb/PEFT missing, OOM, ...
                rows.append({"case": key, "label": CASES[key], "ran": False,
                             "skipped": f"{type(err).__name__}: {err}"[:500]})  # fmt: skip
                _free(device)
    finally:
        if args.ckpt_dir is None:
            shutil.rmtree(ckpt, ignore_errors=True)
    checks = evaluate_targets(case, rows)
    info = meta(case, spec, args, device)
    info.update(targets=checks, loss_agreement=loss_agreement(rows),
                ran=[r["case"] for r in rows if r["ran"]],
                skipped={r["case"]: r["skipped"] for r in rows if not r["ran"]})  # fmt: skip
    json_path, png_path = args.out / f"bench_e2e_{case}.json", args.out / f"bench_e2e_{case}.png"
    write_json(json_path, info, rows)
    plotted = plot(png_path, case, rows, info)
    print(format_table(case, rows, checks))
    print(f"loss₀ agreement: {info['loss_agreement']}")
    print(f"wrote {json_path}" + (f" and {png_path.name}" if plotted else ""))
    return 0 if all(r["ran"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
