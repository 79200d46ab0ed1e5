"""The per-row LoRA kernels of mixed batches (``lora_core.kernels.lora_mixed``) and the autograd Function
built on them (``lora_core.lora.mixed``), against the reference math on fresh random inputs.

Without CUDA the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1): shapes stay
small and dtypes are fp16 / fp32 (bf16 is wrong under the interpreter; checked on a GPU). The reference is
the direct formula, row by row, in float64 from the same (rounded) inputs, differentiated by autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

import lora_core as lc
from lora_core.dispatch import fused_mode, plan_mixed
from lora_core.lora.bases import DenseBase
from lora_core.lora.layer import LoRALinear
from lora_core.lora.mixed import mixed_lora_linear
from lora_core.lora.registry import lora_layers

pytestmark = pytest.mark.triton
kernels = pytest.importorskip("lora_core.kernels")
pytest.importorskip("triton")
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])


@st.composite
def problems(draw: st.DrawFn) -> dict:
    n_adapters = draw(st.integers(1, 3))
    rows = draw(st.integers(1, 5))
    return {
        "rows": rows, "tokens": draw(st.integers(1, 3)), "n_in": draw(st.integers(1, 40)),
        "n_out": draw(st.integers(1, 40)), "ranks": [draw(st.integers(1, 20)) for _ in range(n_adapters)],
        "index": [draw(st.integers(-1, n_adapters - 1)) for _ in range(rows)],
        "bias": draw(st.booleans()), "seed": draw(st.integers(0, 2**31)),
    }  # fmt: skip


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, factors: list, index: list[int]):
    """Row i: ``x_i W₀ᵀ + b + s·(x_i Aᵀ) Bᵀ`` with adapter ``index[i]`` (none for -1), plain PyTorch."""
    out = []
    for i, slot in enumerate(index):
        y = F.linear(x[i], w, bias)
        if slot >= 0:
            a, b, s = factors[slot]
            y = y + s * F.linear(F.linear(x[i], a), b)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=6)
@given(p=problems())
def test_forward_and_gradients_match_the_reference(p: dict, dtype: torch.dtype) -> None:
    """Output and the gradients of x, every A and B and the bias: fp32 adapters over an x / W₀ in
    ``dtype``, ranks that differ (zero-padded to the largest), base rows (-1) mixed in."""
    gen = torch.Generator().manual_seed(p["seed"])
    rand = lambda *s: torch.randn(*s, generator=gen)
    x = (rand(p["rows"], p["tokens"], p["n_in"]) / 2).to(dtype)
    w = (rand(p["n_out"], p["n_in"]) / 4).to(dtype)
    bias = rand(p["n_out"]).to(dtype) if p["bias"] else None
    factors = [
        (rand(r, p["n_in"]) / 4, rand(p["n_out"], r) / 4, 2.0 / (1 + i)) for i, r in enumerate(p["ranks"])
    ]
    g = rand(p["rows"], p["tokens"], p["n_out"]).to(dtype)

    leaves = [x, *(t for a, b, _ in factors for t in (a, b))] + ([bias] if bias is not None else [])
    ours = [t.detach().to(DEVICE).requires_grad_() for t in leaves]
    theirs = [t.detach().double().requires_grad_() for t in leaves]

    def unpack(ts: list[torch.Tensor]) -> tuple:
        fs = [(ts[1 + 2 * i], ts[2 + 2 * i], s) for i, (_, _, s) in enumerate(factors)]
        return ts[0], fs, ts[-1] if bias is not None else None

    xo, fo, bo = unpack(ours)
    y = mixed_lora_linear(xo, DenseBase(w.to(DEVICE)), fo, p["index"], bo)
    assert y.dtype == dtype and y.grad_fn is not None and "Mixed" in type(y.grad_fn).__name__
    y.backward(g.to(DEVICE))
    xr, fr, br = unpack(theirs)
    want = reference(xr, w.double(), br, fr, p["index"])
    want.backward(g.double())
    assert_close(y, want)
    for got, ref in zip(ours, theirs):
        assert got.grad.dtype == got.dtype
        want_grad = torch.zeros_like(ref) if ref.grad is None else ref.grad  # an adapter no row uses: 0
        assert_close(got.grad, want_grad, dtype)  # the compute dtype's tolerance (fp32 grads of fp16 math)


@pytest.mark.parametrize("index", [[1, 0, 1, 0], [1, 0, 0, -1]])
def test_weight_gradients_batched_and_per_adapter(index: list[int]) -> None:
    """Equal rows per adapter take the batched weight gradients (bmm), unequal ones a GEMM pair per
    adapter: both give the reference's gradients, at each adapter's own rank."""
    from lora_core.lora import mixed

    torch.manual_seed(1)
    x = torch.randn(4, 2, 12, requires_grad=True)
    w = torch.randn(10, 12)
    factors = [(torch.randn(r, 12, requires_grad=True), torch.randn(10, r, requires_grad=True), s)
               for r, s in ((3, 2.0), (5, 0.5))]  # fmt: skip
    plan = kernels.mixed_plan(index, 2, "cpu")
    meta = [(t.dtype, t.shape) for a, b, _ in factors for t in (a, b)]
    assert mixed._uniform(plan, meta) == (index == [1, 0, 1, 0])
    g = torch.randn(4, 2, 10)
    mixed_lora_linear(x.to(DEVICE), DenseBase(w.to(DEVICE)), factors, index).backward(g.to(DEVICE))
    got = [x.grad] + [t.grad for a, b, _ in factors for t in (a, b)]
    for t in [x] + [t for a, b, _ in factors for t in (a, b)]:
        t.grad = None
    reference(x, w, None, factors, index).backward(g)
    want = [x.grad] + [t.grad for a, b, _ in factors for t in (a, b)]
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b)


def test_plan_sorts_rows_by_adapter_and_tiles_them() -> None:
    bm = kernels.lora_mixed.BLOCK_M
    t = bm // 2 + 3  # rows of t tokens: an adapter's run crosses a tile boundary
    plan = kernels.mixed_plan([1, -1, 0, 1], t, "cpu")
    rows = lambda *r: [i * t + j for i in r for j in range(t)]
    assert plan.order.tolist() == rows(2) + rows(0, 3) and plan.n_tokens == 4 * t
    assert plan.segments == ((0, 0, t), (1, t, 3 * t))
    assert plan.tiles.tolist() == [[0, 0, t], [1, t, bm], [1, t + bm, 2 * t - bm]]
    assert kernels.mixed_plan([-1, -1], 3, "cpu").order.numel() == 0
    with pytest.raises(ValueError, match="index"):
        kernels.mixed_plan([0, -2], 1, "cpu")
    with pytest.raises(ValueError, match="tokens_per_row"):
        kernels.mixed_plan([0], 0, "cpu")


def test_launchers_refuse_bad_input() -> None:
    plan = kernels.mixed_plan([0, -1], 1, "cpu")
    x, w = torch.zeros(2, 8), torch.zeros(1, 4, 8)
    with pytest.raises(TypeError, match="dtype"):
        kernels.lora_mixed_shrink(x.double(), w.double(), plan)
    with pytest.raises(ValueError, match="M=2"):
        kernels.lora_mixed_shrink(torch.zeros(3, 8), w, plan)
    with pytest.raises(ValueError, match="R ≤ 128"):
        kernels.lora_mixed_shrink(x, torch.zeros(1, 129, 8), plan)
    with pytest.raises(ValueError, match="scale"):
        kernels.lora_mixed_expand(
            torch.zeros(2, 8), torch.zeros(1, 4), torch.zeros(1, 8, 4), torch.ones(2), plan
        )


def _layer_with_adapters(dtype: torch.dtype) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(24, 20).to(dtype), r=4, alpha=8.0)
    layer.add_adapter("big", r=17, alpha=4.0)  # another rank: padded to 17 in the stack
    layer.add_adapter("dora", r=3, alpha=6.0, use_dora=True)  # stays on the reference
    for name in layer.adapter_names():
        with torch.no_grad():
            layer.lora_B[name].normal_(std=0.5)
        for p in layer.adapter_parameters(name):
            p.requires_grad_(True)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_mixed_batch_kernel_equals_reference_with_dora_rows(dtype: torch.dtype) -> None:
    """``LoRALinear`` in a mixed batch: the kernel path (plain adapters) + reference (the DoRA adapter's
    rows) gives the reference path's output and gradients."""
    layer = _layer_with_adapters(dtype).to(DEVICE)
    names = ["big", "default", "__base__", "dora", "big"]
    x0 = torch.randn(5, 3, 24).to(dtype)

    def run(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layer.zero_grad()
        x = x0.to(DEVICE).requires_grad_()
        layer.row_adapters = names
        try:
            with fused_mode(mode):
                y = layer(x)
                y.float().square().sum().backward()
        finally:
            layer.row_adapters = None
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        return y, {"x": x.grad, **grads}

    with fused_mode("always"):
        assert plan_mixed(layer, x0.to(DEVICE)).path == "kernel"
    y, got = run("always")
    assert got  # the adapters got gradients
    y_ref, want = run("never")
    assert_close(y, y_ref)
    assert set(got) == set(want) and {"lora_A.big.weight", "lora_magnitude.dora.weight"} <= set(got)
    for n in got:
        assert_close(got[n], want[n], dtype)


def test_plan_mixed_keeps_the_reference_off_gpu_and_for_float64() -> None:
    layer = LoRALinear.from_linear(torch.nn.Linear(8, 8), r=2, alpha=2.0)
    x = torch.randn(2, 8)
    assert plan_mixed(layer, x).path == ("kernel" if HAS_CUDA else "reference")  # auto: CUDA only
    with fused_mode("always"):
        assert plan_mixed(layer, x.double()).path == "reference"
        layer.double()
        assert "fp16/bf16/fp32" in plan_mixed(layer, x.double()).reason


def test_mixed_adapters_trains_through_the_kernel_on_a_model() -> None:
    """``lc.mixed_adapters`` on a two-layer model with the kernel path forced: same loss and gradients as
    the reference path."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8))
    model = lc.apply_lora(net, lc.LoraConfig(r=4, target_modules=["0", "2"], dropout=0.0))
    lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["2"], dropout=0.0), adapter_name="b")
    for _, layer in lora_layers(model):
        for name in layer.adapter_names():
            torch.nn.init.normal_(layer.lora_B[name].data)  # B = 0 would hide A's gradient
    lc.set_adapter(model, ["default", "b"])
    model.to(DEVICE)
    x = torch.randn(4, 16, device=DEVICE)
    results = []
    for mode in ("always", "never"):
        model.zero_grad()
        with fused_mode(mode), lc.mixed_adapters(model, ["b", "default", "__base__", "b"]):
            loss = model(x).square().sum()
            loss.backward()
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, got), (loss_ref, want) = results
    assert_close(loss, loss_ref)
    assert set(got) == set(want) and len(got) == 6
    for n in got:
        assert_close(got[n], want[n])


@pytest.mark.gpu
def test_bf16_llama_sized_batch_on_gpu() -> None:
    """On a GPU: bf16, 8 adapters of rank 16, 8 rows × 512 tokens (the benchmark's batch), a 2048 → 5632
    layer: output and gradients against the reference computed in float32 from the same bf16 inputs."""
    torch.manual_seed(0)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    x = (torch.randn(8, 512, 2048, device=dev) / 4).to(bf16).requires_grad_()
    w = (torch.randn(5632, 2048, device=dev) / 64).to(bf16)
    factors = [(torch.randn(16, 2048, device=dev, requires_grad=True), torch.randn(5632, 16, device=dev) / 16,
                2.0) for _ in range(8)]  # fmt: skip
    for _, b, _ in factors:
        b.requires_grad_()
    index = [3, 1, -1, 7, 0, 5, 3, 2]
    g = torch.randn(8, 512, 5632, device=dev).to(bf16)
    y = mixed_lora_linear(x, DenseBase(w), factors, index)
    y.backward(g)
    leaves = [x] + [t for a, b, _ in factors for t in (a, b)]
    got = [t.grad for t in leaves]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref_factors = [(ref_leaves[1 + 2 * i], ref_leaves[2 + 2 * i], s) for i, (_, _, s) in enumerate(factors)]
    want_y = reference(ref_leaves[0], w.float(), None, ref_factors, index)
    want_y.backward(g.float())
    assert_close(y, want_y)
    for a, t in zip(got, ref_leaves):
        want = torch.zeros_like(t) if t.grad is None else t.grad
        torch.testing.assert_close(a.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
