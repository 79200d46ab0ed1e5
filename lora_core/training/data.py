"""Training data: plain text and JSONL files → tokenized, packed blocks of fixed length.

Every document is tokenized, followed by the end-of-sequence token, and appended to one long stream; the
stream is cut into blocks of ``block_size`` tokens (the ragged tail is dropped). No padding, no wasted
compute::

    doc₁ <eos> doc₂ <eos> doc₃ ...  →  [ block 0 ][ block 1 ][ block 2 ] (tail dropped)

Each block is a dict ``{"input_ids": (T,), "labels": (T,)}``. ``labels`` equals ``input_ids`` except where
no loss is wanted, which holds ``-100`` (transformers' ignore index): for a JSONL record with ``prompt`` and
``response`` only the response (and its ``<eos>``) is learned. Labels are *not* shifted: position ``t``'s
logits predict ``labels[t + 1]``, the same convention as transformers.

Accepted files:

- ``*.txt`` (or any non-JSONL file): the whole file is one document.
- ``*.jsonl``: one JSON object per line: ``{"text": ...}``, ``{"prompt": ..., "response": ...}``, or a chat
  ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat template and
  learned on the assistant's turns only (``lora_core.training.chat``; no ``<eos>`` is appended: the
  template ends each turn itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (transformers' tokenizers and ``CharTokenizer`` fit)."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    """One document: ``prompt`` (no loss, may be empty) followed by ``text`` (loss); or a conversation
    (``messages``, with ``text`` empty)."""

    text: str
    prompt: str = ""
    messages: tuple[dict[str, str], ...] | None = None


def read_examples(path: str | Path) -> list[Example]:
    """Read a ``.txt`` file (one document) or a ``.jsonl`` file (one record per line).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a JSONL line is not an object with ``text``, ``prompt``/``response`` or ``messages``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() != ".jsonl":
        return [Example(text=raw)] if raw.strip() else []
    examples = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        examples.append(_example_from_record(record, f"{path}:{lineno}"))
    return examples


def _example_from_record(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record and isinstance(record["text"], str):
        return Example(text=record["text"])
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return Example(text=record["response"], prompt=record["prompt"])
    if "messages" in record:
        from lora_core.training.chat import check_messages

        return Example(text="", messages=check_messages(record["messages"], where))
    raise ValueError(
        f"{where}: a record needs a string 'text', string 'prompt' and 'response', or 'messages'; "
        f"got keys {sorted(record)}"
    )


def tokenize(examples: Iterable[Example], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """The token stream of all examples and, per token, whether it carries loss.

    Prompt and response are tokenized separately so the loss boundary falls exactly between them.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    for ex in examples:
        if ex.messages is not None:  # a conversation: the chat template marks its own turns' ends
            from lora_core.training.chat import chat_tokens

            chat_ids, chat_mask = chat_tokens(ex.messages, tokenizer)
            ids += chat_ids
            mask += chat_mask
            continue
        if ex.prompt:
            p = tokenizer.encode(ex.prompt, add_special_tokens=False)
            ids += p
            mask += [False] * len(p)
        t = tokenizer.encode(ex.text, add_special_tokens=False)
        t = [*t, eos] if eos is not None else t
        ids += t
        mask += [True] * len(t)
    return ids, mask


class PackedDataset(Dataset):
    """Fixed-length blocks: ``input_ids`` and ``labels``, both ``(N, block_size)`` int64."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if input_ids.shape != labels.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} "
                "must be equal (N, T) shapes"
            )
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def subset(self, indices: Sequence[int] | slice) -> PackedDataset:
        idx = indices if isinstance(indices, slice) else torch.as_tensor(list(indices), dtype=torch.long)
        return PackedDataset(self.input_ids[idx], self.labels[idx])


def pack(ids: Sequence[int], loss_mask: Sequence[bool], block_size: int) -> PackedDataset:
    """Cut a token stream into ``len(ids) // block_size`` blocks (the tail is dropped)."""
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    n = len(ids) // block_size
    t_ids = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)  # (N, T)
    t_mask = torch.tensor(loss_mask[: n * block_size], dtype=torch.bool).view(n, block_size)
    return PackedDataset(t_ids, t_ids.masked_fill(~t_mask, IGNORE_INDEX))


def load_dataset(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Tokenizer,
    block_size: int,
    eval_fraction: float = 0.0,
    max_tokens: int | None = None,
) -> tuple[PackedDataset, PackedDataset | None]:
    """Read, tokenize and pack one or more files; optionally hold out the last blocks for evaluation.

    Args:
        paths: ``.txt`` / ``.jsonl`` files, concatenated in order.
        tokenizer: anything with ``encode(text, add_special_tokens=False)`` and ``eos_token_id``.
        block_size: tokens per block (the model's context must hold it).
        eval_fraction: share of blocks, taken from the end of the stream (contiguous, so held-out text is
            unseen text, not interleaved with training text), kept for evaluation; 0 for none.
        max_tokens: stop reading once this many tokens are in the stream (for quick runs).

    Raises:
        ValueError: the files hold fewer than one block of text (or too few to split), or bad arguments.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    ids: list[int] = []
    mask: list[bool] = []
    for path in paths:
        file_ids, file_mask = tokenize(read_examples(path), tokenizer)
        ids += file_ids
        mask += file_mask
        if max_tokens is not None and len(ids) >= max_tokens:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            break
    data = pack(ids, mask, block_size)
    names = ", ".join(str(p) for p in paths)
    if len(data) == 0 or not bool((data.labels != IGNORE_INDEX).any()):
        raise ValueError(
            f"empty dataset: {names} holds {len(ids)} tokens, fewer than one block of {block_size} with loss"
        )
    if eval_fraction == 0.0:
        return data, None
    n_eval = max(1, round(len(data) * eval_fraction))
    if n_eval >= len(data):
        raise ValueError(
            f"dataset too small to hold out {eval_fraction:.0%} for evaluation: "
            f"{len(data)} blocks of {block_size} tokens in {names}"
        )
    return data.subset(slice(0, len(data) - n_eval)), data.subset(slice(len(data) - n_eval, len(data)))


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-shaped examples into a batch (packed blocks and fixed-length classification examples)."""
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
