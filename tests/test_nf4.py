"""NF4 reference: the math on its own (no bitsandbytes here; see test_nf4_bitsandbytes.py for that)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from lora_core.quant.nf4 import (
    dequantize_nf4,
    nf4_block_scales,
    nf4_matmul_grad_ref,
    nf4_matmul_ref,
    quantize_nf4,
)
from lora_core.quant.nf4_codes import (
    NF4_CODE,
    max_code_gap,
    nf4_code_table_from_quantiles,
    pack_nf4,
    unpack_nf4,
)

# DESIGN.md §4, typed in again so the literal in nf4_codes.py is checked against an independent copy.
TABLE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
HALF_WIDEST_GAP = (-0.6961928009986877 - -1.0) / 2  # the widest gap is the first one, [-1, -0.696]

weights = st.builds(
    lambda shape, seed, scale: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale,
    st.one_of(st.tuples(st.integers(1, 600)), st.tuples(st.integers(1, 20), st.integers(1, 90))),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1e-4, 1.0, 300.0]),
)


def test_code_table_from_normal_quantiles() -> None:
    table = nf4_code_table_from_quantiles()
    assert torch.equal(table, torch.tensor(TABLE, dtype=torch.float32))
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), table)
    assert max_code_gap() == pytest.approx(2 * HALF_WIDEST_GAP)
    assert (table < 0).sum() == 7 and (table > 0).sum() == 8 and (table == 0).sum() == 1


def test_hand_worked_example() -> None:
    """[2, -1, 0, 0.3] / absmax 2 = [1, -0.5, 0, 0.15] → codes [15, 2, 7, 9] (nearest in TABLE)."""
    q = quantize_nf4(torch.tensor([2.0, -1.0, 0.0, 0.3]), block_size=16, double_quant=False)
    assert q.packed.tolist() == [0xF2, 0x79]
    assert q.absmax.tolist() == [2.0]
    assert dequantize_nf4(q).tolist() == pytest.approx([2.0, 2 * TABLE[2], 0.0, 2 * TABLE[9]])
    odd = quantize_nf4(torch.tensor([1.0, -1.0, 1.0]), block_size=16, double_quant=False)
    assert odd.packed.tolist() == [0xF0, 0xF7]  # an odd count pads with 7 (the code of 0.0)


@given(codes=st.lists(st.integers(0, 15), max_size=99))
def test_pack_unpack_identity(codes: list[int]) -> None:
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nf4(t)
    assert packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_nf4(packed, len(codes)), t)
    if len(codes) >= 2:
        assert packed[0].item() == codes[0] * 16 + codes[1]  # [a, b] -> [ab]


@given(w=weights, block_size=st.sampled_from([16, 64, 256]))
def test_round_trip_error_bound(w: torch.Tensor, block_size: int) -> None:
    """|w − ŵ| ≤ ½·(widest code gap)·absmax of the element's block (plus the error of the quantized
    absmax with double quantization)."""
    n = w.numel()
    pad = (-n) % block_size
    absmax = torch.cat([w.flatten(), w.new_zeros(pad)]).reshape(-1, block_size).abs().amax(1)
    absmax_per_elem = absmax.repeat_interleave(block_size)[:n].reshape(w.shape)
    err = (dequantize_nf4(quantize_nf4(w, block_size, double_quant=False)) - w).abs()
    assert (err <= HALF_WIDEST_GAP * absmax_per_elem * (1 + 1e-6)).all()
    q = quantize_nf4(w, block_size, double_quant=True)
    scale_err = (nf4_block_scales(q) - absmax).abs().repeat_interleave(block_size)[:n].reshape(w.shape)
    err = (dequantize_nf4(q) - w).abs()
    assert (err <= HALF_WIDEST_GAP * absmax_per_elem * (1 + 1e-6) + scale_err * (1 + 1e-6)).all()


@given(w=weights, double_quant=st.booleans())
def test_quantize_dequantize_quantize_is_idempotent(w: torch.Tensor, double_quant: bool) -> None:
    q1 = quantize_nf4(w, 64, double_quant)
    q2 = quantize_nf4(dequantize_nf4(q1), 64, double_quant)
    assert torch.equal(q2.packed, q1.packed)
    if not double_quant:
        assert torch.equal(q2.absmax, q1.absmax)
        assert torch.equal(dequantize_nf4(q2), dequantize_nf4(q1))


def assert_same_nf4(a, b) -> None:
    """Every field equal, to the byte (same dtypes too)."""
    meta = ("shape", "dtype", "block_size", "nested_block_size")
    assert [getattr(a, k) for k in meta] == [getattr(b, k) for k in meta]
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("chunk", [16, 64, 100, 192])
def test_chunked_quantize_is_byte_identical(chunk: int, double_quant: bool, dtype: torch.dtype, rng) -> None:
    """Quantizing in small steps gives the one-pass result: 64·7 + 13 elements (odd, a partial last block,
    steps that are 1, 3 and not a whole number of blocks); rows of wildly different scale; a 2-D input
    that is not contiguous."""
    w = torch.randn(64 * 7 + 13, generator=rng) * torch.exp(3 * torch.randn(1, generator=rng))
    w[64:128] *= 1e4  # one block far larger than the rest
    w = w.to(dtype)
    one_pass = quantize_nf4(w, 32, double_quant, _chunk=1 << 30)
    chunked = quantize_nf4(w, 32, double_quant, _chunk=chunk)
    assert one_pass.packed.numel() == (64 * 7 + 14) // 2 and one_pass.absmax.numel() == 15
    assert_same_nf4(chunked, one_pass)
    w2 = torch.randn(40, 30, generator=rng).to(dtype).T  # (30, 40), non-contiguous
    expected = quantize_nf4(w2.contiguous(), 16, double_quant)
    assert_same_nf4(quantize_nf4(w2, 16, double_quant, _chunk=48), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_default_dequantize_dtype(dtype: torch.dtype, rng) -> None:
    w = torch.randn(8, 24, generator=rng).to(dtype)
    q = quantize_nf4(w)
    assert q.dtype == dtype and dequantize_nf4(q).dtype == dtype and dequantize_nf4(q).shape == w.shape
    assert torch.equal(dequantize_nf4(q), dequantize_nf4(q, torch.float32).to(dtype))  # one rounding


def test_matmul_references(rng) -> None:
    w = torch.randn(12, 20, generator=rng, dtype=torch.float64)
    q = quantize_nf4(w)
    wd = dequantize_nf4(q, torch.float64)
    x = torch.randn(3, 4, 20, generator=rng, dtype=torch.float64)
    b = torch.randn(12, generator=rng, dtype=torch.float64)
    assert_close(nf4_matmul_ref(x, q, b), torch.einsum("bti,oi->bto", x, wd) + b)
    g = torch.randn(3, 4, 12, generator=rng, dtype=torch.float64)
    assert_close(nf4_matmul_grad_ref(g, q), torch.einsum("bto,oi->bti", g, wd))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_empty(shape: tuple[int, ...], double_quant: bool) -> None:
    q = quantize_nf4(torch.empty(shape), double_quant=double_quant)
    assert q.packed.numel() == 0 and q.nbytes == 0
    assert dequantize_nf4(q).shape == shape


@pytest.mark.parametrize("block_size", [0, 8, 48, 100, 8192, -64])
def test_bad_block_size(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size must be a power of two in \\[16, 4096\\]"):
        quantize_nf4(torch.randn(64), block_size=block_size)


@pytest.mark.parametrize("block_size", [64.0, True, "64", None])
def test_bad_block_size_type(block_size) -> None:
    with pytest.raises(TypeError, match="block_size must be an int"):
        quantize_nf4(torch.randn(64), block_size=block_size)


@pytest.mark.parametrize("double_quant", ["yes", "", 1, 0, None, 1.0])
def test_double_quant_must_be_a_bool(double_quant) -> None:
    """A truthy string or an int chose double quantization silently; None silently meant False."""
    with pytest.raises(TypeError, match="double_quant must be a bool, got"):
        quantize_nf4(torch.randn(64), double_quant=double_quant)


@pytest.mark.parametrize("dtype", ["float32", float, 32])
def test_dequantize_dtype_must_be_a_torch_dtype(dtype) -> None:
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        dequantize_nf4(quantize_nf4(torch.randn(64)), dtype)


F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("scale", [1e38, 3e38, F32_MAX])
@pytest.mark.parametrize("double_quant", [False, True])
def test_huge_finite_weights_round_trip_without_nan(scale: float, double_quant: bool, rng) -> None:
    """bitsandbytes' float32 ``mean(absmax)`` overflows to inf for |w| ≳ 1e38 and its double-quantized
    scales come back NaN; ours fall back to the float64 mean, so the weight round-trips like any other."""
    w = (torch.randn(8, 64, generator=rng) / 3).clamp(-1, 1) * scale
    w[:, 0] = scale  # every block's absmax is `scale`, so the float32 sum of 8 of them overflows
    q = quantize_nf4(w, 64, double_quant)
    back = dequantize_nf4(q)
    assert torch.isfinite(back).all()
    err = ((back.double() - w.double()).abs() / scale).max()
    assert err <= HALF_WIDEST_GAP + 0.02  # the 4-bit rounding plus the 8-bit scale's
    assert q.offset is None or torch.isfinite(q.offset)


def test_scales_that_would_overflow_float32_are_refused() -> None:
    """One block at float32's max and nine zero blocks: ``code·nested_scale + offset`` rounds past the
    largest float32 for the big block, so the double-quantized scale would dequantize to inf."""
    w = torch.zeros(10, 64)
    w[0, 0] = F32_MAX
    with pytest.raises(ValueError, match=r"too close to float32.s limit.*use double_quant=False"):
        quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(dequantize_nf4(quantize_nf4(w, 64, double_quant=False)), w)


@pytest.mark.parametrize("value", [1e39, -1e300, 3.5e38])
def test_float64_beyond_float32_range_is_refused(value: float) -> None:
    """Rounded to float32 first, such a weight became inf and came back inf / NaN."""
    w = torch.randn(64, dtype=torch.float64)
    w[5] = value
    with pytest.raises(ValueError, match="beyond float32's range"):
        quantize_nf4(w, double_quant=False)
    ok = torch.full((64,), 3.0e38, dtype=torch.float64)  # large but representable: fine
    assert torch.isfinite(dequantize_nf4(quantize_nf4(ok))).all()


@pytest.mark.parametrize(
    ("w", "message"),
    [
        (torch.arange(10), "floating-point"),
        (torch.ones(4, dtype=torch.bool), "floating-point"),
        (torch.randn(4, dtype=torch.complex64), "complex"),
        (torch.tensor([1.0, float("nan")]), "NaN"),
        (torch.tensor([1.0, float("inf")]), "inf"),
        (torch.tensor([float("-inf"), 2.0]), "inf"),
    ],
)
def test_bad_weights(w: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_nf4(w)


def stored_bits_per_param(q) -> float:
    """Bytes actually held by every tensor of the container (storages, code tables included), per param."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in q.tensors().values()}
    return 8 * sum(storages.values()) / q.numel


def test_memory_per_parameter(rng) -> None:
    w = torch.randn(1024, 2048, generator=rng, dtype=torch.bfloat16)
    with_dq = stored_bits_per_param(quantize_nf4(w, 64, double_quant=True))
    without = stored_bits_per_param(quantize_nf4(w, 64, double_quant=False))
    assert with_dq == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.01)  # ≈ 4.127
    assert without == pytest.approx(4.5, abs=0.01)


def test_to_keeps_dtypes() -> None:
    q = quantize_nf4(torch.randn(100, dtype=torch.float16))
    moved = q.to("meta")
    assert moved.device.type == "meta"
    assert {k: v.dtype for k, v in moved.tensors().items()} == {k: v.dtype for k, v in q.tensors().items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_moving_to_a_missing_device_is_a_value_error() -> None:
    """torch raises AssertionError ('Torch not compiled with CUDA enabled') for ``.to("cuda")``."""
    q = quantize_nf4(torch.randn(64))
    for move in (lambda: q.to("cuda"), q.cuda, lambda: q.cuda(1)):
        with pytest.raises(ValueError, match=r"device=.*cuda.* is not available in this process"):
            move()
    with pytest.raises(ValueError, match="device='gpu' is not available"):
        q.to("gpu")
