"""``lora.dropout``: the CPU dropout mask from a counter-based hash, in C, equals its numpy reference bit for
bit (every index range, including across 2³² boundaries, for a scalar and a ``-march=native`` build), has
Bernoulli(1 − p)'s law (keep rate, no correlation between neighbours, rows or seeds), and falls back to
torch's generator where the C is not built."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from c_compiler import needs_c
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_core.lora import dropout
from lora_core.lora.dropout import dropout_mask, hashed_mask_into, kept_reference


@pytest.fixture(scope="module")
def builds() -> dict[str, object]:
    """A scalar build (``-O2``, baseline x86-64: gcc does not vectorize at -O2) and the vectorized one
    `dropout_mask` uses (``-O3 -march=native``)."""
    found = {}
    for name, flags in {"scalar": ("-O2",), "native": ("-O3", "-march=native")}.items():
        lib = dropout.build(flags)
        assert not isinstance(lib, str), lib
        found[name] = lib
    return found


@needs_c
@settings(max_examples=60, deadline=None)
@given(
    seed=st.one_of(st.integers(0, 2**62), st.integers(-(2**70), 2**70)),
    p=st.one_of(st.floats(1e-6, 0.999), st.sampled_from([0.05, 0.1, 0.5])),
    n=st.integers(0, 3000),
    start=st.one_of(st.just(0), st.integers(0, 2**40), st.integers(2**32 - 3000, 2**32 + 10)),
)
def test_the_c_mask_is_the_numpy_reference_bit_for_bit(builds, seed, p, n, start) -> None:
    kept = kept_reference(seed, p, n, start)
    keep = np.float32(1.0 / (1.0 - p))
    for name, lib in builds.items():
        mask = hashed_mask_into(lib, torch.full((n,), -1.0), p, seed, start).numpy()
        assert np.array_equal(mask != 0, kept), name
        assert np.all(mask[kept] == keep) and np.all(mask[~kept] == 0), name


@needs_c
def test_dropout_mask_on_a_cpu_is_the_hash_where_the_c_is_built() -> None:
    assert dropout.status() == "in use"
    like = torch.empty(37, 129)
    mask = dropout_mask(like, 0.25, 12345)
    assert mask.shape == like.shape and mask.dtype == torch.float32
    assert np.array_equal((mask != 0).numpy().ravel(), kept_reference(12345, 0.25, like.numel()))
    assert set(mask.unique().tolist()) == {0.0, np.float32(1 / 0.75).item()}
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        other = dropout_mask(like.to(dtype), 0.25, 12345)
        assert other.dtype == dtype and torch.equal(other != 0, mask != 0)


def test_the_mask_is_a_function_of_the_seed() -> None:
    like = torch.empty(64, 300)
    a, b, c = dropout_mask(like, 0.3, 7), dropout_mask(like, 0.3, 7), dropout_mask(like, 0.3, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_the_mask_has_bernoullis_law(p: float) -> None:
    """Keep rate within 5 σ of 1 − p; no correlation between neighbouring elements, neighbouring rows, or
    the masks of neighbouring seeds (|r| < 5/√n); the per-row keep counts spread as a binomial's do."""
    rows, cols = 1000, 1000
    kept = (dropout_mask(torch.empty(rows, cols), p, 2024) != 0).double()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5

    def corr(u: torch.Tensor, v: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([u.ravel(), v.ravel()]))[0, 1].item()

    bound = 5 / n**0.5
    assert abs(corr(kept[:, :-1], kept[:, 1:])) < bound  # element and its right neighbour
    assert abs(corr(kept[:-1], kept[1:])) < bound  # row and the next row
    next_seed = (dropout_mask(torch.empty(rows, cols), p, 2025) != 0).double()
    assert abs(corr(kept, next_seed)) < bound
    spread = kept.sum(1).var().item() / (cols * p * (1 - p))  # 1 for independent elements
    assert 0.8 < spread < 1.2, spread


def test_hashed_mask_into_refuses_what_the_c_would_misread() -> None:
    lib = dropout.library() or object()
    bad = ((torch.empty(4, dtype=torch.float64), 0.1), (torch.empty(4, 2).T, 0.1), (torch.empty(4), 1.0))
    for out, p in bad:
        with pytest.raises(ValueError, match="contiguous float32 CPU tensor, 0 <= p < 1"):
            hashed_mask_into(lib, out, p, 0)


def test_without_the_c_cpu_masks_come_from_torchs_generator() -> None:
    """``LORA_CORE_NATIVE=0`` (as without a compiler): `status` says why, the mask keeps its law and is
    still a function of the seed (a fresh interpreter: the build is cached per process)."""
    code = (
        "import torch\n"
        "from lora_core.lora import dropout\n"
        "a = dropout.dropout_mask(torch.empty(500, 400), 0.2, 3)\n"
        "b = dropout.dropout_mask(torch.empty(500, 400), 0.2, 3)\n"
        "print(dropout.status(), '|', torch.equal(a, b), '|', (a != 0).float().mean().item())\n"
    )
    env = {**os.environ, "LORA_CORE_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    reason, same, rate = done.stdout.strip().split(" | ")
    assert reason == "LORA_CORE_NATIVE=0" and same == "True"
    assert abs(float(rate) - 0.8) < 5 * (0.2 * 0.8 / 200_000) ** 0.5
