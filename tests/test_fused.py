"""The fused LoRA / DoRA Functions against the reference formulas (float64, CPU), what they save, dispatch.

The expected values come from ``lora_core.lora.functional`` (autograd through the plain formula) and from
``LoRALinear``'s reference path; the dropout mask is shared by regenerating it from the same seed and
passing it to the reference explicitly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close, tolerance

from lora_core.dispatch import fused_mode, plan_lora
from lora_core.lora import fused
from lora_core.lora.bases import DenseBase, NF4Base
from lora_core.lora.functional import dora_linear_ref, dora_weight_norm_ref, lora_linear_ref
from lora_core.lora.fused import dropout_mask, fused_dora_linear, fused_lora_linear
from lora_core.lora.layer import LoRALinear

F64 = torch.float64


@st.composite
def problems(draw: st.DrawFn) -> dict:
    lead = draw(st.sampled_from([(1,), (5,), (2, 3), (3, 1, 2)]))
    n_in, n_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    r = draw(st.integers(1, min(n_in, n_out)))
    return {
        "lead": lead, "n_in": n_in, "n_out": n_out, "r": r,
        "dropout": draw(st.sampled_from([0.0, 0.0, 0.3, 0.7])),
        "bias": draw(st.sampled_from(["none", "frozen", "trainable"])),
        "scaling": draw(st.sampled_from([0.5, 2.0, 16 / math.sqrt(3)])),
        "transposed": draw(st.booleans()),  # a Conv1D-style (in, out) weight seen through .T
        "seed": draw(st.integers(0, 2**31)),
    }  # fmt: skip


def make(p: dict, dora: bool) -> dict:
    gen = torch.Generator().manual_seed(p["seed"])
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    w = rand(p["n_in"], p["n_out"]).T if p["transposed"] else rand(p["n_out"], p["n_in"])  # (out, in)
    t = {
        "x": rand(*p["lead"], p["n_in"]).requires_grad_(),
        "w": w,
        "a": rand(p["r"], p["n_in"]).requires_grad_(),
        "b": rand(p["n_out"], p["r"]).requires_grad_(),
        "bias": None if p["bias"] == "none" else rand(p["n_out"]).requires_grad_(p["bias"] == "trainable"),
    }
    if dora:
        t["m"] = (rand(p["n_out"]).abs() + 0.5).requires_grad_()
    return t


def grads(y: torch.Tensor, inputs: list[torch.Tensor | None], seed: int) -> list[torch.Tensor | None]:
    """∂⟨y, G⟩/∂input for a fixed random G (None where the input takes no gradient)."""
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=y.dtype)
    live = [t for t in inputs if t is not None and t.requires_grad]
    out = iter(torch.autograd.grad(y, live, g))
    return [next(out) if t is not None and t.requires_grad else None for t in inputs]


def ref_mask(p: dict, x: torch.Tensor, seed: int) -> torch.Tensor | None:
    if p["dropout"] == 0:
        return None
    # The Function draws the mask for x viewed as (M, in); the reference takes it in x's shape.
    return dropout_mask(x.detach().reshape(-1, x.shape[-1]), p["dropout"], seed).view(x.shape)


def assert_all_close(actual: list, expected: list) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e)


@given(problems())
def test_lora_function_matches_reference(p: dict) -> None:
    t = make(p, dora=False)
    ins = [t["x"], t["a"], t["b"], t["bias"]]
    y = fused_lora_linear(t["x"], DenseBase(t["w"]), t["a"], t["b"], t["bias"], scaling=p["scaling"],
                          dropout=p["dropout"], seed=p["seed"])  # fmt: skip
    mask = ref_mask(p, t["x"], p["seed"])
    y_ref = lora_linear_ref(t["x"], t["w"], t["bias"], t["a"], t["b"], p["scaling"], mask)
    assert y.shape == (*p["lead"], p["n_out"])
    assert_close(y, y_ref)
    assert_all_close(grads(y, ins, p["seed"]), grads(y_ref, ins, p["seed"]))


@given(problems())
def test_dora_function_matches_reference(p: dict) -> None:
    t = make(p, dora=True)
    ins = [t["x"], t["a"], t["b"], t["m"], t["bias"]]
    y = fused_dora_linear(t["x"], DenseBase(t["w"]), t["a"], t["b"], t["m"], t["bias"],
                          scaling=p["scaling"], dropout=p["dropout"], seed=p["seed"])  # fmt: skip
    mask = ref_mask(p, t["x"], p["seed"])
    y_ref = dora_linear_ref(t["x"], t["w"], t["bias"], t["a"], t["b"], t["m"], p["scaling"], mask)
    assert_close(y, y_ref)
    assert_all_close(grads(y, ins, p["seed"]), grads(y_ref, ins, p["seed"]))


def test_dora_zero_magnitude_row_still_gets_its_gradient() -> None:
    # m_j = 0 makes y_j = b_j: the backward cannot read z_j off the output and must recompute it.
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 5, generator=gen, dtype=F64), torch.randn(4, 5, generator=gen, dtype=F64)
    a, b = torch.randn(2, 5, generator=gen, dtype=F64), torch.randn(4, 2, generator=gen, dtype=F64)
    bias = torch.randn(4, generator=gen, dtype=F64)
    m = torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=F64, requires_grad=True)
    y = fused_dora_linear(x, DenseBase(w), a, b, m, bias, scaling=1.5)
    y_ref = dora_linear_ref(x, w, bias, a, b, m, 1.5)
    (gm,) = grads(y, [m], 0)
    (gm_ref,) = grads(y_ref, [m], 0)
    assert gm_ref[1] != 0 and torch.isfinite(gm).all()
    assert_close(gm, gm_ref)


def test_dora_row_norm_without_forming_the_sum() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(11, 7, generator=gen, dtype=F64)
    a, b = torch.randn(3, 7, generator=gen, dtype=F64), torch.randn(11, 3, generator=gen, dtype=F64)
    base = DenseBase(w)
    got = fused.dora_row_norm(base, a, b, 0.7, base.row_sqnorm(), F64)
    assert_close(got, dora_weight_norm_ref(w, a, b, 0.7))
    # A bf16 base with float32 adapters: float32 norms, bf16-accurate on CPU (float32-accurate on CUDA,
    # where cuBLAS hands back its float32 accumulator).
    wh, af, bf = w.bfloat16(), a.float(), b.float()
    got = fused.dora_row_norm(DenseBase(wh), af, bf, 0.7, DenseBase(wh).row_sqnorm(), torch.bfloat16)
    assert got.dtype == torch.float32
    assert_close(got, dora_weight_norm_ref(wh.float(), af, bf, 0.7), torch.bfloat16)


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64, requires_grad=True)
    x, w, a, b, bias, m = rand(2, 3, 4), rand(5, 4).detach(), rand(2, 4), rand(5, 2), rand(5), rand(5)
    for p in (0.0, 0.4):
        lora = lambda x, a, b, bias, p=p: fused_lora_linear(
            x, DenseBase(w), a, b, bias, scaling=1.3, dropout=p, seed=7
        )
        assert torch.autograd.gradcheck(lora, (x, a, b, bias))
        # DoRA's norm is detached (§4.3), so finite differences in A, B would see what backward ignores:
        # gradcheck the inputs whose derivative is exact.
        dora = lambda x, m, bias, p=p: fused_dora_linear(
            x, DenseBase(w), a.detach(), b.detach(), m, bias, scaling=1.3, dropout=p, seed=7
        )
        assert torch.autograd.gradcheck(dora, (x, m, bias))


# ---- what backward keeps ---------------------------------------------------------------------------


def saved_by(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return [out, *saved]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dora", [False, True])
def test_saves_x_once_and_xa_only(dropout: float, dora: bool) -> None:
    m_rows, n_in, n_out, r = 64, 48, 40, 4
    x = torch.randn(4, 16, n_in, dtype=F64, requires_grad=True)
    w = torch.randn(n_out, n_in, dtype=F64)  # frozen
    a = torch.randn(r, n_in, dtype=F64, requires_grad=True)
    b = torch.randn(n_out, r, dtype=F64, requires_grad=True)
    m = torch.rand(n_out, dtype=F64).add_(0.5).requires_grad_()
    bias = torch.randn(n_out, dtype=F64, requires_grad=True)
    params = {t.data_ptr() for t in (a, b, m, bias)}  # Parameters: saved by reference, no memory
    if dora:
        call = lambda: fused_dora_linear(x, DenseBase(w), a, b, m, bias, scaling=2.0, dropout=dropout)
    else:
        call = lambda: fused_lora_linear(x, DenseBase(w), a, b, bias, scaling=2.0, dropout=dropout)
    y, *saved = saved_by(call)
    acts = [t for t in saved if t.data_ptr() not in params]
    xs = [t for t in acts if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()]
    assert len(xs) == 1 and xs[0].numel() == x.numel()  # x, by reference: no copy
    small = [t for t in acts if tuple(t.shape) == (m_rows, r)]
    assert len(small) == 1  # xa = drop(x) Aᵀ
    rest = [t for t in acts if not any(t is u for u in xs + small)]
    w_storage = w.untyped_storage().data_ptr()
    for t in saved:  # never the weight, never anything weight-sized (a dequantized or cast copy)
        assert t.untyped_storage().data_ptr() != w_storage
        assert tuple(t.shape) not in {(n_out, n_in), (n_in, n_out)}
    if not dora:
        assert rest == []  # no mask, no drop(x): dropout is regenerated from a seed
        return
    vectors = [t for t in rest if tuple(t.shape) == (n_out,)]
    big = [t for t in rest if t.ndim > 1 or t.numel() > n_out]
    assert len(vectors) == 2 and len(big) == 1 and len(rest) == 3  # g, ‖V‖ and one (M, out)
    if dropout == 0:  # ...which is the output itself (the caller holds it anyway)
        assert big[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    else:  # ...w = drop(x) W₀ᵀ + s·xa Bᵀ, needed for ∂L/∂m
        assert big[0].untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


def test_reference_path_saves_more() -> None:
    # The baseline the audit above improves on: autograd through the formula keeps drop(x) and the mask.
    x = torch.randn(32, 24, dtype=F64, requires_grad=True)
    w, a, b = torch.randn(16, 24, dtype=F64), torch.randn(4, 24, dtype=F64), torch.randn(16, 4, dtype=F64)
    a.requires_grad_()
    b.requires_grad_()
    mask = dropout_mask(x.detach(), 0.1, 0)
    _, *saved = saved_by(lambda: lora_linear_ref(x, w, None, a, b, 2.0, mask))
    full = [t for t in saved if t.shape == x.shape]
    assert len(full) >= 2  # the fused Function keeps exactly one


# ---- dropout mask ----------------------------------------------------------------------------------


def test_dropout_mask_is_a_function_of_the_seed() -> None:
    like = torch.empty(200, 100, dtype=torch.float32)
    m1, m2, m3 = dropout_mask(like, 0.25, 5), dropout_mask(like, 0.25, 5), dropout_mask(like, 0.25, 6)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    values = m1.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75)
    dropped = (m1 == 0).float().mean().item()
    assert abs(dropped - 0.25) < 5 * math.sqrt(0.25 * 0.75 / m1.numel())


# ---- through the module: the dispatch point --------------------------------------------------------


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Half-precision products of sums that cancel can be off by a few ulps of the *largest* term in one
    element; compare ‖actual − expected‖ against the dtype's rtol times ‖expected‖ instead."""
    rtol, _ = tolerance(dtype)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape
    assert torch.linalg.vector_norm(actual - expected) <= rtol * torch.linalg.vector_norm(expected)


def layer(dora: bool, dropout: float, dtype: torch.dtype = F64, bias: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10, bias=bias, dtype=dtype)
    mod = LoRALinear.from_linear(lin, r=3, alpha=6.0, dropout=dropout, use_dora=dora)
    torch.nn.init.normal_(mod.lora_B.weight)
    return mod


def fuses(mod: LoRALinear, x: torch.Tensor) -> bool:
    """Whether dispatch sends ``mod(x)`` through the fused Function."""
    return plan_lora(mod, x).path == "fused"


def module_grads(mod: LoRALinear, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    y = mod(x)
    ins = [x, *[p for p in mod.parameters() if p.requires_grad]]
    return [y, *grads(y, ins, 0)]


@pytest.mark.parametrize("dora", [False, True])
def test_module_fused_equals_module_reference(dora: bool) -> None:
    # No dropout in train mode; with dropout in eval mode (identity): both paths are deterministic.
    for dropout, train in ((0.0, True), (0.2, False)):
        mod = layer(dora, dropout)
        mod.bias.requires_grad_(True)
        mod.train(train)
        x = torch.randn(3, 4, 12, dtype=F64)
        with fused_mode("always"):
            assert fuses(mod, x)
            got = module_grads(mod, x)
        with fused_mode("never"):
            want = module_grads(mod, x)
        assert_all_close(got, want)


@pytest.mark.parametrize("dora", [False, True])
def test_unfrozen_base_weight_gets_its_gradient(dora: bool) -> None:
    # A user may unfreeze W₀ (full fine-tuning plus an adapter); "always" must not drop ∂L/∂W₀.
    mod = layer(dora, 0.0)
    mod.weight.requires_grad_(True)
    x = torch.randn(4, 12, dtype=F64)
    with fused_mode("always"):
        got = module_grads(mod, x)
    with fused_mode("never"):
        want = module_grads(mod, x)
    assert len(got) == 6 + dora  # y, ∂x, ∂W₀, ∂b, ∂A, ∂B (, ∂m)
    assert_all_close(got, want)
    if not dora:  # ∂⟨y, G⟩/∂W₀ = Gᵀ x, written out (G as grads() draws it)
        g = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        assert_close(got[2], g.T @ x)


def test_dora_norm_cache_follows_the_base_weight() -> None:
    mod = layer(True, 0.0)
    x = torch.randn(5, 12, dtype=F64)
    with fused_mode("always"):
        mod(x)  # fills the ‖W₀‖² cache
        mod.base.set_dense_weight(torch.randn(10, 12, dtype=F64))  # in place: same Parameter, new version
        got = mod(x)
    with fused_mode("never"):
        assert_close(got, mod(x))


def test_half_base_float32_adapters() -> None:
    # PEFT's default dtype mix: bf16 frozen weight, float32 A/B/m; the fused path computes in bf16.
    for dora in (False, True):
        mod = layer(dora, 0.0, dtype=torch.bfloat16)
        x = torch.randn(8, 12, dtype=torch.bfloat16)
        with fused_mode("always"):
            got = module_grads(mod, x)
        with fused_mode("never"):
            want = module_grads(mod, x)
        assert [t.dtype for t in got] == [t.dtype for t in want]  # float32 grads for float32 adapters
        assert_close(got[0], want[0])  # the output, elementwise
        for a, e in zip(got[1:], want[1:]):
            assert_close_normwise(a, e, torch.bfloat16)


def test_dispatch_rules() -> None:
    mod = layer(False, 0.0)
    x = torch.randn(2, 12, dtype=F64)
    assert fuses(mod, x)  # "auto" on CPU with grad enabled (training): the fused Function
    assert not fuses(layer(True, 0.0), x)  # ... for LoRA; DoRA keeps the reference off CUDA
    with torch.no_grad():
        assert not fuses(mod, x)  # "auto" on CPU without grad: the reference
    with torch.inference_mode():
        assert not fuses(mod, x)
    with fused_mode("always"):
        assert fuses(mod, x)
        assert not fuses(mod, x.float())  # dtype mismatch: the reference raises as before
        mod.merge()
        assert not fuses(mod, x)
    mod.unmerge()
    mod.weight.requires_grad_(True)  # an unfrozen base: its gradient needs the reference path
    with fused_mode("always"):
        assert not fuses(mod, x)
        with torch.no_grad():
            assert fuses(mod, x)  # no graph, no gradient to lose
    with pytest.raises(ValueError, match="mode must be one of"):
        with fused_mode("fast"):
            pass


@pytest.mark.parametrize("dora", [False, True])
def test_fused_under_bf16_autocast_computes_as_autocast_would(dora: bool) -> None:
    """``lc.train`` runs under bf16 autocast on a GPU: the plan there is the fused Function in bf16 (it was
    the reference before), with outputs and gradients as the reference path gives under the same autocast.
    Checked on CPU, where autocast(bf16) exists too (where "auto" takes the same plan when grad is on)."""
    mod = layer(dora, 0.0, dtype=torch.float32)  # a float32 model trained under bf16 autocast
    x = torch.randn(6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ("reference", None) if dora else ("fused", torch.bfloat16)  # CPU, grad on: LoRA fuses
        assert (plan_lora(mod, x).path, plan_lora(mod, x).dtype) == auto
        with torch.no_grad():
            assert plan_lora(mod, x).path == "reference"  # auto: CPU input, no grad
        with fused_mode("always"):
            plan = plan_lora(mod, x)
            assert (plan.path, plan.dtype) == ("fused", torch.bfloat16)
            got = module_grads(mod, x)
        with fused_mode("never"):
            want = module_grads(mod, x)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert got[0].dtype == torch.bfloat16  # the output in autocast's dtype, as F.linear gives under it
    for a, e in zip(got, want):
        assert_close_normwise(a, e, torch.bfloat16)


def test_bad_arguments() -> None:
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="x must be"):
        fused_lora_linear(torch.randn(2, 5), DenseBase(w), a, b, scaling=1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        fused_lora_linear(x, DenseBase(w), a, b.T, scaling=1.0)
    with pytest.raises(ValueError, match="dropout"):
        fused_lora_linear(x, DenseBase(w), a, b, scaling=1.0, dropout=1.0)
    with pytest.raises(ValueError, match="magnitude"):
        fused_dora_linear(x, DenseBase(w), a, b, torch.ones(4), scaling=1.0)


# ---- NF4 base (once lora_core.quant.nf4 has quantize_nf4) ------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_nf4_base_matches_reference_on_dequantized_weight(dora: bool) -> None:
    nf4 = pytest.importorskip("lora_core.quant.nf4")
    if not hasattr(nf4, "quantize_nf4") or not hasattr(nf4, "nf4_matmul_ref"):
        pytest.skip("NF4 quantization has not landed on this branch yet")
    gen = torch.Generator().manual_seed(2)
    q = nf4.quantize_nf4(torch.randn(24, 64, generator=gen), 64, True)
    w = nf4.dequantize_nf4(q, torch.float32)
    x = torch.randn(5, 64, generator=gen, requires_grad=True)
    a = torch.randn(4, 64, generator=gen, requires_grad=True)
    b = torch.randn(24, 4, generator=gen, requires_grad=True)
    m = torch.rand(24, generator=gen).add_(0.5).requires_grad_()
    ins = [x, a, b] + ([m] if dora else [])
    if dora:
        y = fused_dora_linear(x, NF4Base(q), a, b, m, scaling=2.0, dropout=0.2, seed=1)
        y_ref = dora_linear_ref(x, w, None, a, b, m, 2.0, dropout_mask(x.detach(), 0.2, 1))
    else:
        y = fused_lora_linear(x, NF4Base(q), a, b, scaling=2.0, dropout=0.2, seed=1)
        y_ref = lora_linear_ref(x, w, None, a, b, 2.0, dropout_mask(x.detach(), 0.2, 1))
    assert_close(y, y_ref)
    assert_all_close(grads(y, ins, 0), grads(y_ref, ins, 0))


# ---- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_gpu_half_matches_float64_reference(dtype: torch.dtype, dora: bool) -> None:
    mod = layer(dora, 0.0, dtype=dtype).cuda()
    x = torch.randn(4, 64, 12, device="cuda", dtype=dtype)
    assert fuses(mod, x)
    got = module_grads(mod, x)
    ref = layer(dora, 0.0, dtype=F64)
    ref.load_state_dict({k: v.double().cpu() for k, v in mod.state_dict().items()})
    want = module_grads(ref, x.double().cpu())
    assert_close(got[0], want[0])
    for a, e in zip(got[1:], want[1:]):
        assert_close_normwise(a, e, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dora", [False, True])
def test_gpu_activation_memory_within_budget(dora: bool) -> None:
    m_rows, n_in, n_out, r = 2048, 1024, 1024, 16
    lin = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
    mod = LoRALinear.from_linear(lin, r=r, alpha=32.0, dropout=0.05, use_dora=dora)
    x = torch.randn(m_rows, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mod(x)  # warm-up: cuBLAS workspaces, the ‖W₀‖² cache
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = mod(x)
    held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    budget = m_rows * (n_in + r) * 2 + (m_rows * n_out * 2 if dora else 0)  # bytes; DoRA+dropout keeps w
    assert held <= budget + (1 << 20), (held, budget)
    y.sum().backward()


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_module_fused_equals_reference(dora: bool) -> None:
    qlora = pytest.importorskip("lora_core.lora.qlora")
    torch.manual_seed(0)
    mod = qlora.QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, alpha=8.0, use_dora=dora)
    torch.nn.init.normal_(mod.lora_B.weight)
    assert isinstance(mod.base, NF4Base)
    x = torch.randn(6, 64)
    with fused_mode("always"):
        assert fuses(mod, x)
        got = module_grads(mod, x)
    with fused_mode("never"):
        want = module_grads(mod, x)
    for a, e in zip(got, want):
        assert_close(a, e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_layer_benchmark_refuses_without_cuda(tmp_path, capsys) -> None:
    from lora_core.bench import layers as bench_layers

    assert bench_layers.main(["--out", str(tmp_path / "res")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()  # nothing half-written
