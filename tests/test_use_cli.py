"""From fine-tune to use, as a user runs it: ``finetune`` (QLoRA) → ``generate`` → ``merge`` → ``export``,
each a real subprocess of ``lora-core`` on a tiny transformers Llama (tests/tiny_llama.py); the cheaper
variants of bad input run in-process through ``lora_core.cli.main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import assert_close

import lora_core as lc

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

SCRIPT = Path(sys.executable).parent / "lora-core"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_CORE_DEBUG": ""}
TEXT = "".join(
    f"{i} green bottles hanging on the wall, and {i % 7} fell. To be, or not to be.\n" for i in range(200)
)

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="lora-core console script not installed")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=900)


def in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from lora_core.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and an adapter that ``lora-core finetune`` trained on its NF4 base (the default)."""
    from tiny_llama import save_tiny_llama

    root = tmp_path_factory.mktemp("use")
    save_tiny_llama(root / "llama")
    (root / "data.txt").write_text(TEXT)
    result = cli(
        "finetune", "--model", str(root / "llama"), "--data", str(root / "data.txt"), "--output-dir",
        str(root / "run"), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2",
        "--sample-tokens", "4", "--no-progress", "--prompt", "To be", "--temperature", "0.8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root


def base_model(root: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(root / "llama").eval()


def ids(root: Path) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(root / "llama")
    return torch.tensor([tok.encode("3 green bottles. To be, or not")])


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def test_finetune_records_the_nf4_base_and_peft_still_reads_the_config(trained: Path) -> None:
    config = json.loads((trained / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["lora_core_quantization"] == {
        "quantize": "nf4",
        "quant_block_size": 64,
        "double_quant": True,
    }
    peft = pytest.importorskip("peft")
    with pytest.warns(UserWarning, match="lora_core_quantization"):  # ignored, with a warning, not refused
        pc = peft.LoraConfig.from_pretrained(str(trained / "run" / "adapter"))
    assert (pc.r, pc.lora_alpha) == (config["r"], config["lora_alpha"])


def test_finetune_samples_are_drawn_with_the_given_prompt_settings_and_seed(trained: Path) -> None:
    metrics = json.loads((trained / "run" / "metrics.json").read_text())
    assert metrics["sample_prompt"] == "To be" and metrics["sample_before"].startswith("To be")
    assert metrics["sampling"] == {"max_new_tokens": 4, "temperature": 0.8, "top_k": 50, "top_p": 0.9,
                                   "repetition_penalty": 1.1, "stop": [], "seed": 0}  # fmt: skip


def test_finetune_on_chat_data_learns_the_replies_and_plots_held_out_points(
    trained: Path, tmp_path: Path
) -> None:
    turns = [
        {"role": "user", "content": "How many bottles?"},
        {"role": "assistant", "content": "Ten, green."},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(80)))
    out = tmp_path / "run"
    result = cli(
        "finetune", "--model", str(trained / "llama"), "--data", str(tmp_path / "chat.jsonl"), "--quantize",
        "none", "--steps", "4", "--eval-every", "2", "--seq-len", "32", "--batch-size", "2",
        "--sample-tokens", "6", "--top-k", "20", "--no-progress", "--output-dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sample_prompt"] == "How many bottles?"  # the data's first user message, via the template
    assert metrics["sampling"]["top_k"] == 20 and metrics["sampling"]["seed"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]  # --eval-every 2: points on the plot


def test_generate_streams_what_the_library_generates(trained: Path) -> None:
    from lora_core.cli.use import load_merged

    torch.set_num_threads(1)  # as the subprocess: the same float sums, so the same draws
    adapter = str(trained / "run" / "adapter")
    model, tok, _ = load_merged(None, adapter, "trained", torch.device("cpu"))
    settings = {"max_new_tokens": 24, "seed": 5, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    full = lc.generate(model, tok, "To be", lc.SamplingConfig(**settings), chat=True)
    assert len(full) > 12
    stop = full[8:10]
    expected = full[: full.index(stop)]
    result = cli(
        "generate", "--adapter", adapter, "--prompt", "To be", "--chat", "--max-new-tokens", "24",
        "--seed", "5", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--stop", stop,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_merge_onto_the_nf4_base_it_was_trained_on_by_default(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = trained / "run" / "adapter"
    x = ids(trained)
    trained_model = lc.load_adapter(base_model(trained), adapter, quantize="nf4")  # what finetune trained
    dense_adapted = lc.load_adapter(base_model(trained), adapter)  # the same adapter on the original weights
    result = cli("merge", str(adapter), "--out", str(trained / "merged"))
    assert result.returncode == 0, result.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(trained / "merged").eval()
    assert_close(logits(merged, x), logits(trained_model, x))
    code, _, err = in_process(
        ["merge", str(adapter), "--out", str(trained / "dense"), "--onto", "dense"], capsys
    )
    assert code == 0, err
    onto_dense = transformers.AutoModelForCausalLM.from_pretrained(trained / "dense").eval()
    assert_close(logits(onto_dense, x), logits(dense_adapted, x))
    # ... and the two really differ: NF4 rounding of the base is visible in the logits
    assert (logits(merged, x) - logits(onto_dense, x)).abs().max() > 1e-2


def test_export_writes_a_gguf_that_transformers_reads_back(trained: Path) -> None:
    from lora_core.cli.use import load_merged

    out = trained / "model.gguf"
    result = cli("export", "--adapter", str(trained / "run" / "adapter"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    merged, tok, _ = load_merged(None, str(trained / "run" / "adapter"), "trained", torch.device("cpu"))
    back = transformers.AutoModelForCausalLM.from_pretrained(trained, gguf_file=out.name).eval()
    x = ids(trained)
    with torch.no_grad():  # f16 (the default): compare with the merged model's weights rounded to f16
        for p in merged.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    assert_close(logits(back, x), logits(merged, x))
    tok_back = transformers.AutoTokenizer.from_pretrained(trained, gguf_file=out.name)
    text = "<|im_start|>user\n3 green bottles: Café<|im_end|>"
    assert tok_back.encode(text) == tok.encode(text) and tok_back.chat_template == tok.chat_template
    import gguf

    assert gguf.GGUFReader(str(out)).fields["general.name"].contents() == "llama-finetuned"


def test_a_bad_sampling_flag_is_one_line_exit_2() -> None:
    result = cli("generate", "--model", "tiny", "--prompt", "x", "--temperature", "-1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "lora-core: error: --temperature must be >= 0, got -1.0\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "-3"], "--max-new-tokens must be an int >= 0, got -3"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--top-k", "-1"], "--top-k must be an int >= 0, got -1"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be > 0, got 0.0"),
        (["--onto", "dense"], "--onto needs --adapter"),
        (["--chat"], "--chat: this model's tokenizer has no chat template"),
    ],
)
def test_bad_generate_input_is_one_line_exit_2(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORA_CORE_DEBUG", raising=False)
    code, out, err = in_process(["generate", "--model", "tiny", "--prompt", "x", *flags], capsys)
    assert (
        code == 2 and out == "" and err.startswith(f"lora-core: error: {message}") and err.count("\n") == 1
    ), err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tiny_model", "GGUF export supports llama models"),
        ("exists", "already exists"),
        ("not_gguf", "must end in .gguf"),
        ("no_adapter", "not an adapter directory"),
    ],
)
def test_bad_export_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path,
    case: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LORA_CORE_DEBUG", raising=False)
    out = tmp_path / ("m.bin" if case == "not_gguf" else "m.gguf")
    if case == "exists":
        out.write_text("mine")
    argv = ["export", "--model", "tiny", "--out", str(out)]
    if case == "no_adapter":
        argv += ["--adapter", str(tmp_path / "nope")]
    code, _, err = in_process(argv, capsys)
    assert code == 2 and err.startswith("lora-core: error:") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.gguf"] if case == "exists" else [])
    if case == "exists":
        assert out.read_text() == "mine"


def test_bad_finetune_sampling_flags_are_one_line_exit_2_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORA_CORE_DEBUG", raising=False)
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    argv = ["finetune", "--model", "tiny", "--data", str(tmp_path / "data.txt"), "--output-dir", str(out)]
    code, _, err = in_process([*argv, "--top-p", "1.01"], capsys)
    assert code == 2 and err == "lora-core: error: --top-p must be in (0, 1], got 1.01\n"
    assert not out.exists()


def test_stop_flag_understands_a_typed_newline() -> None:
    from lora_core.cli import build_parser
    from lora_core.cli.use import sampling_config

    args = build_parser().parse_args(["generate", "--prompt", "x", "--stop", "\\n\\n", "--stop", "END"])
    assert sampling_config(args, 5).stop == ("\n\n", "END")
