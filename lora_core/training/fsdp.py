"""Fully sharded data parallelism over the frozen base (FSDP2): QLoRA on models larger than one device.

DDP (the default under ``torchrun``) gives every rank the whole frozen base. ``TrainConfig(fsdp=True)``
shards it instead, with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), as Answer.AI's FSDP+QLoRA
and torchtune's QLoRA do::

    rank r keeps      1/W of every frozen tensor: NF4 packed bytes and block scales, dense weights, norms
    unit U runs       all-gather U's tensors (NF4: the packed bytes, ≈0.52 byte/param, never a dequantized
                      copy) → forward → free; the same again for U's backward
    adapters          whole on every rank; their gradients are averaged over ranks once per step (as DDP)
    optimizer state   follows the adapters: whole on every rank, saved by rank 0 in ``checkpoint.pt``

**Units** (`fsdp_units`). Each block of the model's layer stack (an element of an ``nn.ModuleList`` that
holds frozen bases: a transformer's decoder layers) is one FSDP unit, gathered whole while it computes, as
torchtune and Answer.AI wrap decoder layers: one collective per block rather than one per linear layer.
Outside the blocks, a module holding a frozen base (`LoRALinear`, `NF4Linear`; ``lora_core.lora.bases``),
an embedding or a linear head is a unit of its own. The model itself is the root unit: it shards what is
left (final norm, tied embeddings) and keeps it gathered for the step.

**Why the adapters are replicated.** They are ~0.1–1% of the parameters (r = 16 on every linear layer of a
70B Llama: ≈0.21 G parameters; fp32 weights, gradients and AdamW's two moments: ≈3.3 GB per rank).
Replicated, they cost one all-reduce per step and no per-unit collective, and the training state stays
plain tensors: ``checkpoint.pt`` (written by rank 0), its checks and the exact resume are those of DDP.
Sharding them (and saving through ``torch.distributed.checkpoint``) would save ≈3.3 GB × (1 − 1/W) per rank.

**How a base sees the gathered tensors.** FSDP2 swaps a module's *registered Parameters* (sharded DTensor ↔
gathered tensor) in its hooks, but a base object keeps its own references. So `shard_model` registers each
base's `storage()` as frozen Parameters of its module (a dense base's ``weight`` already is one; an NF4
base's fields become ``fsdp_base_packed``, ``fsdp_base_absmax``, ``fsdp_base_nested_absmax``), and a
forward pre-hook, which runs after FSDP's all-gather, `rebind`s the base to the gathered tensors. FSDP2
reuses the gathered Parameter objects (it frees and re-allocates their storage), so what a layer's forward
saved for backward (the packed `NF4Tensor`, the dense weight) is whole again when FSDP re-gathers the layer
for its backward. FSDP2 gathers tensors of mixed dtypes (uint8 codes, float32 scales) as bytes.

Under FSDP the causal-LM loss goes through ``model(...).logits``: the chunked loss calls the decoder and
reads the head's weight itself, past the hooks in which FSDP gathers them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora_core.lora.base_protocol import HoldsFrozenBase

STORAGE_PREFIX = "fsdp_base_"  # registered names of a base's tensors that are not Parameters already


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_model` (or anyone's ``fully_shard``) has made ``model`` an FSDP2 root."""
    if not dist.is_available():  # a torch built without distributed has no FSDP
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def frozen_base_holders(model: nn.Module) -> list[HoldsFrozenBase]:
    """The modules of ``model`` that hold a frozen base (LoRA layers, frozen NF4 layers)."""
    return [m for m in model.modules() if isinstance(m, HoldsFrozenBase)]


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules `shard_model` makes FSDP units (the root aside), none inside another: the outermost
    blocks of ``nn.ModuleList`` layer stacks that hold a frozen base, then, outside them, every frozen-base
    holder, ``nn.Embedding`` and ``nn.Linear`` (the embeddings and the head: as units they are gathered only
    while they compute, not for the whole step) unless it shares a Parameter with another module (tied
    embeddings stay together in the root)."""
    holders = frozen_base_holders(model)
    holder_ids = {id(h) for h in holders}
    blocks = [b for stack in model.modules() if isinstance(stack, nn.ModuleList) for b in stack]
    blocks = [b for b in blocks if any(id(m) in holder_ids for m in b.modules())]
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}  # inside another block
    units = [b for b in blocks if id(b) not in inner]
    covered = {id(m) for b in units for m in b.modules()}
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    for m in model.modules():
        if (
            m is model
            or id(m) in covered
            or not (id(m) in holder_ids or isinstance(m, (nn.Embedding, nn.Linear)))
        ):
            continue
        if any(owners[id(p)] > 1 for p in m.parameters(recurse=False)):  # tied: one unit must hold both
            continue
        units.append(m)
        covered |= {id(sub) for sub in m.modules()}
    return units


def _register_storage(module: HoldsFrozenBase) -> dict[str, str]:
    """Make the base's tensors frozen Parameters of ``module``; ``{storage name: parameter name}``."""
    names = {}
    for field, t in module.base.storage().items():
        already = next((n for n, p in module._parameters.items() if p is t), None)  # a dense ``weight``
        if already is None:
            already = STORAGE_PREFIX + field
            module.register_parameter(already, nn.Parameter(t, requires_grad=False))
        names[field] = already
    return names


def _rebinder(names: dict[str, str]) -> Callable[[nn.Module, Any], None]:
    """A forward pre-hook pointing ``module.base`` at the module's current Parameters (gathered by FSDP)."""

    def rebind(module: nn.Module, args: Any) -> None:
        module.base.rebind({field: module._parameters[name] for field, name in names.items()})

    return rebind


def _drop_unsharded_entries(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    """State-dict post-hook of an NF4 holder: its ``weight*`` entries (bitsandbytes' keys, built from the
    base's last gathered tensors, whose storage FSDP has freed) go; its ``fsdp_base_*`` shards stay."""
    for key in [k for k in state if k == prefix + "weight" or k.startswith(prefix + "weight.")]:
        del state[key]


def shard_model(model: nn.Module, *, cpu_offload: bool = False) -> nn.Module:
    """Shard ``model``'s frozen tensors over the ranks of the default process group (FSDP2), in place.

    Trainable parameters (``requires_grad``: the adapters) are left whole on every rank; average their
    gradients with `average_gradients` after backward. Calling it again on a sharded model does nothing.

    Args:
        model: on its device, adapters applied, under an initialized ``torch.distributed`` (``torchrun``).
        cpu_offload: keep the shards in CPU memory and copy a layer's shard to the device only to gather
            it (FSDP2's ``CPUOffloadPolicy``); on a CPU-only run the shards are already there.

    Raises:
        ValueError: ``torch.distributed`` is not initialized.
    """
    if is_sharded(model):
        return model
    Sharder(next(model.parameters()).device, cpu_offload=cpu_offload).shard_root(model)
    return model


class Sharder:
    """`shard_model` one unit at a time, for a model sharded while it is built (``lc.load_pretrained``
    shards each decoder block as soon as it is loaded): `shard_unit` on each block of `fsdp_units` once its
    adapters are marked trainable, then `shard_root` on the model, which shards the units left and the root.
    The result is `shard_model`'s.

    Raises:
        ValueError: ``torch.distributed`` is not initialized.
    """

    def __init__(self, device: torch.device, *, cpu_offload: bool = False) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "shard_model needs an initialized torch.distributed process group (run under torchrun)"
            )
        self.mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        self.offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
        self.done: set[int] = set()  # the holders rebound to their shards (ids)

    def shard_unit(self, unit: nn.Module, *, root: bool = False) -> None:
        """``fully_shard`` one unit (its frozen-base holders' tensors registered as Parameters first, and
        their bases rebound to the shards right after); a unit with nothing frozen is left alone."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        holders = [h for h in frozen_base_holders(unit) if id(h) not in self.done]  # not in a unit before
        names = {h: _register_storage(h) for h in holders}  # before FSDP sees the params
        params = list(unit.parameters())
        own = {p for p in params if p.requires_grad}
        if root or (len(own) < len(params) and not isinstance(unit, FSDPModule)):
            fully_shard(unit, mesh=self.mesh, offload_policy=self.offload, ignored_params=own)
        for holder, held in names.items():  # FSDP's hooks on a unit run before the holder's own forward
            hook = _rebinder(held)
            hook(holder, ())  # drop the base's references to the whole tensors: only the shards stay
            holder.register_forward_pre_hook(hook)
            if "weight" not in held.values():  # an NF4 base: its state dict entries are the shards
                holder.register_state_dict_post_hook(_drop_unsharded_entries)
            self.done.add(id(holder))

    def shard_root(self, model: nn.Module) -> None:
        """The units of ``model`` not sharded yet, then ``model`` itself (the root: what is left)."""
        for unit in fsdp_units(model):
            self.shard_unit(unit)
        self.shard_unit(model, root=True)


@torch.no_grad()
def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated ``params`` over all ranks (what DDP does), one all-reduce per
    dtype. Every rank must hold gradients for the same parameters (they run the same model)."""
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s frozen tensors held by this process: every frozen Parameter (its local shard when
    sharded) and every tensor a frozen base references, each counted once; a gathered tensor FSDP has freed
    counts 0. Sharded over W ranks this is ≈ 1/W of the unsharded figure."""
    tensors = [p for p in model.parameters() if not p.requires_grad]
    tensors += [t for m in frozen_base_holders(model) for t in m.base.storage().values()]
    sizes = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard: this rank's part
        if local.untyped_storage().nbytes():
            sizes[(local.device, local.data_ptr(), local.numel())] = local.numel() * local.element_size()
    return sum(sizes.values())


__all__ = [
    "Sharder",
    "average_gradients",
    "frozen_base_holders",
    "frozen_bytes",
    "fsdp_units",
    "is_sharded",
    "shard_model",
]
