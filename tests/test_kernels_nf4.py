"""The NF4 Triton kernels (lora_core.kernels) against the reference, on fresh random inputs.

Without CUDA the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay
tiny and dtypes are fp16/fp32 (bf16 is wrong under the interpreter); bf16 and big shapes run on a GPU.

Inputs are quantized by the real bitsandbytes (CPU); the reference is
``lora_core.quant.nf4.nf4_dequantize_ref``, itself checked below against bitsandbytes' fields decoded by
hand (``bnb_oracle``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from bnb_oracle import decode_bnb_fields
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

import lora_core.quant.nf4 as nf4
from lora_core.quant.nf4 import NF4Tensor

pytestmark = pytest.mark.triton
Fb = pytest.importorskip("bitsandbytes.functional")
kernels = pytest.importorskip("lora_core.kernels")
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# bf16 is computed wrongly by the interpreter on CPU: checked on a GPU only.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])


# ----------------------------------------------------------------------------- inputs and reference


def quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """NF4Tensor from bitsandbytes' own quantizer (CPU), moved to DEVICE."""
    packed, st_ = Fb.quantize_4bit(
        w.float().cpu(), blocksize=block_size, quant_type="nf4", compress_statistics=double_quant
    )
    nested = {}
    if double_quant:
        nested = {
            "nested_absmax": st_.state2.absmax.to(DEVICE),
            "nested_code": st_.state2.code.float().to(DEVICE),
            "nested_block_size": int(st_.state2.blocksize),
            "offset": st_.offset.float().reshape(()).to(DEVICE),
        }
    return NF4Tensor(
        packed=packed.reshape(-1).to(DEVICE), absmax=st_.absmax.to(DEVICE), shape=w.shape, dtype=w.dtype,
        block_size=block_size, code=st_.code.float().to(DEVICE), **nested,
    )  # fmt: skip


def dequantize_ref(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    return nf4.nf4_dequantize_ref(q, dtype)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x``, stored with a last-dim stride of 2 (every other column of a wider tensor)."""
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous() or x.numel() == 1  # a single element is contiguous whatever its strides
    return out


def nan_full(shape: tuple[int, ...] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A NaN-filled tensor: as ``out=`` / ``workspace=`` it shows any cell a kernel reads before writing
    or forgets to write (NaN is never equal to anything)."""
    return torch.full((shape,) if isinstance(shape, int) else shape, float("nan"), dtype=dtype, device=DEVICE)


def poisoned(rows: int, q: NF4Tensor, out_shape: tuple[int, ...], dtype: torch.dtype, grad: bool) -> dict:
    """``out=`` and ``workspace=`` for a matmul launcher, both NaN-filled."""
    numel = kernels.nf4_matmul_workspace_numel(rows, q, grad=grad)
    return {"out": nan_full(out_shape, dtype), "workspace": nan_full(numel)}


# ----------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("double_quant", [False, True])
def test_reference_matches_bitsandbytes(double_quant: bool) -> None:
    w = randn(7, 97, seed=1).cpu()
    packed, st_ = Fb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = quantize(w, 64, double_quant)
    # bitsandbytes' fields decoded by hand: its CPU dequantize_4bit is wrong on some CPUs (see bnb_oracle)
    assert_close(dequantize_ref(q, torch.float32).cpu(), decode_bnb_fields(packed, st_))


@given(
    shape=st.sampled_from([(1,), (63,), (130,), (3, 33), (5, 64), (4, 7, 9), (17, 70)]),
    block_size=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    use_out=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_dequantize_bit_exact(shape, block_size, double_quant, dtype, use_out, seed) -> None:
    q = quantize(randn(*shape, seed=seed), block_size, double_quant)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) if use_out else None  # poisoned
    got = kernels.nf4_dequantize(q, dtype, out=out)
    if use_out:
        assert got is out
    assert got.shape == torch.Size(shape) and got.dtype == dtype
    assert torch.equal(got, dequantize_ref(q, dtype))  # bit for bit, NaN never equal


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_many_nested_blocks(dtype: torch.dtype) -> None:
    # > 256 quantization blocks: the nested scale index b // 256 reaches 1 and 2; several programs
    q = quantize(randn(40, 1000, seed=7), 64, double_quant=True)
    assert q.nested_absmax.numel() == 3
    out = torch.full((40, 1000), float("nan"), dtype=dtype, device=DEVICE)
    assert torch.equal(kernels.nf4_dequantize(q, dtype, out=out), dequantize_ref(q, dtype))


# ----------------------------------------------------------------------------- matmul and its gradient

# K: aligned to the block (fast path), even but ragged (per-byte scales), odd (dequantize + torch path)
K_VALUES = [128, 96, 70, 33]


def _expected(a: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None, grad: bool) -> torch.Tensor:
    w = dequantize_ref(q, a.dtype).double()  # the weight rounded to the input's dtype, as documented
    out = a.double() @ (w if grad else w.T)
    return out if bias is None else out + bias.double()


@given(
    m=st.sampled_from([1, 3, 17]),
    n=st.integers(1, 40),
    k=st.sampled_from(K_VALUES),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    layout=st.sampled_from(["2d", "3d", "noncontiguous", "transposed", "padded"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matmul(m, n, k, double_quant, dtype, with_bias, layout, seed) -> None:
    q = quantize(randn(n, k, seed=seed), 64, double_quant)
    x = randn(m, k, seed=seed + 1, dtype=dtype)
    bias = randn(n, seed=seed + 2, dtype=dtype) if with_bias else None
    if layout == "3d":
        x = x.reshape(1, m, k)
    elif layout == "noncontiguous":
        x = noncontiguous(x)
    elif layout == "transposed":
        x = randn(k, m, seed=seed + 1, dtype=dtype).T  # column-major x
    elif layout == "padded":  # rows of a wider tensor: a row stride that is not a multiple of 8
        x = randn(m, k + 4, seed=seed + 1, dtype=dtype)[:, :k]
    buffers = poisoned(m, q, (*x.shape[:-1], n), dtype, grad=False)
    y = kernels.nf4_matmul(x, q, bias, **buffers)
    assert y is buffers["out"] and y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    assert_close(y, _expected(x, q, bias, grad=False))


@pytest.mark.parametrize("pad", [4, 8])  # a row stride of K + 4 (not a multiple of 8) and K + 8
def test_matmul_row_stride_of_x(pad: int) -> None:
    """x's rows inside a wider tensor: the fused kernel's 16-byte loads of x are only used when the row
    stride is a multiple of 8 elements; either way the result is the contiguous x's, bit for bit."""
    q = quantize(randn(24, 256, seed=40), 64, True)
    wide = randn(3, 256 + pad, seed=41, dtype=torch.float16)
    x = wide[:, :256]
    assert torch.equal(kernels.nf4_matmul(x, q), kernels.nf4_matmul(x.contiguous(), q))
    assert_close(kernels.nf4_matmul(x, q), _expected(x, q, None, grad=False))


@given(
    m=st.sampled_from([1, 3, 17]),
    n=st.integers(1, 40),
    k=st.sampled_from(K_VALUES),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["2d", "3d", "noncontiguous"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matmul_grad(m, n, k, double_quant, dtype, layout, seed) -> None:
    q = quantize(randn(n, k, seed=seed), 64, double_quant)
    g = randn(m, n, seed=seed + 1, dtype=dtype)
    if layout == "3d":
        g = g.reshape(m, 1, n)
    elif layout == "noncontiguous":
        g = noncontiguous(g)
    buffers = poisoned(m, q, (*g.shape[:-1], k), dtype, grad=True)
    dx = kernels.nf4_matmul_grad(g, q, **buffers)
    assert dx is buffers["out"] and dx.shape == (*g.shape[:-1], k) and dx.dtype == dtype
    assert_close(dx, _expected(g, q, None, grad=True))


# BLOCK_K=32 < block_size=64 forces the per-byte-scale path even for aligned K; SPLIT 3 leaves a remainder.
CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 4},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT": 3},
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT": 1},
]


def _fused_poisoned(a: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None, grad: bool, cfg: dict[str, int]
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:  # fmt: skip
    """The fused kernel with a forced configuration, into NaN-filled out and workspace; returns both."""
    from lora_core.kernels.nf4_gemm import _launch_fused, _plan

    plan = _plan(a.shape[0], q, grad, a.device, cfg)
    out = nan_full((a.shape[0], q.shape[1] if grad else q.shape[0]), a.dtype)
    ws = nan_full(plan["WS"])
    assert _launch_fused(a, q, bias, grad, cfg, out=out, workspace=ws) is out
    return out, ws, plan


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("double_quant", [False, True])
def test_fused_split_k_configs(cfg: dict[str, int], double_quant: bool) -> None:
    q = quantize(randn(40, 448, seed=3), 64, double_quant)  # 7 blocks per row
    x = randn(5, 448, seed=4, dtype=torch.float16)
    bias = randn(40, seed=5, dtype=torch.float16)
    g = randn(5, 40, seed=6, dtype=torch.float16)
    y, _, _ = _fused_poisoned(x, q, bias, False, cfg)
    dx, _, _ = _fused_poisoned(g, q, None, True, cfg)
    assert_close(y, _expected(x, q, bias, grad=False))
    assert_close(dx, _expected(g, q, None, grad=True))


@pytest.mark.parametrize("grad", [False, True], ids=["matmul", "grad"])
@pytest.mark.parametrize("seed", [31, 32])
def test_split_k_reduces_in_one_launch_bit_exact(grad: bool, seed: int) -> None:
    """Split-K sums its partials in the same launch (the last program of a tile to arrive adds them up).
    The result must be, bit for bit, what the former second kernel computed from the same partials —
    ``0 + ws[0] + ws[1] + … (+ bias)`` in float32, then one rounding — every partial must be the product
    over its slice, and a repeated call (the tile counters reset) must give identical bits."""
    from lora_core.kernels.splitk import tile_counters

    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 3}  # K: 192 + 192 + 64, N: 16 + 16 + 8
    n, k, m = 40, 448, 5
    q = quantize(randn(n, k, seed=seed), 64, True)
    a = randn(m, n if grad else k, seed=seed + 1, dtype=torch.float16)
    bias = None if grad else randn(n, seed=seed + 2, dtype=torch.float16)
    out, ws, plan = _fused_poisoned(a, q, bias, grad, cfg)
    split, per, n_out = plan["SPLIT"], plan["PER_SPLIT"], k if grad else n
    assert split == 3 and plan["TILES"] > 1
    partials = ws.view(split, m, n_out)
    # the former reduce kernel: acc = 0; acc += ws[s] in split order; acc += bias; cast (all float32)
    acc = torch.zeros(m, n_out, dtype=torch.float32, device=DEVICE)
    for s in range(split):
        acc = acc + partials[s]
    if bias is not None:
        acc = acc + bias.float()
    assert torch.equal(out, acc.to(out.dtype))
    w = dequantize_ref(q, a.dtype).double()
    for s in range(split):  # each partial is the product over its own slice of the reduction
        lo, hi = s * per, min((s + 1) * per, n if grad else k)
        want = a[:, lo:hi].double() @ (w[lo:hi] if grad else w[:, lo:hi].T)
        assert_close(partials[s], want, dtype=torch.float16)
    assert_close(out, _expected(a, q, bias, grad))
    assert int(tile_counters(DEVICE, plan["TILES"])[: plan["TILES"]].abs().sum()) == 0  # reset
    again, _, _ = _fused_poisoned(a, q, bias, grad, cfg)
    assert torch.equal(again, out)


@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("k", [256, 200])  # 200: K % 64 != 0, one scale per packed word
def test_fused_block_sizes_and_ragged_k(block_size: int, k: int) -> None:
    q = nf4.quantize_nf4(randn(24, k, seed=20), block_size, double_quant=True)  # bnb has no 16-blocks
    x, g = randn(3, k, seed=21, dtype=torch.float16), randn(3, 24, seed=22, dtype=torch.float16)
    y = kernels.nf4_matmul(x, q, **poisoned(3, q, (3, 24), torch.float16, grad=False))
    dx = kernels.nf4_matmul_grad(g, q, **poisoned(3, q, (3, k), torch.float16, grad=True))
    assert_close(y, _expected(x, q, None, grad=False))
    assert_close(dx, _expected(g, q, None, grad=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matmul_uses_the_dequantized_weight_bit_for_bit(dtype: torch.dtype) -> None:
    """One-hot rows of x pick columns of W exactly (products with 1, sums of zeros): the fused kernels
    must see the very weights nf4_dequantize gives (FP fusion off: the absmax is not one FMA)."""
    n, k = 40, 512
    q = quantize(randn(n, k, seed=23), 64, double_quant=True)
    w = dequantize_ref(q, dtype)  # (N, K)
    cols, rows = torch.tensor([0, 7, 63, 64, 300, 511]), torch.tensor([0, 1, 17, 39])
    x = torch.zeros(len(cols), k, dtype=dtype, device=DEVICE)
    x[torch.arange(len(cols)), cols.to(DEVICE)] = 1
    g = torch.zeros(len(rows), n, dtype=dtype, device=DEVICE)
    g[torch.arange(len(rows)), rows.to(DEVICE)] = 1
    assert torch.equal(kernels.nf4_matmul(x, q), w[:, cols.to(DEVICE)].T)
    assert torch.equal(kernels.nf4_matmul_grad(g, q), w[rows.to(DEVICE)])


def test_large_m_dequantize_then_torch() -> None:
    from lora_core.kernels.nf4_gemm import FUSED_MAX_M

    m = FUSED_MAX_M + 1
    q = quantize(randn(24, 64, seed=8), 64, True)
    x = randn(m, 64, seed=9)
    bias = randn(24, seed=10)
    assert_close(kernels.nf4_matmul(x, q, bias), _expected(x, q, bias, grad=False))
    g = randn(m, 24, seed=11)
    assert_close(kernels.nf4_matmul_grad(g, q), _expected(g, q, None, grad=True))


def test_empty_batch() -> None:
    q = quantize(randn(8, 64, seed=12), 64)
    assert kernels.nf4_matmul(torch.empty(0, 64, device=DEVICE), q).shape == (0, 8)
    assert kernels.nf4_matmul_grad(torch.empty(2, 0, 8, device=DEVICE), q).shape == (2, 0, 64)


def test_empty_weight_dimensions() -> None:
    """K = 0: the sum over K is empty, so y = bias; N = 0: grad_out has no columns, so dx = 0."""
    no_k = quantize(torch.empty(5, 0), 64)  # (N=5, K=0)
    bias = randn(5, seed=16)
    assert torch.equal(kernels.nf4_matmul(randn(3, 0, seed=0), no_k, bias), bias.expand(3, 5))
    assert torch.equal(kernels.nf4_matmul(randn(2, 3, 0, seed=0), no_k), torch.zeros(2, 3, 5, device=DEVICE))
    assert kernels.nf4_matmul_grad(randn(3, 5, seed=0), no_k).shape == (3, 0)
    no_n = quantize(torch.empty(0, 4), 64)  # (N=0, K=4)
    assert torch.equal(kernels.nf4_matmul_grad(randn(3, 0, seed=0), no_n), torch.zeros(3, 4, device=DEVICE))
    assert kernels.nf4_matmul(randn(3, 4, seed=0), no_n).shape == (3, 0)


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the same values, stored every other element of a bigger buffer (not contiguous)."""
    wide = torch.zeros(t.numel(), 2, dtype=t.dtype, device=t.device)
    wide[:, 0] = t.reshape(-1)
    return wide[:, 0].reshape(t.shape) if t.dim() else wide[0, 0]


@pytest.mark.parametrize("double_quant", [False, True])
def test_noncontiguous_nf4_tensors(double_quant: bool) -> None:
    """An NF4Tensor whose packed bytes / scales are strided views (e.g. sliced out of a bigger state
    dict) gives the same results as a contiguous one."""
    q = quantize(randn(24, 64, seed=17), 32, double_quant)
    strided = NF4Tensor(**{**q.__dict__, **{k: strided_copy(v) for k, v in q.tensors().items() if v.dim()}})
    assert not strided.packed.is_contiguous() and not strided.absmax.is_contiguous()
    assert torch.equal(kernels.nf4_dequantize(strided, torch.float32), dequantize_ref(q, torch.float32))
    x, g = randn(3, 64, seed=18), randn(3, 24, seed=19)
    assert torch.equal(kernels.nf4_matmul(x, strided), kernels.nf4_matmul(x, q))
    assert torch.equal(kernels.nf4_matmul_grad(g, strided), kernels.nf4_matmul_grad(g, q))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    q = quantize(randn(8, 64, seed=13), 64)
    x = randn(2, 64, seed=14)
    with pytest.raises(TypeError, match="NF4Tensor"):
        kernels.nf4_matmul(x, torch.zeros(8, 64, device=DEVICE))
    with pytest.raises(TypeError, match="x must be float16"):
        kernels.nf4_matmul(x.to(torch.int32), q)
    with pytest.raises(ValueError, match="in_features=64"):
        kernels.nf4_matmul(randn(2, 63, seed=0), q)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        kernels.nf4_matmul_grad(randn(2, 64, seed=0), q)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.nf4_matmul(x, q, randn(7, seed=0))
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.nf4_matmul(x, q, randn(8, seed=0, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D weight"):
        kernels.nf4_matmul(x, quantize(randn(2, 4, 64, seed=0), 64))
    with pytest.raises(TypeError, match="dtype must be one of"):
        kernels.nf4_dequantize(q, torch.int8)
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernels.nf4_dequantize(q, torch.float32, out=torch.empty(8, 63, device=DEVICE))
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernels.nf4_dequantize(q, torch.float32, out=torch.empty(64, 8, device=DEVICE).T)
    for launcher, arg in ((kernels.nf4_matmul, x), (kernels.nf4_matmul_grad, randn(2, 8, seed=0))):
        width = 8 if launcher is kernels.nf4_matmul else 64
        with pytest.raises(TypeError, match="out must be a torch"):
            launcher(arg, q, out=[0.0])
        for bad in (nan_full((2, width + 1)), nan_full((2, width), torch.float16), nan_full((width, 2)).T):
            with pytest.raises(ValueError, match="out must be contiguous, shape"):
                launcher(arg, q, out=bad)
    one, wide = randn(1, 2048, seed=0, dtype=torch.float16), quantize(randn(64, 2048, seed=0), 64)
    needed = kernels.nf4_matmul_workspace_numel(1, wide)
    assert needed > 0  # K = 2048 is reduced in slices: a split-K launch
    with pytest.raises(ValueError, match=f"workspace must have at least {needed} elements"):
        kernels.nf4_matmul(one, wide, workspace=nan_full(needed - 1))
    with pytest.raises(ValueError, match="workspace must be a contiguous float32"):
        kernels.nf4_matmul(one, wide, workspace=nan_full(needed, torch.float16))
    with pytest.raises(TypeError, match="workspace must be a torch"):
        kernels.nf4_matmul(one, wide, workspace="big")
    with pytest.raises(ValueError, match="rows must be an int"):
        kernels.nf4_matmul_workspace_numel(-1, q)
    broken = NF4Tensor(**{**q.__dict__, "absmax": q.absmax[:-1]})
    with pytest.raises(ValueError, match="absmax must be"):
        kernels.nf4_dequantize(broken)
    broken = NF4Tensor(**{**q.__dict__, "block_size": 48})
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        kernels.nf4_dequantize(broken)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal; with CUDA, CPU tensors are refused anyway")
def test_cpu_tensors_refused_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    q = quantize(randn(8, 64, seed=15), 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what a CPU user without the interpreter has
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.nf4_dequantize(q)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.nf4_matmul(randn(1, 64, seed=0), q)


def test_import_is_lazy_and_names_are_functions() -> None:
    code = (
        "import sys, lora_core.kernels as k\n"
        "assert 'triton' not in sys.modules, 'importing lora_core.kernels imported triton'\n"
        "import lora_core.kernels.nf4_gemm\n"  # importing the module keeps the function reachable
        "assert callable(k.nf4_matmul) and k.nf4_matmul.__name__ == 'nf4_matmul', k.nf4_matmul\n"
        "assert k.nf4_dequantize.__name__ == 'nf4_dequantize' and callable(k.nf4_matmul_grad)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- GPU only: bf16, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_gpu_dequantize_bf16_large_bit_exact(double_quant: bool) -> None:
    q = quantize(torch.randn(4096, 4096), 64, double_quant)  # FMA contraction would show here
    out = torch.full((4096, 4096), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert torch.equal(kernels.nf4_dequantize(q, torch.bfloat16, out=out), dequantize_ref(q, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64, 65, 512])
def test_gpu_matmul_bf16_large(m: int) -> None:
    n, k = 2048, 4096
    q = quantize(torch.randn(n, k) * 0.02, 64, True)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y = kernels.nf4_matmul(x, q, bias, **poisoned(m, q, (m, n), torch.bfloat16, grad=False))
    dx = kernels.nf4_matmul_grad(g, q, **poisoned(m, q, (m, k), torch.bfloat16, grad=True))
    assert_close(y, _expected(x, q, bias, grad=False))
    assert_close(dx, _expected(g, q, None, grad=True))
