"""The adapter-input dropout mask, regenerated from a seed: ``mask' = Bernoulli(1 − p) / (1 − p)``.

The fused Functions (``lora.fused``) never store a mask: the forward draws it from ``(seed, shape)``, the
backward draws the same one again (LoRA §4.1). On a GPU that is torch's Philox generator. On a CPU, torch's
``bernoulli_`` runs one Mersenne-Twister draw per element on one thread: ≈ 2.5 ms for one (512, 576) mask,
≈ 0.54 s for the 210 masks of one SmolLM2-135M forward at 4 × 128 tokens, so ≈ 1.1 s of a 4.5 s step with
regeneration (p = 0.05, this 2-core AMD EPYC). A counter-based hash has no state to advance, so it
vectorizes: element ``i`` of the mask is a pure function of ``(seed, i)``::

    fmix32(h):  h ^= h >> 16;  h *= 0x85EBCA6B;  h ^= h >> 13;  h *= 0xC2B2AE35;  h ^= h >> 16   (mod 2³²)
    keys:       s = seed mod 2⁶⁴;  k₀ = fmix32(s_lo ⊕ 0x9E3779B9);  k₁ = fmix32(s_hi ⊕ k₀ ⊕ 0x7F4A7C15)
    element i = c·2³² + j (j < 2³²):   k_c = k₀ ⊕ fmix32(c ⊕ k₁)
                                        h   = fmix32(fmix32(j ⊕ k_c) + k₁)
    dropped  ⇔  h < T = ⌊p · 2³²⌋        (P(dropped) = T / 2³², within 2⁻³² of p)
    mask'_i  =  0 if dropped else 1 / (1 − p)            (row-major i over the tensor's shape)

``fmix32`` is MurmurHash3's finalizer (a bijection of 32-bit words with full avalanche); two rounds with a
key between them decorrelate neighbouring indices and neighbouring seeds (tests/test_dropout.py measures
the keep rate and the correlations). In C (`C_SOURCE`, compiled on first use by `lora_core.native`; gcc
vectorizes the loop: 16 lanes with AVX-512) a mask costs ≈ one write of it. `kept_reference` is the same
function in numpy (uint32 arithmetic wraps mod 2³² there too): the C is tested against it bit for bit.

Where the C cannot be built (`status()` says why: no compiler, not Linux on x86-64, ``LORA_CORE_NATIVE=0``)
a CPU mask comes from torch's generator as on a GPU: the same law, other draws. Either way the mask is a
pure function of ``(seed, shape, dtype, device)`` within a process, which is all the backward needs.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch
from torch import Tensor

from lora_core.native import compile_c

C_SOURCE = r"""
#include <stdint.h>

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}

/* out[i] = 0 if hash(start + i) < threshold else keep, for i < n (the module docstring's hash) */
void dropout_mask_f32(float *restrict out, int64_t start, int64_t n, uint32_t key0, uint32_t key1,
                      uint32_t threshold, float keep) {
    int64_t i = 0;
    while (i < n) {  /* one pass per 2^32 indices: the chunk's key is constant inside it */
        const uint64_t index = (uint64_t)(start + i);
        const uint32_t first = (uint32_t)index, kc = key0 ^ fmix32((uint32_t)(index >> 32) ^ key1);
        const uint64_t room = ((uint64_t)1 << 32) - first;
        const int64_t len = (uint64_t)(n - i) < room ? n - i : (int64_t)room;
        float *o = out + i;
        for (int64_t j = 0; j < len; j++) {
            const uint32_t h = fmix32(fmix32((first + (uint32_t)j) ^ kc) + key1);
            o[j] = h < threshold ? 0.0f : keep;
        }
        i += len;
    }
}
"""

_M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def seed_keys(seed: int) -> tuple[int, int]:
    """``(k₀, k₁)``, the two 32-bit keys of ``seed`` (any int; taken mod 2⁶⁴)."""
    s = seed % 2**64
    key0 = _fmix32((s & _M32) ^ 0x9E3779B9)
    return key0, _fmix32((s >> 32) ^ key0 ^ 0x7F4A7C15)


def drop_threshold(p: float) -> int:
    """``T = ⌊p · 2³²⌋``: an element is dropped when its hash is below it (0 ≤ p < 1)."""
    return int(p * 2**32)


def _fmix32_np(h: np.ndarray) -> np.ndarray:  # uint32 arrays: * wraps mod 2³²
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def kept_reference(seed: int, p: float, n: int, start: int = 0) -> np.ndarray:
    """Which of the elements ``start .. start + n − 1`` the hash keeps, in numpy: bool (n,)."""
    key0, key1 = seed_keys(seed)
    index = np.arange(start, start + n, dtype=np.uint64)
    chunk_key = np.uint32(key0) ^ _fmix32_np((index >> np.uint64(32)).astype(np.uint32) ^ np.uint32(key1))
    h = _fmix32_np(_fmix32_np(index.astype(np.uint32) ^ chunk_key) + np.uint32(key1))
    return h >= np.uint32(drop_threshold(p))


def build(flags: tuple[str, ...] = ("-O3", "-march=native")) -> ctypes.CDLL | str:
    """Compile ``C_SOURCE`` with ``flags`` and load it; the library, or why not (one line)."""
    loaded = compile_c(C_SOURCE, flags)
    if isinstance(loaded, str):
        return loaded
    loaded.dropout_mask_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
                                        ctypes.c_uint32, ctypes.c_uint32, ctypes.c_float]  # fmt: skip
    loaded.dropout_mask_f32.restype = None
    return loaded


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    built = build()
    return (None, built) if isinstance(built, str) else (built, "in use")


def library() -> ctypes.CDLL | None:
    """This process's build of ``C_SOURCE`` (compiled on the first call), or None; `status()` says why."""
    return _load()[0]


def status() -> str:
    """``"in use"`` (CPU masks from the hash, in C), or why CPU masks come from torch's generator."""
    return _load()[1]


def hashed_mask_into(lib: ctypes.CDLL, out: Tensor, p: float, seed: int, start: int = 0) -> Tensor:
    """Fill the contiguous float32 CPU tensor ``out`` with the hash's ``mask'`` for elements ``start ..``
    (``lib`` from `build`); returns ``out``."""
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous() or not 0 <= p < 1:
        raise ValueError("dropout.hashed_mask_into: out must be a contiguous float32 CPU tensor, 0 <= p < 1")
    key0, key1 = seed_keys(seed)
    keep = 1.0 / (1.0 - p)
    lib.dropout_mask_f32(out.data_ptr(), start, out.numel(), key0, key1, drop_threshold(p), keep)
    return out


def dropout_mask(like: Tensor, p: float, seed: int) -> Tensor:  # same shape/dtype/device as `like`
    """``mask' = Bernoulli(1 − p) / (1 − p)``, a pure function of ``(seed, shape, dtype, device)``: the
    forward draws it, the backward draws the same one again, so no mask is ever stored (LoRA §4.1). On a
    CPU from the hash (module docstring) where its C is built, else from torch's generator."""
    if like.device.type == "cpu" and (lib := library()) is not None:
        mask = hashed_mask_into(lib, torch.empty(like.shape, dtype=torch.float32), p, seed)
        return mask if like.dtype == torch.float32 else mask.to(like.dtype)
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return mask.bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


__all__ = [
    "C_SOURCE", "build", "drop_threshold", "dropout_mask", "hashed_mask_into", "kept_reference", "library",
    "seed_keys", "status",
]  # fmt: skip
