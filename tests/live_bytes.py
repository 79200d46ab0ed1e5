"""Bytes of live tensors, counted without the allocator or timing (a test helper).

`PeakLiveBytes` is a ``TorchDispatchMode`` that tracks the storage of every tensor an op returns (a DTensor:
its local shard; meta tensors hold nothing) until it is freed, and keeps the most bytes alive at once.
Tensors made without an op on this thread (transformers' threaded loader, ``safetensors``' mapped reads)
are invisible to it: `model_storages` lists what a model holds, so a test can check that none escaped.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t  # a DTensor's shard on this rank


def storage_key(t: torch.Tensor) -> int:
    return StorageWeakRef(_local(t).untyped_storage()).cdata


class PeakLiveBytes(TorchDispatchMode):
    """``peak``: the most bytes alive at once among the storages ops returned; ``live``: those alive now
    (``{storage key: (weak reference, bytes)}``), ``initial`` counted as alive from the start."""

    def __init__(self, initial: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        for t in initial:
            self._add(t)
        self.peak = self.now()

    def _add(self, t: torch.Tensor) -> None:
        t = _local(t)
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            ref = StorageWeakRef(t.untyped_storage())
            self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())

    def now(self) -> int:
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.now())
        return out


def model_storages(model: nn.Module) -> dict[int, int]:
    """``{storage key: bytes}`` of every tensor ``model`` holds: parameters (local shards), buffers, and
    the NF4 tensors of its frozen bases; FSDP's freed gathered copies hold 0 bytes and are left out."""
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        q = getattr(getattr(m, "base", None), "q", None)
        if q is not None:
            tensors += list(q.tensors().values())
    out = {}
    for t in tensors:
        local = _local(t)
        if local.device.type != "meta" and local.untyped_storage().nbytes():
            out[storage_key(t)] = local.untyped_storage().nbytes()
    return out
