"""The end-to-end benchmark on a CPU with a real model: SmolLM2-135M trained four ways, one process each.

    lora-core bench e2e --device cpu --model smollm2      (or: python benchmarks/bench_e2e.py ...)
    lora-core bench e2e --device cpu --model tiny         the same harness on a 2-layer random Llama (tests)

The cases are ``lora_core.bench.e2e_cases``' — a lora_core QLoRA, b PEFT + bitsandbytes
(``BitsAndBytesConfig`` nf4 + double quant, ``prepare_model_for_kbit_training``, the model's own loss),
c lora_core LoRA, d PEFT LoRA — built by the same code, here in float32 (bitsandbytes computes in float32
too): SmolLM2-135M-Instruct
(``lora_core.models.pretrained``, 30 layers, hidden 576, vocabulary 49152, tied head), LoRA r = 16, α = 32
on q, k, v, o, gate, up, down of every layer, fused AdamW, batches of 4 × 128 tokens of Shakespeare (the same
batches for every case; random tokens when the ``shakespeare`` package is missing, and for ``tiny``).

How it measures, on a machine other jobs may share:

- **One process per case** (``python -m lora_core.bench.e2e_cpu --worker KEY``), all with the same torch
  thread count (``--threads``, default: this process's ``torch.get_num_threads()``). A worker loads its
  model, runs the warm-up steps, then waits on its stdin; only one worker computes at any time.
- **Interleaved rounds**: round i runs ``--steps-per-round`` timed steps of every case, the case order
  rotated each round (a b c d, b c d a, ...), so a burst of load from elsewhere lands on every case alike.
  tokens/s = tokens per step ÷ the median wall time of a timed step (``perf_counter`` around each step:
  forward, loss, backward, ``AdamW.step``, ``zero_grad``), robust to bursts of load; the mean (timed
  tokens ÷ timed seconds), per-round tokens/s, the per-round ratios a/b and c/d (the spread) and the
  median CPU seconds per step (``process_time``) are recorded too.
- **malloc**: by default the lora_core cases run with ``lc.train``'s setting on a CPU (glibc keeps what a
  step frees for the next, ``lora_core.training.host_memory``) and the PEFT cases with glibc's default:
  what each library's users get. ``--keep-freed-memory all`` gives every case the setting (the
  computation alone), ``none`` none; each row records its ``malloc``.
- **Peak memory** = the worker's own peak resident set (``VmHWM``), measured over training only: after
  loading, every worker returns freed heap to the OS (``malloc_trim``) and resets the high-water mark
  (``/proc/self/clear_refs``); the load peak is recorded apart. Where the reset is not allowed, the peak
  is the whole process's (``memory_kind`` says which).

Writes ``bench_e2e_<model>.json`` (device, load average before/after, versions, config, every number) and
``bench_e2e_<model>.png`` under ``--out``; prints the table, the ratio spread and, for ``smollm2``, the
targets (a ≥ 1.2 × b, c ≥ 1.1 × d, each at no more peak memory) as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import torch

from lora_core.bench import e2e_cases as e2e
from lora_core.bench.common import write_json
from lora_core.bench.e2e_report import MALLOC_CASES, evaluate_targets, format_table, loss_agreement, plot
from lora_core.training.host_memory import keep_freed_memory

MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {"batch": 4, "seq": 128, "dtype": "float32", "grad_ckpt": False},
    "tiny": dict(e2e.MODELS["tiny"], dtype="float32"),
}
LORA_CORE_CASES = ("a", "c")  # the cases lc.train would run: they get its malloc setting by default
MARK = "@@e2e_cpu "  # prefixes the workers' protocol lines on stdout (libraries may print there too)
GIB = 2**30


# ----------------------------------------------------------------------------- memory of this process


def _status_kib(field: str) -> int | None:
    """``VmHWM`` / ``VmRSS`` of this process in KiB from /proc/self/status (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_and_reset_peak() -> str:
    """Give freed heap back to the OS and restart the peak-RSS count; returns what the peak will mean."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: reset VmHWM to the current RSS
        return "VmHWM after loading (peak resident set during training)"
    except OSError:
        return "VmHWM of the whole process (the reset was not allowed): includes loading"


# ----------------------------------------------------------------------------- the worker (one case)


def _send(payload: dict[str, Any]) -> None:
    print(MARK + json.dumps(payload), flush=True)


def worker(args: argparse.Namespace) -> int:
    """Load case ``args.worker``, warm up, then run the steps the parent asks for (one JSON line each)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    e2e.quiet_libraries()
    spec = json.loads(args.spec)
    batches = torch.load(args.data)
    key, device = args.worker, torch.device("cpu")
    model, loss_fn, opt, params, load_s = e2e.build_case(key, Path(args.ckpt), spec, args, device)
    load_peak = _status_kib("VmHWM")
    memory_kind = _release_and_reset_peak()
    resident = _status_kib("VmRSS")
    which = args.keep_freed_memory
    keep = which == "all" or (which == "lora_core" and key in LORA_CORE_CASES)
    malloc = (keep_freed_memory() or "kept freed memory") if keep else "glibc's default"
    losses = [
        float(e2e.train_step(model, loss_fn, opt, batches[i % len(batches)])) for i in range(args.warmup)
    ]
    _send({"ready": True, "load_s": load_s, "trainable_params": sum(p.numel() for p in params),
           "load_peak_kib": load_peak, "rss_after_load_kib": resident, "memory_kind": memory_kind,
           "warmup_losses": losses, "threads": torch.get_num_threads(), "malloc": malloc,
           "dtypes": {"embed": e2e.param_dtype(model, "embed_tokens.weight"),
                      "lm_head": e2e.param_dtype(model, "lm_head.weight"),
                      "final_norm": e2e.param_dtype(model, "model.norm.weight")}})  # fmt: skip
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "steps":
            times, cpu, step_losses = [], [], []
            for i in range(cmd["start"], cmd["start"] + cmd["n"]):
                t0, c0 = time.perf_counter(), time.process_time()
                loss = e2e.train_step(model, loss_fn, opt, batches[i % len(batches)])
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                step_losses.append(float(loss))
            _send({"step_s": times, "cpu_s": cpu, "losses": step_losses})
        elif cmd["cmd"] == "finish":
            peak = _status_kib("VmHWM")  # read before profiling, which allocates its own records
            profile = None
            if cmd.get("profile"):

                def step(i: int) -> torch.Tensor:
                    return e2e.train_step(model, loss_fn, opt, batches[i % len(batches)])

                profile = e2e.profile_steps(step, False, Path(cmd["profile"]))
            _send({"peak_kib": peak, "profile": profile})
            return 0
    return 1  # the parent went away


# ----------------------------------------------------------------------------- the parent


class _Worker:
    """One case's process: start, ask for steps, read the marked JSON replies."""

    def __init__(self, key: str, argv: list[str], log: Path) -> None:
        self.key, self.log = key, log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "w") as err:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lora_core.bench.e2e_cpu", "--worker", key, *argv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                cwd=log.parent,  # not the repository root: its kernels/ folder would shadow a PyPI package
            )  # fmt: skip

    def ask(self, cmd: dict[str, Any] | None) -> dict[str, Any]:
        if cmd is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        for line in out:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        tail = self.log.read_text(errors="replace")[-400:].strip().replace("\n", " | ")
        raise RuntimeError(f"worker {self.key} exited with {self.proc.returncode}: {tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _batches(
    model: str, folder: Path, spec: dict[str, Any], n: int, seed: int
) -> tuple[list[torch.Tensor], str]:
    """``n`` batches (batch, seq) of token ids: Shakespeare through the model's tokenizer, else random."""
    shape = (spec["batch"], spec["seq"])
    if model == "smollm2":
        from transformers import AutoTokenizer

        from lora_core.models.pretrained import shakespeare_texts

        try:
            texts = shakespeare_texts()
        except FileNotFoundError:
            texts = []
        if texts:
            tok = AutoTokenizer.from_pretrained(str(folder))
            need = n * shape[0] * shape[1]
            ids: list[int] = []
            for path in texts:
                ids += tok(path.read_text(errors="replace"))["input_ids"]
                if len(ids) >= need:
                    return list(
                        torch.tensor(ids[:need]).view(n, *shape).unbind(0)
                    ), f"Shakespeare ({texts[0].name}, ...)"
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = spec.get("vocab_size", 49152)
    return [torch.randint(0, vocab, shape, generator=gen) for _ in range(n)], "random token ids"


def _summarise(key: str, ready: dict[str, Any], rounds: list[list[float]], cpu_s: list[float],
               losses: list[float], final: dict[str, Any], tokens_per_step: int,
               ) -> dict[str, Any]:  # fmt: skip
    """One case's row. ``tokens_per_s`` is tokens per *median* step (robust to the bursts of load other jobs
    cause); ``tokens_per_s_mean`` is timed tokens ÷ total timed seconds."""
    step_s = [t for r in rounds for t in r]
    per_round = [tokens_per_step * len(r) / sum(r) for r in rounds]
    kib = 1024 / GIB
    return {
        "case": key, "label": e2e.case_label(key, torch.float32), "ran": True,
        "tokens_per_s": tokens_per_step / statistics.median(step_s),
        "tokens_per_s_mean": tokens_per_step * len(step_s) / sum(step_s),
        "tokens_per_s_rounds": per_round,
        "tokens_per_s_min": min(per_round), "tokens_per_s_max": max(per_round),
        "step_ms_median": 1e3 * statistics.median(step_s), "step_ms": [1e3 * t for t in step_s],
        "cpu_s_per_step_median": statistics.median(cpu_s),
        "peak_gib": final["peak_kib"] * kib if final.get("peak_kib") else None,
        "load_peak_gib": ready["load_peak_kib"] * kib if ready.get("load_peak_kib") else None,
        "rss_after_load_gib": ready["rss_after_load_kib"] * kib if ready.get("rss_after_load_kib") else None,
        "memory_kind": ready["memory_kind"], "malloc": ready.get("malloc"), "threads": ready["threads"],
        "load_s": ready["load_s"],
        "trainable_params": ready["trainable_params"],
        "loss_first": (ready["warmup_losses"] or losses)[0], "loss_last": losses[-1],
        "profile": final.get("profile"), "dtypes": ready["dtypes"],
    }  # fmt: skip


def _ratios(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, float] | None:
    """x/y tokens/s per round (the same round: the same machine state) as median, min, max."""
    by = {r["case"]: r for r in rows if r.get("ran")}
    if x not in by or y not in by:
        return None
    per = [a / b for a, b in zip(by[x]["tokens_per_s_rounds"], by[y]["tokens_per_s_rounds"])]
    return {"overall": by[x]["tokens_per_s"] / by[y]["tokens_per_s"], "median_round": statistics.median(per),
            "min_round": min(per), "max_round": max(per)}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """The parent: prepare the model and data once, start one worker per case, interleave the rounds."""
    model = args.model
    spec = dict(MODELS[model])
    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_cpu_"))
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    try:
        if model == "smollm2":
            from lora_core.models.pretrained import smollm2_folder

            folder = smollm2_folder()
            spec["vocab_size"] = json.loads((folder / "config.json").read_text())["vocab_size"]
        else:
            folder = tmp / "ckpt"
            e2e.write_checkpoint(spec, folder, torch.device("cpu"), args.seed)
        batches, data = _batches(model, folder, spec, 8, args.seed)
        torch.save(batches, tmp / "batches.pt")
        argv = ["--ckpt", str(folder), "--data", str(tmp / "batches.pt"), "--spec", json.dumps(spec),
                "--threads", str(threads), "--warmup", str(args.warmup), "--r", str(args.r),
                "--alpha", str(args.alpha), "--dropout", str(args.dropout), "--lr", str(args.lr),
                "--seed", str(args.seed), "--keep-freed-memory", args.keep_freed_memory]  # fmt: skip
        if args.loss_chunk is not None:
            argv += ["--loss-chunk", str(args.loss_chunk)]
        workers, ready, failed = {}, {}, {}
        for key in args.cases:  # one at a time: loading peaks do not overlap
            print(
                f"bench_e2e [{model}, cpu] loading case {key}: {e2e.CASES[key]} ...",
                file=sys.stderr,
                flush=True,
            )
            w = _Worker(key, argv, tmp / f"worker_{key}.log")
            try:
                ready[key], workers[key] = w.ask(None), w
            except RuntimeError as err:
                failed[key] = str(err)[:500]
                w.close()
        rounds: dict[str, list[list[float]]] = {k: [] for k in workers}
        cpu_s: dict[str, list[float]] = {k: [] for k in workers}
        losses: dict[str, list[float]] = {k: [] for k in workers}
        order = list(workers)
        for i in range(args.rounds):
            for key in order[i % len(order) :] + order[: i % len(order)]:  # rotate: a b c d, b c d a, ...
                reply = workers[key].ask({"cmd": "steps", "n": args.steps_per_round,
                                          "start": args.warmup + i * args.steps_per_round})  # fmt: skip
                rounds[key].append(reply["step_s"])
                cpu_s[key] += reply["cpu_s"]
                losses[key] += reply["losses"]
            print(f"bench_e2e [{model}, cpu] round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        tokens_per_step = spec["batch"] * spec["seq"]
        for key in args.cases:
            if key in failed:
                label = e2e.case_label(key, torch.float32)
                rows.append({"case": key, "label": label, "ran": False, "skipped": failed[key]})
                continue
            prof = str(args.out / f"bench_e2e_{model}_profile_{key}.txt") if args.profile else None
            final = workers[key].ask({"cmd": "finish", "profile": prof})
            workers[key].close()
            rows.append(
                _summarise(key, ready[key], rounds[key], cpu_s[key], losses[key], final, tokens_per_step)
            )
    finally:
        for w in locals().get("workers", {}).values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    checks = evaluate_targets(model, rows)
    meta = e2e.meta(model, spec, args, torch.device("cpu"))
    meta.update(
        device=f"CPU: {_cpu_name()}, {os.cpu_count()} cores, {threads} torch threads per case",
        dtype=spec["dtype"], data=data, threads=threads, rounds=args.rounds,
        steps_per_round=args.steps_per_round, steps=args.rounds * args.steps_per_round,
        load_average_before=load_before, load_average_after=os.getloadavg(),
        timer="perf_counter around each timed step; tokens/s from the median step; rounds interleave the "
        "cases (one process each, one at a time)",
        memory="peak resident set of each case's own process (VmHWM), reset after loading (memory_kind)",
        keep_freed_memory=args.keep_freed_memory,
        ratios={"a_over_b": _ratios(rows, "a", "b"), "c_over_d": _ratios(rows, "c", "d")},
        targets=checks, loss_agreement=loss_agreement(rows), ran=[r["case"] for r in rows if r["ran"]],
        skipped={r["case"]: r["skipped"] for r in rows if not r["ran"]},
    )  # fmt: skip
    json_path, png_path = args.out / f"bench_e2e_{model}.json", args.out / f"bench_e2e_{model}.png"
    write_json(json_path, meta, rows)
    plotted = plot(png_path, model, rows, meta)
    print(format_table(model, rows, checks))
    for name, r in meta["ratios"].items():
        if r is not None:
            print(f"{name.replace('_over_', '/')}: {r['overall']:.3f} (median steps); per round median "
                  f"{r['median_round']:.3f}, "
                  f"min {r['min_round']:.3f}, max {r['max_round']:.3f} ({args.rounds} rounds)")  # fmt: skip
    print(f"load average before {load_before}, after {meta['load_average_after']}; loss₀ agreement: "
          f"{meta['loss_agreement']}")  # fmt: skip
    print(f"wrote {json_path}" + (f" and {png_path.name}" if plotted else ""))
    return 0 if all(r["ran"] for r in rows) else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_e2e_cpu worker")
    p.add_argument("--worker", choices=list(e2e.CASES), required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    for name, kind in (
        ("--r", int),
        ("--alpha", float),
        ("--dropout", float),
        ("--lr", float),
        ("--seed", int),
    ):
        p.add_argument(name, type=kind, required=True)
    p.add_argument("--loss-chunk", type=int, default=None)
    p.add_argument("--keep-freed-memory", choices=list(MALLOC_CASES), default="lora_core")
    return p


if __name__ == "__main__":
    sys.exit(worker(_worker_parser().parse_args()))
