"""The CPU fast path for NF4 (``quant.nf4_lookup``: byte-pair table dequantize) and the dispatch that uses
it: bit for bit the reference (``nf4_dequantize_ref``, ``nf4_matmul_ref``, ``nf4_matmul_grad_ref``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_core import dispatch
from lora_core.quant.nf4 import (
    nf4_block_scales,
    nf4_dequantize_ref,
    nf4_matmul_grad_ref,
    nf4_matmul_ref,
    quantize_nf4,
)
from lora_core.quant.nf4_codes import NF4_CODE
from lora_core.quant.nf4_lookup import _block_scales, nf4_dequantize_lookup, pair_table

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _weight(shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_pair_table_holds_both_codes_of_every_byte_high_nibble_first() -> None:
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    pairs = pair_table(code).view(torch.float32).view(256, 2)  # back to (hi, lo) float32 pairs
    for byte in (0x00, 0x07, 0x70, 0xF0, 0x0F, 0xA5, 0xFF):
        assert pairs[byte].tolist() == [NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.one_of(st.tuples(st.integers(1, 700)), st.tuples(st.integers(1, 24), st.integers(1, 97))),
    block_size=st.sampled_from([16, 64, 256]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-6, 1.0, 300.0]),
    native=st.booleans(),
)
def test_lookup_dequantize_is_the_reference_bit_for_bit(
    shape: tuple[int, ...], block_size: int, double_quant: bool, dtype: torch.dtype, seed: int, scale: float,
    native: bool,
) -> None:  # fmt: skip
    """Odd element counts (a padded last nibble), partial last blocks, 1-D and 2-D, every float dtype; the
    torch gather (native=False) and what this machine uses by default (the C: tests/test_nf4_native.py)."""
    q = quantize_nf4(_weight(shape, seed, scale), block_size, double_quant)
    got, want = nf4_dequantize_lookup(q, dtype, native=native), nf4_dequantize_ref(q, dtype)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == q.shape
    assert torch.equal(got, want)


def test_lookup_reads_the_weights_own_code_table_and_strided_bytes() -> None:
    """A checkpoint's quant map is the table used (as in the reference), and a non-contiguous packed view
    gives the same weight as its contiguous copy."""
    q = quantize_nf4(_weight((6, 40), 0, 1.0), 16, False)
    q.code = q.code.flip(0) * 0.5  # any 16 float32 values
    want = nf4_dequantize_ref(q, torch.float32)
    assert torch.equal(nf4_dequantize_lookup(q, torch.float32, native=False), want)
    wide = torch.zeros(q.packed.numel(), 2, dtype=torch.uint8)
    wide[:, 0] = q.packed
    q.packed = wide[:, 0]  # stride 2
    assert not q.packed.is_contiguous()
    for native in (False, True):
        assert torch.equal(nf4_dequantize_lookup(q, torch.float32, native=native), want)


@pytest.mark.parametrize("shape, block", [((96, 64), 16), ((300, 70), 16), ((1, 8200), 16), ((2, 8193), 64)])
def test_double_quantized_scales_over_whole_and_partial_nested_groups(shape: tuple[int, int], block: int):
    """The in-place undo of double quantization (`_block_scales`) over whole 256-block groups, a partial last
    group and a partial last block: the reference's ``nf4_block_scales`` bit for bit, and so the weight."""
    q = quantize_nf4(_weight(shape, 7, 2.0), block, True)
    assert q.absmax.numel() >= 256
    assert torch.equal(_block_scales(q), nf4_block_scales(q))
    for native in (False, True):
        assert torch.equal(
            nf4_dequantize_lookup(q, torch.float32, native=native), nf4_dequantize_ref(q, torch.float32)
        )
    q.nested_code = q.nested_code * 0.75  # another 8-bit map: read from the weight, as the reference does
    for native in (False, True):
        want = nf4_dequantize_ref(q, torch.bfloat16)
        assert torch.equal(nf4_dequantize_lookup(q, torch.bfloat16, native=native), want)


def test_empty_weight() -> None:
    q = quantize_nf4(torch.zeros(0, 5))
    assert nf4_dequantize_lookup(q, torch.bfloat16).shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_products_take_the_lookup_path_and_equal_the_references(dtype: torch.dtype) -> None:
    """dispatch's CPU path: the NF4 products (and their in-place accumulating forms) are the references'
    results bit for bit, since the dense weight is the same and so is the matmul."""
    assert dispatch.nf4_path(512, torch.device("cpu")) == "lookup"
    q = quantize_nf4(_weight((48, 80), 1, 1.0), 64, True)  # 3840 elements: 60 blocks, one 256-group + rest
    x, g = _weight((3, 5, 80), 2, 1.0).to(dtype), _weight((3, 5, 48), 3, 1.0).to(dtype)
    bias = _weight((48,), 4, 1.0).to(dtype)
    assert torch.equal(dispatch.nf4_matmul(x, q, bias), nf4_matmul_ref(x, q, bias))
    assert torch.equal(dispatch.nf4_matmul_grad(g, q), nf4_matmul_grad_ref(g, q))
    out, x2, g2 = _weight((15, 48), 5, 1.0).to(dtype), x.reshape(15, 80), g.reshape(15, 48)
    w = nf4_dequantize_ref(q, dtype)
    assert torch.equal(dispatch.nf4_matmul_acc(out.clone(), x2, q), torch.addmm(out, x2, w.T))
    out = _weight((15, 80), 6, 1.0).to(dtype)
    assert torch.equal(dispatch.nf4_matmul_grad_acc(out.clone(), g2, q), torch.addmm(out, g2, w))
