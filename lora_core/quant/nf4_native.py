"""NF4 dequantization on a CPU with AVX-512 or AVX2: 16 / 8 codes looked up at once, compiled on first use.

torch has no multi-threaded gather over one index, and a gather is what `nf4_lookup` does: ≈ 0.5 ns a byte
on one core, ≈ 200 ms of every QLoRA step of SmolLM2-135M (two dequantizes of each of its 210 weights). A
16-entry float32 table fits one AVX-512 register, so ``vpermps`` looks up 16 codes in one instruction::

    16 bytes ─zero-extend─► 16 × int32 v ─► hi = v >> 4, lo = v & 15
    code[hi], code[lo]  = permutexvar(hi, table), permutexvar(lo, table)      (16 lookups each)
    × absmax (one float32 multiplication, as the reference) ─interleave─► 32 floats, in packing order

With AVX2 (8 lanes) both halves of the table are looked up and a compare picks one (a blend): 8 codes per
three instructions. Every element is ``code[nibble] * absmax_f32[block]`` (one rounding, no FMA: nothing
is added), so the result equals `nf4_dequantize_ref` bit for bit, as `nf4_lookup`'s does
(tests/test_nf4_native.py). One thread does the SmolLM2 step's 420 dequantizes in ≈ 60 ms with AVX-512 and
≈ 85 ms with AVX2, against ≈ 200 ms for the torch gather (and for scalar C) and ≈ 55 ms for bitsandbytes'
two-thread C++ (this 2-core AMD EPYC).

The C source below is compiled once per process, on first use, by `lora_core.native.compile_c` (the
system's C compiler, ``-O3 -march=native``, ≈ 0.2 s; loaded with ctypes, the call releases the GIL).
Where that cannot happen — not Linux on x86-64, no compiler, a failed build, a CPU with neither AVX-512F
nor AVX2, or ``LORA_CORE_NATIVE=0`` — `library()` is None and `nf4_lookup` uses torch's gather: the same
bits, only slower. `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from lora_core.native import OPT_OUT, compile_c

C_SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>

int nf4_native_simd(void) {  /* 2: AVX-512F, 1: AVX2, 0: scalar only */
#if defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
/* code[idx] for 8 indices < 16: look up in both halves of the table (vpermps uses the low 3 bits), pick */
static inline __m256 lookup16(__m256 codes_0_7, __m256 codes_8_15, __m256i idx, __m256i seven) {
    __m256 low = _mm256_permutevar8x32_ps(codes_0_7, idx), high = _mm256_permutevar8x32_ps(codes_8_15, idx);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
}
#endif

/* out[j] = code[nibble j] * scales[j / block] for j < n; byte i holds nibbles 2i (high) and 2i+1 (low).
   block is even, so every block starts on a byte. */
void nf4_dequantize(const uint8_t *restrict packed, const float *restrict code, const float *restrict scales,
                    float *restrict out, int64_t n, int64_t block) {
#if defined(__AVX512F__)
    const __m512 table = _mm512_loadu_ps(code);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i low_nibble = _mm512_set1_epi32(15);
#elif defined(__AVX2__)
    const __m256 codes_0_7 = _mm256_loadu_ps(code), codes_8_15 = _mm256_loadu_ps(code + 8);
    const __m256i low_nibble = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
#endif
    for (int64_t start = 0; start < n; start += block) {
        const int64_t len = start + block < n ? block : n - start;
        const int64_t bytes = len / 2;
        const uint8_t *p = packed + start / 2;
        float *o = out + start;
        const float s = scales[start / block];
        int64_t i = 0;
#if defined(__AVX512F__)
        const __m512 scale = _mm512_set1_ps(s);
        for (; i + 16 <= bytes; i += 16) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i)));
            __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), scale);
            __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low_nibble), table), scale);
            _mm512_storeu_ps(o + 2 * i, _mm512_permutex2var_ps(hi, first, lo));
            _mm512_storeu_ps(o + 2 * i + 16, _mm512_permutex2var_ps(hi, second, lo));
        }
#elif defined(__AVX2__)
        const __m256 scale = _mm256_set1_ps(s);
        for (; i + 8 <= bytes; i += 8) {  /* 8 bytes: two 8-entry lookups and a blend per 8 codes */
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i)));
            __m256i h = _mm256_srli_epi32(v, 4), l = _mm256_and_si256(v, low_nibble);
            __m256 hi = _mm256_mul_ps(lookup16(codes_0_7, codes_8_15, h, seven), scale);
            __m256 lo = _mm256_mul_ps(lookup16(codes_0_7, codes_8_15, l, seven), scale);
            __m256 a = _mm256_unpacklo_ps(hi, lo), b = _mm256_unpackhi_ps(hi, lo);  /* per 128-bit lane */
            _mm256_storeu_ps(o + 2 * i, _mm256_permute2f128_ps(a, b, 0x20));
            _mm256_storeu_ps(o + 2 * i + 8, _mm256_permute2f128_ps(a, b, 0x31));
        }
#endif
        for (; i < bytes; i++) {
            o[2 * i] = code[p[i] >> 4] * s;
            o[2 * i + 1] = code[p[i] & 15] * s;
        }
        if (len & 1) o[len - 1] = code[p[bytes] >> 4] * s;  /* an odd n: the last byte's high nibble */
    }
}
"""


def build(flags: tuple[str, ...] = ("-O3", "-march=native")) -> ctypes.CDLL | str:
    """Compile ``C_SOURCE`` with ``flags`` and load it (`lora_core.native.compile_c`); the library, or
    why not (a one-line reason)."""
    loaded = compile_c(C_SOURCE, flags)
    if isinstance(loaded, str):
        return loaded
    loaded.nf4_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    loaded.nf4_dequantize.restype = None
    return loaded


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """This process's build (compiled on the first call) if it has a SIMD path, and what `status` says."""
    built = build()
    if isinstance(built, str):
        return None, built
    simd = built.nf4_native_simd()
    if not simd:
        return None, "the CPU has neither AVX-512F nor AVX2 (torch's gather is as fast as scalar C)"
    return built, f"in use ({'AVX-512' if simd == 2 else 'AVX2'})"


def library() -> ctypes.CDLL | None:
    """This process's SIMD build (compiled on the first call), or None; `status()` says why not."""
    return _load()[0]


def status() -> str:
    """``"in use (AVX-512)"`` / ``"in use (AVX2)"``, or why the torch gather is used instead (builds the
    library if not tried yet)."""
    return _load()[1]


def dequantize_into(lib: ctypes.CDLL, packed: torch.Tensor, code: torch.Tensor, scales: torch.Tensor,
                    out: torch.Tensor, n: int, block: int) -> None:  # fmt: skip
    """``out[:n] = code[nibbles] · scales[block of each]`` through ``lib`` (all CPU, contiguous: uint8
    ``packed`` (ceil(n/2),), float32 ``code`` (16,), ``scales`` (ceil(n/block),) and ``out`` (≥ n,); block
    even). Checked here because C would read or write past a wrong size."""
    ok = (
        all(t.device.type == "cpu" and t.is_contiguous() for t in (packed, code, scales, out))
        and packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
        and code.dtype == torch.float32 and code.numel() == 16
        and scales.dtype == torch.float32 and scales.numel() == -(-n // block)
        and out.dtype == torch.float32 and out.numel() >= n and block > 0 and block % 2 == 0
    )  # fmt: skip
    if not ok:
        raise ValueError("nf4_native.dequantize_into: tensors do not match n / block (see its docstring)")
    lib.nf4_dequantize(packed.data_ptr(), code.data_ptr(), scales.data_ptr(), out.data_ptr(), n, block)


__all__ = ["C_SOURCE", "OPT_OUT", "build", "dequantize_into", "library", "status"]
