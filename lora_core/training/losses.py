"""Causal-LM cross-entropy computed chunk by chunk: fp32 logits for the whole batch never exist.

A Hugging Face causal LM computes ``logits = lm_head(h)`` for all N = B·T tokens, upcasts them to fp32 and
calls ``F.cross_entropy``; autograd then keeps the fp32 log-softmax (N, V) for backward and makes an (N, V)
gradient. For N = 4096 tokens and V = 32000 that is ≈ 0.5 GiB per copy, several copies at the peak. Here,
with ``z_i = W h_i + b`` (V,), targets ``y_i`` = labels shifted left by one, and n = #non-ignored targets:

    loss      = (1/n) Σ_{i valid} ( lse(z_i) − z_{i,y_i} )                  lse = log Σ_v exp z_{i,v}
    D_i       = ∂loss/∂z_i = (softmax(z_i) − onehot(y_i)) / n  (valid i),  0 (ignored i)
    ∂loss/∂h  = D W          (N, H)        ∂loss/∂W = Dᵀ h   (V, H)        ∂loss/∂b = Σ_i D_i   (V,)

D depends on nothing the caller does after the loss, so the gradients are formed **in the forward pass**,
one chunk of C tokens at a time, and the (C, V) logits die with their chunk ("fused linear cross-entropy",
as in Liger-Kernel, Hsu et al. 2024)::

    for each chunk c of C rows:       z = (h_c Wᵀ + b).float()            (C, V)   the only big temporary
                                      loss_sum += Σ (lse − z_y)           z ← softmax in place (exp, /Σ)
                                      z ← (z − onehot) · valid / n        D_c, in place
                                      grad_h[c] = D_c W                   (C, H)   written once, never summed
                                      grad_W += D_cᵀ h_c  (fp32)          only when the head trains

What is kept for backward is ``grad_h`` (N, H) in the hidden dtype (and ``grad_W``/``grad_b`` when the head
trains): never a (tokens × vocab) tensor. Backward only scales them by the incoming scalar gradient. That
costs 3 GEMMs per chunk (forward, D W, Dᵀ h when needed) instead of the 4 of a recompute-in-backward
checkpoint. When no gradient is wanted (``torch.no_grad()`` or frozen inputs) only the loss is computed.

The two GEMMs are ``lora_core.dispatch``'s (oneDNN for float32 on a CPU, within float32 tolerance of
``F.linear``). Precision matches transformers' ``ForCausalLMLoss``: the head GEMM runs in the hidden dtype,
the softmax and the sum in fp32 (float64 stays float64), D is rounded once to the hidden dtype before the
gradient GEMMs.

Peak extra memory ≈ C·V·(2 + 4 + 2) bytes for bf16 (the GEMM output, its fp32 copy, D in bf16) + N·H·2 for
grad_h. The default C gives ≈ 32 Mi logits per chunk: 1024 tokens for a 32k vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_core import dispatch

_LOGITS_PER_CHUNK = 2**25  # ≈ 128 MiB of fp32 logits per chunk with the default chunk size


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for ``vocab_size``: ≈ 32 Mi logits, a multiple of 64 (GEMM-friendly), at least 64."""
    return max(64, _LOGITS_PER_CHUNK // max(vocab_size, 1) // 64 * 64)


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:  # (..., T) -> (..., T)
    """Targets for next-token prediction: position t predicts ``labels[t + 1]``; the last position has no
    target (``ignore_index``), as transformers pads before shifting."""
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean_i CE(h_i Wᵀ + b, y_i)`` over non-ignored ``y_i``; gradients formed in forward (module doc)."""

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
        opts: tuple[int, int, bool, bool, bool, bool],
    ) -> Tensor:  # fmt: skip
        chunk, ignore_index, mean, need_h, need_w, need_b = opts
        n_tok, acc = h.shape[0], torch.promote_types(h.dtype, torch.float32)
        valid = targets != ignore_index  # (N,)
        valid_f = valid.to(acc)  # (N,)
        count = valid_f.sum()  # n, kept on the device: no sync
        # D's row scale: valid/n (torch gives zero gradients when every target is ignored, so clamp n ≥ 1)
        row_scale = valid_f / count.clamp(min=1) if mean else valid_f  # (N,)
        safe_t = torch.where(valid, targets, 0)  # (N,) a valid index for gather/scatter on ignored rows
        need_grad = need_h or need_w or need_b
        grad_h = torch.empty_like(h) if need_h else None  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None  # (V,)
        loss_sum = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, n_tok, chunk):
            rows = slice(start, min(start + chunk, n_tok))
            h_c, t_c = h[rows], safe_t[rows, None]  # (C, H), (C, 1)
            z = dispatch.linear(h_c, weight, bias).to(acc)  # (C, V) the head GEMM in h's dtype, then fp32
            z_target = z.gather(1, t_c)  # (C, 1)
            z_max = z.amax(1, keepdim=True)  # (C, 1)
            z.sub_(z_max).exp_()  # exp(z − max), in place: no second (C, V) buffer
            z_sum = z.sum(1, keepdim=True)  # (C, 1)
            lse = z_max + z_sum.log()  # (C, 1)
            loss_sum += ((lse - z_target).squeeze(1) * valid_f[rows]).sum()
            if not need_grad:
                continue
            z.div_(z_sum)  # softmax(z)
            z.scatter_add_(1, t_c, -valid_f[rows, None])  # − onehot(y) on valid rows
            z.mul_(row_scale[rows, None])  # D_c = (softmax − onehot) · valid / n   (C, V)
            if need_b:
                grad_b += z.sum(0)  # (V,)
            d = z.to(h.dtype)  # (C, V) rounded once, as autograd through .float() would
            del z
            if need_h:
                grad_h[rows] = dispatch.mm(d, weight)  # (C, H) = D_c W
            if need_w:
                grad_w += (d.T @ h_c).to(acc)  # (V, H) += D_cᵀ h_c
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss_sum / count if mean else loss_sum  # n = 0: nan, as F.cross_entropy gives

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = None if grad_h is None else grad_h * grad.to(grad_h.dtype)  # (N, H)
        gw = None if grad_w is None else (grad_w * grad).to(w_dtype)  # (V, H)
        gb = None if grad_b is None else (grad_b * grad).to(b_dtype)  # (V,)
        return gh, gw, gb, None, None


def chunked_causal_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    lm_head_bias: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Next-token cross-entropy of a causal LM from its final hidden states, without materialising the
    (tokens × vocab) logits: the value of transformers' ``ForCausalLMLoss`` (labels shifted inside, mean
    over non-ignored targets), gradients w.r.t. ``hidden`` (and the head, if it requires grad).

    Args:
        hidden: ``(..., T, H)`` last hidden states (after the final norm), float.
        lm_head_weight: ``(V, H)`` output head weight, ``hidden``'s dtype and device.
        labels: ``(..., T)`` integer token ids, **not** shifted; ``ignore_index`` marks positions to skip.
        chunk_size: tokens per chunk (default: ≈ 32 Mi logits per chunk, 1024 for V = 32000).
        ignore_index: label value that contributes nothing (transformers: -100).
        lm_head_bias: optional ``(V,)`` head bias.
        reduction: ``"mean"`` (over non-ignored targets; nan when there are none, like ``F.cross_entropy``)
            or ``"sum"`` (for normalising by a global token count yourself).

    Returns:
        A scalar in ``promote(hidden.dtype, float32)``.

    Raises:
        TypeError: non-tensor arguments, non-float hidden, non-integer labels, mismatched dtypes.
        ValueError: shapes that do not fit, a bad ``chunk_size`` / ``reduction``, a label outside
            ``[0, V)`` that is not ``ignore_index`` (checked on the labels: one device sync).
    """
    for name, t in (("hidden", hidden), ("lm_head_weight", lm_head_weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point() or hidden.dim() < 2:
        raise TypeError(
            f"hidden must be a float tensor (..., T, H), got {hidden.dtype} {tuple(hidden.shape)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be (V, H={hidden.shape[-1]}), got {tuple(lm_head_weight.shape)}"
        )
    if lm_head_weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight is {lm_head_weight.dtype} but hidden is {hidden.dtype}; cast one")
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and (not isinstance(lm_head_bias, Tensor) or lm_head_bias.shape != (vocab,)):
        raise ValueError(f"lm_head_bias must be a ({vocab},) tensor or None")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's), got {tuple(labels.shape)}"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    targets = shift_labels(labels.to(hidden.device, torch.long), ignore_index).reshape(-1)  # (N,)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; got {targets[bad][:5].tolist()}"
        )
    grad_on = torch.is_grad_enabled()
    opts = (
        chunk_size, ignore_index, reduction == "mean", grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
        grad_on and lm_head_bias is not None and lm_head_bias.requires_grad,
    )  # fmt: skip
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H), a view for contiguous hidden states
    return _ChunkedLinearCrossEntropy.apply(h, lm_head_weight, lm_head_bias, targets, opts)


def causal_lm_loss_ref(
    hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *, ignore_index: int = -100,
    lm_head_bias: Tensor | None = None, reduction: str = "mean",
) -> Tensor:  # fmt: skip
    """The reference: full logits, then ``F.cross_entropy`` on the shifted labels (transformers' recipe)."""
    logits = F.linear(hidden, lm_head_weight, lm_head_bias)  # (..., T, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # transformers' .float()
    targets = shift_labels(labels.long(), ignore_index).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=ignore_index,
                           reduction=reduction)  # fmt: skip


# ---- transformers causal LMs ---------------------------------------------------------------------------


def causal_lm_hidden_and_head(
    model: nn.Module, input_ids: Tensor, **model_kwargs: Any
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a transformers causal LM (``LlamaForCausalLM`` and kin, with or without LoRA) up to its final
    hidden states, and hand back its output head: ``(hidden (B, T, H), weight (V, H), bias or None)``.

    Calls the decoder (``model.get_decoder()``, else ``model.model``) with ``use_cache=False`` and
    ``model_kwargs`` (``attention_mask``, ``position_ids``, ...); the model itself is not changed. A PEFT
    wrapper is unwrapped with ``get_base_model()``.

    Raises:
        TypeError: no decoder / output head found, or the head is not a plain ``nn.Linear`` (an adapted
            head's update would be missing from the loss).
        ValueError: the config scales or soft-caps the logits (``final_logit_softcapping``,
            ``logit_scale``), which ``chunked_causal_lm_loss`` does not apply.
    """
    decoder, head = decoder_and_head(model)
    out = decoder(input_ids=input_ids, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
    return hidden, head.weight, head.bias


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The decoder and plain ``nn.Linear`` output head of a transformers causal LM, or the error that says
    why ``causal_lm_hidden_and_head`` cannot use this model (see there)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(base, "model", None)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, nn.Module) or decoder is base:
        raise TypeError(f"{type(base).__name__} has no decoder submodule (get_decoder() or .model)")
    if type(head) is not nn.Linear:
        raise TypeError(
            f"the output head must be a plain nn.Linear, got {type(head).__name__}; "
            "chunked_causal_lm_loss reads its weight directly (leave lm_head out of LoRA's targets)"
        )
    config = getattr(base, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise ValueError(f"config.{attr}={getattr(config, attr)!r} is not supported by the chunked loss")
    return decoder, head


def causal_lm_loss(
    model: nn.Module, input_ids: Tensor, labels: Tensor, *, chunk_size: int | None = None,
    ignore_index: int = -100, **model_kwargs: Any,
) -> Tensor:  # fmt: skip
    """``model(input_ids, labels=labels).loss`` for a transformers causal LM, through
    ``chunked_causal_lm_loss``: same value, no (tokens × vocab) fp32 logits."""
    hidden, weight, bias = causal_lm_hidden_and_head(model, input_ids, **model_kwargs)
    return chunked_causal_lm_loss(
        hidden, weight, labels, chunk_size=chunk_size, ignore_index=ignore_index, lm_head_bias=bias
    )


__all__ = [
    "causal_lm_hidden_and_head",
    "causal_lm_loss",
    "causal_lm_loss_ref",
    "chunked_causal_lm_loss",
    "default_chunk_size",
    "shift_labels",
]
