"""Text generation: a small sampler over logits, and a decode loop that streams text as it is produced.

At each step the model gives logits ``z ∈ ℝ^V`` for the next token. ``next_token_probs`` turns them into a
distribution in the order transformers uses (penalty first, then the warpers)::

    z ─ repetition penalty ─ / T ─ top-k ─ softmax ─ top-p ─ renormalize ─ draw (seeded generator)

1. **Repetition penalty** θ (CTRL, Keskar et al. 2019, §4.1; transformers'
   ``RepetitionPenaltyLogitsProcessor``): for every token id already in the sequence (prompt included),
   ``z_i ← z_i / θ`` if ``z_i > 0`` else ``z_i · θ``. θ > 1 makes repeats less likely, θ = 1 is a no-op.
2. **Temperature** T: ``p = softmax(z / T)``. As T → 0 the distribution tends to one-hot on ``argmax z``;
   T = 0 *is* that limit (greedy decoding), computed as an argmax rather than a division by zero.
3. **Top-k** (Fan et al. 2018): keep exactly the k largest logits (ties broken by the lower token id, so
   exactly k survive), the rest get probability 0. k = 0 keeps all.
4. **Top-p**, nucleus sampling (Holtzman et al. 2020, §3.1): sort the probabilities in decreasing order and
   keep the smallest prefix whose mass is ≥ p (a token survives if the mass *before* it is < p, so the
   most likely token always survives). p = 1 keeps all.

``generate_ids`` runs the model one token at a time, reusing transformers' key/value cache
(``past_key_values``) when the model's ``forward`` takes one (each step then costs one token, not the whole
sequence); otherwise it recomputes the window of the last ``max_position_embeddings`` tokens. ``generate``
wraps it with the tokenizer: prompt (optionally through the chat template) → ids → streamed text, ending at
an end-of-sequence token, a stop string, the token budget, or the model's context.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class SamplingError(ValueError):
    """A bad sampling setting; ``field`` names it (the CLI turns it into ``--flag``)."""

    def __init__(self, field: str, rule: str, value: Any) -> None:
        super().__init__(f"{field} {rule}, got {value!r}")
        self.field, self.rule, self.value = field, rule, value


@dataclass
class SamplingConfig:
    """How to pick each next token (validated at construction; see the module docstring for the math).

    Args:
        max_new_tokens: at most this many tokens are generated (≥ 0).
        temperature: T ≥ 0; 0 is greedy (argmax), 1 the model's own distribution.
        top_k: keep the k most likely tokens (≥ 0; 0 = all).
        top_p: keep the smallest set of most likely tokens with mass ≥ p, p ∈ (0, 1] (1 = all).
        repetition_penalty: θ > 0 (CTRL); 1 is none, 1.1–1.3 is usual against loops.
        stop: strings that end the generation; the text is cut before the first one found.
        seed: seeds a private ``torch.Generator`` (reproducible draws); None uses torch's global RNG.

    Defaults suit small chat models: some randomness, the long tail cut off, a mild penalty.
    """

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SamplingError(name, "must be an int >= 0", value)
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):  # NaN fails too
            raise SamplingError("temperature", "must be >= 0", self.temperature)
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError("top_p", "must be in (0, 1]", self.top_p)
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise SamplingError("repetition_penalty", "must be > 0", self.repetition_penalty)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", "must be non-empty strings", self.stop)


# ------------------------------------------------------------------------------------- the sampler (pure)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on the logits ``(V,)`` of every token id in ``seen`` (each counted once)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    ids = seen.unique()
    z = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(z > 0, z / penalty, z * penalty)  # divide a positive logit, multiply a negative
    return out


def top_k_mask(logits: Tensor, k: int) -> Tensor:
    """Boolean ``(V,)``: True for exactly the ``k`` largest logits (all when ``k`` is 0 or ≥ V)."""
    if k == 0 or k >= logits.shape[-1]:
        return torch.ones_like(logits, dtype=torch.bool)
    # A stable sort breaks ties by index: exactly k survive even when logits tie (topk promises no order).
    order = torch.sort(logits, descending=True, stable=True).indices[:k]
    return torch.zeros_like(logits, dtype=torch.bool).index_fill_(0, order, True)


def top_p_mask(probs: Tensor, p: float) -> Tensor:
    """Boolean ``(V,)``: the smallest set of most likely tokens whose probabilities sum to ≥ ``p``."""
    if p >= 1.0:
        return probs > 0
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above each one
    keep_sorted = mass_before < p  # the first token always (mass 0 before it)
    return torch.zeros_like(keep_sorted).scatter_(0, order, keep_sorted)


def next_token_probs(logits: Tensor, seen: Tensor, cfg: SamplingConfig) -> Tensor:
    """The distribution ``(V,)`` the next token is drawn from, after penalty, temperature, top-k, top-p."""
    z = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:  # the T → 0 limit: all mass on the argmax
        return torch.zeros_like(z).index_fill_(0, z.argmax().view(1), 1.0)
    z = z / cfg.temperature
    z = z.masked_fill(~top_k_mask(z, cfg.top_k), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    probs = probs * top_p_mask(probs, cfg.top_p)
    return probs / probs.sum()


def sample_next(logits: Tensor, seen: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token id drawn from ``next_token_probs`` (an argmax when T = 0: no random number is used)."""
    probs = next_token_probs(logits, seen, cfg)
    if cfg.temperature == 0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------------------- the decode loop


def _takes_cache(model: nn.Module) -> bool:
    try:
        return "past_key_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _context_length(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _generator(model: nn.Module, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    device = next(model.parameters()).device
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def generate_ids(
    model: nn.Module, input_ids: Tensor, cfg: SamplingConfig, eos_ids: Sequence[int] = ()
) -> Iterator[int]:
    """Yield new token ids one at a time for the prompt ``input_ids`` ``(T,)`` or ``(1, T)``.

    Stops after ``cfg.max_new_tokens``, after yielding an id in ``eos_ids``, or when a cached model's
    context is full. The model is put in eval mode for the duration (dropout off) and restored after.
    """
    ids = input_ids.reshape(-1).to(next(model.parameters()).device)  # (T,)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to condition on")
    generator = _generator(model, cfg.seed)
    context = _context_length(model)
    cached = _takes_cache(model)
    was_training = model.training
    model.eval()
    try:
        past, step_input = None, ids
        for _ in range(cfg.max_new_tokens):
            if cached:
                if context is not None and ids.numel() >= context:
                    return  # the cache cannot grow past the positions the model knows
                out = model(input_ids=step_input[None], past_key_values=past, use_cache=True)
                past = out.past_key_values
            else:  # no cache: recompute the last `context` tokens (a sliding window)
                window = ids if context is None else ids[-context:]
                out = model(window[None])
            token = sample_next(out.logits[0, -1], ids, cfg, generator)
            yield token
            if token in eos_ids:
                return
            step_input = torch.tensor([token], device=ids.device)
            ids = torch.cat([ids, step_input])
    finally:
        model.train(was_training)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's (chat models often end a
    turn with a token, like ``<|im_end|>``, that only the generation config names)."""
    ids = [getattr(tokenizer, "eos_token_id", None)]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return sorted({int(i) for i in ids if i is not None})


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt``; with ``chat`` it is one user message through the tokenizer's chat template,
    ending with the assistant's turn opened (``add_generation_prompt``).

    No special tokens are added to a plain prompt: ``lora-core finetune`` trains on text encoded the same
    way, so a prompt looks like the training data.
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this model's tokenizer has no chat template")
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (not shown yet)."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    cfg: SamplingConfig | None = None,
    *,
    chat: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate a continuation of ``prompt`` and return it (the new text only).

    Args:
        model: a causal LM (transformers, ``TinyCausalLM``, with or without LoRA) returning ``.logits``.
        tokenizer: ``encode`` / ``decode`` (and ``apply_chat_template`` for ``chat``).
        prompt: the text to continue, or with ``chat`` the user's message.
        cfg: sampling settings (``SamplingConfig()`` when None).
        chat: apply the tokenizer's chat template (``ValueError`` if it has none).
        on_text: called with each new piece of text as soon as it is final, for streaming. Text is held
            back while it could still be the start of a stop string or an incomplete UTF-8 character.

    Returns:
        The generated text, cut before the first stop string; special tokens are not shown.
    """
    cfg = cfg or SamplingConfig()
    ids = torch.tensor(encode_prompt(tokenizer, prompt, chat), dtype=torch.long)
    new_ids: list[int] = []
    text, shown = "", 0  # the decoded new text, and how much of it was handed to on_text

    def show(upto: int) -> None:
        nonlocal shown
        if on_text is not None and upto > shown:
            on_text(text[shown:upto])
        shown = max(shown, upto)

    for token in generate_ids(model, ids, cfg, eos_token_ids(model, tokenizer)):
        new_ids.append(token)
        # Decode everything so far (not token by token): byte-level BPE splits characters across tokens.
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its remaining bytes
            continue
        hits = [i for i in (text.find(s, max(0, shown - len(s))) for s in cfg.stop) if i >= 0]
        if hits:
            text = text[: min(hits)]
            break
        show(len(text) - _held_back(text, cfg.stop))
    show(len(text))
    return text


__all__ = [
    "SamplingConfig",
    "SamplingError",
    "apply_repetition_penalty",
    "encode_prompt",
    "eos_token_ids",
    "generate",
    "generate_ids",
    "next_token_probs",
    "sample_next",
    "top_k_mask",
    "top_p_mask",
]
