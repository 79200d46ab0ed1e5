"""Split-K for the NF4 matmul kernels: how far to split, and the reduction done in the same launch.

At M = 1 an 8192-wide output gives only 8192 / BLOCK_N output tiles, about one per SM: too few loads in
flight to stream the weight at HBM speed. So the reduction dimension is split into ``SPLIT`` slices and
program ``(tile, s)`` sums its slice only (``split_count`` picks ``SPLIT``). The ``SPLIT`` partial sums of
a tile are then added **in the same launch, deterministically** (``store_or_reduce``)::

    program (tile, s):   ws[s, tile] = acc                      # its float32 partial sum
                         barrier; arrived = atomic_add(counter[tile], 1)     # acq_rel, gpu scope, int32
                         if arrived == SPLIT - 1:               # the last program of this tile to arrive
                             total = 0; for s' in 0..SPLIT-1: total += ws[s', tile]   # fixed order
                             counter[tile] = 0                  # ready for the next launch
                             (the caller adds the bias and stores total in c)

No floating-point atomics: which program arrives last varies from run to run, but the sum is always
taken in split order ``0, 1, …, SPLIT-1`` starting from 0, exactly as the former second kernel did, so
the result is bit-identical whatever the order of arrival. The barrier makes every thread's partial
store happen before the (single-thread) release atomic; the partials are read with ``.cg`` loads (L2,
where other SMs' stores are visible, never a stale L1 line). Under Triton's interpreter the programs run
one after another, so the last one (``s = SPLIT - 1``) takes the reducing branch.

The counters (``tile_counters``) are int32 zeros kept per device and stream and grown on demand; every
launch leaves them at zero. Launches on one stream run in order, so they can share them; another stream
gets its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_PROGRAMS_PER_SM = 4  # ~4 resident programs per SM keep enough 16-byte loads in flight
_MIN_ITERS_PER_SPLIT = 4  # a K slice spans at least this many tiles (the partials stay small next to W)

_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}  # (device, stream) -> int32 zeros


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the interpreter: a small number; only the split reads it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_count(tiles: int, iters: int, sms: int) -> int:
    """How many slices to cut the reduction into: doubling while there are fewer than
    ``_PROGRAMS_PER_SM`` programs per SM and each slice keeps at least ``_MIN_ITERS_PER_SPLIT`` of the
    ``iters`` reduction steps."""
    split = 1
    while tiles * split < _PROGRAMS_PER_SM * sms and iters // (2 * split) >= _MIN_ITERS_PER_SPLIT:
        split *= 2
    return split


def tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` int32 counters, all zero, for split-K launches on ``device``'s current stream."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def check_workspace(workspace: object, numel: int, device: torch.device) -> torch.Tensor:
    """Validate a caller's split-K workspace: a contiguous float32 tensor of at least ``numel`` elements
    on ``device`` (contents irrelevant: every cell read is written first). Raises naming ``workspace``."""
    if not isinstance(workspace, torch.Tensor):
        raise TypeError(f"workspace must be a torch.Tensor or None, got {type(workspace).__name__}")
    if workspace.dtype != torch.float32 or workspace.device != device or not workspace.is_contiguous():
        raise ValueError(
            f"workspace must be a contiguous float32 tensor on {device}; got dtype {workspace.dtype}, "
            f"device {workspace.device}, contiguous={workspace.is_contiguous()}"
        )
    if workspace.numel() < numel:
        raise ValueError(
            f"workspace must have at least {numel} elements for this product (split-K partial sums), "
            f"got {workspace.numel()}"
        )
    return workspace


@triton.jit
def store_or_reduce(acc, ws_ptr, counter_ptr, offs_c, mask_c, tile, pid_s, n_split, stride_cs):
    """Split-K in one launch (module doc). ``acc`` is this program's float32 partial of output tile
    ``tile`` (elements ``offs_c``, valid where ``mask_c``); slice ``s`` of the workspace starts at
    ``s * stride_cs``. Returns ``(total, last)``: with ``n_split == 1`` ``(acc, True)``; otherwise
    ``last`` is True in the program that arrived last, which holds the sum of all partials in split
    order, and False elsewhere (the caller then stores nothing)."""
    last = pid_s == pid_s  # a run-time True (both branches must give `last` the same type)
    if n_split > 1:
        tl.store(ws_ptr + pid_s * stride_cs + offs_c, acc, mask=mask_c)
        tl.debug_barrier()  # every thread's partial is stored before the one-thread release below
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = arrived == n_split - 1
        if last:
            acc = tl.zeros_like(acc)
            for s in range(n_split):  # fixed order: the result does not depend on who arrived last
                acc += tl.load(ws_ptr + s * stride_cs + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + tile, 0)  # reset for the next launch on this stream
    return acc, last
