"""LoRAEmbedding and LoRAConv (nn.Embedding, nn.Conv1d, nn.Conv2d): the linear layer's property tests against
the reference math (lora_core.lora.functional) and the formulas written out (in models and against the real
peft: test_lora_layers_models.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close
from torch import nn

from lora_core.lora.conv import LoRAConv
from lora_core.lora.embedding import LoRAEmbedding
from lora_core.lora.functional import (
    lora_conv_delta_weight_ref,
    lora_conv_ref,
    lora_embedding_ref,
)

DTYPES = [torch.float32, torch.float64]


# ---- random layers -----------------------------------------------------------------------------------------
@st.composite
def embedding_case(draw):
    """A random nn.Embedding (maybe with a padding_idx), rank, alpha, rsLoRA flag and a batch of ids."""
    num, dim = draw(st.integers(2, 20)), draw(st.integers(1, 12))
    r = draw(st.integers(1, min(num, dim)))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, num - 1)))
    base = nn.Embedding(num, dim, padding_idx=padding_idx, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(num, dim, generator=g, dtype=dtype))
    ids = torch.randint(0, num, (draw(st.integers(1, 3)), draw(st.integers(1, 5))), generator=g)
    return base, r, draw(st.floats(0.25, 16.0)), draw(st.booleans()), ids, g


@st.composite
def conv_case(draw):
    """A random nn.Conv1d or nn.Conv2d (kernel, stride, padding, bias drawn), rank, alpha, rsLoRA, input."""
    nd = draw(st.sampled_from([1, 2]))
    c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    r = draw(st.integers(1, min(c_in * math.prod(kernel), c_out)))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    base = cls(c_in, c_out, kernel, stride=stride, padding=padding, bias=draw(st.booleans()), dtype=dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    spatial = tuple(draw(st.integers(3, 6)) for _ in range(nd))
    x = torch.randn(draw(st.integers(1, 3)), c_in, *spatial, generator=g, dtype=dtype)
    return base, r, draw(st.floats(0.25, 16.0)), draw(st.booleans()), x, g


def _randomize(layer: LoRAEmbedding | LoRAConv, g: torch.Generator, name: str = "default") -> None:
    """Both factors (and DoRA's magnitude) random, so every term of the formulas is non-zero."""
    with torch.no_grad():
        for p in layer.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        if layer.lora_specs[name].use_dora:
            layer.magnitude(name).abs_().add_(0.5)


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r  # from the papers, not from the layer


# ---- embedding ---------------------------------------------------------------------------------------------
@given(embedding_case(), st.booleans())
def test_embedding_at_init_gives_the_base_output_exactly(case, dora):
    base, r, alpha, rslora, ids, _ = case
    expected = base(ids)
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0  # PEFT's init: A = 0, B ~ N(0, 1)
    assert torch.equal(layer(ids), expected)


@given(embedding_case())
def test_embedding_zero_b_gives_the_base_output_exactly(case):
    base, r, alpha, rslora, ids, g = case
    expected = base(ids)
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora)
    _randomize(layer, g)
    with torch.no_grad():
        layer.lora_B.default.zero_()
    assert torch.equal(layer(ids), expected)


@given(embedding_case())
def test_embedding_equals_the_merged_table(case):
    base, r, alpha, rslora, ids, g = case
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora)
    _randomize(layer, g)
    w, s = base.weight.detach(), _scale(alpha, r, rslora)
    a, b = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    assert layer.scaling == pytest.approx(s)
    assert_close(layer(ids).detach(), (w + (s * b @ a).T)[ids])  # ΔW = (s·BA)ᵀ, looked up
    assert_close(layer(ids).detach(), lora_embedding_ref(ids, w, a, b, s, padding_idx=base.padding_idx))


@given(embedding_case())
def test_embedding_dora_matches_the_direct_formula(case):
    base, r, alpha, rslora, ids, g = case
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=True)
    w = base.weight.detach()
    assert_close(layer.lora_magnitude_vector.detach(), torch.sqrt((w * w).sum(dim=0)))  # one per dim
    _randomize(layer, g, "default")
    a, b = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    m, s = layer.lora_magnitude_vector.detach(), _scale(alpha, r, rslora)
    v = w.T + s * b @ a  # (dim, num): the (out, in) frame
    direct = ((m / torch.sqrt((v * v).sum(dim=1)))[:, None] * v).T  # DoRA eq. 5, as a table (num, dim)
    assert_close(layer(ids).detach(), direct[ids])
    assert_close(layer(ids).detach(), lora_embedding_ref(ids, w, a, b, s, m, padding_idx=base.padding_idx))


@given(embedding_case(), st.booleans())
def test_embedding_merge_then_unmerge_restores_the_weight(case, dora):
    base, r, alpha, rslora, ids, g = case
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    _randomize(layer, g)
    w0, y = layer.weight.detach().clone(), layer(ids).detach()
    layer.merge()
    assert_close(layer(ids).detach(), y)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(layer.weight.detach(), w0)
    plain = layer.unload()
    assert type(plain) is nn.Embedding and plain.padding_idx == base.padding_idx
    assert not hasattr(plain, "bias")
    assert_close(plain(ids).detach(), y)


def test_embedding_gradients_reach_only_the_adapter(rng):
    base = nn.Embedding(9, 5, padding_idx=2)
    layer = LoRAEmbedding.from_module(base, r=3, alpha=6.0, use_dora=True)
    _randomize(layer, rng)
    ids = torch.tensor([[0, 2, 4, 2], [8, 1, 2, 3]])
    layer(ids).square().sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert a.grad is not None and b.grad is not None and layer.lora_magnitude_vector.grad is not None
    assert torch.count_nonzero(a.grad[:, 2]) == 0  # the padding row gets no gradient, as in the base lookup
    assert torch.count_nonzero(a.grad[:, 0]) > 0 and torch.count_nonzero(a.grad[:, 5]) == 0  # only seen ids


def test_embedding_dropout_is_not_applied_as_in_peft(rng):
    layer = LoRAEmbedding.from_module(nn.Embedding(6, 4), r=2, alpha=2.0, dropout=0.5).train()
    _randomize(layer, rng)
    ids = torch.arange(6)[None]
    assert torch.equal(layer(ids), layer(ids))


def test_embedding_half_precision_base_gets_float32_adapters():
    base = nn.Embedding(8, 4, dtype=torch.bfloat16)
    ids = torch.arange(8)[None]
    layer = LoRAEmbedding.from_module(base, r=2, alpha=2.0)
    assert layer.lora_embedding_B["default"].dtype == torch.float32
    y = layer(ids)
    assert y.dtype == torch.bfloat16 and torch.equal(y, base(ids))


# ---- convolution -------------------------------------------------------------------------------------------
@given(conv_case(), st.booleans())
def test_conv_zero_b_gives_the_base_output_exactly(case, dora):
    base, r, alpha, rslora, x, _ = case
    expected = base(x)
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.equal(layer(x), expected)


@given(conv_case())
def test_conv_equals_the_merged_kernel(case):
    base, r, alpha, rslora, x, g = case
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora)
    _randomize(layer, g)
    w, s = base.weight.detach(), _scale(alpha, r, rslora)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    bias = None if base.bias is None else base.bias.detach()
    # ΔW[o, i, k] = s Σ_r B[o, r] A[r, i, k], written with einsum (not the reshape the code uses)
    delta = s * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    assert_close(lora_conv_delta_weight_ref(a, b, s), delta)
    conv = F.conv1d if w.dim() == 3 else F.conv2d
    direct = conv(x, w + delta, bias, base.stride, base.padding)
    assert_close(layer(x).detach(), direct)
    assert_close(layer(x).detach(), lora_conv_ref(x, w, bias, a, b, s, base.stride, base.padding))


@given(conv_case())
def test_conv_dora_matches_the_direct_formula(case):
    base, r, alpha, rslora, x, g = case
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=True)
    w = base.weight.detach()
    m0 = layer.lora_magnitude_vector.detach()
    assert m0.shape == (1, w.shape[0], *[1] * (w.dim() - 2))  # PEFT's shape
    assert_close(m0.flatten(), torch.sqrt((w * w).flatten(1).sum(dim=1)))
    _randomize(layer, g)
    a, b, m = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.lora_magnitude_vector.detach()
    s = _scale(alpha, r, rslora)
    v = w + s * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    norm = torch.sqrt((v * v).flatten(1).sum(dim=1))  # per output channel, over (in, *k)
    direct_w = (m.flatten() / norm).view(-1, *[1] * (w.dim() - 1)) * v
    bias = None if base.bias is None else base.bias.detach()
    conv = F.conv1d if w.dim() == 3 else F.conv2d
    assert_close(layer(x).detach(), conv(x, direct_w, bias, base.stride, base.padding))
    assert_close(layer(x).detach(), lora_conv_ref(x, w, bias, a, b, s, base.stride, base.padding, m))


@given(conv_case(), st.booleans())
def test_conv_merge_then_unmerge_restores_the_weight(case, dora):
    base, r, alpha, rslora, x, g = case
    cls = type(base)
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    _randomize(layer, g)
    w0, y = layer.weight.detach().clone(), layer(x).detach()
    layer.merge()
    assert_close(layer(x).detach(), y)
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight.detach(), w0)
    plain = layer.unload()
    assert type(plain) is cls and plain.weight.shape == w0.shape
    assert_close(plain(x).detach(), y)


@pytest.mark.parametrize("dora", [False, True])
def test_conv_gradients_reach_only_the_adapter_and_gradcheck(dora, rng):
    base = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1, dtype=torch.float64)
    layer = LoRAConv.from_module(base, r=2, alpha=3.0, use_dora=dora)
    _randomize(layer, rng)
    x = torch.randn(2, 2, 4, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad
    assert all(p.grad is not None for p in layer.adapter_parameters("default"))
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if not dora:
        assert torch.autograd.gradcheck(lambda x, a, b: layer(x), (x, a, b))
    else:  # DoRA's norm is detached for A and B by design; x and m see the exact function
        assert torch.autograd.gradcheck(lambda x, m: layer(x), (x, layer.lora_magnitude_vector))


@pytest.mark.parametrize("dora", [False, True])
def test_conv_dropout_applies_to_the_adapter_input_only(dora, rng):
    base = nn.Conv1d(3, 4, 3, padding=1)
    layer = LoRAConv.from_module(base, r=2, alpha=4.0, dropout=0.5, use_dora=dora).train()
    _randomize(layer, rng)
    x = torch.randn(2, 3, 7, generator=rng)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones_like(x), p=0.5, training=True)  # the same draw, as a mask
    w, bias = base.weight.detach(), base.bias.detach()
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    m = layer.lora_magnitude_vector.detach() if dora else None
    assert_close(y.detach(), lora_conv_ref(x, w, bias, a, b, layer.scaling, 1, 1, m, mask))


def test_conv_unbatched_input(rng):
    layer = LoRAConv.from_module(nn.Conv1d(2, 3, 2), r=2, alpha=2.0, use_dora=True)
    _randomize(layer, rng)
    x = torch.randn(2, 6, generator=rng)
    assert_close(layer(x).detach(), layer(x[None]).detach()[0])
