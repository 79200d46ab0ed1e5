"""``LoraConfig``: what to adapt and how, validated at construction, round-tripping through PEFT's JSON.

A config answers three questions:

- **Where**: ``target_modules`` (names matched as suffixes of module paths, one regex matched against the
  whole path, or ``"all-linear"``), minus ``exclude_modules``, restricted to ``layers_to_transform``;
  ``modules_to_save`` are trained fully instead (e.g. a classifier head; ``task_type`` adds the usual ones).
- **How big**: rank ``r`` and ``alpha`` (per module via ``rank_pattern`` / ``alpha_pattern``), giving the
  scale ``s = alpha / r`` (LoRA, Hu et al. 2021) or ``s = alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023).
- **Which variant**: ``use_dora`` (DoRA, Liu et al. 2024), ``init`` (``"default"``, ``"gaussian"``,
  ``"pissa"``: Meng et al. 2024), ``quantize="nf4"`` (QLoRA, Dettmers et al. 2023).

``to_peft_dict`` / ``from_peft_dict`` translate to and from ``adapter_config.json`` as PEFT writes it
(``lora_alpha``, ``lora_dropout``, ``init_lora_weights``), which the constructor also accepts
(``LoraConfig(lora_alpha=16, lora_dropout=0.05, init_lora_weights="gaussian")``);
``LoraConfig.from_peft(peft.LoraConfig(...))`` converts a PEFT config object, refusing what lora_core does
not implement. The quantization fields describe how the base was stored while the adapter trained: an
NF4-trained adapter records them under ``lora_core_quantization`` (PEFT ignores keys it does not know, with
a warning), so ``lora-core merge`` can merge onto the same dequantized NF4 base it was trained against.
Loading an adapter still stores the base as the caller says.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import InitVar, dataclass, field
from typing import Any

from lora_core.lora.inits import is_extra_init
from lora_core.lora.peft_names import (
    PEFT_ALIASES,
    QUANT_KEY,
    from_peft_fields,
    init_from_peft,
    loftq_iters,
    peft_init,
    plain_peft_value,
)

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "pissa", "olora", "pissa_niter_<N>", "loftq", "loftq_iter_<N>")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM")
QUANTIZE_MODES = ("none", "nf4")

# Heads that a task trains fully (PEFT's choice for the same task types): a freshly initialised classifier
# must learn, and a low-rank update of a random matrix would not be enough.
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
}


def _str_list(value: Any, name: str) -> list[str] | str | None:
    """A list of names (from any iterable of str), a single regex string, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{name} must be a list of module names, a regex string or None, got {value!r}")


@dataclass
class LoraConfig:
    """Validated LoRA settings (every field checked in ``__post_init__``).

    Args:
        r: rank of the update ``B A`` (Hu et al. 2021, §4.1). Must be ≥ 1 and ≤ min(in, out) of each
            adapted layer (checked when applied).
        alpha: scale numerator: the update is multiplied by ``alpha / r`` (or ``alpha / sqrt(r)``).
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: list of names matched as suffixes of module paths (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), a regex matched against the full path, or
            ``"all-linear"`` (every Linear / Conv1D except the output head). ``None`` picks known defaults
            for a few Hugging Face architectures.
        exclude_modules: same forms as ``target_modules``; matching modules are never adapted.
        bias: ``"none"`` (biases frozen), ``"all"`` (every bias trains), ``"lora_only"`` (biases of the
            adapted layers train). Trained biases are saved with the adapter.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023, Thm. 3.2).
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): ``W' = m · (W + sBA) / ‖W + sBA‖_row``.
        init: ``"default"`` (A kaiming-uniform with a=√5, B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0),
            ``"pissa"`` (A, B from the top-r SVD of W; W replaced by its residual; Meng et al. 2024),
            ``"pissa_niter_<N>"`` (the same with a randomized SVD, N subspace iterations) or ``"olora"``
            (A, B from W's QR decomposition; Büyükakyüz 2024), ``"loftq"`` / ``"loftq_iter_<N>"`` (LoftQ,
            Li et al. 2023: NF4(W) and BA fitted together, N alternations): see ``lora_core.lora.inits``.
        modules_to_save: modules trained fully and saved with the adapter (names matched as suffixes).
        fan_in_fan_out: the base stores its weight as (in, out), like GPT-2's ``Conv1D``.
        task_type: ``"CAUSAL_LM" | "SEQ_CLS" | "TOKEN_CLS" | "SEQ_2_SEQ_LM"`` or None; classification tasks
            add their head (``classifier`` / ``score``) to ``modules_to_save``.
        layers_to_transform: only adapt these layer indices (the number after ``layers.`` / ``h.`` /
            ``layer.`` / ``block.`` / ``blocks.`` in the path, or after ``layers_pattern``).
        layers_pattern: the name of the layer list, when it is not one of those.
        rank_pattern: ``{regex: r}`` overriding ``r`` for modules whose path ends with a match.
        alpha_pattern: ``{regex: alpha}``, likewise for ``alpha``.
        quantize: ``"none"`` or ``"nf4"`` (store the frozen base in 4-bit NormalFloat: QLoRA).
        quant_block_size: NF4 block size (elements per absmax scale), a power of two in [16, 4096].
        double_quant: quantize the block scales too (QLoRA §3, "double quantization").
        quantize_base: with ``quantize="nf4"``, store every other linear layer of the base in NF4 too (a
            frozen ``NF4Linear``), except the output head and ``modules_to_save``: the whole base in 4 bit,
            as QLoRA with bitsandbytes does. ``None`` (default): ``True`` under ``quantize="nf4"``, else
            ``False``; ``True`` needs ``quantize="nf4"``.
        base_model_name_or_path: recorded in ``adapter_config.json`` for the reader's benefit.
        lora_alpha, lora_dropout, init_lora_weights: PEFT's names for ``alpha``, ``dropout`` and ``init``
            (``init_lora_weights=True`` is ``"default"``); give one name or the other, not both.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    quantize: str = "none"
    quant_block_size: int = 64
    double_quant: bool = True
    quantize_base: bool | None = None
    base_model_name_or_path: str | None = None
    # PEFT's spellings (keyword-only in practice: they come after every field above)
    lora_alpha: InitVar[float | None] = None
    lora_dropout: InitVar[float | None] = None
    init_lora_weights: InitVar[bool | str | None] = None

    def __post_init__(
        self, lora_alpha: float | None, lora_dropout: float | None, init_lora_weights: bool | str | None
    ) -> None:
        peft_values = {"lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
        if init_lora_weights is not None:
            peft_values["init_lora_weights"] = init_from_peft(init_lora_weights, "init_lora_weights")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for peft_name, value in peft_values.items():
            ours = PEFT_ALIASES[peft_name]
            if value is None:
                continue
            if getattr(self, ours) != defaults[ours] and getattr(self, ours) != value:
                raise ValueError(
                    f"{peft_name}={value!r} and {ours}={getattr(self, ours)!r} disagree; {peft_name} is "
                    f"PEFT's name for {ours}: give one of them"
                )
            setattr(self, ours, value)
        _check_rank("r", self.r)
        check_alpha("alpha", self.alpha)
        check_dropout("dropout", self.dropout)
        self.dropout = float(self.dropout)
        self.alpha = float(self.alpha)
        self.target_modules = _str_list(self.target_modules, "target_modules")
        if self.target_modules == []:
            raise ValueError(
                "target_modules is an empty list, so nothing would be adapted; give module names (e.g. "
                "['q_proj', 'v_proj']), a regex string, 'all-linear', or None for the model type's defaults"
            )
        self.exclude_modules = _str_list(self.exclude_modules, "exclude_modules")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                _check_regex(name, value)
        if self.modules_to_save is not None:
            mts = _str_list(self.modules_to_save, "modules_to_save")
            self.modules_to_save = [mts] if isinstance(mts, str) else mts
        _check_choice("bias", self.bias, BIAS_MODES)
        if self.init not in INIT_MODES[:3] and not is_extra_init(self.init):
            raise ValueError(f"init must be one of {list(INIT_MODES)}, got {self.init!r}")
        _check_choice("quantize", self.quantize, QUANTIZE_MODES)
        if self.task_type is not None:
            _check_choice("task_type", self.task_type, TASK_TYPES)
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "double_quant"):
            check_bool(name, getattr(self, name))
        if self.quantize_base is None:
            self.quantize_base = self.quantize == "nf4"
        check_bool("quantize_base", self.quantize_base)
        if self.quantize_base and self.quantize != "nf4":
            raise ValueError(f"quantize_base=True needs quantize='nf4', got quantize={self.quantize!r}")
        for name in ("layers_pattern", "base_model_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        bs = self.quant_block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs > 4096 or bs & (bs - 1):
            raise ValueError(f"quant_block_size must be a power of two in [16, 4096], got {bs!r}")
        ltt = self.layers_to_transform
        if ltt is not None:
            one = isinstance(ltt, int) and not isinstance(ltt, bool)  # one index, as PEFT allows
            items = [ltt] if one else ltt
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise ValueError(
                    f"layers_to_transform must be a non-negative int or a list of them, got {ltt!r}"
                )
            self.layers_to_transform = list(items)
        # PEFT's rules (its LoraConfig refuses these, so an adapter saved with them would not load there):
        # a regex already says which layers; a layers_pattern alone would be silently ignored.
        regex = isinstance(self.target_modules, str) and self.target_modules != "all-linear"
        for name in ("layers_to_transform", "layers_pattern"):
            if regex and getattr(self, name) is not None:
                raise ValueError(f"{name} cannot be used when target_modules is a regex; put the layer in it")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (it only says where the index is)")
        for pattern_name, check in (("rank_pattern", _check_rank), ("alpha_pattern", check_alpha)):
            pattern = getattr(self, pattern_name)
            if not isinstance(pattern, dict):
                raise TypeError(f"{pattern_name} must be a dict {{regex: value}}, got {pattern!r}")
            for key, value in pattern.items():
                if not isinstance(key, str):
                    raise TypeError(f"{pattern_name} keys must be regex strings, got {key!r}")
                _check_regex(f"{pattern_name} key", key)
                check(f"{pattern_name}[{key!r}]", value)

    # ----------------------------------------------------------------------------------------------------
    def scale(self, r: int, alpha: float) -> float:
        """The adapter scale ``s`` for rank ``r``: ``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """``(r, alpha)`` for the module at ``path``, after ``rank_pattern`` / ``alpha_pattern`` (as PEFT:
        the first pattern whose regex matches a dotted suffix of the path wins)."""
        return (
            int(_pattern_lookup(self.rank_pattern, path, self.r)),
            float(_pattern_lookup(self.alpha_pattern, path, self.alpha)),
        )

    def effective_modules_to_save(self) -> list[str]:
        """``modules_to_save`` plus the heads that ``task_type`` trains (order kept, no duplicates)."""
        names = list(self.modules_to_save or [])
        for name in TASK_MODULES_TO_SAVE.get(self.task_type or "", ()):
            if name not in names:
                names.append(name)
        return names

    # ----------------------------------------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, in PEFT's field names (plus ``QUANT_KEY`` for an NF4 base)."""
        quant = {} if self.quantize == "none" else {
            QUANT_KEY: {"quantize": self.quantize, "quant_block_size": self.quant_block_size,
                        "double_quant": self.double_quant}
        }  # fmt: skip
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": peft_init(self.init),
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "inference_mode": True,
            **quant,
            **({"loftq_config": {"loftq_bits": 4, "loftq_iter": loftq_iters(self.init)}}
               if self.init.startswith("loftq") else {}),
        }  # fmt: skip

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], **overrides: Any) -> LoraConfig:
        """Read PEFT's ``adapter_config.json`` content; ``overrides`` set fields PEFT does not store
        (``quantize``, ``quant_block_size``, ``double_quant``, ``quantize_base``).

        Raises:
            ValueError: not a LoRA config, or it uses a PEFT feature lora_core does not implement.
        """
        return from_peft_fields(cls, data, "adapter_config.json", overrides, strict_init=False)

    @classmethod
    def from_peft(cls, peft_config: Any, **overrides: Any) -> LoraConfig:
        """Convert a ``peft.LoraConfig`` object (what ``get_peft_model`` takes) into a ``LoraConfig``:
        ``lora_alpha`` → ``alpha``, ``lora_dropout`` → ``dropout``, ``init_lora_weights`` → ``init``, the
        rest by name. ``overrides`` set lora_core's own fields (e.g. ``quantize="nf4"``).

        Raises:
            TypeError: ``peft_config`` is not a ``peft.LoraConfig``.
            ValueError: it uses a PEFT feature lora_core does not implement (DoRA's and rsLoRA's do exist;
                e.g. ``lora_bias``, ``use_qalora``, ``layer_replication``, ``target_parameters``,
                ``init_lora_weights="loftq"`` or ``False`` are refused, naming the field).
        """
        kind = type(peft_config)
        from_peft = kind.__name__ == "LoraConfig" and kind.__module__.startswith("peft.")
        if not from_peft or not dataclasses.is_dataclass(peft_config):
            raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}")
        fields = dataclasses.fields(peft_config)
        data = {f.name: plain_peft_value(getattr(peft_config, f.name)) for f in fields}
        return from_peft_fields(cls, data, "peft_config", overrides, strict_init=True)


# --------------------------------------------------------------------------------------------------------
def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int ≥ 1, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be ≥ 1, got {value}")


def check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_dropout(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_bool(name: str, value: Any) -> None:
    """TypeError naming ``name`` unless ``value`` is a bool (a truthy string or 1 must not pass as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{name} {value!r} is not a valid regular expression: {err}") from None


def _pattern_lookup(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
