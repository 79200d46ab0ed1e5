"""The CPU training path in float32: dispatch's GEMMs (oneDNN where torch has it) against ``F.linear`` /
float64 matmuls, and the fused LoRA / QLoRA layer and the chunked loss that use them against the reference
formulas (``lora.functional`` through ``fused_mode("never")``, ``causal_lm_loss_ref``), within float32's
tolerance (tests/tolerances.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close, tolerance
from torch import nn

from lora_core import dispatch
from lora_core.lora.bases import NF4Base
from lora_core.lora.layer import LoRALinear
from lora_core.training.losses import causal_lm_loss_ref, chunked_causal_lm_loss


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 90), n=st.integers(1, 70), bias=st.booleans(),
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_linear_and_mm_equal_float64_within_float32_tolerance(
    m: int, k: int, n: int, bias: bool, transposed: bool, seed: int
) -> None:
    x = _randn(m, k, seed=seed)
    w = _randn(k, n, seed=seed + 1).T if transposed else _randn(n, k, seed=seed + 1)  # (n, k), any strides
    b = _randn(n, seed=seed + 2) if bias else None
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    got = dispatch.linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert_close(got, want, torch.float32)
    assert_close(dispatch.mm(x, w.T), x.double() @ w.double().T, torch.float32)
    assert_close(dispatch.mm(x.T.contiguous().T, w.T), x.double() @ w.double().T, torch.float32)


@pytest.mark.parametrize("m, k, n", [(16, 512, 1536), (1536, 512, 16), (70, 300, 200), (8, 5, 3)])
def test_mm_of_transposed_activations_equals_float64(m: int, k: int, n: int) -> None:
    """The weight-gradient products ``aᵀ b`` of a LoRA layer: ``a`` a transposed view (K = tokens), one side
    skinny (the rank) or neither; every route of `dispatch.mm` against float64, and b strided too. Sums of
    k = 512 terms: compared as vectors (an entry near 0 carries the others' rounding)."""
    a = _randn(k, m, seed=m).T  # (m, k), strided
    rtol, _ = tolerance(torch.float32)
    for b in (_randn(k, n, seed=n), _randn(n, k, seed=n + 1).T):
        got, want = dispatch.mm(a, b), a.double() @ b.double()
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert torch.linalg.vector_norm(got - want) <= rtol * torch.linalg.vector_norm(want)


def test_a_broadcast_operand_stays_on_torchs_mm() -> None:
    """An ``expand``ed gradient (what ``y.sum().backward()`` sends back) goes to torch's mm, not oneDNN
    (which reads a stride-0 weight ≈ 100× slower): the same bits as torch's product, on every route."""
    g = torch.ones(1, 1).expand(512, 576)  # stride (0, 0)
    b, w = _randn(576, 16, seed=0), _randn(576, 576, seed=1)
    assert torch.equal(dispatch.mm(g, b), torch.mm(g, b))
    a = _randn(512, 16, seed=2)
    assert torch.equal(dispatch.mm(g.T, a), torch.mm(g.T, a))
    assert torch.equal(dispatch.linear(g, w), torch.nn.functional.linear(g, w))


def test_linear_keeps_other_dtypes_and_empty_shapes_on_torch() -> None:
    x, w = _randn(3, 4, seed=0, dtype=torch.float64), _randn(5, 4, seed=1, dtype=torch.float64)
    assert torch.equal(dispatch.linear(x, w), torch.nn.functional.linear(x, w))  # float64: F.linear itself
    assert dispatch.linear(torch.zeros(0, 4), torch.zeros(5, 4)).shape == (0, 5)
    assert torch.equal(dispatch.linear(torch.ones(2, 0), torch.ones(5, 0)), torch.zeros(2, 5))


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_training_layer_equals_the_reference_in_float32(nf4: bool, bias: bool) -> None:
    """The default CPU training plan (the fused Function with dispatch's GEMMs) against the reference
    formula: output and every gradient (x, A, B, bias)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias)
    layer = LoRALinear(lin, r=8, alpha=16.0, **({"frozen": NF4Base.quantize(lin)} if nf4 else {}))
    nn.init.normal_(layer.lora_B.weight)
    if bias:
        layer.bias.requires_grad_(True)
    x = _randn(4, 33, 96, seed=3)
    g = _randn(4, 33, 80, seed=4)

    def run() -> list[torch.Tensor]:
        xr = x.clone().requires_grad_()
        y = layer(xr)
        params = [xr, *(p for p in layer.parameters() if p.requires_grad)]
        return [y, *torch.autograd.grad(y, params, g)]

    assert dispatch.plan_lora(layer, x).path == "fused"
    got = run()
    with dispatch.fused_mode("never"):
        want = run()
    assert len(got) == len(want) == 4 + bias
    assert_close(got[0], want[0])  # the output, elementwise
    rtol, _ = tolerance(torch.float32)
    for a, b in zip(got[1:], want[1:]):  # sums over M·out terms: compared as vectors (cancellation near 0)
        assert torch.linalg.vector_norm(a - b) <= rtol * torch.linalg.vector_norm(b)


def test_chunked_loss_in_float32_equals_the_full_logits_reference() -> None:
    h = _randn(2, 40, 48, seed=5).requires_grad_()
    w = _randn(300, 48, seed=6)
    labels = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    ours = chunked_causal_lm_loss(h, w, labels, chunk_size=24)
    (g_ours,) = torch.autograd.grad(ours, h)
    ref = causal_lm_loss_ref(h, w, labels)
    (g_ref,) = torch.autograd.grad(ref, h)
    assert_close(ours, ref)
    assert_close(g_ours, g_ref)
