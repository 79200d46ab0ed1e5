"""The shapes of a Llama-style decoder: what the memory planner (`lora_core.training.planner`) counts from.

A `ModelShape` is the handful of ``config.json`` fields that fix every weight's size (transformers'
``LlamaConfig`` names); each block has the 7 linear layers of `LINEARS`::

    q_proj (a, h)   k_proj, v_proj (kv, h)   o_proj (h, a)   gate_proj, up_proj (i, h)   down_proj (h, i)

    h = hidden_size, i = intermediate_size, a = num_attention_heads·d, kv = num_key_value_heads·d,
    d = head_dim (default hidden_size / num_attention_heads)

`model_shape` reads one from a built-in name (`KNOWN_MODELS`, or 7b / 13b / 70b / smollm2), a folder holding
a transformers ``config.json``, or passes a `ModelShape` through. Nothing here knows about bytes: the
planner turns shapes into memory, and re-exports every name here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The 7 linear layers of a block, in the order of `ModelShape.linear_shapes` (the planner's default targets).
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-style decoder (transformers' ``LlamaConfig`` field names)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # default hidden_size / num_attention_heads

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of each linear layer of one block."""
        h, i = self.hidden_size, self.intermediate_size
        a, kv = self.num_attention_heads * self.d, self.num_key_value_heads * self.d
        return {"q_proj": (a, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, a),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip

    @classmethod
    def from_config(cls, config: dict, name: str = "config.json") -> ModelShape:
        """From a transformers ``config.json`` (Llama, Mistral, Qwen2, SmolLM2: the same field names)."""
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        config = {"num_key_value_heads": config.get("num_attention_heads"), **config}
        config = {k: v for k, v in config.items() if v is not None}  # null head_dim / kv heads: the default
        optional = ("num_key_value_heads", "head_dim")
        bad = [k for k in keys + optional if (k in config or k in keys) and not _positive_int(config.get(k))]
        if bad:
            raise ValueError(f"{name}: needs positive integer {', '.join(bad)} (a Llama-style config)")
        return cls(
            name=name, **{k: config[k] for k in keys}, num_key_value_heads=config["num_key_value_heads"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim"),
        )  # fmt: skip


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Built-in shapes, from the models' published config.json files. Llama-2-7b and -13b use multi-head
# attention; -70b grouped-query attention with 8 key/value heads.
KNOWN_MODELS = {
    "llama-2-7b": ModelShape("Llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": ModelShape("Llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": ModelShape("Llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
}
ALIASES = {"7b": "llama-2-7b", "13b": "llama-2-13b", "70b": "llama-2-70b", "smollm2": "smollm2-135m"}


def model_shape(model: str | ModelShape) -> ModelShape:
    """A `ModelShape`: itself, a built-in name (``KNOWN_MODELS``, or 7b / 13b / 70b / smollm2), or a folder
    holding a transformers ``config.json``."""
    if isinstance(model, ModelShape):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a name, a folder or a ModelShape, got {type(model).__name__}")
    key = ALIASES.get(model.lower(), model.lower())
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    path = Path(model)
    if not (path / "config.json").is_file():
        known = sorted(KNOWN_MODELS) + sorted(ALIASES)
        raise ValueError(
            f"model {model!r} is neither a built-in ({', '.join(known)}) nor a folder with config.json"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'} must hold a JSON object")
    return ModelShape.from_config(config, name=str(path))


__all__ = ["ALIASES", "KNOWN_MODELS", "LINEARS", "ModelShape", "model_shape"]
