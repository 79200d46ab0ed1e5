"""``LoRAEmbedding``: a frozen ``nn.Embedding`` plus a trainable low-rank update (PEFT's embedding LoRA).

    y = W₀[ids] + s · Aᵀ[ids] Bᵀ          W₀ (num, dim), A (r, num), B (dim, r), s = α/r  (rsLoRA: α/√r)

An embedding is the linear map ``one_hot(ids) ↦ one_hot · W₀`` whose (out, in) weight is ``W₀ᵀ`` (dim, num),
so everything but the forward is `LoRALinear`'s: merging writes ``W₀ + (s·BA)ᵀ`` (``functional
.merged_weight`` on ``W₀ᵀ``), DoRA's magnitude has one entry per embedding dimension, several named adapters
live side by side. As in PEFT:

- the update looks ``ids`` up in ``Aᵀ`` with the base's ``padding_idx``, ``max_norm``, ... (so the padding
  row of A gets no gradient), and no dropout is applied (``lora_dropout`` is accepted and ignored);
- ``init="default"`` (and ``"gaussian"``) start with A = 0 and B ~ N(0, 1), the reverse of a linear layer;
- the adapter's tensors are PEFT's ParameterDict entries: ``lora_embedding_A.<name>`` (r, num) and
  ``lora_embedding_B.<name>`` (dim, r), saved as ``lora_embedding_A`` / ``lora_embedding_B``; DoRA's
  magnitude keeps `LoRALinear`'s keys (saved: ``lora_magnitude_vector``, (dim,)).

``layer.lora_A`` / ``layer.lora_B`` name the same containers, so code written for linear layers reads them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_core.lora import functional
from lora_core.lora.bases import DenseBase
from lora_core.lora.layer import LoRALinear
from lora_core.lora.slots import DEFAULT, AdapterSlots


class EmbeddingBase(DenseBase):
    """An ``nn.Embedding``'s frozen weight (num, dim) = (in, out) of the linear frame: a `DenseBase` with
    ``fan_in_fan_out``, whose forward is the base's own lookup (``F.embedding`` with its options)."""

    def __init__(self, module: nn.Embedding) -> None:
        module.weight.requires_grad_(False)
        super().__init__(module.weight, fan_in_fan_out=True, template=module)
        self.kwargs = functional.embedding_kwargs(module)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:  # (...,) ids -> (..., dim)
        return F.embedding(x, self.weight, **self.kwargs)  # type: ignore[arg-type]


class ParameterSlots(AdapterSlots):
    """One factor of every adapter as a Parameter named by the adapter: PEFT's ``ParameterDict`` keys
    ``<slots>.<name>`` (``lora_embedding_A.default``), the default adapter included."""

    def __getitem__(self, name: str) -> nn.Parameter:
        if name in self._parameters:
            return self._parameters[name]  # type: ignore[return-value]
        raise KeyError(name)

    def __setitem__(self, name: str, value: nn.Parameter) -> None:
        self.register_parameter(name, value)

    def __delitem__(self, name: str) -> None:
        self[name]  # KeyError when absent
        del self._parameters[name]

    def names(self) -> list[str]:
        return list(self._parameters)


class LoRAEmbedding(LoRALinear):
    """A frozen ``nn.Embedding`` with trainable low-rank updates: ``ids ↦ W₀[ids] + Σ_active s·Aᵀ[ids] Bᵀ``.

    Build it with ``LoRAEmbedding.from_module(embedding, r=..., alpha=...)`` or ``apply_lora`` with the
    embedding's name in ``target_modules``. ``merge`` / ``unmerge`` / ``unload``, DoRA, rsLoRA, several
    adapters, ``lc.disable_adapter`` and ``lc.mixed_adapters`` work as in `LoRALinear`.

    Args:
        base: the ``nn.Embedding`` (a subclass with its own ``forward``, e.g. a scaled embedding, is refused:
            its output is not the lookup this layer adds to; so is ``sparse=True``); its weight is adopted
            and frozen.
        r: rank, 1 ≤ r ≤ min(num_embeddings, embedding_dim).
        alpha, use_rslora, use_dora, adapter_name: as in `LoRALinear`.
        dropout: accepted and not applied (as PEFT).
        fan_in_fan_out: ignored (an embedding's layout is fixed).
    """

    ADAPTS = "nn.Embedding"
    fusable = False
    ADAPTER_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "lora_embedding_A": ("lora_embedding_A.default", "lora_embedding_A.{}"),
        "lora_embedding_B": ("lora_embedding_B.default", "lora_embedding_B.{}"),
        "lora_magnitude_vector": LoRALinear.ADAPTER_KEYS["lora_magnitude_vector"],
    }
    # the containers of A and B have PEFT's names; code written for linear layers reads them as lora_A/B
    lora_A = property(lambda self: self.lora_embedding_A)
    lora_B = property(lambda self: self.lora_embedding_B)

    @classmethod
    def features(cls, module: nn.Module) -> tuple[int, int] | None:
        if isinstance(module, nn.Embedding):
            return module.num_embeddings, module.embedding_dim
        return None

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if type(module).forward is not nn.Embedding.forward:
            return f"{type(module).__name__} has its own forward; only nn.Embedding's lookup can be adapted"
        if module.sparse:  # PEFT passes it on too, and backward then fails inside torch
            return "sparse=True: the update's gradient flows through Aᵀ, which cannot take a sparse gradient"
        return None

    def _fan_in_fan_out(self, base: nn.Module, fan_in_fan_out: bool) -> bool:
        return False

    def _frozen_base(self, base: nn.Module, fan_in_fan_out: bool) -> EmbeddingBase:
        return EmbeddingBase(base)  # type: ignore[arg-type]

    def _init_factor_slots(self) -> None:
        self.lora_embedding_A = ParameterSlots()  # [name] (r, num)
        self.lora_embedding_B = ParameterSlots()  # [name] (dim, r)

    def _update(self, name: str, x: Tensor, result: Tensor) -> Tensor:  # (..., dim), the adapter's dtype
        """Adapter ``name``'s term for ids ``x`` whose base output is ``result`` (``functional
        .lora_embedding_ref`` less the base output)."""
        spec = self.lora_specs[name]
        a, b = self.matrices(name)
        update = functional.lora_embedding_update(x, a, b, spec.scaling, **self.base.kwargs)
        if not spec.use_dora:
            return update
        g = self.magnitude(name) / self._dora_norm(name, a.dtype)  # (dim,)
        return (g - 1) * result.to(g.dtype) + g * update

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default", adapter_name: str = DEFAULT) -> None:
        """PEFT's embedding init: A = 0, B ~ N(0, 1) (``"default"`` and ``"gaussian"`` alike), then DoRA's
        magnitude. Raises ValueError for any other ``init``."""
        if init not in ("default", "gaussian"):
            raise ValueError(f"init={init!r}: a LoRAEmbedding supports init 'default' and 'gaussian'")
        nn.init.zeros_(self.lora_A[adapter_name])
        nn.init.normal_(self.lora_B[adapter_name])
        self._reset_magnitude(adapter_name)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        names = "" if self.adapter_names() == [DEFAULT] else f", adapters={self.adapter_names()}"
        return (
            f"{kind}: num_embeddings={self.in_features}, embedding_dim={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, merged={self.merged}{names}"
        )


__all__ = ["EmbeddingBase", "LoRAEmbedding", "ParameterSlots"]
