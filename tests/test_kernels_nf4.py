"""The NF4 Triton kernels (lora_core.kernels) against the reference, on fresh random inputs.

Without CUDA the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay
tiny and dtypes are fp16/fp32 (bf16 is wrong under the interpreter); bf16 and big shapes run on a GPU.

Inputs are quantized by the real bitsandbytes (CPU); the reference is
``lora_core.quant.nf4.nf4_dequantize_ref``, itself checked below against bitsandbytes' fields decoded by
hand (``bnb_oracle``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator

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


@contextlib.contextmanager
def poisoned_alloc() -> Iterator[None]:
    """Every output / split-K workspace the matmul launchers allocate starts as NaN (catches unwritten cells).

    A context manager, not a fixture: hypothesis reuses function-scoped fixtures across examples.
    """
    mod = importlib.import_module("lora_core.kernels.nf4_gemm")
    saved = mod._alloc
    mod._alloc = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    try:
        yield
    finally:
        mod._alloc = saved


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
    layout=st.sampled_from(["2d", "3d", "noncontiguous", "transposed"]),
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
    with poisoned_alloc():
        y = kernels.nf4_matmul(x, q, bias)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    assert_close(y, _expected(x, q, bias, grad=False))


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
    with poisoned_alloc():
        dx = kernels.nf4_matmul_grad(g, q)
    assert dx.shape == (*g.shape[:-1], k) and dx.dtype == dtype
    assert_close(dx, _expected(g, q, None, grad=True))


# BLOCK_K=32 < block_size=64 forces the per-byte-scale path even for aligned K; SPLIT 3 leaves a remainder.
CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 4},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT": 3},
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT": 1},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("double_quant", [False, True])
def test_fused_split_k_configs(cfg: dict[str, int], double_quant: bool) -> None:
    from lora_core.kernels.nf4_gemm import _launch_fused

    q = quantize(randn(40, 448, seed=3), 64, double_quant)  # 7 blocks per row
    x = randn(5, 448, seed=4, dtype=torch.float16)
    bias = randn(40, seed=5, dtype=torch.float16)
    g = randn(5, 40, seed=6, dtype=torch.float16)
    with poisoned_alloc():
        y, dx = _launch_fused(x, q, bias, False, cfg), _launch_fused(g, q, None, True, cfg)
    assert_close(y, _expected(x, q, bias, grad=False))
    assert_close(dx, _expected(g, q, None, grad=True))


@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("k", [256, 200])  # 200: K % 64 != 0, one scale per packed word
def test_fused_block_sizes_and_ragged_k(block_size: int, k: int) -> None:
    q = nf4.quantize_nf4(randn(24, k, seed=20), block_size, double_quant=True)  # bnb has no 16-blocks
    x, g = randn(3, k, seed=21, dtype=torch.float16), randn(3, 24, seed=22, dtype=torch.float16)
    with poisoned_alloc():
        y, dx = kernels.nf4_matmul(x, q), kernels.nf4_matmul_grad(g, q)
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
    with poisoned_alloc():
        y, dx = kernels.nf4_matmul(x, q, bias), kernels.nf4_matmul_grad(g, q)
    assert_close(y, _expected(x, q, bias, grad=False))
    assert_close(dx, _expected(g, q, None, grad=True))
