"""``LoRAConv``: a frozen ``nn.Conv1d`` / ``nn.Conv2d`` plus a trainable low-rank update (PEFT's conv LoRA).

    y = W₀ ⋆ x + b + s · B ⋆ (A ⋆ drop(x))      W₀ (out, in, *k); A (r, in, *k): the base's kernel size,
                                                 stride and padding; B (out, r, *1): a 1×1 conv; s = α/r

A convolution is a linear map on unfolded patches, with weight ``W₀`` flattened to (out, in·∏k), and
``B ⋆ (A ⋆ x)`` is the convolution with ``B₍out×r₎ A₍r×in·∏k₎`` reshaped to a kernel. So everything but the
forward is `LoRALinear`'s on those flattened views (`ConvBase.dense_weight`, `LoRAConv.matrices`):
merging writes ``W₀ + s·BA`` (DoRA: ``m ⊙ V / ‖V‖`` with the norm over (in, *k) per output channel),
several named adapters, ``lc.disable_adapter``, ``lc.mixed_adapters``. The tensors keep PEFT's shapes and
keys: ``lora_A.weight`` (r, in, *k), ``lora_B.weight`` (out, r, *1), DoRA's ``lora_magnitude_vector``
(1, out, *1).

Refused (ValueError naming the reason), where PEFT's conv LoRA would not compute what its merge writes:
``groups ≠ 1`` (PEFT cannot merge them), ``dilation ≠ 1`` and ``padding_mode ≠ "zeros"`` (PEFT's ``lora_A``
ignores both, so its update is not the base's kind of convolution).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_core.lora import functional
from lora_core.lora.bases import DenseBase
from lora_core.lora.layer import LoRALinear
from lora_core.lora.slots import DEFAULT

_CONVS = (nn.Conv1d, nn.Conv2d)


class ConvBase(DenseBase):
    """A conv's frozen kernel (out, in, *k), seen as the (out, in·∏k) matrix of the linear frame; its forward
    is the base's own convolution (``F.conv1d`` / ``F.conv2d`` with its stride, padding, ...)."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d) -> None:
        module.weight.requires_grad_(False)
        super().__init__(module.weight, template=module)
        self.stride, self.padding = module.stride, module.padding
        self.dilation, self.groups = module.dilation, module.groups

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:  # (out, in·∏k)
        w = self.weight.flatten(1)
        return w if dtype is None else w.to(dtype)

    @torch.no_grad()
    def set_dense_weight(self, w: Tensor) -> None:  # (out, in·∏k)
        want = tuple(self.dense_weight().shape)
        if tuple(w.shape) != want:
            raise ValueError(f"w must have shape {want} (out, in·∏k), got {tuple(w.shape)}")
        self.weight.copy_(w.reshape(self.weight.shape))

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:  # (N, in, *L) -> (N, out, *L')
        conv = functional.conv_fn(self.weight)
        return conv(x, self.weight, bias, self.stride, self.padding, self.dilation, self.groups)  # type: ignore[no-any-return]

    def plain_module(self, weight: Tensor | None, bias: Tensor | None, training: bool = False) -> nn.Module:
        kernel = None if weight is None else weight.reshape(self.weight.shape)
        return super().plain_module(kernel, bias, training)


class LoRAConv(LoRALinear):
    """A frozen ``nn.Conv1d`` / ``nn.Conv2d`` with trainable low-rank updates (module docstring).

    Build it with ``LoRAConv.from_module(conv, r=..., alpha=...)`` or ``apply_lora`` with the conv's name in
    ``target_modules``. ``in_features`` is the width of the flattened kernel, ``in_channels · ∏kernel_size``
    (what ``r`` is bounded by, with ``out_channels``).

    Args:
        base: the convolution; its weight and bias are adopted and frozen. ``groups``, ``dilation`` and
            ``padding_mode`` must be the defaults (module docstring).
        r, alpha, dropout, use_rslora, use_dora, adapter_name: as in `LoRALinear` (dropout on the input
            feature map, as PEFT).
        fan_in_fan_out: ignored (a conv's layout is fixed).
    """

    ADAPTS = "nn.Conv1d or nn.Conv2d"
    fusable = False

    @classmethod
    def features(cls, module: nn.Module) -> tuple[int, int] | None:
        if isinstance(module, _CONVS):
            return math.prod(module.weight.shape[1:]), module.out_channels
        return None

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if type(module).forward not in (c.forward for c in _CONVS):
            return f"{type(module).__name__} has its own forward; only nn.Conv1d / nn.Conv2d can be adapted"
        if module.groups != 1:
            return f"groups={module.groups}: only groups=1 (PEFT cannot merge LoRA into grouped convolutions)"
        if any(d != 1 for d in module.dilation):
            return f"dilation={module.dilation}: only 1 (PEFT's lora_A ignores the base's dilation)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: only 'zeros' (PEFT's lora_A pads with zeros)"
        return None

    @classmethod
    def factor_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], ...]:
        """A (r, in, *k), B (out, r, *1), DoRA's magnitude (1, out, *1): PEFT's shapes."""
        n_out, n_in, *kernel = module.weight.shape
        ones = (1,) * len(kernel)
        return (r, n_in, *kernel), (n_out, r, *ones), (1, n_out, *ones)

    def matrices(self, name: str) -> tuple[Tensor, Tensor]:
        """A as (r, in·∏k) and B as (out, r): views of the kernels."""
        return self.lora_A[name].flatten(1), self.lora_B[name].flatten(1)

    def _fan_in_fan_out(self, base: nn.Module, fan_in_fan_out: bool) -> bool:
        return False

    def _frozen_base(self, base: nn.Module, fan_in_fan_out: bool) -> ConvBase:
        return ConvBase(base)  # type: ignore[arg-type]

    def _update(self, name: str, x: Tensor, result: Tensor) -> Tensor:  # like result, the adapter's dtype
        """Adapter ``name``'s term for input ``x`` whose base output (with bias) is ``result``
        (``functional.lora_conv_ref`` less the base output)."""
        spec = self.lora_specs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        xa = x.to(a.dtype)
        p = spec.dropout if self.training else 0.0
        xd = F.dropout(xa, p) if p else xa
        update = functional.lora_conv_update(xd, a, b, spec.scaling, self.base.stride, self.base.padding)
        if not spec.use_dora:
            return update
        channel = (-1,) + (1,) * (a.dim() - 2)  # an (out,) vector against (N, out, *L) or unbatched (out, *L)
        if not p:
            base_xd = result if self.bias is None else result - self.bias.view(channel)
        else:  # dropout changed the input: W₀'s share is recomputed on drop(x)
            base_xd = self.base.forward(xd.to(x.dtype), None)
        g = (self.magnitude(name).reshape(-1) / self._dora_norm(name, a.dtype)).view(channel)
        return (g - 1) * base_xd.to(g.dtype) + g * update

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default", adapter_name: str = DEFAULT) -> None:
        """``"default"`` (A kaiming-uniform over (in, *k), B = 0) or ``"gaussian"`` (A ~ N(0, 1/r²)), as
        PEFT's conv layers. Raises ValueError for any other ``init``."""
        if init not in ("default", "gaussian"):
            raise ValueError(f"init={init!r}: a LoRAConv supports init 'default' and 'gaussian'")
        super().reset_lora_parameters(init, adapter_name)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        names = "" if self.adapter_names() == [DEFAULT] else f", adapters={self.adapter_names()}"
        w = self.base.weight
        return (
            f"{kind}: in_channels={w.shape[1]}, out_channels={w.shape[0]}, kernel_size={tuple(w.shape[2:])}, "
            f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, merged={self.merged}{names}"
        )


__all__ = ["ConvBase", "LoRAConv"]
