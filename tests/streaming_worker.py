"""One rank of ``test_streaming``'s torchrun check: ``python streaming_worker.py FOLDER OUT`` under torchrun.

Loads FOLDER twice, the same seed before each: the reference (``from_pretrained`` → ``apply_lora`` →
``shard_model``) and ``lc.load_pretrained(fsdp=True, cpu_offload=True)`` under a live-bytes tally (QLoRA on
every linear layer; then dense LoRA on two blocks of six, without the tally), then writes
``OUT/rank{R}.json``: whether the local shards, logits and adapter gradients are equal, the frozen bytes
each holds, the streamed load's peak, and the sizes the test compares them with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from live_bytes import PeakLiveBytes
from transformers import AutoModelForCausalLM

import lora_core as lc
from lora_core.training.fsdp import frozen_bytes, shard_model


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def same_shards(ref: torch.nn.Module, model: torch.nn.Module) -> bool:
    """The same state dict keys, and this rank's tensors (shards, adapters) equal, bit for bit."""
    a, b = ref.state_dict(), model.state_dict()
    return list(a) == list(b) and all(torch.equal(local(a[k]), local(b[k])) for k in a)


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = lc.LoraConfig(r=4, alpha=8, target_modules="all-linear", quantize="nf4", dropout=0.0)

    dense = AutoModelForCausalLM.from_pretrained(str(folder))
    dense_bytes = sum(p.nbytes for p in dense.parameters())
    block_bytes = sum(p.nbytes for p in dense.model.layers[0].parameters())
    torch.manual_seed(1)
    ref = lc.apply_lora(dense, cfg)
    whole = frozen_bytes(ref)
    shard_model(ref, cpu_offload=True)

    lc.quantize_nf4(torch.randn(256), 64, True)  # the 8-bit map's lookup table: built once per process
    torch.manual_seed(1)
    mode = PeakLiveBytes()
    with mode:
        model = lc.load_pretrained(folder, cfg, fsdp=True, cpu_offload=True)

    shards_equal = same_shards(ref, model)
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for m in (ref, model):
        out_logits = m(ids).logits
        out_logits.float().square().mean().backward()
        logits.append(out_logits.detach())
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (ref, model)]
    report = {
        "shards_equal": shards_equal,
        "logits_equal": torch.equal(*logits),
        "grads_equal": len(grads[0]) > 0 and all(torch.equal(x, y) for x, y in zip(*grads)),
        "logits": logits[1][0, 0, :4].tolist(),  # the same batch on both ranks: the same logits
        "frozen_bytes_whole": whole,
        "frozen_bytes_reference": frozen_bytes(ref),
        "frozen_bytes_streamed": frozen_bytes(model),
        "adapter_bytes": sum(p.nbytes for p in model.parameters() if p.requires_grad),
        "dense_bytes": dense_bytes,
        "block_bytes": block_bytes,
        "peak_streamed": mode.peak,
    }
    # dense LoRA on two blocks only: the other four hold no frozen base, so they are the root's (as in
    # shard_model), not units of their own
    partial = lc.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], layers_to_transform=[0, 3])
    torch.manual_seed(2)
    ref = shard_model(lc.apply_lora(AutoModelForCausalLM.from_pretrained(str(folder)), partial))
    torch.manual_seed(2)
    model = lc.load_pretrained(folder, partial, fsdp=True)
    a, b = ref.state_dict(), model.state_dict()
    report["partial_shards_equal"] = list(a) == list(b) and all(
        torch.equal(local(a[k]), local(b[k])) for k in a
    )
    report["partial_logits_equal"] = torch.equal(ref(ids).logits, model(ids).logits)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
