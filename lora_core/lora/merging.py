"""Merging: a LoRA layer's adapters folded into its frozen base and taken out again, or the plain module back.

    merge     W₀ ← W₀ + Σ s·BA               (DoRA: m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖_row, its row norm recorded)
    unmerge   W₀ ← W₀ − Σ s·BA               (DoRA: undone with the recorded norm; exact up to rounding)
    unload    the plain module again (the base's own class, or a frozen NF4Linear), adapters dropped

Every formula is in ``lora_core.lora.functional`` (``merged_weight_sum`` / ``unmerged_weight_sum``: several
adapters at once, as the forward computes them all active); the weight is written through the base's
``set_dense_weight``, so a dense base changes in place (its Parameter stays) and an NF4 base requantizes and
reports the error (a warning here).

`MergesAdapters` is the third part of ``LoRALinear``: `lora_core.lora.slots.HoldsAdapters` keeps the named
adapters, this class folds them into the base, and ``lora_core.lora.layer`` adds the forward and the
constructors. It only reads the adapters and the layer's ``base``, ``bias``, ``training`` and
``active_adapters``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lora_core.lora import functional
from lora_core.lora.bases import NF4Base
from lora_core.lora.slots import DEFAULT, HoldsAdapters


class MergesAdapters(HoldsAdapters):
    """Merge, unmerge and unload for a layer holding a frozen ``base`` and named adapters (module docstring).

    ``merged_adapters`` (a list, set up by `HoldsAdapters`) names the adapters the base holds now.
    """

    @property
    def merged(self) -> bool:
        """Whether any adapter is folded into the base weight."""
        return bool(self.merged_adapters)

    def _dense(self) -> Tensor:  # (out, in), float32 or wider
        w = self.base.dense_weight()
        return w.to(torch.promote_types(w.dtype, torch.float32))

    def _factors(self, name: str) -> tuple[Tensor, Tensor, float, Tensor | None]:
        """``(A, B, s, m)`` of adapter ``name`` (``m``: DoRA's magnitude, or None)."""
        spec = self.lora_specs[name]
        m = self.magnitude(name).reshape(-1) if spec.use_dora else None  # (out,)
        return *self.matrices(name), spec.scaling, m

    def _merged(self, names: list[str], w0: Tensor | None = None) -> tuple[Tensor, list[Tensor | None]]:
        """``W₀`` (the base's, or ``w0``) with the adapters ``names`` folded in, in float32 or wider, and each
        DoRA adapter's row norm (``functional.merged_weight_sum``: what the forward computes with them all
        active; PEFT folds one after the other, which differs for DoRA)."""
        if w0 is None:
            w0 = self._dense()
        return functional.merged_weight_sum(w0, [self._factors(n) for n in names])

    def _unmerged(self) -> Tensor:  # (out, in), float32 or wider
        """``W₀`` back from the merged base weight (exact up to float rounding)."""
        w = self._dense()
        names = self.merged_adapters
        factors, norms = [self._factors(n) for n in names], [self._norm(n) for n in names]
        return functional.unmerged_weight_sum(w, factors, norms)

    def _store(self, w: Tensor, what: str) -> None:
        """Write ``w`` into the base; a base that cannot hold it exactly (NF4) reports the error: warn."""
        err = self.base.set_dense_weight(w)
        if err is not None:
            warnings.warn(
                f"{what} a 4-bit NF4 base requantizes it: requantization error max |ΔW| = {err:.3g}; "
                "unload_lora(model, "
                "dequantize=True) merges exactly into a dense layer",
                UserWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the base weight: ``W₀ ← W₀ + s·BA`` (DoRA: ``m ⊙ (W₀ + s·BA)/‖·‖_row``), the
        active ones or ``adapter_names`` (several: see ``_merged``).

        Raises:
            ValueError: already merged (nothing left to merge); an adapter this layer does not have.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        unknown = [n for n in names if n not in self.lora_specs]
        if unknown:
            raise ValueError(f"this layer has no adapter {unknown}; it has {self.adapter_names()}")
        todo = [n for n in names if n not in self.merged_adapters]
        if not todo:
            raise ValueError("this LoRALinear is already merged; call unmerge() first")
        w0 = self._unmerged() if self.merged else None  # merging more: fold them all into W₀ again
        names = self.merged_adapters + todo
        w, norms = self._merged(names, w0)
        self._store(w, "merging into")
        for name, norm in zip(names, norms):
            self.register_buffer(self._norm_buffer(name), norm, persistent=False)
        self.merged_adapters = names

    @staticmethod
    def _norm_buffer(name: str) -> str:
        return "_dora_merged_norm" if name == DEFAULT else f"_dora_merged_norm__{name}"

    def _norm(self, name: str) -> Tensor | None:  # (out,): DoRA's row norm recorded by merge
        return getattr(self, self._norm_buffer(name), None)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapters out of the base weight again (exact up to float rounding for a dense
        base).

        Raises:
            ValueError: not merged.
        """
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; nothing to unmerge")
        w = self._unmerged()
        for name in self.merged_adapters:
            setattr(self, self._norm_buffer(name), None)
        self._store(w, "unmerging from")
        self.merged_adapters = []

    @torch.no_grad()
    def unload(self, dequantize: bool = False) -> nn.Module:
        """The plain module (the base's own class) holding the merged weight (the active adapters); the
        adapters are dropped.

        A dense base merges in place and hands its Parameter to the plain module. An NF4 base gives, with
        ``dequantize=True``, a dense module holding ``dequant(W) + s·BA`` exactly (`functional.merged_weight`,
        never requantized); with ``False``, a frozen `NF4Linear` (requantized: lossy, warns). On an NF4 layer
        that is already merged, ``dequantize=True`` cannot be exact (the exact sum was not kept): it returns
        ``dequant`` of what the base holds and warns with the recorded error.
        """
        exact_dense = dequantize and isinstance(self.base, NF4Base)
        active = [n for n in self.active_adapters if n in self.lora_specs]
        if exact_dense and not self.merged:
            weight: Tensor | None = self._merged(active)[0]
        elif exact_dense:
            err = self.base.requantization_error
            err_text = "unknown" if err is None else f"{err:.3g}"
            warnings.warn(
                "unload(dequantize=True) on an already merged QLoRALinear returns the requantized merge, not "
                f"the exact one: requantization error max |ΔW| = {err_text}; "
                "unload before merging for the exact dequant(W) + s·BA",
                UserWarning,
                stacklevel=2,
            )
            weight = self.base.dense_weight()
        else:
            if not self.merged and active:
                self.merge(active)
            weight = None  # the base as it is stored now
        return self.base.plain_module(weight, self.bias, self.training)


__all__ = ["MergesAdapters"]
