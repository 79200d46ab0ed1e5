"""Chat data: a conversation rendered with the tokenizer's chat template, loss on the assistant's tokens only.

A JSONL record ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`` is
rendered as the model will see it at inference (``lora-core generate --chat`` uses the same template)::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n  Hello!<|im_end|>\\n
    └──────────────── no loss (label −100) ─────────────────┘  └─── loss ────┘

The assistant's span of turn ``i`` is found by rendering twice: ``render(messages[:i],
add_generation_prompt=True)`` ends where the reply starts, ``render(messages[:i + 1])`` where it ends (its
end-of-turn token included, so the model learns to stop). Each span of text is tokenized separately, so a
loss boundary always falls between two tokens (as ``lora_core.training.data`` does for ``prompt`` /
``response``).
This needs a template that renders a conversation incrementally (each shorter conversation's text is a
prefix of the longer one's), which chat templates are written to do; one that does not is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    """The messages of a record, validated: a non-empty list of ``{"role", "content"}`` string pairs with at
    least one assistant turn (else there is nothing to learn)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"{where}: messages[{j}] needs string 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{j}] has role {m['role']!r}; expected one of {list(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: a 'messages' record needs at least one assistant message to learn from")
    return tuple(out)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_tokens(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it carries loss (assistant turns).

    Raises:
        ValueError: the tokenizer has no chat template, or its template does not render incrementally.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "a JSONL 'messages' record needs a tokenizer with a chat template; this model's has none"
        )
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []  # (start, end) character offsets of each assistant turn in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(upto) or start > len(upto):
            raise ValueError("the tokenizer's chat template does not render a conversation incrementally")
        spans.append((start, len(upto)))
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for start, end in spans:
        for text, loss in ((full[pos:start], False), (full[start:end], True)):
            if text:
                t = tokenizer.encode(text, add_special_tokens=False)
                ids += t
                mask += [loss] * len(t)
        pos = end
    if pos < len(full):
        tail = tokenizer.encode(full[pos:], add_special_tokens=False)
        ids += tail
        mask += [False] * len(tail)
    return ids, mask


__all__ = ["chat_tokens", "check_messages"]
