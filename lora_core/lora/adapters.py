"""Adapters on disk, in PEFT's layout: ``save_adapter`` writes one, ``load_adapter`` puts one into a model.

A saved adapter is a directory::

    out/adapter/
    ├── adapter_config.json          LoraConfig.to_peft_dict(): peft_type "LORA", r, lora_alpha, ...
    └── adapter_model.safetensors    base_model.model.<path>.lora_A.weight          (r, in)
                                     base_model.model.<path>.lora_B.weight          (out, r)
                                     base_model.model.<path>.lora_magnitude_vector  (out,)  DoRA only
                                     (an embedding: <path>.lora_embedding_A (r, num), .lora_embedding_B
                                     (dim, r); a conv: lora_A (r, in, *k), lora_B (out, r, *1), DoRA's
                                     magnitude (1, out, *1): each layer class's ADAPTER_KEYS)
                                     base_model.model.<path>.base_layer.bias        (out,)  an adapted
                                                                                    layer's trained bias
                                     base_model.model.<path>.<param>    modules_to_save, other biases

so ``peft.PeftModel.from_pretrained(base, "out/adapter")`` reads it, and adapters PEFT saved load here.
Several adapters use PEFT's multi-adapter layout: ``"default"`` at the root, any other adapter ``name`` in
``out/adapter/<name>/`` (the same two files; keys without the adapter name). ``load_adapter(model, path,
adapter_name=...)`` adds one more adapter to a model that has some.
Files are read with safetensors only (never pickle). ``save_adapter`` prepares both files in memory, writes
them into a temporary sibling folder and swaps that in (``lora_core.atomic.atomic_write_dir``): a failure or a
crash never leaves new weights beside an old config, or a folder without one; other files in the folder
are kept. ``load_adapter`` checks every tensor against the model before it changes anything: a mismatch
raises and leaves the model exactly as it was. It also reads ``<path>.bias`` for an adapted layer's bias
(what lora_core wrote before it used PEFT's key) and PEFT's extra ``modules_to_save`` copies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_core.atomic import atomic_write_dir
from lora_core.lora.config import LoraConfig
from lora_core.lora.embedding import LoRAEmbedding
from lora_core.lora.layer import LoRALinear
from lora_core.lora.registry import adapter_configs, check_new_adapter_name, lora_layers, plan_layers
from lora_core.lora.slots import DEFAULT, check_adapter_name
from lora_core.lora.surgery import apply_lora, get_lora_config
from lora_core.lora.targets import find_modules_to_save, find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix: PeftModel.base_model (LoraModel).model (the user's model)


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")  # apply_lora's rule for bias="all"


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors adapter ``adapter_name`` (default: the first) consists of, keyed as PEFT saves them
    (without the ``base_model.model.`` prefix and the adapter name): LoRA factors, DoRA magnitudes,
    ``modules_to_save`` parameters and trained biases.

    A trained bias of an adapted layer is ``<path>.base_layer.bias``: in PEFT that layer wraps the original
    module as ``base_layer`` (PEFT would drop a ``<path>.bias`` silently and add no bias of ours)."""
    configs = adapter_configs(model)
    name = adapter_name if adapter_name is not None else next(iter(configs), DEFAULT)
    cfg = configs[name] if name in configs else get_lora_config(model)  # get_lora_config raises
    out: dict[str, torch.Tensor] = {}
    adapted = set()
    for path, layer in lora_layers(model):
        if name not in layer.lora_specs:
            continue
        pre = f"{path}." if path else ""
        out.update({pre + key: tensor for key, tensor in layer.adapter_tensors(name).items()})
        if cfg.bias != "none" and layer.bias is not None:
            out[f"{pre}base_layer.bias"] = layer.bias
        adapted.add(f"{pre}bias")
    if cfg.bias == "all":
        out.update({n: p for n, p in model.named_parameters() if _is_bias(n) and n not in adapted})
    for path in find_modules_to_save(model, cfg):
        out.update({f"{path}.{n}": p for n, p in model.get_submodule(path).named_parameters()})
    return out


def _name_or_path(value: object) -> str | None:
    """``base_model_name_or_path`` as PEFT stores it: a str (a path is written as its string) or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
        return os.fspath(value)
    raise TypeError(f"base_model_name_or_path must be a str, an os.PathLike or None, got {value!r}")


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_names: list[str] | None = None,
    *,
    base_model_name_or_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the adapters of ``model`` (all, or ``adapter_names``) to the directory ``path`` (created if
    needed) in PEFT's layout: ``"default"`` at ``path``, any other adapter in ``path/<name>/``.

    Atomic per adapter: the config and the tensors are validated and prepared first, both files are written
    into a temporary sibling folder, which then replaces ``path``. Any failure (a bad argument, a full disk)
    leaves a previous adapter at ``path`` as it was, byte for byte, and no new folder for a fresh ``path``.
    Other files in an existing ``path`` (a README, PEFT's subfolders for other adapters) are kept.

    Args:
        model: a model that went through ``apply_lora`` or ``load_adapter`` (merged or not).
        path: the adapter directory.
        adapter_names: which adapters (default: every adapter of the model).
        base_model_name_or_path: recorded in ``adapter_config.json`` (PEFT uses it to find the base);
            default: the config's own.

    Returns:
        The directory, as a ``Path``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``path`` is not a str or path;
            ``base_model_name_or_path`` (the argument or the config's) is not a str, a path or None.
        ValueError: the model has no LoRA layers; an unknown adapter name; ``path`` exists and is not a
            directory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path {str(directory)!r} exists and is not a directory")
    get_lora_config(model)  # no LoRA layers: raises
    configs = adapter_configs(model)
    names = list(configs) if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in configs]
    if unknown or not names:
        raise ValueError(f"save_adapter: no adapter named {unknown or names}; the model has {list(configs)}")
    prepared = [_prepare(model, n, configs[n], base_model_name_or_path) for n in names]
    for adapter_name, (text, tensors) in sorted(zip(names, prepared), key=lambda item: item[0] != DEFAULT):

        def fill(tmp: Path, text: str = text, tensors: dict[str, torch.Tensor] = tensors) -> None:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")

        target = directory if adapter_name == DEFAULT else directory / adapter_name
        atomic_write_dir(target, fill, keep_other_files=True)  # the root first: it keeps the subfolders
    return directory


def _prepare(
    model: nn.Module,
    adapter_name: str,
    cfg: LoraConfig,
    base_model_name_or_path: str | os.PathLike[str] | None,
) -> tuple[str, dict[str, torch.Tensor]]:
    """``adapter_config.json``'s text and the tensors to write for one adapter (everything checked)."""
    name = _name_or_path(
        cfg.base_model_name_or_path if base_model_name_or_path is None else base_model_name_or_path
    )
    cfg = LoraConfig(**{**cfg.__dict__, "base_model_name_or_path": name})
    try:
        text = json.dumps(cfg.to_peft_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:  # defence in depth: every field is validated already
        raise TypeError(f"the adapter config cannot be written as JSON: {err}") from None
    # clone: safetensors refuses tensors that share storage (e.g. tied weights in modules_to_save)
    tensors = {
        PREFIX + k: v.detach().to("cpu").contiguous().clone()
        for k, v in adapter_state_dict(model, adapter_name).items()
    }
    return text, tensors


def read_adapter(
    path: str | os.PathLike[str], **overrides: Any
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory: its config and its tensors (keys without the PEFT prefix).

    Raises:
        TypeError: ``path`` is not a str or path.
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: a file that is not UTF-8 JSON / not safetensors (the file is named); a bad config.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            hint = " (only safetensors adapters are read, never pickle files)" if name == WEIGHTS_NAME else ""
            raise FileNotFoundError(f"adapter directory {str(directory)!r} has no {name}{hint}")
    try:
        data = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: not UTF-8 text, so not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{directory / CONFIG_NAME}: expected a JSON object, got {type(data).__name__}")
    cfg = LoraConfig.from_peft_dict(data, **overrides)
    try:
        raw = load_file(str(directory / WEIGHTS_NAME))
    except SafetensorError as err:
        raise ValueError(f"{directory / WEIGHTS_NAME}: not a valid safetensors file ({err})") from None
    tensors = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    return cfg, tensors


def _expected_tensors(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Every key an adapter for ``cfg`` must hold for ``model``, with its shape (raises like apply_lora)."""
    modules = dict(model.named_modules())
    expected: dict[str, tuple[int, ...]] = {}
    for path, r, _, cls, _ in plan_layers(model, cfg, find_targets(model, cfg)):
        pre = f"{path}." if path else ""
        shapes = cls.adapter_shapes(modules[path], r, cfg.use_dora)
        expected.update({pre + key: shape for key, shape in shapes.items()})
    for path in find_modules_to_save(model, cfg):
        for n, p in model.get_submodule(path).named_parameters():
            expected[f"{path}.{n}"] = tuple(p.shape)
    return expected


def _optional_tensors(
    model: nn.Module, cfg: LoraConfig, expected: dict[str, tuple[int, ...]]
) -> dict[str, str]:
    """Keys an adapter may also hold, mapped to the parameter they set ("" for one that is skipped).

    - trained biases: an adapted layer's as PEFT saves it (``<path>.base_layer.bias``) or as lora_core did
      before (``<path>.bias``); with ``bias="all"`` every other bias under its own name;
    - PEFT's extra copies of a ``modules_to_save`` module's parameters, written with ``bias="all"``:
      ``<path>.modules_to_save.<p>`` (the trained one again) and ``<path>.original_module.<p>`` (the base's
      own, untrained: skipped, the base model has it).
    """
    params = dict(model.named_parameters())
    optional: dict[str, str] = {}
    for path in find_targets(model, cfg):  # PEFT's save_embedding_layers: a targeted embedding's own weight
        pre = f"{path}." if path else ""
        if isinstance(model.get_submodule(path), (nn.Embedding, LoRAEmbedding)):
            optional[f"{pre}base_layer.weight"] = f"{pre}weight"
    if cfg.bias != "none":
        for path in find_targets(model, cfg):
            pre = f"{path}." if path else ""
            if f"{pre}bias" in params:
                optional[f"{pre}base_layer.bias"] = optional[f"{pre}bias"] = f"{pre}bias"
    if cfg.bias == "all":
        for n in params:
            if _is_bias(n):
                optional.setdefault(n, n)
    for path in find_modules_to_save(model, cfg):
        for n, _ in model.get_submodule(path).named_parameters():
            optional[f"{path}.modules_to_save.{n}"] = f"{path}.{n}"
            optional[f"{path}.original_module.{n}"] = ""
    for key in expected:
        optional.pop(key, None)
    return optional


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str = DEFAULT,
    is_trainable: bool = False,
    quantize: str = "none",
    quant_block_size: int = 64,
    double_quant: bool = True,
    quantize_base: bool | None = None,
) -> nn.Module:
    """Apply the adapter saved at ``path`` to ``model`` in place: to a base model, or next to the adapters
    ``model`` has (as adapter ``adapter_name``, inactive until ``lc.set_adapter``; PEFT's ``load_adapter``).

    Everything is checked before the model changes. A PiSSA adapter re-runs PiSSA's SVD on the base (as
    PEFT does), so the base must be the same model the adapter was trained from.

    Args:
        model: the base model.
        path: an adapter directory (``save_adapter``'s or PEFT's ``save_pretrained``'s).
        adapter_name: the name the adapter gets in ``model``.
        is_trainable: keep the adapter trainable; otherwise (PEFT's default) it is frozen (a first adapter:
            the whole model) and the model is put in eval mode.
        quantize, quant_block_size, double_quant, quantize_base: how to store the base (``LoraConfig``
            fields that are not part of an adapter).

    Returns:
        ``model``, with the adapter applied.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``path`` is not a str or path.
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: a file that is not UTF-8 JSON / safetensors; bad config; the model has an adapter named
            ``adapter_name`` already; a target that does not exist; a tensor missing, unexpected, of the wrong
            shape or dtype, or holding NaN/inf (the first such key is named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg, tensors = read_adapter(
        path, quantize=quantize, quant_block_size=quant_block_size, double_quant=double_quant,
        quantize_base=quantize_base,
    )  # fmt: skip
    check_adapter_name(adapter_name)
    check_new_adapter_name(model, adapter_name, "load it under another adapter_name")
    existing = adapter_configs(model)
    expected = _expected_tensors(model, cfg)
    optional = _optional_tensors(model, cfg, expected)
    params = dict(model.named_parameters())
    writes: dict[str, tuple[str, torch.Tensor]] = {}  # parameter name -> (adapter key, value)
    for key, tensor in tensors.items():
        if key in expected:
            name, want = key, expected[key]
        elif key in optional:
            name = optional[key]
            want = tuple(params[name or key.replace(".original_module.", ".")].shape)
        else:
            raise ValueError(f"adapter tensor {key!r} does not belong to any target of this model")
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, the model needs {want}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"adapter tensor {key!r} has dtype {tensor.dtype}; expected a floating dtype")
        if not torch.isfinite(tensor).all():  # a diverged run's adapter: loading it would only give NaNs
            bad = tensor[~torch.isfinite(tensor)][0].item()
            raise ValueError(
                f"adapter tensor {key!r} holds non-finite values (e.g. {bad}); refusing to load it"
            )
        if not name:
            continue
        if name in writes and not torch.equal(writes[name][1], tensor):
            raise ValueError(
                f"adapter tensors {writes[name][0]!r} and {key!r} give {name!r} different values"
            )
        writes[name] = (key, tensor)
    missing = [k for k in expected if k not in writes]
    if missing:
        raise ValueError(f"adapter has no tensor {missing[0]!r} (and {len(missing) - 1} more missing)")

    # Validated: now change the model.
    model = apply_lora(model, cfg, adapter_name=adapter_name)
    current = dict(model.named_parameters())
    with torch.no_grad():
        for name, (_, tensor) in writes.items():
            name = _param_name(name, adapter_name)
            current[name].copy_(tensor.to(device=current[name].device))
    if not is_trainable:
        if not existing:
            model.requires_grad_(False)
        model.eval()
    return model


def _param_name(key: str, adapter_name: str) -> str:
    """The model's parameter for a saved key (the layer classes' ``ADAPTER_KEYS``): ``<path>.lora_A.weight``
    is itself for ``"default"`` and ``<path>.lora_A.<name>.weight`` for another adapter (DoRA:
    ``<path>.lora_magnitude.<name>.weight``); ``<path>.lora_embedding_A`` is
    ``<path>.lora_embedding_A.<name>`` (PEFT's ParameterDict key), ``"default"`` included."""
    for leaf, (own, other) in {**LoRALinear.ADAPTER_KEYS, **LoRAEmbedding.ADAPTER_KEYS}.items():
        if key == leaf or key.endswith("." + leaf):
            stem = key[: len(key) - len(leaf)]
            return stem + (own if adapter_name == DEFAULT else other.format(adapter_name))
    return key
