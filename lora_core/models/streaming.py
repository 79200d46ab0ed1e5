"""Streamed loading: a transformers checkpoint becomes a LoRA / QLoRA model without ever being whole.

``lc.load_pretrained(folder, cfg, device=, dtype=, fsdp=, cpu_offload=)`` returns, bit for bit, what ::

    model = lc.apply_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device), cfg)
    shard_model(model, cpu_offload=cpu_offload)          # fsdp=True (lora_core.training.fsdp)

returns (module tree, state dict: NF4 bytes and scales, adapters; logits), but that path holds the dense
model on ``device`` (a 70B model: 140 GB of bf16) before ``apply_lora`` quantizes it. Here:

1. **An empty model.** The model is built from ``config.json`` on the ``meta`` device (accelerate's
   ``init_empty_weights(include_buffers=False)``: parameters have shapes and dtypes, no memory; buffers
   computed in ``__init__``, such as the rotary ``inv_freq``, are real), in the dtype ``from_pretrained``
   would choose; tied parameters (``lm_head`` = ``embed_tokens``) are tied there, so one read fills both.
2. **Everything checked first.** ``apply_lora``'s plan is made on the empty model (`plan_surgery`: the
   same checks, the same order) and every parameter's tensor is found in the checkpoint's headers
   (``model.safetensors`` or the shards of ``model.safetensors.index.json``) with its shape, before a
   single weight is read: bad input raises ``ValueError`` and nothing is returned.
3. **One module at a time**, in ``named_modules`` order: its tensors are read (``safe_open``, one tensor
   at a time), cast to the parameter's dtype and put on ``device``; a target is wrapped at once (QLoRA
   quantizes its weight there, and the dense copy is dropped), a ``quantize_base`` layer is quantized at
   once. The targets are wrapped in the plan's order, so adapter inits draw the RNG as ``apply_lora`` does
   (and the inits that read the weight, PiSSA / OLoRA / LoftQ, see it loaded).
4. **FSDP** (``fsdp=True``, under ``torchrun``): each decoder block is sharded (``fully_shard``, as
   `shard_model` does) as soon as its last module is done; the embeddings, head and root last.

Peak memory of a process (``device``; the host's too, as nothing is staged there): the finished model (its
shards under FSDP) + one dense layer weight and the quantizer's temporaries (≤ 17 bytes an element of that
weight, at most 4 M elements at a time); under FSDP + the block being sharded, whole in NF4, until its
shards are cut. A 70B Llama on 2 ranks: ≈ 17 GiB of NF4 shards each + ≈ 0.4 GiB (a block in NF4) +
≈ 0.44 GiB (one bf16 MLP weight), where the reference path needs 140 GB on one device.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_core.lora.base_protocol import HoldsFrozenBase
from lora_core.lora.config import LoraConfig
from lora_core.lora.quantize_base import quantize_frozen_linears
from lora_core.lora.registry import replace_module
from lora_core.lora.surgery import (
    check_device,
    finish_surgery,
    mark_trainable,
    plan_surgery,
    wrap_layer,
)

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of the checkpoint in ``folder`` (one file, or sharded).

    Raises:
        ValueError: no ``model.safetensors`` / ``model.safetensors.index.json``, a malformed index, or a
            shard it names that is missing.
    """
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{folder / INDEX} is not a safetensors index (no weight_map: {e})") from None
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise ValueError(f"{folder / INDEX} names shards that are missing: {missing}")
        return files
    if (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), framework="pt") as f:
            return {name: folder / SINGLE for name in f.keys()}
    raise ValueError(
        f"{folder} has no {SINGLE} or {INDEX}: load_pretrained streams safetensors checkpoints only"
    )


class _Reader:
    """The checkpoint's tensors by name, read one at a time (the files opened once, lazily)."""

    def __init__(self, files: dict[str, Path], stack: contextlib.ExitStack) -> None:
        self.files, self.stack, self.open = files, stack, {}

    def handle(self, name: str) -> Any:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self.open:
            self.open[file] = self.stack.enter_context(safe_open(str(file), framework="pt"))
        return self.open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle(name).get_slice(name).get_shape())

    def read(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # one copy (a cast on the way when the dtypes differ): nothing stays mapped to the file
        return self.handle(name).get_tensor(name).to(device=device, dtype=dtype, copy=True)


def _default_dtype(config: Any, reader: _Reader) -> torch.dtype:
    """The dtype ``from_pretrained`` gives without ``dtype=``: transformers ≥ 5 reads it from the config
    (else the checkpoint's first floating tensor), earlier versions use torch's default (float32)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return torch.get_default_dtype()
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    for name in reader.files:
        found = getattr(torch, str(reader.handle(name).get_slice(name).get_dtype()).lower(), None)
        if isinstance(found, torch.dtype) and found.is_floating_point:
            return found
    return torch.get_default_dtype()


def _empty_model(folder: Path, dtype: torch.dtype | None, reader: _Reader) -> nn.Module:
    """The model of ``folder``'s config on the meta device (buffers real, on the CPU), tied, in eval mode."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(folder))
    dtype = dtype or _default_dtype(config, reader)
    new = tuple(map(int, transformers.__version__.split(".")[:2])) >= (4, 56)  # `torch_dtype` renamed
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **{"dtype" if new else "torch_dtype": dtype})
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()  # as from_pretrained returns it


def empty_model(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``folder`` as `load_pretrained` starts it: on the meta device, no adapters, no memory
    (its config, parameter count and shapes, e.g. for ``lora-core finetune`` to check them before loading).

    Raises:
        ValueError: what `load_pretrained` raises for ``folder`` (no folder, config or checkpoint)."""
    path = _check_folder(folder)
    with contextlib.ExitStack() as stack:
        return _empty_model(path, dtype, _Reader(checkpoint_files(path), stack))


def _check_folder(folder: Any) -> Path:
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"folder must be a path (str or Path), got {type(folder).__name__}")
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"folder {str(folder)!r} is not a folder (a transformers model folder is needed)")
    if not (path / "config.json").is_file():
        raise ValueError(f"folder {str(folder)!r} has no config.json")
    return path


def _check_arguments(folder: Any, config: Any, device: Any, dtype: Any, fsdp: Any, cpu_offload: Any) -> Path:
    import torch.distributed as dist

    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_core.LoraConfig, got {type(config).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (torch.bfloat16, ...) or None, got {dtype!r}")
    for name, flag in (("fsdp", fsdp), ("cpu_offload", cpu_offload)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if cpu_offload and not fsdp:
        raise ValueError("cpu_offload=True offloads the shards of fsdp=True: pass fsdp=True too")
    if fsdp and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "fsdp=True needs an initialized torch.distributed process group (run under torchrun)"
        )
    return _check_folder(folder)


def load_pretrained(
    folder: str | Path,
    config: LoraConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    fsdp: bool = False,
    cpu_offload: bool = False,
) -> nn.Module:
    """A transformers causal LM from ``folder`` with ``config``'s adapters, streamed (module docstring).

    Args:
        folder: a transformers folder: ``config.json`` and ``model.safetensors`` (or a sharded checkpoint
            with ``model.safetensors.index.json``).
        config: the LoRA settings (``quantize="nf4"``: QLoRA, each weight quantized as soon as it is read).
        device: where the model is built (each process its own GPU under ``torchrun``).
        dtype: the dtype of the dense weights, as ``from_pretrained(dtype=...)``; None: as it chooses.
        fsdp: shard the frozen base over the ranks as it loads (`shard_model`); needs ``torchrun``.
        cpu_offload: with ``fsdp``, keep the shards in CPU memory (FSDP2's ``CPUOffloadPolicy``).

    Returns:
        The model, equal to ``lc.apply_lora(AutoModelForCausalLM.from_pretrained(folder,
        dtype=dtype).to(device), config)`` (then `shard_model` with ``fsdp``) for the same RNG state.

    Raises:
        ValueError: no folder, ``config.json`` or safetensors checkpoint; a parameter missing from the
            checkpoint or of another shape (named); what ``apply_lora`` refuses; ``cpu_offload`` without
            ``fsdp``; ``fsdp`` outside ``torchrun``; a ``device`` this process cannot use.
        TypeError: ``config`` not a LoraConfig; ``dtype``, ``fsdp``, ``cpu_offload``, ``device`` of a
            wrong type.
    """
    path = _check_arguments(folder, config, device, dtype, fsdp, cpu_offload)
    device = check_device(device)
    with contextlib.ExitStack() as stack:
        reader = _Reader(checkpoint_files(path), stack)
        model = _empty_model(path, dtype, reader)
        sources = _sources(model, reader)  # every parameter found, shapes checked: before any read
        plan = plan_surgery(model, config)
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        sharder = None
        if fsdp:
            from lora_core.training.fsdp import Sharder

            sharder = Sharder(device, cpu_offload=cpu_offload)
        _Loader(model, config, plan, reader, sources, device, sharder).run()
        finish_surgery(model, config, plan, flags)
    if sharder is not None:
        sharder.shard_root(model)  # the units left (embeddings, head) and the root
    return model


def _sources(model: nn.Module, reader: _Reader) -> dict[int, str]:
    """``{id(meta parameter or persistent buffer): checkpoint name}``: for tied parameters the first of
    their names the checkpoint has. Raises ValueError naming a missing tensor or a wrong shape."""
    names: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        shapes[id(p)] = tuple(p.shape)
    found = {}
    for key, group in names.items():
        name = next((n for n in group if n in reader.files), None)
        if name is None:
            raise ValueError(f"the checkpoint has no tensor {' / '.join(group)} (shape {list(shapes[key])})")
        if reader.shape(name) != shapes[key]:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {list(reader.shape(name))}; the model's config "
                f"needs {list(shapes[key])}"
            )
        found[key] = name
    for name, b in model.named_buffers():  # persistent buffers the checkpoint has replace the built ones
        if name in reader.files and reader.shape(name) == tuple(b.shape):
            found[id(b)] = name
    return found


def _holds_frozen_base(module: nn.Module) -> bool:
    return any(isinstance(m, HoldsFrozenBase) for m in module.modules())


class _Loader:
    """Step 3 (and 4) of the module docstring over one model."""

    def __init__(self, model, config, plan, reader, sources, device, sharder) -> None:
        self.model, self.config, self.plan, self.reader = model, config, plan, reader
        self.sources, self.device, self.sharder = sources, device, sharder
        self.steps = {step[0]: step for step in plan.layers}
        self.rest = set(plan.rest)
        counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self.tied = {key for key, n in counts.items() if n > 1}
        self.loaded: dict[int, nn.Parameter] = {}  # id(tied meta parameter) → the loaded one, for its twins
        self.seen: set[int] = set()
        self.pinned = [*model.parameters(), *model.buffers()]  # the ids above stay theirs (meta: no bytes)
        stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        inner = {id(s) for m in stacks for b in m for s in b.modules() if s is not b}
        self.blocks = {id(b) for m in stacks for b in m if id(b) not in inner}  # outermost stack elements

    def run(self) -> None:
        self.visit(self.model, "")
        missed = [n for n, p in self.model.named_parameters() if p.is_meta]
        if missed:  # a module reached only through an attribute that is no child: not expected
            raise ValueError(f"load_pretrained: tensors not reached while loading: {missed[:5]}")

    def visit(self, module: nn.Module, path: str) -> None:
        if id(module) in self.seen:  # a module registered twice: named_modules visits it once
            return
        self.seen.add(id(module))
        if path in self.steps or path in self.rest:
            for sub in module.modules():
                self.materialize(sub)
            if path in self.steps:
                replace_module(self.model, path, wrap_layer(module, self.config, self.steps[path]))
            else:
                quantize_frozen_linears(
                    self.model, [path], self.config.quant_block_size, self.config.double_quant, None
                )
            return
        self.materialize(module)
        for name, child in module.named_children():
            self.visit(child, f"{path}.{name}" if path else name)
        if self.sharder is not None and id(module) in self.blocks and _holds_frozen_base(module):
            mark_trainable(self.model, self.config, self.plan.to_save)  # adapters stay out of the shards
            self.sharder.shard_unit(module)  # a block of fsdp_units (one without a base: the root's)

    def materialize(self, module: nn.Module) -> None:
        """``module``'s own parameters and buffers, from the checkpoint, on the device."""
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            loaded = self.loaded.get(id(p))
            if loaded is None:
                data = self.reader.read(self.sources[id(p)], p.dtype, self.device)
                loaded = nn.Parameter(data, requires_grad=p.requires_grad)
                if id(p) in self.tied:  # kept only for the twins: the others may go as soon as quantized
                    self.loaded[id(p)] = loaded
            module._parameters[name] = loaded
        for name, b in list(module._buffers.items()):
            if b is not None and id(b) in self.sources:  # a persistent buffer the checkpoint has
                module._buffers[name] = self.reader.read(self.sources[id(b)], b.dtype, self.device)
            elif b is not None:  # built in __init__ (rotary inv_freq): moved, as model.to(device) does
                module._buffers[name] = b.to(self.device)


__all__ = ["checkpoint_files", "empty_model", "load_pretrained"]
