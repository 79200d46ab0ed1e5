"""``quant.nf4_native``: the C NF4 dequantize (AVX-512 or AVX2 ``vpermps`` lookups, a scalar tail) is the
reference bit for bit. Every build this CPU can run is tested wherever a C compiler exists: the scalar one
(``-O2``, baseline x86-64) on every x86-64 machine, the AVX2 and AVX-512 ones where the CPU has them; the
``-march=native`` build ``nf4_dequantize_lookup`` uses by default is one of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from c_compiler import needs_c
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_core.quant import nf4_native
from lora_core.quant.nf4 import nf4_dequantize_ref, quantize_nf4
from lora_core.quant.nf4_lookup import nf4_dequantize_lookup

pytestmark = needs_c
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _cpu_flags() -> set[str]:
    flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    return set(flags[0].split()) if flags else set()


@pytest.fixture(scope="module")
def builds() -> dict[str, object]:
    """Each build this CPU can run: scalar (baseline x86-64) always, AVX2 and AVX-512 where it has them."""
    wanted = {"scalar": (("-O2",), 0), "avx2": (("-O3", "-mavx2"), 1), "avx512": (("-O3", "-mavx512f"), 2)}
    flags = _cpu_flags()
    found = {}
    for name, (cflags, simd) in wanted.items():
        if name != "scalar" and name.replace("avx512", "avx512f") not in flags:
            continue  # its instructions would not run here
        lib = nf4_native.build(cflags)
        assert not isinstance(lib, str), lib
        assert lib.nf4_native_simd() == simd  # the build compiled the path it was meant to
        found[name] = lib
    return found


def test_the_simd_build_is_in_use_exactly_where_the_cpu_has_avx512_or_avx2() -> None:
    flags = _cpu_flags()
    if "avx512f" in flags:
        assert nf4_native.status() == "in use (AVX-512)" and nf4_native.library().nf4_native_simd() == 2
    elif "avx2" in flags:
        assert nf4_native.status() == "in use (AVX2)" and nf4_native.library().nf4_native_simd() == 1
    else:
        assert nf4_native.library() is None and "AVX2" in nf4_native.status()


@settings(max_examples=80, deadline=None)
@given(
    shape=st.one_of(st.tuples(st.integers(1, 900)), st.tuples(st.integers(1, 24), st.integers(1, 97))),
    block_size=st.sampled_from([16, 32, 64, 256, 1024]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-6, 1.0, 300.0]),
    which=st.sampled_from(["scalar", "avx2", "avx512"]),
)
def test_native_dequantize_is_the_reference_bit_for_bit(builds, shape, block_size, double_quant, dtype, seed,
                                                        scale, which) -> None:  # fmt: skip
    """Odd element counts (the last byte's high nibble only), partial last blocks, 16-byte SIMD groups
    with and without a scalar tail, any dtype (one rounding from float32, as the reference)."""
    if which not in builds:
        return  # this CPU cannot run that build: the others cover the same C
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    q = quantize_nf4(w, block_size, double_quant)
    got, want = nf4_dequantize_lookup(q, dtype, native=builds[which]), nf4_dequantize_ref(q, dtype)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("which", ["scalar", "avx2", "avx512"])
def test_a_checkpoints_own_code_table_and_strided_bytes(builds, which) -> None:
    if which not in builds:
        pytest.skip(f"this CPU cannot run the {which} build")
    q = quantize_nf4(torch.randn(40, 96, generator=torch.Generator().manual_seed(1)), 64, True)
    q.code = q.code.flip(0) * 0.5  # any 16 float32 values: the weight's own table is the one used
    wide = torch.zeros(q.packed.numel(), 2, dtype=torch.uint8)
    wide[:, 0] = q.packed
    q.packed = wide[:, 0]  # a strided view of the same bytes
    want = nf4_dequantize_ref(q, torch.float32)
    assert torch.equal(nf4_dequantize_lookup(q, torch.float32, native=builds[which]), want)


def test_dequantize_into_refuses_sizes_the_c_would_overrun(builds) -> None:
    q = quantize_nf4(torch.randn(8, 64), 64, False)
    code, scales = q.code.float(), torch.ones(8)
    for packed, out, n in [
        (q.packed.reshape(-1), torch.empty(511), 512),  # out too small
        (q.packed.reshape(-1)[:100], torch.empty(512), 512),  # too few bytes
        (q.packed.reshape(-1), torch.empty(512, dtype=torch.float64), 512),  # wrong out dtype
    ]:
        with pytest.raises(ValueError, match="do not match"):
            nf4_native.dequantize_into(builds["scalar"], packed, code, scales, out, n, 64)


@pytest.mark.parametrize(
    ("env", "reason"),
    [({"LORA_CORE_NATIVE": "0"}, "LORA_CORE_NATIVE=0"), ({"CC": "/nonexistent/cc"}, "did not run"),
     ({"CC": "false"}, "failed")],
)  # fmt: skip
def test_build_says_why_not(monkeypatch, env, reason) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    built = nf4_native.build()
    assert isinstance(built, str) and reason in built
