"""Test infrastructure shared by every test file: hypothesis profiles, markers, the Triton interpreter.

- Hypothesis: profile ``ci`` (bounded, used when ``CI`` is set) or ``dev`` (more examples); override with
  ``HYPOTHESIS_PROFILE=name``. Deadlines are off: the first call of a kernel compiles or interprets it.
- Tolerances per dtype live in ``tests/tolerances.py`` (``assert_close``, ``tolerance``), defined once.
- Order independence: every test starts from the same global RNG state (torch, Python, NumPy seeded) and
  gets torch's thread count and default dtype back afterwards, so no result depends on which tests ran
  before it.
- ``@pytest.mark.gpu``: skipped without CUDA.
- ``@pytest.mark.triton``: runs Triton kernels. Without CUDA they run on the CPU through Triton's
  interpreter (``TRITON_INTERPRET=1`` is set below, before anything imports Triton); skipped when Triton is
  not installed. Use the ``kernel_device`` fixture for where to put the tensors, and
  ``skip_bf16_if_interpreted(dtype)``: with triton 3.9 + torch 2.13 on CPU the interpreter computes bf16
  wrongly (fp16/fp32 are fine), so bf16 kernel results are checked on a GPU only.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Must happen before Triton is imported: its @jit decorator picks the interpreter at decoration time.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", max_examples=15, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="needs triton (pip install 'lora-core[test]')")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _same_global_state_for_every_test() -> Iterator[None]:
    """Seed the global RNGs before each test and restore torch's thread count and default dtype after it."""
    import numpy as np

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernel tests put their tensors: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def skip_bf16_if_interpreted(dtype: torch.dtype) -> None:
    """Skip a bf16 kernel check under the CPU interpreter, where bf16 results are wrong (see module doc)."""
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 is wrong under TRITON_INTERPRET on CPU (triton 3.9, torch 2.13); tested on GPU")


@pytest.fixture
def rng() -> torch.Generator:
    """A CPU generator with a fixed seed, for tests that want reproducible (not hypothesis-drawn) data."""
    return torch.Generator().manual_seed(0)
