"""lora_core.training.host_memory: glibc keeps what a CPU step frees, so the next step faults no new pages.

Every check runs in a fresh Python process: malloc's settings are process-wide and cannot be undone, and
the test process itself may already have them (any CPU ``lc.train`` before this file sets them). Page
faults are counted with ``getrusage`` around a loop that allocates and frees one 64 MiB tensor: by
default glibc serves a block that size with a fresh ``mmap`` every time (32 MiB is the most its dynamic
threshold reaches), so each pass faults in all 16,384 of its pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
    reason="glibc's malloc only",
)

PAGES = (64 << 20) // os.sysconf("SC_PAGESIZE")  # pages of one 64 MiB tensor

PROBE = """
import json, resource, sys, torch
from lora_core.training import host_memory

def faults_per_pass(passes=6, warm_up=True):
    for _ in range(2 if warm_up else 0):  # the first pass starts torch's threads: what they allocate lands
        torch.ones(16 << 20)              # above the block, so the second pass takes a new one
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(passes):
        torch.ones(16 << 20)  # 64 MiB, freed at once
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / passes

out = {}
"""


def run_probe(body: str, tmp_path, **env: str) -> dict:
    """Run PROBE + ``body`` in a fresh interpreter (cwd outside the repo); it fills ``out``."""
    code = PROBE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LORA_CORE_KEEP"))}
    clean.pop("GLIBC_TUNABLES", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**clean, **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_and_given_back_on_release(tmp_path):
    out = run_probe(
        """
        out["before"] = faults_per_pass()
        out["reason"] = host_memory.keep_freed_memory()
        out["kept"] = faults_per_pass()
        out["again"] = host_memory.keep_freed_memory()
        out["released"] = host_memory.release_freed_memory()
        out["after_release"] = faults_per_pass(1, warm_up=False)  # the first pass after it faults again
        """,
        tmp_path,
    )
    assert out["before"] >= 0.9 * PAGES, out  # the default: every pass maps and faults in fresh pages
    assert out["reason"] is None and out["again"] is None  # applied; a second call is a no-op
    assert out["kept"] <= 0.05 * PAGES, out  # the freed block is reused
    assert out["after_release"] >= 0.9 * PAGES, out  # release gave the pages back to the kernel


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"LORA_CORE_KEEP_FREED_MEMORY": "0"}, "LORA_CORE_KEEP_FREED_MEMORY=0"),
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, "GLIBC_TUNABLES"),
    ],
)
def test_the_opt_out_and_the_users_own_malloc_settings_win(tmp_path, env, reason):
    out = run_probe(
        """
        out["reason"] = host_memory.keep_freed_memory()
        out["faults"] = faults_per_pass()
        """,
        tmp_path,
        **env,
    )
    assert out["reason"] is not None and reason in out["reason"]
    if "MALLOC_MMAP_THRESHOLD_" not in env:  # nothing here raised the mmap threshold: every pass faults
        assert out["faults"] >= 0.9 * PAGES


def test_train_on_a_cpu_keeps_freed_memory_and_gives_it_back_at_the_end(tmp_path):
    body = """
        import lora_core as lc
        from tests_tiny import tiny_lora_model_and_data
        model, data = tiny_lora_model_and_data()
        lc.train(model, data, config=lc.TrainConfig(max_steps=2, batch_size=2, progress=False))
        out["faults"] = faults_per_pass()
        """
    (tmp_path / "tests_tiny.py").write_text(TINY)
    kept = run_probe(body, tmp_path)
    opted_out = run_probe(body, tmp_path, LORA_CORE_KEEP_FREED_MEMORY="0")
    assert kept["faults"] <= 0.05 * PAGES  # lc.train left the thresholds raised
    assert opted_out["faults"] >= 0.9 * PAGES


def test_lora_trainer_on_a_cpu_keeps_freed_memory(tmp_path):
    pytest.importorskip("transformers")
    body = """
        import lora_core as lc
        from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        from lora_core.training.hf_trainer import LoraTrainer
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2))
        lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        ids = torch.randint(0, 64, (8, 16))
        data = [{"input_ids": row, "labels": row} for row in ids]
        args = TrainingArguments(output_dir="out", max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                                 report_to=[], save_strategy="no", disable_tqdm=True)
        LoraTrainer(model=model, args=args, train_dataset=data).train()
        out["faults"] = faults_per_pass()
        """
    assert run_probe(body, tmp_path)["faults"] <= 0.05 * PAGES


TINY = """
import torch
import lora_core as lc

def tiny_lora_model_and_data():
    torch.manual_seed(0)
    model = lc.TinyCausalLM(lc.TinyConfig(vocab_size=64))
    lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    return model, data
"""
