"""The ``lora-core`` command line, run as real subprocesses on the tiny built-in model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerances import assert_close

import lora_core as lc

SCRIPT = Path(sys.executable).parent / "lora-core"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_CORE_DEBUG": ""}
TEXT = "".join(f"{i} green bottles hanging on the wall, and {i % 7} fell.\n" for i in range(120))
FAST = [
    "--model",
    "tiny",
    "--quantize",
    "none",
    "--seq-len",
    "32",
    "--steps",
    "4",
    "--lr",
    "3e-3",
    "--sample-tokens",
    "8",
    "--no-progress",
]

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="lora-core console script not installed")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real fine-tuning run of the tiny model, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("cli")
    (root / "data.txt").write_text(TEXT)
    # The last checkpoint (step 3 of 4) is what a run killed during step 4 leaves: the resume test uses it.
    args = ["--data", str(root / "data.txt"), "--output-dir", str(root / "run"), "--checkpoint-every", "3"]
    result = cli("finetune", *FAST, *args)
    assert result.returncode == 0, result.stderr
    assert "held-out loss before" in result.stderr and "held-out loss after" in result.stderr
    return root


def test_finetune_writes_adapter_metrics_and_curve(run: Path) -> None:
    out = run / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "eval_loss_before",
        "eval_loss_after",
        "train_tokens_per_s",
        "peak_memory_mb",
        "trainable_params",
        "total_params",
        "device",
    ):
        assert key in metrics, key
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["steps"] == 4 and metrics["device"].startswith("cpu")
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 16, "tiny")
    adapted = lc.load_adapter(lc.TinyCausalLM(), out / "adapter")  # the adapter fits the tiny base
    assert (
        sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n) == metrics["trainable_params"]
    )


def test_resume_from_a_mid_run_checkpoint_ends_with_the_same_adapter(run: Path) -> None:
    killed = run / "killed"  # what a run killed during step 4 leaves behind: its step-3 checkpoint
    killed.mkdir()
    shutil.copy(run / "run" / "checkpoint.pt", killed / "checkpoint.pt")
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 3
    args = ["--data", str(run / "data.txt"), "--output-dir", str(killed), "--checkpoint-every", "3"]
    refused = cli("finetune", *FAST, *args)  # without --resume the folder is not touched
    assert refused.returncode == 2 and "--resume" in refused.stderr
    # What killed writers leave (lora_core.atomic's names), and user files that only look alike: kept.
    stale = [".checkpoint.pt.9f3e01aa.tmp", ".metrics.jsonl.0a1b2c3d.tmp", ".adapter.77ab0c12.tmp"]
    mine = [".checkpoint.pt.mine.tmp", "checkpoint.pt.9f3e01aa.tmp", ".notes.9f3e01aa.tmp", ".adapter.old-x"]
    for name in stale[:2] + mine[:3]:
        (killed / name).write_text("x")
    for name in (stale[2], mine[3]):
        (killed / name).mkdir()
    result = cli("finetune", *FAST, *args, "--resume")
    assert result.returncode == 0, result.stderr
    left = {p.name for p in killed.iterdir()}
    assert not left & set(stale) and set(mine) <= left
    expected = load_file(str(run / "run" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert sorted(resumed) == sorted(expected)
    for name, tensor in expected.items():  # LoRA dropout is on: the RNG state must have been restored too
        assert torch.equal(resumed[name], tensor), name
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]  # steps 1-3 come from the checkpoint
    full, again = (json.loads((d / "metrics.json").read_text()) for d in (run / "run", killed))
    assert again["eval_loss_after"] == full["eval_loss_after"]
    assert again["train_tokens"] * 4 == full["train_tokens"]  # it trained step 4 only: a resume, not a rerun


def test_merge_gives_a_plain_model_with_the_adapted_outputs(run: Path) -> None:
    result = cli("merge", str(run / "run" / "adapter"), "--out", str(run / "merged"))
    assert result.returncode == 0, result.stderr
    merged = lc.models.tiny.load_tiny(run / "merged")
    adapted = lc.load_adapter(lc.TinyCausalLM(), run / "run" / "adapter").eval()
    ids = torch.tensor([lc.CharTokenizer().encode("3 green bottles")])
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert_close(merged(ids).logits, adapted(ids).logits)


def test_merge_refuses_an_adapter_made_for_another_model(run: Path) -> None:
    other = lc.TinyCausalLM(lc.TinyConfig(hidden_size=16, intermediate_size=24))
    (run / "other").mkdir()
    other.save_pretrained(run / "other")
    result = cli(
        "merge", str(run / "run" / "adapter"), "--model", str(run / "other"), "--out", str(run / "bad")
    )
    assert result.returncode == 2
    assert result.stderr.startswith("lora-core: error:") and result.stderr.count("\n") == 1, result.stderr
    assert not (run / "bad").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_data", "file not found"),
        ("missing_model", "not found"),
        ("empty_data", "empty dataset"),
        ("seq_len_too_long", "longer than the model's context of 128"),
        ("seq_len_one", "--seq-len must be >= 2, got 1"),
        ("output_dir_taken", "is not empty"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path: Path, case: str, message: str) -> None:
    data = tmp_path / "data.txt"
    data.write_text("" if case == "empty_data" else TEXT)
    out = tmp_path / "out"
    args = ["finetune", *FAST, "--data", str(data), "--output-dir", str(out)]
    if case == "missing_data":
        args[args.index(str(data))] = str(tmp_path / "nope.txt")
    elif case == "missing_model":
        args[args.index("tiny")] = str(tmp_path / "no-such-model")
    elif case == "seq_len_too_long":
        args[args.index("32")] = "256"
    elif case == "seq_len_one":
        args[args.index("32")] = "1"
    elif case == "output_dir_taken":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("lora-core: error:") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    if case == "output_dir_taken":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli("finetune", "--help")  # one real subprocess; the rest in-process (each costs a torch import)
    assert result.returncode == 0 and "--quantize" in result.stdout and "--resume" in result.stdout
    from lora_core.cli import main

    for argv, word in (
        (["merge", "--help"], "--out"),
        (["quantize", "--help"], "--block-size"),
        (["--help"], "bench"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and word in capsys.readouterr().out, argv


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU `bench` would run the real benchmark")
@pytest.mark.parametrize("suite", [[], ["kernels"], ["layer"]])
def test_bench_without_a_gpu_says_so_and_exits_2(suite: list[str]) -> None:
    result = cli("bench", *suite)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_rejects_an_unknown_suite() -> None:
    result = cli("bench", "warp-speed")
    assert result.returncode == 2
    expected = (
        "lora-core: error: unknown benchmark 'warp-speed'; choose from "
        "['e2e', 'kernels', 'layer', 'mixed', 'static']"
    )
    assert result.stderr.strip() == expected


def test_quantize_writes_bitsandbytes_nf4_and_copies_the_rest(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lora_core.quant.checkpoint import load_bnb_checkpoint
    from lora_core.quant.nf4 import dequantize_nf4, quantize_nf4

    gen = torch.Generator().manual_seed(0)
    src = {"q_proj.weight": torch.randn(64, 96, generator=gen), "q_proj.bias": torch.randn(64, generator=gen),
           "embed_tokens.weight": torch.randn(10, 8, generator=gen)}  # fmt: skip
    save_file(src, str(tmp_path / "in.safetensors"))
    result = cli("quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"))
    assert result.returncode == 0, result.stderr
    loaded = load_bnb_checkpoint(tmp_path / "out.safetensors")
    expected = dequantize_nf4(quantize_nf4(src["q_proj.weight"], block_size=64, double_quant=True))
    assert torch.equal(dequantize_nf4(loaded["q_proj.weight"]), expected)
    assert torch.equal(loaded["q_proj.bias"], src["q_proj.bias"])
    assert torch.equal(loaded["embed_tokens.weight"], src["embed_tokens.weight"])  # embeddings stay dense
    missing = cli("quantize", str(tmp_path / "nope.safetensors"), str(tmp_path / "o2.safetensors"))
    assert missing.returncode == 2 and "input file not found" in missing.stderr
    assert not (tmp_path / "o2.safetensors").exists()


def _in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from lora_core.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("model_is_a_text_file", "neither a model folder nor a .gguf file"),
        ("model_folder_without_weights", "cannot load the model in"),
        ("model_type_unknown", "does not recognize this architecture"),  # transformers' multi-line message
        ("merge_missing_adapter", "is not an adapter directory: it has no adapter_config.json"),
        ("merge_bad_adapter_json", "adapter_config.json is not valid JSON"),
        ("merge_adapter_without_weights", "has no adapter_model.safetensors"),
        ("quantize_not_safetensors", "is not a safetensors file"),
    ],
)
def test_bad_files_for_every_command_are_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    message: str,
) -> None:
    monkeypatch.delenv("LORA_CORE_DEBUG", raising=False)
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    finetune = ["finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(out)]
    model = tmp_path / "model"
    if case == "model_is_a_text_file":
        argv = [*finetune, "--model", str(tmp_path / "data.txt")]
    elif case.startswith("model_"):
        model.mkdir()
        config = {"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "intermediate_size": 16}  # fmt: skip
        if case == "model_type_unknown":
            config["model_type"] = "no-such-architecture"
        (model / "config.json").write_text(json.dumps(config))
        argv = [*finetune, "--model", str(model)]
    elif case.startswith("merge_"):
        adapter = tmp_path / "adapter"
        if case != "merge_missing_adapter":
            adapter.mkdir()
            good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                    "base_model_name_or_path": "tiny"}  # fmt: skip
            text = "{not json" if case == "merge_bad_adapter_json" else json.dumps(good)
            (adapter / "adapter_config.json").write_text(text)
        argv = ["merge", str(adapter), "--out", str(out)]
    else:
        argv = ["quantize", str(tmp_path / "data.txt"), str(out)]
    code, err = _in_process(argv, capsys)
    assert code == 2, err
    assert err.startswith("lora-core: error:") and message in err, err
    assert err.count("\n") == 1, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries


@pytest.mark.parametrize("device", ["tpu9", "cuda:7"], ids=["not-a-device", "absent-cuda-7"])
def test_a_bad_device_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    argv = ["finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(out)]
    argv += ["--device", device]
    code, err = _in_process(argv, capsys)
    assert code == 2 and err.startswith("lora-core: error: --device") and err.count("\n") == 1, err
    assert not out.exists()


def test_each_torchrun_process_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_core.cli.common import pick_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    if torch.cuda.device_count() < 2:  # no second GPU here: the choice is still cuda:1, which is refused
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(Exception, match=r"--device cuda:1: no such CUDA device"):
            pick_device(None)
    else:
        assert pick_device(None) == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--eval-every", "0", "--eval-every must be > 0"),
        ("--checkpoint-every", "-2", "--checkpoint-every must be > 0"),
        ("--warmup", "-1", "--warmup must be >= 0"),
        ("--steps", "0", "--steps must be > 0"),
        ("--sample-tokens", "-3", "--sample-tokens must be >= 0"),
    ],
)
def test_bad_numbers_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    argv = ["finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(out), flag, value]
    code, err = _in_process(argv, capsys)
    assert code == 2 and err.startswith(f"lora-core: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_gguf_files_of_the_same_name_get_their_own_cached_copy(tmp_path: Path) -> None:
    from lora_core.models.pretrained import gguf_cache_folder

    for d, payload in (("a", b"GGUF one"), ("b", b"GGUF two!")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.gguf").write_bytes(payload)
    first, second = (
        gguf_cache_folder(tmp_path / "a" / "model.gguf"),
        gguf_cache_folder(tmp_path / "b" / "model.gguf"),
    )
    assert first != second and first.name.startswith("model-")
    assert (
        gguf_cache_folder(tmp_path / "a" / ".." / "a" / "model.gguf") == first
    )  # the same file, the same copy


def snapshot_tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): "every file as it was"."""
    paths = sorted(root.rglob("*"))
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in paths}


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("lora-core: error:") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_resume_with_other_settings_names_every_one_and_changes_nothing(run: Path) -> None:
    changed = run / "changed"
    changed.mkdir()
    shutil.copy(run / "run" / "checkpoint.pt", changed / "checkpoint.pt")
    (run / "other.txt").write_text(TEXT.replace("green", "brown"))
    tiny_folder = run / "tiny-model"
    tiny_folder.mkdir()
    lc.TinyCausalLM(seed=0).save_pretrained(tiny_folder)
    before = snapshot_tree(changed)
    argv = [*FAST, "--data", str(run / "other.txt"), "--output-dir", str(changed), "--resume"]
    for flag, value in (("--seq-len", "16"), ("--quantize", "nf4"), ("--model", str(tiny_folder))):
        argv[argv.index(flag) + 1] = value
    argv += ["--alpha", "8", "--dropout", "0.1", "--r", "4", "--target-modules", "q_proj,v_proj"]
    result = cli("finetune", *argv)
    settings = ["alpha", "data", "dropout", "model", "quantize", "r", "seq_len", "target_modules"]
    assert_one_line_error(result, "different settings", *(f"{k} (checkpoint" for k in settings))
    assert snapshot_tree(changed) == before


@pytest.mark.parametrize("case", ["empty", "garbage", "pickled_object"])
def test_resume_from_a_bad_checkpoint_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    out.mkdir()
    if case == "pickled_object":
        torch.save({"an": ["arbitrary", "object"]}, out / "checkpoint.pt")
    else:
        (out / "checkpoint.pt").write_bytes(b"" if case == "empty" else b"\x80\x04garbage" * 50)
    before = snapshot_tree(out)
    args = ["--data", str(tmp_path / "data.txt"), "--output-dir", str(out), "--resume"]
    assert_one_line_error(cli("finetune", *FAST, *args), "checkpoint.pt is not")
    assert snapshot_tree(out) == before


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(out), "--resume"]
    code, err = _in_process(argv, capsys)
    assert code == 2 and "has no checkpoint.pt to resume from" in err and err.count("\n") == 1, err
    assert list(out.iterdir()) == []


def test_a_diverged_run_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text(TEXT)
    args = ["--data", str(tmp_path / "data.txt"), "--output-dir", str(tmp_path / "out"), "--lr", "1e30"]
    result = cli("finetune", *FAST, *args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]  # after the progress report of the run that diverged
    assert last.startswith("lora-core: error:") and "Traceback" not in result.stderr, result.stderr
    assert "loss became nan" in last or "weights became NaN or inf" in last, last


def test_merge_of_a_truncated_adapter_is_one_line_exit_2(run: Path) -> None:
    adapter = run / "truncated-adapter"
    shutil.copytree(run / "run" / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = cli("merge", str(adapter), "--out", str(run / "merged-truncated"))
    assert_one_line_error(result, "not a valid safetensors file")
    assert not (run / "merged-truncated").exists()


def test_a_usage_error_is_one_line_exit_2() -> None:
    result = cli("finetune", "--r", "x")
    assert_one_line_error(result, "finetune: argument --r: invalid int value: 'x'")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "kernels", "--m", "x"], "bench kernels: argument --m: invalid int value: 'x'"),
        (["bench", "layer", "--bogus"], "bench layer: unrecognized arguments: --bogus"),
        (["bench", "e2e", "--keep-freed-memory", "some"], "bench e2e: argument --keep-freed-memory: invalid"),
        (["bench", "mixed", "--size", "huge"], "bench mixed: argument --size: invalid choice: 'huge'"),
        (["bench", "static", "--arch", "75"], "bench static: argument --arch: invalid choice: 75"),
    ],
)  # fmt: skip
def test_a_benchmark_usage_error_is_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lora_core.cli import main

    with pytest.raises(SystemExit) as exited:  # argparse's own usage errors end in SystemExit(2)
        main(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == "", out
    assert err.startswith("lora-core: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "case",
    ["output_dir_is_a_file", "output_dir_under_a_file", "merge_out_under_a_file",
     "quantize_output_is_a_folder", "quantize_output_under_a_file", "bad_choice"],
)  # fmt: skip
def test_output_paths_that_cannot_be_written_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    from safetensors.torch import save_file

    monkeypatch.delenv("LORA_CORE_DEBUG", raising=False)
    (tmp_path / "data.txt").write_text(TEXT)
    (tmp_path / "a-file").write_text("mine")
    save_file({"q_proj.weight": torch.randn(8, 64)}, str(tmp_path / "in.safetensors"))
    (tmp_path / "folder").mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj"], "base_model_name_or_path": "tiny"}))  # fmt: skip
    finetune = ["finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir"]
    quantize = ["quantize", str(tmp_path / "in.safetensors")]
    under_a_file = tmp_path / "a-file" / "x"
    argv, message = {
        "output_dir_is_a_file": ([*finetune, str(tmp_path / "a-file")], "is a file; give a folder"),
        "output_dir_under_a_file": ([*finetune, str(under_a_file)], "is a file, not a folder"),
        "merge_out_under_a_file": (["merge", str(adapter), "--out", str(under_a_file)], "is a file, not a"),
        "quantize_output_is_a_folder": ([*quantize, str(tmp_path / "folder")], "is a folder; give a file"),
        "quantize_output_under_a_file": ([*quantize, str(under_a_file)], "is a file, not a folder"),
        "bad_choice": ([*finetune, str(tmp_path / "out"), "--quantize", "int3"], "argument --quantize"),
    }[case]
    before = snapshot_tree(tmp_path)
    try:
        code, err = _in_process(argv, capsys)
    except SystemExit as e:  # argparse's own exit
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and err.startswith("lora-core: error:") and message in err and err.count("\n") == 1, err
    assert snapshot_tree(tmp_path) == before


def test_a_full_disk_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import lora_core.cli.finetune

    def no_space(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.delenv("LORA_CORE_DEBUG", raising=False)
    monkeypatch.setattr(lora_core.cli.finetune, "atomic_write_text", no_space)  # metrics.json: the last write
    (tmp_path / "data.txt").write_text(TEXT)
    argv = ["finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(tmp_path / "out")]
    code, err = _in_process(argv, capsys)
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("lora-core: error: no space left on device"), err
    assert "metrics.json" in last and "Traceback" not in err


def test_without_matplotlib_no_curve_is_claimed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    argv = ["finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(out)]
    code, err = _in_process(argv, capsys)
    assert code == 0, err
    assert not (out / "loss_curve.png").exists()
    wrote = next(line for line in err.splitlines() if line.startswith("wrote"))
    assert "loss_curve.png" not in wrote.split("(")[0] and "matplotlib is not installed" in wrote, wrote


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path: Path) -> None:
    import fcntl

    (tmp_path / "data.txt").write_text(TEXT)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lora-core.lock", "a") as held:  # what a running `lora-core finetune` holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot_tree(out)
        result = cli("finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(out))
        assert_one_line_error(result, "is in use by another lora-core run")
        assert snapshot_tree(out) == before
    result = cli("finetune", *FAST, "--data", str(tmp_path / "data.txt"), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr  # released: the folder is free again
