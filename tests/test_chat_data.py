"""JSONL ``messages`` records: rendered with the chat template, loss on the assistant's tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_core.models.tiny import CharTokenizer
from lora_core.training.chat import chat_tokens
from lora_core.training.data import IGNORE_INDEX, load_dataset, read_examples

pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How many bottles?"},
    {"role": "assistant", "content": "Ten green bottles."},
    {"role": "user", "content": "Then?"},
    {"role": "assistant", "content": "Nine."},
]


@pytest.fixture(scope="module")
def tok():
    from tiny_llama import build_tokenizer

    return build_tokenizer()


def test_only_the_assistant_turns_carry_loss(tok) -> None:
    ids, mask = chat_tokens(CONVERSATION, tok)
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    # each reply and its end of turn, nothing of the system, the user or the assistant header
    assert learned == "Ten green bottles.<|im_end|>\nNine.<|im_end|>\n"


def test_messages_records_become_blocks_with_ignored_labels(tok, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(8)))
    data, _ = load_dataset(path, tok, block_size=16)
    ids, mask = chat_tokens(CONVERSATION, tok)
    stream = (ids * 8)[: data.num_tokens]
    assert data.input_ids.flatten().tolist() == stream  # no <eos> appended: the template ends each turn
    expected = [i if m else IGNORE_INDEX for i, m in zip(ids * 8, mask * 8)][: data.num_tokens]
    assert data.labels.flatten().tolist() == expected


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "hi"}], "at least one assistant message"),
        ([{"role": "user"}], "needs string 'role' and 'content'"),
        ([{"role": "wizard", "content": "hi"}], "has role 'wizard'"),
    ],
)
def test_bad_messages_say_why(tmp_path: Path, messages: list, message: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=message):
        read_examples(path)


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        load_dataset(path, CharTokenizer(), block_size=8)
