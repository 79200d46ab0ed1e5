"""Which modules a `LoraConfig` adapts (`find_targets`) and trains fully (`find_modules_to_save`).

Targets are matched by module path, as PEFT does: a list of names matches a path equal to a name or ending
in ``.<name>``; a string is a regex matched against the whole path; ``"all-linear"`` takes every linear
layer (``nn.Linear``, transformers' ``Conv1D``) except the output head; ``None`` takes PEFT's defaults for a
few architectures (`DEFAULT_TARGETS`). ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``
and ``modules_to_save`` then narrow the choice. A name that matches nothing is refused with the closest
module names, so a typo never adapts nothing silently.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from lora_core.lora.config import TASK_MODULES_TO_SAVE, LoraConfig
from lora_core.lora.layer import LoRALinear
from lora_core.lora.registry import TARGET_TYPES, features_of, lora_class_for

_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")

# target_modules=None: the attention projections PEFT adapts by default for a few architectures.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "t5": ["q", "v"], "opt": ["q_proj", "v_proj"],
}  # fmt: skip


def _matches(spec: list[str] | str, path: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _layer_index(path: str, pattern: str | None) -> int | None:
    names = pattern if pattern is not None else "|".join(_LAYER_PATTERNS)
    found = re.search(rf"(?:^|\.)(?:{names})\.(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None


def output_head(model: nn.Module) -> set[str]:
    """Paths of the output layer ("all-linear" leaves it alone, like PEFT): Hugging Face models tell us
    through ``get_output_embeddings``; otherwise a module called ``lm_head``."""
    heads = {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        heads |= {n for n, m in model.named_modules() if out is not None and m is out}
    return heads


def _close_names(model: nn.Module, name: str) -> list[str]:
    paths = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in paths})
    close = difflib.get_close_matches(name, leaves, n=5, cutoff=0.4)
    return close or difflib.get_close_matches(name, paths, n=5, cutoff=0.3)


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Paths of the modules ``cfg`` adapts, in ``named_modules`` order. Raises like ``apply_lora``."""
    targets = cfg.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                "target_modules is required for this model (no default for "
                f"model_type={model_type!r}); give names, a regex or 'all-linear'"
            )
        targets = DEFAULT_TARGETS[model_type]
    lora_paths = [p for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    modules = {  # the modules inside a LoRA layer (its base, its adapters) are no targets
        p: m
        for p, m in model.named_modules()
        if not any(p.startswith(q + ".") or not q for q in lora_paths) or p in lora_paths
    }
    root_linear = lora_class_for(model) is not None  # a bare Linear (Embedding, Conv) can be its own target
    saved = [p for p in modules if p and _matches(cfg.effective_modules_to_save(), p)]
    if targets == "all-linear":
        heads = output_head(model)
        named = [p for p, m in modules.items() if features_of(m) is not None and p not in heads]
        if not named:
            raise ValueError("target_modules='all-linear': the model has no nn.Linear / Conv1D layers")
    else:
        named = [p for p in modules if (p or root_linear) and _matches(targets, p)]
        if isinstance(targets, str) and not named:
            raise ValueError(
                f"target_modules regex {targets!r} matches no module; close: {_close_names(model, targets)}"
            )
        if isinstance(targets, list):
            for name in targets:
                if not any(p == name or p.endswith("." + name) for p in named):
                    raise ValueError(
                        f"target_modules: no module named {name!r}; closest module names: "
                        f"{_close_names(model, name)}"
                    )
    chosen = []
    for path in named:
        if any(path == s or path.startswith(s + ".") for s in saved):
            continue  # trained fully instead
        if cfg.exclude_modules is not None and _matches(cfg.exclude_modules, path):
            continue
        if cfg.layers_to_transform is not None:
            index = _layer_index(path, cfg.layers_pattern)
            if index is None or index not in cfg.layers_to_transform:
                continue
        cls = lora_class_for(modules[path])
        if cls is None:
            raise TypeError(
                f"target module {path!r} is a {type(modules[path]).__name__}; LoRA supports {TARGET_TYPES}"
            )
        reason = None if isinstance(modules[path], LoRALinear) else cls.unsupported(modules[path])
        if reason is not None:
            raise ValueError(f"target module {path!r} cannot be adapted: {reason}")
        chosen.append(path)
    if not chosen:
        raise ValueError(
            "target_modules: after exclude_modules / layers_to_transform no module is left to adapt"
        )
    return chosen


def find_modules_to_save(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Paths of the modules trained fully. Names the user listed must exist; ``task_type``'s are optional."""
    paths = [p for p, _ in model.named_modules() if p]
    found = [p for p in paths if _matches(cfg.effective_modules_to_save(), p)]
    optional = TASK_MODULES_TO_SAVE.get(cfg.task_type or "", ())  # PEFT writes both head names
    for name in cfg.modules_to_save or []:
        if name not in optional and not any(p == name or p.endswith("." + name) for p in found):
            raise ValueError(
                f"modules_to_save: no module named {name!r}; closest: {_close_names(model, name)}"
            )
    # an enclosing module covers its children
    return [p for p in found if not any(p.startswith(q + ".") for q in found if q != p)]


__all__ = ["DEFAULT_TARGETS", "find_modules_to_save", "find_targets", "output_head"]
