"""Matrix products with an NF4 weight: ``x @ Wᵀ (+ bias)`` (forward) and ``g @ W`` (what backward needs).

``W`` is ``(N, K)`` (``out_features, in_features``) stored as NF4 (see ``lora_core.quant.nf4``); ``x`` is
``(..., K)``, ``g`` is ``(..., N)``. Two strategies, picked by the number of rows ``M`` of ``x``:

**Small M (decode, M ≤ FUSED_MAX_M = 16, fp16/bf16, K % 8 == 0): a fused split-K kernel.** The product is
bound by reading ``W``. Reading it packed (0.52 byte/param with double quantization) instead of as bf16
(2 bytes/param) is a 3.9× smaller floor, so each program dequantizes a ``(BLOCK_N, BLOCK_K)`` tile of
``W`` in registers and feeds it straight to ``tl.dot``; ``W`` never exists in memory as bf16::

    grid = (M tiles × N tiles, SPLIT_K)          program (tile, s) sums k over its slice of K:
    words = packed.view(int32)[tile k0]                                  # (BLOCK_N, BLOCK_K / 8) words
    for k0 in slice s, step BLOCK_K:
        next = packed.view(int32)[tile k0 + BLOCK_K]                     # loads in flight during the math
        a   = x[offs_m, k0:k0+BLOCK_K]                                   # (BLOCK_M, BLOCK_K)
        w   = (code[words >> shift & 15] * absmax).to(x.dtype)           # (BLOCK_N, BLOCK_K)
        accᵀ += w @ aᵀ                                                   # tensor cores, fp32 acc
        words = next
    SPLIT_K == 1: out = (acc + bias).to(x.dtype)
    SPLIT_K  > 1: ws[s] = acc; the program of the tile that finishes last sums the SPLIT_K partials in
                  split order, adds bias, casts (same launch, deterministic: ``splitk``)

  With M ≤ 16 the tensor-core tile is mostly padding (BLOCK_M = 16 is tl.dot's minimum) but costs little:
  the multiply-adds are ~1% of the time the bytes take; what costs is the dequantization arithmetic. A
  tile row is read as 32-bit words (8 codes each); each nibble is a shift and a mask, and its value one
  load from the 16-entry code table (64 bytes: one L1 wavefront per warp). Each of a word's 8 nibbles is
  decoded in the words' register layout and ``tl.interleave`` puts them in order without moving them
  between threads; the forward kernel computes ``accᵀ = W @ xᵀ`` so the decoded tile is the tensor cores'
  A operand (with ``x @ Wᵀ`` it was the transposed B operand and went through a shared-memory shuffle).
  Each scale is loaded once per ``GROUP`` (64) elements, or once per word when K is ragged
  (``scale_group``). The kernel prefetches the next tile's words into registers itself (``num_stages=1``):
  Triton's pipeliner would otherwise turn the data-dependent code-table loads into per-element
  asynchronous copies through shared memory.
  ``x`` is read 16 bytes at a time: sizes are not specialised, so the kernel states what the launcher
  guarantees (slices of K start and end on multiples of 8, and with ``A_ALIGNED`` so do x's rows) in a
  form the compiler's alignment analysis reads (``n // 8 * 8``); with 2-byte loads of x the forward
  kernel was integer-ALU bound (the static report: 5.9 → 4.9 integer instructions per weight).
  Split-K exists because at M = 1 an 8192-wide output only makes 8192 / BLOCK_N = 128 tiles — one per SM,
  far too few loads in flight to saturate HBM; ``lora_core.kernels.splitk`` says how far K is split and
  how the partial sums (``SPLIT_K·M·N·4`` bytes, in ``workspace``) are added in the same launch.

  Outputs and workspaces: every launcher takes ``out=`` (where to write the result) and ``workspace=``
  (float32 scratch for the split-K partials, ``nf4_matmul_workspace_numel`` elements); both are
  allocated when not given, and their contents on entry never matter.

  Bit-exactness: the weight is ``(code * absmax).to(x.dtype)`` exactly as ``nf4_dequantize`` gives it;
  the kernels are compiled with FP fusion off so that the double-quantized absmax
  (``nested_code * nested_absmax + offset``) rounds twice, as the reference does, not once in an FMA.

**Otherwise: dequantize, then cuBLAS.** Large M (prefill / training) is bound by the tensor cores
(2·M·N·K flops); a bf16 copy of ``W`` costs one streaming pass (``nf4_dequantize``, ~57 µs for 8192² at
H100 copy bandwidth) next to ~705 µs of cuBLAS at M = 4096, i.e. ≤ 1.10× cuBLAS. fp32 activations take
this path too (a fused fp32 kernel spilled 3–25 KB per thread), and so do K % 8 != 0 (rows that do not
start on a packed word) and 16 < M ≤ 64 (a BLOCK_M = 64 tile spills; see ``BLOCK_MS``). The cross-over
``FUSED_MAX_M`` is to be read off ``lora-core bench``'s M sweep, which times both strategies at every M.

The backward product ``g @ W`` reduces over N (the rows of W) instead of K, with the same tile loader.
Every configuration these launchers can choose is compiled for sm_80 and sm_90a by the compile gate
(``compile_check``, ``tests/test_kernels_compile.py``): no spills, shared memory within each limit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from lora_core.kernels import FUSED_MAX_M
from lora_core.kernels.nf4_dequant import (
    check_device,
    check_nf4,
    check_out,
    log2,
    nf4_dequantize,
    packed_words,
    scale_args,
)
from lora_core.kernels.nf4_gemm_kernels import nf4_matmul_grad_kernel, nf4_matmul_kernel
from lora_core.kernels.splitk import check_workspace, num_sms, split_count, tile_counters

from lora_core.quant.nf4 import NF4Tensor

# The BLOCK_M tiles _config picks from (tl.dot's minimum is 16). A BLOCK_M = 64 tile of this kernel needs
# 255 registers and spills on sm_80 and sm_90 (the compile gate), so M > 16 takes dequantize + cuBLAS.
BLOCK_MS = (16,)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FUSED_DTYPES = (torch.float16, torch.bfloat16)  # fp32 activations: dequantize + cuBLAS (module doc)


# ----------------------------------------------------------------------------- kernels


# ----------------------------------------------------------------------------- host side


def _config(m: int, n_out: int, reduce: int, device: torch.device, grad: bool,
            word_scales: bool = False) -> dict[str, int]:  # fmt: skip
    """Tile sizes and split for an (m × reduce) @ (reduce × n_out) product. First guesses, see module doc.

    BLOCK_K = 128: a tile row is 16 contiguous packed words (64 bytes: two full 32-byte sectors per row,
    16-byte loads per thread). BLOCK_N = 64 rows: 4 KiB of packed W per iteration, 8192 fp32 values = 64
    registers a thread at 4 warps. BLOCK_M: the smallest tl.dot tile in ``BLOCK_MS`` that covers m.
    ``word_scales`` (one scale per word: ragged K, blocks of 16/32): BLOCK_K = 64, since with 128 the
    per-word scales push the forward kernel with double quantization to 255 registers and spills on sm_90.
    """
    block_m = next(b for b in BLOCK_MS if m <= b) if m <= BLOCK_MS[-1] else BLOCK_MS[-1]
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64 if word_scales else 128}
    # forward: the output tile is BLOCK_N wide and K is reduced BLOCK_K at a time; grad: the reverse
    tile_out, step = (cfg["BLOCK_K"], cfg["BLOCK_N"]) if grad else (cfg["BLOCK_N"], cfg["BLOCK_K"])
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n_out, tile_out)
    cfg["SPLIT"] = split_count(tiles, triton.cdiv(reduce, step), num_sms(device))
    return cfg


def scale_group(k: int, block_k: int, block_size: int) -> int:
    """Elements of a tile row that share one scale (the kernels' GROUP): ``min(BLOCK_K, 64)`` when it
    divides both K and the block size (every group then lies in one block: QLoRA's 64-blocks), else 8,
    one word (ragged K, block sizes 16 and 32). Two values only: each is another compiled kernel."""
    group = min(block_k, 64)
    return group if k % group == 0 and block_size % group == 0 else 8


def _plan(m: int, q: NF4Tensor, grad: bool, device: torch.device,
          cfg: dict[str, int] | None = None) -> dict[str, int]:  # fmt: skip
    """The fused launch's configuration for ``m`` rows, with ``PER_SPLIT`` (reduction length of a slice),
    ``SPLIT`` (slices actually used), ``TILES`` (output tiles) and ``WS`` (workspace elements, 0 if none)."""
    n, k = q.shape
    n_out, reduce = (k, n) if grad else (n, k)
    cfg = dict(cfg or _config(m, n_out, reduce, device, grad, scale_group(k, 128, q.block_size) == 8))
    step, tile_out = (cfg["BLOCK_N"], cfg["BLOCK_K"]) if grad else (cfg["BLOCK_K"], cfg["BLOCK_N"])
    cfg["PER_SPLIT"] = triton.cdiv(triton.cdiv(reduce, step), cfg["SPLIT"]) * step
    cfg["SPLIT"] = triton.cdiv(reduce, cfg["PER_SPLIT"])
    cfg["TILES"] = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n_out, tile_out)
    cfg["WS"] = cfg["SPLIT"] * m * n_out if cfg["SPLIT"] > 1 else 0
    return cfg


def _check_x(x: object, name: str, width: int, width_name: str, q: NF4Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(
            f"{name} must have shape (..., {width_name}={width}) to match q.shape={tuple(q.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    check_device(x, name)
    return x


def _check_q2d(q: object) -> NF4Tensor:
    q = check_nf4(q)
    if len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D weight (out_features, in_features), got shape {tuple(q.shape)}")
    return q


def _launch_fused(a: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None, grad: bool,
                  cfg: dict[str, int] | None = None, out: torch.Tensor | None = None,
                  workspace: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The fused kernel on a 2-D ``a``: forward ``a (M, K) -> (M, N)`` or grad ``a (M, N) -> (M, K)``.

    Needs ``K % 8 == 0`` (rows start on a packed word) and ``a`` in float16/bfloat16; ``out`` (if given)
    contiguous ``(M, n_out)``, ``workspace`` (if given) checked to hold ``_plan(...)["WS"]`` float32.
    """
    n, k = q.shape
    m = a.shape[0]
    n_out = k if grad else n
    cfg = _plan(m, q, grad, a.device, cfg)
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT"]
    if out is None:
        out = torch.empty((m, n_out), dtype=a.dtype, device=a.device)
    if workspace is None:  # with no split an empty tensor stands in (never read or written)
        workspace = torch.empty(cfg["WS"], dtype=torch.float32, device=a.device)
    else:
        workspace = check_workspace(workspace, cfg["WS"], a.device)
    counters = tile_counters(a.device, cfg["TILES"]) if split > 1 else workspace
    nested_code, nested_absmax, offset, nested_shift = scale_args(q)
    sizes = (m, n, k, cfg["PER_SPLIT"], split, log2(q.block_size) - 3, nested_shift)  # + has_bias (fwd)
    strides = (a.stride(0), a.stride(1), k // 8, m * n_out, out.stride(0), out.stride(1))  # ws: out's + s
    meta = {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": scale_group(k, bk, q.block_size),
        "DOUBLE_QUANT": q.double_quant, "num_warps": cfg.get("num_warps", 4),
        "num_stages": 1,  # the kernels prefetch the next words into registers themselves (module doc)
        "enable_fp_fusion": False,  # the scales round as the reference's (nf4_dequant's module doc)
    }  # fmt: skip
    quant = (packed_words(q.packed), q.absmax, q.code.reshape(16), nested_code, nested_absmax, offset)
    grid = (cfg["TILES"], split)
    if grad:
        nf4_matmul_grad_kernel[grid](a, *quant, out, workspace, counters, *sizes, *strides, **meta)
    else:
        # x's rows start on multiples of 8 elements (K % 8 == 0 always here): 16-byte loads of x when its
        # pointer is 16-byte aligned too (the same for g in the grad kernel made it slower in the model)
        nf4_matmul_kernel[grid](
            a, *quant, bias if bias is not None else a, out, workspace, counters, *sizes,
            int(bias is not None), *strides, **meta, A_ALIGNED=a.stride(1) == 1 and a.stride(0) % 8 == 0,
            # ptxas' own cap for 4 warps on sm_80 is 168 registers, where this kernel spilled 8 bytes (the
            # compile gate); uncapped it takes 215 there (2 blocks per SM) and 168 on sm_90 (3 blocks)
            maxnreg=255,
        )  # fmt: skip
    return out


def nf4_matmul_workspace_numel(rows: int, q: NF4Tensor, *, grad: bool = False) -> int:
    """float32 elements of ``workspace`` the fused kernel needs for ``rows`` rows of ``x`` (or of
    ``grad_out`` with ``grad``) on ``q``'s device: ``SPLIT·rows·N`` (``·K`` for grad), 0 when it does not
    split the reduction (then ``workspace`` is not used)."""
    q = _check_q2d(q)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ValueError(f"rows must be an int >= 0, got {rows!r}")
    if rows == 0 or q.numel == 0:
        return 0
    return _plan(rows, q, grad, q.device)["WS"]


def nf4_matmul_fused(a: torch.Tensor, q: NF4Tensor, *, grad: bool = False, out: torch.Tensor | None = None,
                     workspace: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The fused kernel alone, whatever M: ``a (M, K) @ dequant(q)ᵀ`` or, with ``grad``, ``a (M, N) @
    dequant(q)``. For benchmarks that time both strategies at every M (``lora-core bench kernels``);
    `nf4_matmul` / `nf4_matmul_grad` choose between them. ``a``: 2-D float16/bfloat16, ``K % 8 == 0``;
    ``out`` and ``workspace`` as in `nf4_matmul`."""
    q = _check_q2d(q)
    n, k = q.shape
    a = _check_x(a, "a", n if grad else k, "out_features" if grad else "in_features", q)
    if a.dim() != 2 or a.dtype not in _FUSED_DTYPES or k % 8:
        raise ValueError(f"the fused kernel needs a 2-D float16/bfloat16 a and K % 8 == 0, got "
                         f"{tuple(a.shape)} {a.dtype}, K = {k}")  # fmt: skip
    shape = (a.shape[0], k if grad else n)
    out = None if out is None else check_out(out, shape, a.dtype, a.device)
    if a.shape[0] == 0 or n == 0 or k == 0:
        return (out if out is not None else torch.empty(shape, dtype=a.dtype, device=a.device)).zero_()
    return _launch_fused(a, q, None, grad, out=out, workspace=workspace)


def _use_fused(m: int, k: int, dtype: torch.dtype) -> bool:
    """The fused kernels take M ≤ FUSED_MAX_M rows of fp16/bf16 with ``K % 8 == 0``. Otherwise (many rows,
    fp32 activations, or rows that do not start on a packed word) dequantize + cuBLAS (module doc)."""
    return m <= FUSED_MAX_M and k % 8 == 0 and dtype in _FUSED_DTYPES


def nf4_matmul(
    x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None, *,
    out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``x @ dequant(q)ᵀ (+ bias)``, the forward of a linear layer whose weight is NF4 (QLoRA, §3).

    Args:
        x: ``(..., K)`` float16 / bfloat16 / float32, any strides.
        q: the NF4 weight of shape ``(N, K)`` (``out_features, in_features``), same device.
        bias: optional ``(N,)`` in ``x.dtype``.
        out: optional contiguous ``(..., N)`` tensor in ``x.dtype`` on ``x``'s device to write the result
            into (its contents on entry do not matter); returned.
        workspace: optional contiguous float32 scratch for the split-K partial sums, at least
            ``nf4_matmul_workspace_numel(rows, q)`` elements (``rows`` = ``x.numel() // K``); allocated
            when not given, unused when the product does not split K.

    Returns:
        ``(..., N)`` in ``x.dtype`` (fp32 accumulation; the weight is rounded to ``x.dtype`` first).
    """
    q = _check_q2d(q)
    n, k = q.shape
    x = _check_x(x, "x", k, "in_features", q)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must have shape ({n},), dtype {x.dtype} and device {x.device}; got "
                f"{tuple(bias.shape)}, {bias.dtype}, {bias.device}"
            )
        bias = bias.contiguous()
    lead = x.shape[:-1]
    out = None if out is None else check_out(out, (*lead, n), x.dtype, x.device)
    if lead.numel() == 0 or n == 0 or k == 0:  # nothing to reduce: the sum over K is empty, y = bias
        y = torch.zeros((*lead, n), dtype=x.dtype, device=x.device)
        y = y if bias is None else y + bias
        return y if out is None else out.copy_(y)
    a = x.reshape(-1, k)  # a view when it can be; strides are passed to the kernel
    if not _use_fused(a.shape[0], k, x.dtype):
        w = nf4_dequantize(q, x.dtype)
        if out is None:
            return F.linear(x, w, bias)
        c = out.view(-1, n)
        torch.mm(a, w.T, out=c) if bias is None else torch.addmm(bias, a, w.T, out=c)
        return out
    y = _launch_fused(a, q, bias, False, out=None if out is None else out.view(-1, n), workspace=workspace)
    return y.view(*lead, n) if out is None else out


def nf4_matmul_grad(grad_out: torch.Tensor, q: NF4Tensor, *, out: torch.Tensor | None = None,
                    workspace: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``grad_out @ dequant(q)``: the input gradient of ``x @ Wᵀ`` for an NF4 weight ``W`` (N, K).

    Args:
        grad_out: ``(..., N)`` float16 / bfloat16 / float32, any strides.
        q: the NF4 weight of shape ``(N, K)``, same device.
        out, workspace: as in `nf4_matmul` (``out`` of shape ``(..., K)``; the workspace size is
            ``nf4_matmul_workspace_numel(rows, q, grad=True)``).

    Returns:
        ``(..., K)`` in ``grad_out.dtype``.
    """
    q = _check_q2d(q)
    n, k = q.shape
    grad_out = _check_x(grad_out, "grad_out", n, "out_features", q)
    lead = grad_out.shape[:-1]
    out = None if out is None else check_out(out, (*lead, k), grad_out.dtype, grad_out.device)
    if lead.numel() == 0 or n == 0 or k == 0:  # an empty product or an empty sum over N: zeros
        y = torch.zeros((*lead, k), dtype=grad_out.dtype, device=grad_out.device)
        return y if out is None else out.copy_(y)
    g = grad_out.reshape(-1, n)
    if not _use_fused(g.shape[0], k, grad_out.dtype):
        w = nf4_dequantize(q, grad_out.dtype)
        if out is None:
            return F.linear(grad_out, w.T)  # = grad_out @ W
        torch.mm(g, w, out=out.view(-1, k))
        return out
    y = _launch_fused(g, q, None, True, out=None if out is None else out.view(-1, k), workspace=workspace)
    return y.view(*lead, k) if out is None else out
