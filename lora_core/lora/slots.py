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

``HoldsAdapters`` is the part of ``LoRALinear`` that manages them (add, delete, initialise, look up);
``lora_core.lora.merging`` (merge, unmerge, unload) and ``lora_core.lora.layer`` (forward) are the rest,
which only read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lora_core.lora import functional, inits
from lora_core.lora.base_protocol import HoldsFrozenBase
from lora_core.lora.config import check_alpha, check_bool, check_dropout

DEFAULT = "default"  # the adapter whose tensors sit where a single-adapter layer always had them
BASE = "__base__"  # in mixed batches: the row runs the base model alone
_RESERVED = {BASE, "weight", "training"}


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter: a non-empty str without dots, not a reserved word."""
    if not isinstance(name, str):
        raise TypeError(f"adapter_name must be a str, got {name!r}")
    if not name or "." in name or name in _RESERVED or not name.isprintable() or hasattr(nn.Module, name):
        raise ValueError(
            f"adapter_name {name!r} is not allowed: use a non-empty name without dots, not one of "
            f"{sorted(_RESERVED)} nor an nn.Module attribute"
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

    @classmethod
    def checked(
        cls, r: Any, alpha: Any, dropout: Any, use_rslora: Any, use_dora: Any, *, max_r: int
    ) -> AdapterSpec:
        """The spec, after the checks ``LoraConfig`` makes (TypeError / ValueError naming the argument)."""
        for flag_name, flag in (("use_rslora", use_rslora), ("use_dora", use_dora)):
            check_bool(flag_name, flag)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= max_r:
            raise ValueError(f"r must be an int in [1, min(in, out) = {max_r}], got {r!r}")
        check_alpha("alpha", alpha)  # a finite number > 0 (not a bool, not a string)
        check_dropout("dropout", dropout)
        return cls(r, float(alpha), float(dropout), use_rslora, use_dora)


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


class HoldsAdapters(HoldsFrozenBase):
    """A module holding a frozen base (``self.base``) and named LoRA adapters: the containers, the
    hyper-parameters per name, adding / deleting / initialising one. ``LoRALinear`` is one."""

    in_features: int
    out_features: int
    base: Any

    # PEFT's file key of each factor (A, B, DoRA's magnitude) -> this layer's own key for adapter "default"
    # and for any other adapter "{}" (relative to the layer); lora_core.lora.adapters reads/writes with it.
    ADAPTER_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "lora_A.weight": ("lora_A.weight", "lora_A.{}.weight"),
        "lora_B.weight": ("lora_B.weight", "lora_B.{}.weight"),
        "lora_magnitude_vector": ("lora_magnitude_vector", "lora_magnitude.{}.weight"),
    }

    def _init_adapters(self, adapter_dtype: torch.dtype) -> None:
        self._adapter_dtype = adapter_dtype
        self.lora_dropout: nn.Module = nn.Identity()  # the default adapter's (kept for PEFT-like access)
        self._init_factor_slots()
        self.lora_magnitude = AdapterSlots(own_default=False)  # DoRA magnitudes of non-default adapters
        self.lora_specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []

    def _init_factor_slots(self) -> None:
        """The containers of A and B (``LoRAEmbedding``, whose PEFT keys differ, overrides it)."""
        self.lora_A = AdapterSlots()  # [name] (r, in)
        self.lora_B = AdapterSlots()  # [name] (out, r)

    @classmethod
    def in_out(cls, module: nn.Module) -> tuple[int, int]:
        """``(in, out)`` of this class's layer or of a module it adapts (``features``)."""
        if isinstance(module, HoldsAdapters):
            return module.in_features, module.out_features
        features = cls.features(module)  # type: ignore[attr-defined]
        if features is None:
            raise TypeError(f"{cls.__name__} cannot adapt a {type(module).__name__}")
        return features  # type: ignore[no-any-return]

    @classmethod
    def factor_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of A, B and DoRA's magnitude of a rank-``r`` adapter on ``module`` (this class's layer or
        the module it adapts), as PEFT stores them: ``(r, in)``, ``(out, r)``, ``(out,)``."""
        n_in, n_out = cls.in_out(module)
        return (r, n_in), (n_out, r), (n_out,)

    def matrices(self, name: str) -> tuple[Tensor, Tensor]:
        """Adapter ``name``'s A (r, in) and B (out, r) as matrices (a conv layer's: views of its kernels)."""
        return self.lora_A[name], self.lora_B[name]

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors by PEFT's file key (relative to the layer): A, B, DoRA's magnitude."""
        key_a, key_b, key_m = self.ADAPTER_KEYS
        out = {key_a: self.lora_A[name], key_b: self.lora_B[name]}
        return {**out, key_m: self.magnitude(name)} if self.lora_specs[name].use_dora else out

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
        """The shapes `adapter_tensors` has for a rank-``r`` adapter on ``module``, by the same keys."""
        keys, shapes = list(cls.ADAPTER_KEYS), cls.factor_shapes(module, r)
        return dict(zip(keys, shapes if use_dora else shapes[:2]))

    # ---- the adapters --------------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, *, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False, init: str | None = "default",
    ) -> None:  # fmt: skip
        """Add adapter ``name`` (not active: ``active_adapters`` says which run). ``init=None`` leaves A and B
        with ``nn.Linear``'s default init (drawn in every case, as PEFT's layers draw it); the caller then
        initialises or fills them.

        Raises:
            ValueError: a duplicate or reserved name; ``r`` outside [1, min(in, out)]; bad alpha / dropout.
            TypeError: a flag that is not a bool.
        """
        check_adapter_name(name)
        if name in self.lora_specs:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        n_in, n_out = self.in_features, self.out_features
        spec = AdapterSpec.checked(r, alpha, dropout, use_rslora, use_dora, max_r=min(n_in, n_out))
        names = self.lora_A.names()
        device = self.lora_A[names[0]].device if names else self.base.weight.device
        like = {"device": device, "dtype": self._adapter_dtype}
        shape_a, shape_b, shape_m = self.factor_shapes(self, r)
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, **like))  # type: ignore[arg-type]
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, **like))  # type: ignore[arg-type]
        if use_dora:
            m = nn.Parameter(torch.ones(shape_m, **like))  # type: ignore[arg-type]
            if name == DEFAULT:
                self.lora_magnitude_vector = m
            else:
                self.lora_magnitude[name] = m
        if name == DEFAULT:
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.register_buffer("_dora_merged_norm", None, persistent=False)
        self.lora_specs[name] = spec
        with torch.no_grad():  # nn.Linear's own init first: the factors were nn.Linear layers (PEFT's still
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))  # are), so seeded runs draw the
            nn.init.kaiming_uniform_(self.lora_B[name], a=math.sqrt(5))  # same numbers as before and as PEFT
        if init is not None:
            self.reset_lora_parameters(init, name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``. Raises ValueError when it is unknown, active or merged."""
        if name not in self.lora_specs:
            raise ValueError(f"this layer has no adapter {name!r}; it has {self.adapter_names()}")
        if name in self.active_adapters or name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is active or merged; set another adapter or unmerge first")
        del self.lora_A[name], self.lora_B[name], self.lora_specs[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        if name == DEFAULT:
            self.lora_dropout = nn.Identity()
            self._parameters.pop("lora_magnitude_vector", None)

    def adapter_names(self) -> list[str]:
        return list(self.lora_specs)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Adapter ``name``'s Parameters: A, B and (DoRA) the magnitude."""
        out = [self.lora_A[name], self.lora_B[name]]
        return out + ([self.magnitude(name)] if self.lora_specs[name].use_dora else [])  # type: ignore[list-item]

    def magnitude(self, name: str) -> Tensor:  # (out,)
        """DoRA's magnitude of adapter ``name``."""
        return self.lora_magnitude_vector if name == DEFAULT else self.lora_magnitude[name]

    def _main(self) -> AdapterSpec:
        specs = self.lora_specs
        if not specs:
            raise AttributeError("this LoRALinear holds no adapter")
        return specs[DEFAULT] if DEFAULT in specs else next(iter(specs.values()))

    r = property(lambda self: self._main().r)
    lora_alpha = property(lambda self: self._main().alpha)
    scaling = property(lambda self: self._main().scaling)
    use_rslora = property(lambda self: self._main().use_rslora)
    use_dora = property(lambda self: self._main().use_dora)

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:  # (out, in)
        """The update ``s · B A`` of the default adapter (or ``adapter_name``), in the adapter's dtype."""
        name = adapter_name or (DEFAULT if DEFAULT in self.lora_specs else self.adapter_names()[0])
        s = self.lora_specs[name].scaling
        return functional.lora_delta_weight_ref(*self.matrices(name), s)

    # ---- adapter initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default", adapter_name: str = DEFAULT) -> None:
        """Initialise A and B (and DoRA's magnitude) of one adapter.

        Args:
            init: ``"default"``: A kaiming-uniform (a=√5), B = 0 (LoRA §4.1: the update starts at zero).
                ``"gaussian"``: A ~ N(0, std=1/r), B = 0 (PEFT's choice). ``"pissa"``: with ``W₀ = U S Vᵀ``,
                ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ`` so that ``s·BA`` is the best rank-r approximation
                of W₀, and W₀ becomes the residual ``W₀ − s·BA`` (Meng et al. 2024, "PiSSA", §3); outputs
                are unchanged up to rounding.
            adapter_name: which adapter.
        """
        a, b, spec = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_specs[adapter_name]
        if init == "default":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.r)
            nn.init.zeros_(b)
        elif init == "pissa":
            self._pissa_init(a, b, spec)
        else:  # "olora", "pissa_niter_<N>", "loftq..." (lora_core.lora.inits); ValueError for anything else
            inits.apply_extra_init(self, init, a, b, spec.r, spec.scaling)
        self._reset_magnitude(adapter_name)

    def _reset_magnitude(self, name: str) -> None:
        """DoRA's magnitude ← ``‖W₀ + s·BA‖_row`` (its initial value; nothing for a LoRA adapter)."""
        if self.lora_specs[name].use_dora:
            m = self.magnitude(name)
            m.copy_(self._dora_norm(name, m.dtype).view(m.shape))  # a conv's m is (1, out, 1, ...)

    def _pissa_init(self, a_out: Tensor, b_out: Tensor, spec: AdapterSpec) -> None:
        w = self.base.dense_weight()
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # (out, in)
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(s_vals[: spec.r] / spec.scaling)  # (r,)
        a = root[:, None] * vh[: spec.r]  # (r, in)
        b = u[:, : spec.r] * root[None, :]  # (out, r)
        a_out.copy_(a)
        b_out.copy_(b)
        self.base.set_dense_weight(w - spec.scaling * (b @ a))

    def _dora_norm(self, name: str, dtype: torch.dtype) -> Tensor:  # (out,)
        """``‖W₀ + s·BA‖`` per output row for adapter ``name``, in ``dtype``, without gradient (DoRA §4.3)."""
        a, b = (t.to(dtype) for t in self.matrices(name))
        return functional.dora_weight_norm(self.base.dense_weight(dtype), a, b, self.lora_specs[name].scaling)
