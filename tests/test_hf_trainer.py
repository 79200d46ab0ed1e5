"""``LoraTrainer``: the real ``transformers.Trainer`` on a lora_core model (a tiny Llama, 2 steps) writes
adapter-only checkpoints in PEFT's layout, which PEFT and ``lc.load_adapter`` read, and resumes from them
to the same weights as an uninterrupted run."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import lora_core as lc

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from lora_core.training.hf_trainer import LoraTrainer, load_adapter_weights  # noqa: E402

CFG = lc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init="gaussian")


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(8)]


def trainer_for(model: torch.nn.Module, out: Path, max_steps: int = 2) -> LoraTrainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        save_strategy="steps", save_steps=1, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    return LoraTrainer(model=model, args=args, train_dataset=data())


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_checkpoints_are_adapters_that_peft_reads(base: torch.nn.Module, tmp_path: Path) -> None:
    model = lc.apply_lora(copy.deepcopy(base), CFG)
    before = lora_tensors(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(model, tmp_path / "run").train()
    after = lora_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    for step in (1, 2):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}  # adapter only
    ckpt = tmp_path / "run" / "checkpoint-2"
    ids = torch.randint(0, 64, (2, 10))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), ckpt).eval()
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)
        ours = lc.load_adapter(copy.deepcopy(base), ckpt)
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=0)


def test_save_model_writes_the_adapter(base: torch.nn.Module, tmp_path: Path) -> None:
    model = lc.apply_lora(copy.deepcopy(base), CFG)
    trainer = trainer_for(model, tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"}


def test_resume_reaches_the_uninterrupted_weights(base: torch.nn.Module, tmp_path: Path) -> None:
    full = lc.apply_lora(copy.deepcopy(base), CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(full, tmp_path / "full").train()
        torch.manual_seed(123)  # a different adapter init: the resume must overwrite it
        resumed = lc.apply_lora(copy.deepcopy(base), CFG)
        first = str(tmp_path / "full" / "checkpoint-1")
        trainer_for(resumed, tmp_path / "full").train(resume_from_checkpoint=first)
    want, got = lora_tensors(full), lora_tensors(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


def test_load_adapter_weights_errors(base: torch.nn.Module, tmp_path: Path) -> None:
    model = lc.apply_lora(copy.deepcopy(base), CFG)
    with pytest.raises(ValueError, match="holds no adapter"):
        load_adapter_weights(model, tmp_path)
    other = lc.apply_lora(copy.deepcopy(base), lc.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lc.save_adapter(other, tmp_path / "r2")
    with pytest.raises(ValueError, match="shape"):
        load_adapter_weights(model, tmp_path / "r2")
    with pytest.raises(ValueError, match="no LoRA layers"):
        load_adapter_weights(copy.deepcopy(base), tmp_path / "r2")
    with pytest.raises(TypeError, match="model"):
        load_adapter_weights("model", tmp_path / "r2")


def test_a_bitsandbytes_4bit_model_trains(base: torch.nn.Module, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    base.save_pretrained(tmp_path / "base")
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=bnb_cfg, device_map="cpu"
        )
        assert model.is_quantized  # transformers' plain Trainer would refuse it ("purely quantized")
        lc.apply_lora(model, lc.LoraConfig.from_peft(peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                                      quantize="nf4"))  # fmt: skip
        before = lora_tensors(model)
        trainer_for(model, tmp_path / "run").train()
    assert "_hf_peft_config_loaded" not in model.__dict__  # the flag was for the constructor's check only
    after = lora_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    names = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names


def vit_examples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 3)} for i in range(8)
    ]


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_gradient_checkpointing_trains_as_without(base: torch.nn.Module, tmp_path: Path, kind: str) -> None:
    """``gradient_checkpointing=True`` (reentrant) with the whole base frozen: the same losses and weights
    as without. For the ViT (``pixel_values``) transformers adds no embedding hook: apply_lora's does it."""
    from test_hf_checkpointing import tiny_vit

    model0, examples = (copy.deepcopy(base), data()) if kind == "llama" else (tiny_vit(), vit_examples())
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = lc.apply_lora(copy.deepcopy(model0), CFG)  # gaussian A, B = 0: A learns from step 2 on
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)), max_steps=3, per_device_train_batch_size=2,
            learning_rate=1e-2, save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, seed=0,
            data_seed=0, disable_tqdm=True, gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )  # fmt: skip
        before = lora_tensors(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = LoraTrainer(model=model, args=args, train_dataset=examples)
            trainer.train()
        assert model.is_gradient_checkpointing is checkpointing
        after = lora_tensors(model)
        assert all(not torch.equal(before[k], after[k]) for k in before), kind  # every LoRA tensor moved
        runs[checkpointing] = ([log["loss"] for log in trainer.state.log_history if "loss" in log], after)
    (losses, want), (losses_ckpt, got) = runs[False], runs[True]
    assert losses_ckpt == pytest.approx(losses, rel=1e-5)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
