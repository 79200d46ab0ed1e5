"""chunked_causal_lm_loss against F.cross_entropy on full logits; no (tokens × vocab) tensor saved; the
transformers helpers against the model's own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from lora_core.training.losses import (
    causal_lm_hidden_and_head,
    causal_lm_loss,
    chunked_causal_lm_loss,
    default_chunk_size,
    shift_labels,
)


def full_logits_loss(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean"):
    """Written out independently of lora_core: full logits, shift, F.cross_entropy (transformers' recipe)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    padded = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), padded.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction)  # fmt: skip


def make_case(seed, batch, seq, hid, vocab, ignore_frac, ignore_index, dtype=torch.float64, bias=False,
              head_grad=True):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hid, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hid, generator=gen, dtype=torch.float64) / hid**0.5).to(dtype)
    weight.requires_grad_(head_grad)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_frac] = ignore_index
    return hidden, weight, b, labels


def grads(loss, tensors):
    tensors = [t for t in tensors if t is not None and t.requires_grad]
    return loss, torch.autograd.grad(loss, tensors)


@given(
    seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), seq=st.integers(1, 9), hid=st.integers(1, 8),
    vocab=st.integers(2, 13), chunk=st.integers(1, 20), ignore_frac=st.sampled_from([0.0, 0.3, 0.9]),
    ignore_index=st.sampled_from([-100, -1, 0]), bias=st.booleans(), head_grad=st.booleans(),
    scale=st.floats(0.25, 4.0), reduction=st.sampled_from(["mean", "sum"]),
)  # fmt: skip
def test_matches_full_logits_float64(seed, batch, seq, hid, vocab, chunk, ignore_frac, ignore_index, bias,
                                     head_grad, scale, reduction) -> None:  # fmt: skip
    """Values and every gradient, any chunking (ragged last chunk, chunk > tokens), any ignore pattern;
    an upstream gradient ≠ 1 (the loss scaled) must scale the gradients formed in forward."""
    h, w, b, labels = make_case(seed, batch, seq, hid, vocab, ignore_frac, ignore_index, bias=bias,
                                head_grad=head_grad)  # fmt: skip
    if seq > 1 and (shift_labels(labels, ignore_index) == ignore_index).all():
        labels[0, 1] = (ignore_index + 1) % vocab  # all-ignored is its own test (nan): keep one target
    loss = chunked_causal_lm_loss(
        h, w, labels, chunk_size=chunk, ignore_index=ignore_index, lm_head_bias=b, reduction=reduction
    )
    ours, g_ours = grads(scale * loss, (h, w, b))
    if seq == 1:  # no position has a target: both give nan (mean) / 0 (sum)
        ref = scale * full_logits_loss(h, w, labels, b, ignore_index, reduction)
        torch.testing.assert_close(ours, ref.detach(), equal_nan=True)
        return
    ref, g_ref = grads(scale * full_logits_loss(h, w, labels, b, ignore_index, reduction), (h, w, b))
    assert ours.dtype == torch.float64
    assert_close(ours, ref)
    assert len(g_ours) == len(g_ref) == 1 + head_grad + bias
    for got, want in zip(g_ours, g_ref):
        assert_close(got, want)


def test_gradcheck() -> None:
    h, w, b, labels = make_case(0, 2, 5, 4, 7, 0.3, -100, bias=True)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: chunked_causal_lm_loss(h_, w_, labels, chunk_size=3, lm_head_bias=b_), (h, w, b)
    )


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_bf16_within_tolerance(chunk: int) -> None:
    """bf16 hidden and head: loss (fp32) and gradients within bf16 tolerance of the float64 reference on the
    same (rounded) values."""
    h, w, _, labels = make_case(1, 2, 24, 32, 50, 0.2, -100, dtype=torch.bfloat16)
    ours, g_ours = grads(chunked_causal_lm_loss(h, w, labels, chunk_size=chunk), (h, w))
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref, g_ref = grads(full_logits_loss(h64, w64, labels), (h64, w64))
    assert ours.dtype == torch.float32 and g_ours[0].dtype == g_ours[1].dtype == torch.bfloat16
    assert_close(ours, ref, dtype=torch.bfloat16)
    for got, want in zip(g_ours, g_ref):
        scale = want.abs().max()  # gradients are O(1/n): compare relative to their size
        assert_close(got.double() / scale, want / scale, dtype=torch.bfloat16)


def saved_shapes(fn):
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("head_grad", [False, True])
def test_saved_tensors_hold_no_token_by_vocab_tensor(head_grad: bool) -> None:
    """Audit: what autograd keeps between forward and backward. The full-logits path keeps an (N, V) tensor
    (so the audit can fail); ours keeps (N, H) and, when the head trains, (V, H) and nothing bigger."""
    n_tok, hid, vocab = 4 * 16, 8, 50  # N·V = 3200 > N·H = 512 and > V·H = 400
    h, w, _, labels = make_case(2, 4, 16, hid, vocab, 0.1, -100, dtype=torch.float32, head_grad=head_grad)
    _, ref_shapes = saved_shapes(lambda: full_logits_loss(h, w, labels))
    assert any(s[-1] == vocab and torch.Size(s).numel() >= n_tok * vocab for s in ref_shapes)
    loss, ours = saved_shapes(lambda: chunked_causal_lm_loss(h, w, labels, chunk_size=16))
    assert all(torch.Size(s).numel() < n_tok * vocab for s in ours), ours
    assert sorted(ours) == sorted([(n_tok, hid)] + ([(vocab, hid)] if head_grad else [])), ours
    loss.backward()  # and backward still works from what was saved
    assert h.grad is not None and h.grad.shape == h.shape


def test_no_grad_and_frozen_inputs_form_no_gradients() -> None:
    h, w, _, labels = make_case(3, 2, 6, 4, 9, 0.0, -100, head_grad=False)
    want = full_logits_loss(h, w, labels)
    with torch.no_grad():
        loss, shapes = saved_shapes(lambda: chunked_causal_lm_loss(h, w, labels, chunk_size=5))
    assert shapes == [] and not loss.requires_grad
    assert_close(loss, want.detach())
    loss2, shapes2 = saved_shapes(lambda: chunked_causal_lm_loss(h.detach(), w, labels, chunk_size=5))
    assert not loss2.requires_grad and shapes2 == []


def test_all_ignored_is_nan_with_zero_grads_like_cross_entropy() -> None:
    h, w, _, labels = make_case(4, 2, 5, 4, 9, 1.0, -100, head_grad=False)
    loss = chunked_causal_lm_loss(h, w, labels)
    ref = full_logits_loss(h, w, labels)
    assert torch.isnan(loss) and torch.isnan(ref)
    (g,) = torch.autograd.grad(loss, h)
    (g_ref,) = torch.autograd.grad(ref, h)
    assert torch.equal(g, g_ref) and not g.any()


def test_backward_twice_with_retain_graph_accumulates() -> None:
    h, w, _, labels = make_case(5, 1, 8, 4, 9, 0.0, -100, head_grad=False)
    loss = chunked_causal_lm_loss(h, w, labels, chunk_size=3)
    loss.backward(retain_graph=True)
    once = h.grad.clone()
    loss.backward()
    assert_close(h.grad, 2 * once)


def test_default_chunk_size() -> None:
    assert default_chunk_size(32000) == 1024  # ≈ 32 Mi fp32 logits per chunk
    assert default_chunk_size(128256) == 256
    assert default_chunk_size(10**9) == 64


def _bad_call(case: str) -> None:
    h, w, _, labels = make_case(6, 2, 4, 4, 9, 0.0, -100)
    args = {"hidden": h, "lm_head_weight": w, "labels": labels}
    kwargs: dict = {}
    if case == "float labels":
        args["labels"] = labels.double()
    elif case == "short labels":
        args["labels"] = labels[:, :3]
    elif case == "out-of-range label":
        args["labels"] = labels.clone().fill_(9)
    elif case == "negative label":
        args["labels"] = labels.clone().fill_(-5)
    elif case == "half head":
        args["lm_head_weight"] = w.detach().float()
    elif case == "wide head":
        args["lm_head_weight"] = torch.zeros(9, 5, dtype=torch.float64)
    elif case == "short bias":
        kwargs["lm_head_bias"] = torch.zeros(3, dtype=torch.float64)
    elif case == "int hidden":
        args["hidden"] = torch.zeros(2, 4, 4, dtype=torch.long)
    elif case == "list head":
        args["lm_head_weight"] = [[0.0]]
    else:
        kwargs.update({"chunk 0": {"chunk_size": 0}, "chunk bool": {"chunk_size": True},
                       "reduction none": {"reduction": "none"}}[case])  # fmt: skip
    chunked_causal_lm_loss(**args, **kwargs)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("float labels", TypeError, "integer"),
        ("short labels", ValueError, "labels must have shape"),
        ("out-of-range label", ValueError, r"labels must be in \[0, 9\)"),
        ("negative label", ValueError, r"got \[-5"),
        ("half head", TypeError, "cast one"),
        ("wide head", ValueError, "lm_head_weight must be"),
        ("short bias", ValueError, "lm_head_bias"),
        ("int hidden", TypeError, "float tensor"),
        ("list head", TypeError, "lm_head_weight must be a torch.Tensor"),
        ("chunk 0", ValueError, "chunk_size"),
        ("chunk bool", ValueError, "chunk_size"),
        ("reduction none", ValueError, "reduction"),
    ],
)
def test_bad_input_raises(case: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _bad_call(case)


# ---- transformers models ---------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def test_causal_lm_loss_equals_the_models_own_loss_with_lora() -> None:
    """Through a real LlamaForCausalLM with LoRA: the loss value and every adapter gradient equal
    ``model(input_ids, labels=labels).loss``'s, with padding masked out."""
    from lora_core import LoraConfig, apply_lora

    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would hide A's gradient
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, ignored in the labels too
    labels = ids.masked_fill(mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    g_ref = torch.autograd.grad(ref, params)
    ours = causal_lm_loss(model, ids, labels, chunk_size=5, attention_mask=mask)
    g_ours = torch.autograd.grad(ours, params)
    assert_close(ours, ref)
    for got, want in zip(g_ours, g_ref):
        assert_close(got, want)


def test_hidden_and_head_reads_the_model_without_changing_it() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 6))
    hidden, weight, bias = causal_lm_hidden_and_head(model, ids)
    assert hidden.shape == (2, 6, 32) and weight is model.lm_head.weight and bias is None
    assert_close(F.linear(hidden, weight), model(input_ids=ids).logits)


def test_hidden_and_head_refuses_an_adapted_head_and_softcapping() -> None:
    from lora_core import LoraConfig, apply_lora

    model = apply_lora(tiny_llama(), LoraConfig(r=2, alpha=4, target_modules=["lm_head"]))
    with pytest.raises(TypeError, match=r"plain nn\.Linear"):
        causal_lm_hidden_and_head(model, torch.zeros(1, 3, dtype=torch.long))
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_hidden_and_head(model, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="no decoder"):
        causal_lm_hidden_and_head(torch.nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long))
