"""PEFT's names for LoRA settings, and reading a PEFT config (a ``peft.LoraConfig`` or its JSON) into
lora_core's ``LoraConfig`` (`lora_core.lora.config`): field aliases, ``init_lora_weights`` values both ways
(LoftQ's iterations in ``loftq_config``), PEFT's bookkeeping fields (ignored) and the features lora_core
does not implement (refused, naming the field).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from lora_core.lora.inits import is_extra_init

# PEFT's `init_lora_weights` values for our `init` names, and back (False, PEFT's "no identity init" for
# tests, has no counterpart: `from_peft` refuses it; an adapter file's init does not matter once loaded).
_INIT_TO_PEFT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}
_INIT_FROM_PEFT: dict[Any, str] = {True: "default", "gaussian": "gaussian", "pissa": "pissa"}
# PEFT's field names that differ from ours: PEFT name -> our name.
PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}

# PEFT config keys that do not change what an adapter computes (bookkeeping), ignored on read.
_PEFT_BOOKKEEPING = {
    "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "runtime_config",
    "qalora_group_size", "layers_pattern", "lora_ga_config", "arrow_config", "ensure_weight_tying",
}  # fmt: skip
# PEFT features we do not implement: loading an adapter that uses one must fail, not compute the wrong thing.
# Our own key in adapter_config.json: how the base was quantized during training (absent for a dense base).
QUANT_KEY = "lora_core_quantization"
_QUANT_FIELDS = {"quantize", "quant_block_size", "double_quant"}
_PEFT_UNSUPPORTED = ("lora_bias", "use_qalora", "layer_replication", "target_parameters",
                     "trainable_token_indices", "alora_invocation_tokens")  # fmt: skip


def plain_peft_value(value: Any) -> Any:
    """PEFT's enum values (``TaskType.CAUSAL_LM``) as plain strings, its sets of names as sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def loftq_iters(init: str) -> int:
    return int(init.removeprefix("loftq_iter_")) if init.startswith("loftq_iter_") else 1


def peft_init(init: str) -> Any:
    """Our ``init`` as PEFT's ``init_lora_weights`` (LoftQ's iterations go to ``loftq_config``)."""
    return "loftq" if init.startswith("loftq") else _INIT_TO_PEFT.get(init, init)


def init_from_peft(value: Any, name: str) -> str:
    if isinstance(value, (bool, str)) and value in _INIT_FROM_PEFT:
        return _INIT_FROM_PEFT[value]
    if is_extra_init(value):
        return value
    raise ValueError(
        f"{name}={value!r} is not supported by lora_core; "
        "allowed: True (= init='default'), 'gaussian', 'pissa', 'olora', 'pissa_niter_<N>', 'loftq'"
    )


def from_peft_fields(
    cls: type[Any], data: dict[str, Any], source: str, overrides: dict[str, Any], strict_init: bool
) -> Any:
    """``data`` in PEFT's field names → ``cls(...)``; errors start with ``source`` and name the field."""
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type must be 'LORA', got {data.get('peft_type')!r}")
    for key in _PEFT_UNSUPPORTED:
        if data.get(key):
            raise ValueError(f"{source}: {key}={data[key]!r} is not supported by lora_core")
    init = data.get("init_lora_weights", True)
    # An adapter file: the weights are loaded, so the init is moot (EVA's data-driven A is in the tensors,
    # its redistributed ranks in rank_pattern / alpha_pattern).
    if (init is False or init == "eva") and not strict_init:
        init = True
    try:
        our_init = init_from_peft(init, "init_lora_weights")
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    loftq = data.get("loftq_config") or {}
    if our_init == "loftq" and loftq:  # PEFT: {"loftq_bits": 4, "loftq_iter": N}
        if loftq.get("loftq_bits", 4) != 4:
            raise ValueError(f"{source}: loftq_config={loftq!r}: only 4-bit (NF4) LoftQ is supported")
        iters = loftq.get("loftq_iter", 1)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"{source}: loftq_config['loftq_iter'] must be an int ≥ 1, got {iters!r}")
        our_init = "loftq" if iters == 1 else f"loftq_iter_{iters}"
    recorded = data.get(QUANT_KEY) or {}
    if not isinstance(recorded, dict) or not set(recorded) <= _QUANT_FIELDS:
        raise ValueError(f"{source}: {QUANT_KEY}={recorded!r} is not a quantization record")
    own = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in {k: v for k, v in data.items() if k != QUANT_KEY}.items():
        name = PEFT_ALIASES.get(key, key)
        if key == "init_lora_weights":
            continue
        if name in own:
            kwargs[name] = value
        elif key in _PEFT_BOOKKEEPING or key in _PEFT_UNSUPPORTED:
            continue
        elif value not in (None, False, [], {}, ""):
            raise ValueError(f"{source}: {key}={value!r} is not supported by lora_core (unknown field)")
    kwargs["init"] = our_init
    # PEFT keys its config's `rank_pattern` etc. with JSON-safe types already; `layers_pattern` may be a
    # one-element list in newer PEFT versions.
    lp = kwargs.get("layers_pattern")
    if isinstance(lp, list):
        if len(lp) != 1:
            raise ValueError(f"{source}: layers_pattern={lp!r}: only one pattern is supported")
        kwargs["layers_pattern"] = lp[0]
    kwargs.update(recorded)  # what the adapter was trained on, unless the caller says otherwise
    kwargs.update(overrides)
    return cls(**kwargs)


__all__ = [
    "PEFT_ALIASES",
    "from_peft_fields",
    "init_from_peft",
    "loftq_iters",
    "peft_init",
    "plain_peft_value",
]
