"""LoRALinear against the reference math (lora_core.lora.functional) and against the formulas themselves."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close
from torch import nn

from lora_core.dispatch import fused_mode
from lora_core.lora.functional import (
    dora_linear_ref,
    dora_merged_weight_ref,
    lora_delta_weight_ref,
    lora_linear_ref,
)
from lora_core.lora.layer import LoRALinear, is_conv1d

DTYPES = [torch.float32, torch.float64]


@st.composite
def layer_case(draw, dtypes=DTYPES):
    """A random Linear (with or without bias), a rank, alpha, rsLoRA flag, a dtype and an input batch."""
    n_in = draw(st.integers(1, 24))
    n_out = draw(st.integers(1, 24))
    r = draw(st.integers(1, min(n_in, n_out)))
    alpha = draw(st.floats(0.25, 64.0))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    bias = draw(st.booleans())
    rslora = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=dtype))
        if bias:
            base.bias.copy_(torch.randn(n_out, generator=g, dtype=dtype))
    x = torch.randn(draw(st.integers(1, 4)), 3, n_in, generator=g, dtype=dtype)
    return base, r, alpha, rslora, x, g


def _randomize_b(layer: LoRALinear, g: torch.Generator) -> None:
    with torch.no_grad():
        layer.lora_B.weight.copy_(
            torch.randn(layer.lora_B.weight.shape, generator=g, dtype=layer.lora_B.weight.dtype)
        )


@given(layer_case(), st.booleans())
def test_zero_b_gives_the_base_output_exactly(case, dora):
    base, r, alpha, rslora, x, _ = case
    expected = base(x)
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    with fused_mode("never"):  # the reference adds exactly 0 to the base module's own output
        assert torch.equal(layer(x), expected)
    assert_close(layer(x), expected)  # the default (fused on a float32 CPU: oneDNN's GEMM order)


@given(layer_case())
def test_output_equals_x_times_merged_weight(case):
    base, r, alpha, rslora, x, g = case
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=rslora)
    _randomize_b(layer, g)
    w, a, b = base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    s = alpha / math.sqrt(r) if rslora else alpha / r  # the scale, from the papers, not from the layer
    assert layer.scaling == pytest.approx(s)
    bias = base.bias.detach() if base.bias is not None else 0.0
    direct = x @ (w + s * b @ a).T + bias
    assert_close(layer(x).detach(), direct)
    assert_close(layer(x).detach(), lora_linear_ref(x, w, base.bias, a, b, s))
    assert_close(layer.delta_weight().detach(), lora_delta_weight_ref(a, b, s))


@given(layer_case(), st.booleans())
def test_merge_then_unmerge_restores_the_weight(case, dora):
    base, r, alpha, rslora, x, g = case
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    _randomize_b(layer, g)
    w0 = layer.weight.detach().clone()
    y = layer(x).detach()
    layer.merge()
    assert layer.merged
    assert_close(layer(x).detach(), y)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight.detach(), w0)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


@given(layer_case())
def test_dora_matches_the_direct_formula(case):
    base, r, alpha, rslora, x, g = case
    w = base.weight.detach().clone()
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=True)
    a = layer.lora_A.weight.detach()
    # magnitude starts at the row norms of W (B = 0), computed here from W directly
    assert_close(layer.lora_magnitude_vector.detach(), torch.sqrt((w * w).sum(dim=1)))
    _randomize_b(layer, g)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.0 + torch.rand(layer.out_features, generator=g, dtype=w.dtype))
    b, m, s = layer.lora_B.weight.detach(), layer.lora_magnitude_vector.detach(), layer.scaling
    v = w + s * b @ a
    direct_w = (m / torch.sqrt((v * v).sum(dim=1)))[:, None] * v  # DoRA eq. 5, written out
    bias = base.bias.detach() if base.bias is not None else 0.0
    assert_close(layer(x).detach(), x @ direct_w.T + bias)
    assert_close(layer(x).detach(), dora_linear_ref(x, w, base.bias, a, b, m, s))
    assert_close(dora_merged_weight_ref(w, a, b, m, s), direct_w)


def test_dora_treats_the_norm_as_a_constant_in_backward(rng):
    """DoRA §4.3: with the norm detached, d(out)/dB flows only through the numerator V = W + sBA."""
    base = nn.Linear(6, 5, dtype=torch.float64)
    layer = LoRALinear.from_linear(base, r=2, alpha=3.0, use_dora=True)
    _randomize_b(layer, rng)
    x = torch.randn(4, 6, generator=rng, dtype=torch.float64)
    layer(x).sum().backward()
    w, a = base.weight.detach(), layer.lora_A.weight.detach()
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    m, s = layer.lora_magnitude_vector.detach(), layer.scaling
    v = w + s * b @ a
    norm = torch.linalg.vector_norm(v, dim=1).detach()  # constant
    (x @ ((m / norm)[:, None] * v).T).sum().backward()
    assert_close(layer.lora_B.weight.grad, b.grad)
    # and it differs from the gradient through a live norm, so the test can tell them apart
    b2 = b.detach().clone().requires_grad_(True)
    v2 = w + s * b2 @ a
    (x @ ((m / torch.linalg.vector_norm(v2, dim=1))[:, None] * v2).T).sum().backward()
    assert not torch.allclose(b2.grad, b.grad)


@pytest.mark.parametrize("dora", [False, True])
def test_gradcheck_float64(dora, rng):
    base = nn.Linear(5, 4, dtype=torch.float64)
    layer = LoRALinear.from_linear(base, r=2, alpha=4.0, use_dora=dora)
    _randomize_b(layer, rng)
    x = torch.randn(3, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    if not dora:
        a, b = layer.lora_A.weight, layer.lora_B.weight
        assert torch.autograd.gradcheck(lambda x, a, b: layer(x), (x, a, b))
    else:  # A and B see a detached norm by design (DoRA §4.3, tested above); x and m see the exact function
        m = layer.lora_magnitude_vector
        assert torch.autograd.gradcheck(lambda x, m: layer(x), (x, m))


def test_dropout_applies_to_the_adapter_input_only(rng):
    base = nn.Linear(8, 6)
    layer = LoRALinear.from_linear(base, r=3, alpha=6.0, dropout=0.5).train()
    _randomize_b(layer, rng)
    x = torch.randn(5, 8, generator=rng)
    torch.manual_seed(123)
    with fused_mode("never"):  # the reference draws F.dropout's mask (the fused path regenerates its own)
        y = layer(x)
    torch.manual_seed(123)
    mask = nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)  # the same draw, as a mask
    w, a, b = base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    assert_close(y.detach(), lora_linear_ref(x, w, base.bias.detach(), a, b, layer.scaling, mask))
    layer.eval()
    assert_close(layer(x).detach(), lora_linear_ref(x, w, base.bias.detach(), a, b, layer.scaling))


@given(st.integers(2, 16), st.integers(2, 16), st.data())
def test_pissa_is_the_best_rank_r_approximation(n_in, n_out, data):
    r = data.draw(st.integers(1, min(n_in, n_out)))
    alpha = data.draw(st.floats(0.5, 32.0))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    base = nn.Linear(n_in, n_out, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=torch.float64))
    w = base.weight.detach().clone()
    x = torch.randn(4, n_in, generator=g, dtype=torch.float64)
    y = base(x).detach()
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, init="pissa")
    assert_close(layer(x).detach(), y)  # outputs unchanged at init
    approx = layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    sv = torch.linalg.svdvals(w)
    # Eckart–Young: the best rank-r error in Frobenius norm is the norm of the tail singular values
    assert_close(torch.linalg.matrix_norm(w - approx), torch.sqrt((sv[r:] ** 2).sum()))
    assert torch.linalg.matrix_rank(approx) == r
    assert_close(layer.weight.detach(), w - approx)  # the base holds the residual


def test_conv1d_fan_in_fan_out():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(nf=6, nx=10)  # weight (in=10, out=6)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    assert is_conv1d(conv)
    x = torch.randn(2, 3, 10)
    y0 = conv(x).detach()
    layer = LoRALinear.from_linear(conv, r=2, alpha=4.0, fan_in_fan_out=True)
    assert layer.weight.shape == (10, 6) and (layer.in_features, layer.out_features) == (10, 6)
    with fused_mode("never"):
        assert torch.equal(layer(x), y0)  # Conv1D's own formula, bit for bit
    assert_close(layer(x).detach(), y0)
    nn.init.normal_(layer.lora_B.weight)
    w = conv.weight.detach().T  # (out, in)
    expected = lora_linear_ref(
        x, w, conv.bias.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), 2.0
    )
    assert_close(layer(x).detach(), expected)
    plain = layer.unload()
    assert type(plain) is type(conv) and plain.weight.shape == (10, 6)
    assert set(plain.state_dict()) == {"weight", "bias"}
    assert_close(plain(x).detach(), expected)


def test_linear_with_fan_in_fan_out_is_corrected_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        layer = LoRALinear.from_linear(nn.Linear(4, 3), r=1, alpha=1.0, fan_in_fan_out=True)
    assert layer.fan_in_fan_out is False


def test_state_dict_keys_and_init_distributions():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 32), r=16, alpha=16.0, use_dora=True)
    assert set(layer.state_dict()) == {
        "weight", "bias", "lora_A.weight", "lora_B.weight", "lora_magnitude_vector",
    }  # fmt: skip
    assert layer.lora_A.weight.shape == (16, 64) and layer.lora_B.weight.shape == (32, 16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a=√5 on fan_in=64: U(-1/√in, 1/√in)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    gauss = LoRALinear.from_linear(nn.Linear(256, 256), r=8, alpha=8.0, init="gaussian")
    assert gauss.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert not layer.weight.requires_grad and layer.lora_A.weight.requires_grad


def test_half_precision_base_gets_float32_adapters():
    base = nn.Linear(8, 8, dtype=torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(base, r=2, alpha=2.0)
    assert layer.lora_A.weight.dtype == torch.float32
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, base(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear.from_linear(nn.Linear(4, 3), r=4, alpha=1.0)
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear.from_linear(nn.Linear(4, 3), r=0, alpha=1.0)
    with pytest.raises(ValueError, match="init"):
        LoRALinear.from_linear(nn.Linear(4, 3), r=1, alpha=1.0, init="corda")
    with pytest.raises(TypeError, match="Conv1D"):
        LoRALinear.from_linear(nn.Embedding(4, 3), r=1, alpha=1.0)
    layer = LoRALinear.from_linear(nn.Linear(4, 3), r=1, alpha=1.0)
    with pytest.raises(ValueError, match="shape"):
        layer.base.set_dense_weight(torch.zeros(4, 3))
