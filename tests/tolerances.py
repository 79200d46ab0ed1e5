"""Tolerances and comparisons shared by the tests, benchmarks and docs: defined once, per dtype.

A kernel or fast path is right when it matches the pure-PyTorch reference within the tolerance of the
dtype it computes in. The numbers below are the only place those tolerances live.
"""

from __future__ import annotations

import torch

# (rtol, atol) by dtype. fp16/bf16 values carry 11/8 significant bits; matmuls accumulate in fp32, so the
# error is dominated by the final rounding to the output dtype plus reduction-order differences.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """The ``(rtol, atol)`` pair for ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for dtype {dtype}; known: {list(TOLERANCES)}") from None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``actual``'s dtype).

    ``expected`` is cast to ``actual``'s dtype and device first, so a float64 reference can be compared
    with a low-precision result directly.
    """
    rtol, atol = tolerance(dtype or actual.dtype)
    expected = expected.to(device=actual.device, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
