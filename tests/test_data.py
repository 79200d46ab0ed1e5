"""Text and JSONL files become packed blocks; the loss mask covers responses only; bad files say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_core.models.tiny import CharTokenizer
from lora_core.training.data import IGNORE_INDEX, load_dataset, pack, read_examples

TOK = CharTokenizer()


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=50))
def test_char_tokenizer_round_trips_printable_text(text: str) -> None:
    assert TOK.decode(TOK.encode(text)) == text


def test_text_file_is_packed_into_full_blocks(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghij")  # 10 chars + <eos> = 11 tokens
    data, held_out = load_dataset(tmp_path / "a.txt", TOK, block_size=4)
    assert held_out is None
    assert len(data) == 2  # 11 // 4; the 3-token tail is dropped
    assert TOK.decode(data.input_ids.flatten()) == "abcdefgh"
    assert (data.labels == data.input_ids).all()  # plain text: every token carries loss


def test_documents_are_separated_by_eos(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cd")
    data, _ = load_dataset([tmp_path / "a.txt", tmp_path / "b.txt"], TOK, block_size=6)
    assert data.input_ids[0].tolist() == [
        *TOK.encode("ab"),
        TOK.eos_token_id,
        *TOK.encode("cd"),
        TOK.eos_token_id,
    ]


def test_jsonl_prompt_response_learns_only_the_response(tmp_path: Path) -> None:
    records = [
        {"prompt": "Q: 2+2?\nA:", "response": " 4"},
        {"text": "hello"},
        {"prompt": "Say hi:", "response": " hi"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    n_tokens = sum(len(r.get("prompt", "")) + len(r.get("response", r.get("text", ""))) + 1 for r in records)
    data, _ = load_dataset(path, TOK, block_size=n_tokens)
    ids, labels = data.input_ids[0], data.labels[0]
    learned = TOK.decode(ids[labels != IGNORE_INDEX].tolist())  # special tokens are skipped in decode
    assert learned == " 4" + "hello" + " hi"
    masked = TOK.decode(ids[labels == IGNORE_INDEX].tolist())
    assert masked == "Q: 2+2?\nA:" + "Say hi:"
    assert int((labels == TOK.eos_token_id).sum()) == 3  # each record's <eos> is learned


def test_eval_split_is_the_contiguous_tail(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(399)))
    train, held_out = load_dataset(tmp_path / "a.txt", TOK, block_size=10, eval_fraction=0.25)
    assert (len(train), len(held_out)) == (30, 10)
    whole = pack(
        [*TOK.encode("".join(chr(97 + i % 26) for i in range(399))), TOK.eos_token_id], [True] * 400, 10
    )
    assert (held_out.input_ids == whole.input_ids[30:]).all()


def test_max_tokens_truncates_the_stream(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x" * 1000)
    data, _ = load_dataset(tmp_path / "a.txt", TOK, block_size=10, max_tokens=35)
    assert len(data) == 3


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("", ".txt", "empty dataset"),
        ("abc", ".txt", "empty dataset"),  # shorter than one block
        ('{"prompt": "only a prompt"}\n', ".jsonl", "'prompt' and 'response'"),
        ('{"text": "ok"}\nnot json\n', ".jsonl", ":2: not valid JSON"),
        ("[1, 2]\n", ".jsonl", "expected a JSON object"),
    ],
)
def test_bad_files_raise_a_clear_value_error(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_dataset(path, TOK, block_size=8)


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_examples(tmp_path / "nope.txt")
    (tmp_path / "a.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match="eval_fraction"):
        load_dataset(tmp_path / "a.txt", TOK, block_size=8, eval_fraction=1.0)
    with pytest.raises(ValueError, match="block_size"):
        load_dataset(tmp_path / "a.txt", TOK, block_size=1)
