"""Where a layer keeps several named adapters: one ``AdapterSlots`` per factor, one ``AdapterSpec`` per name.

Why this container, and not a ``ModuleDict`` (PEFT's ``lora_A[name]``) or state-dict hooks:

- **Keys stay.** The adapter called ``"default"`` is the container's own Parameter ``weight``, so a
  single-adapter layer keeps exactly the keys, files and attributes it always had (``<path>.lora_A.weight``,
  ``layer.lora_A.weight``): training checkpoints, ``save_quantized`` files and every test written before
  several adapters existed are untouched, and no hook rewrites keys behind the user's back.
- **Other adapters get PEFT's in-memory key.** Adapter ``"fr"`` is a child module holding its own
  ``weight``: ``<path>.lora_A.fr.weight``, the key ``PeftModel.state_dict()`` has for it.
- **No per-adapter dicts threaded through the layer.** The layer asks for ``lora_A[name]`` once per active
  adapter per call (it computes the active set once), and the math below it sees plain tensors.

::

    LoRALinear.lora_A ─┬─ weight        (r, in)    adapter "default"       key  lora_A.weight
                       └─ fr.weight     (r', in)   adapter "fr"            key  lora_A.fr.weight
    LoRALinear.lora_specs = {"default": AdapterSpec(r, alpha, ...), "fr": AdapterSpec(...)}

DoRA magnitudes follow the same rule one level up: ``"default"``'s is the layer's ``lora_magnitude_vector``
(PEFT's saved name), another adapter's lives in ``lora_magnitude.<name>.weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

DEFAULT = "default"  # the adapter whose tensors sit where a single-adapter layer always had them
BASE = "__base__"  # in mixed batches: the row runs the base model alone
_RESERVED = {BASE, "weight", "training"}


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter: a non-empty str without dots, not a reserved word."""
    if not isinstance(name, str):
        raise TypeError(f"adapter_name must be a str, got {name!r}")
    if not name or "." in name or name in _RESERVED or not name.isprintable():
        raise ValueError(
            f"adapter_name {name!r} is not allowed: use a non-empty name without dots, not one of "
            f"{sorted(_RESERVED)}"
        )
    return name


@dataclass(frozen=True)
class AdapterSpec:
    """The hyper-parameters of one adapter in one layer (its tensors are in the slots).

    Args:
        r: rank; alpha: scale numerator; dropout: dropout on the adapter's input;
        use_rslora: ``s = alpha/√r`` instead of ``alpha/r``; use_dora: DoRA's magnitude applies.
    """

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class _Slot(nn.Module):
    """Holds one non-default adapter's tensor as ``weight`` (so its key is ``<slots>.<name>.weight``)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


class AdapterSlots(nn.Module):
    """One factor (A, B or DoRA's magnitude) of every adapter a layer holds, keyed by adapter name.

    ``slots[name]`` is the Parameter; ``name in slots``, ``slots.names()``, ``slots[name] = p`` and
    ``del slots[name]`` do what they say. ``"default"`` is stored as ``self.weight`` unless
    ``own_default=False`` (then every adapter, the default too, is a child)."""

    def __init__(self, own_default: bool = True) -> None:
        super().__init__()
        self._own_default = own_default

    def _is_own(self, name: str) -> bool:
        return self._own_default and name == DEFAULT

    def __getitem__(self, name: str) -> nn.Parameter:
        if self._is_own(name) and "weight" in self._parameters:
            return self._parameters["weight"]  # type: ignore[return-value]
        if not self._is_own(name) and name in self._modules:
            return self._modules[name].weight  # type: ignore[union-attr, return-value]
        raise KeyError(name)

    def __setitem__(self, name: str, value: nn.Parameter) -> None:
        if self._is_own(name):
            self.register_parameter("weight", value)
        else:
            self.add_module(name, _Slot(value))

    def __delitem__(self, name: str) -> None:
        self[name]  # KeyError when absent
        if self._is_own(name):
            del self._parameters["weight"]
        else:
            del self._modules[name]

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def names(self) -> list[str]:
        own = [DEFAULT] if self._is_own(DEFAULT) and "weight" in self._parameters else []
        return own + list(self._modules)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {tuple(self[n].shape)}" for n in self.names())
