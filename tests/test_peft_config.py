"""PEFT's spellings: ``LoraConfig(lora_alpha=...)`` aliases and ``LoraConfig.from_peft(peft.LoraConfig(...))``
with real ``peft`` configs; what lora_core does not implement is refused with the field named."""

from __future__ import annotations

import dataclasses

import peft
import pytest

import lora_core as lc


def test_peft_field_names_are_aliases() -> None:
    cfg = lc.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, init_lora_weights="gaussian", use_rslora=True)
    assert (cfg.alpha, cfg.dropout, cfg.init, cfg.use_rslora) == (16.0, 0.05, "gaussian", True)
    assert lc.LoraConfig(init_lora_weights=True).init == "default"
    assert cfg == lc.LoraConfig(r=4, alpha=16, dropout=0.05, init="gaussian", use_rslora=True)
    # the aliases are not fields: repr, equality, replace and the JSON know only our names
    assert "lora_alpha" not in repr(cfg) and "lora_alpha" not in {f.name for f in dataclasses.fields(cfg)}
    assert dataclasses.replace(cfg, r=2).alpha == 16.0
    assert lc.LoraConfig(alpha=16, lora_alpha=16).alpha == 16.0  # the same value twice is fine


@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [
        ({"alpha": 4, "lora_alpha": 16}, ValueError, "lora_alpha"),
        ({"dropout": 0.1, "lora_dropout": 0.2}, ValueError, "lora_dropout"),
        ({"lora_alpha": -1}, ValueError, "alpha"),
        ({"lora_alpha": "16"}, TypeError, "alpha"),
        ({"lora_dropout": 1.5}, ValueError, "dropout"),
        ({"init_lora_weights": "corda"}, ValueError, "init_lora_weights"),
        ({"init_lora_weights": False}, ValueError, "init_lora_weights"),
        ({"init_lora_weights": 1}, ValueError, "init_lora_weights"),
        ({"lora_alhpa": 16}, TypeError, "lora_alhpa"),
    ],
)
def test_alias_errors_name_the_argument(kwargs: dict, exc: type, field: str) -> None:
    with pytest.raises(exc, match=field):
        lc.LoraConfig(**kwargs)


def test_from_peft_converts_a_real_peft_config() -> None:
    pc = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="lora_only",
        use_rslora=True, use_dora=True, task_type="CAUSAL_LM", init_lora_weights="pissa",
        modules_to_save=["lm_head"], layers_to_transform=[0, 2], rank_pattern={"v_proj": 4},
        alpha_pattern={"v_proj": 8}, exclude_modules=["k_proj"],
    )  # fmt: skip
    cfg = lc.LoraConfig.from_peft(pc)
    assert cfg == lc.LoraConfig(
        r=16, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"], bias="lora_only", use_rslora=True,
        use_dora=True, task_type="CAUSAL_LM", init="pissa", modules_to_save=["lm_head"],
        layers_to_transform=[0, 2], rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 8},
        exclude_modules=["k_proj"],
    )  # fmt: skip
    assert type(cfg.task_type) is str  # not PEFT's TaskType enum
    # and back: PEFT reads what we write as the same config
    back = peft.LoraConfig(**{k: v for k, v in cfg.to_peft_dict().items() if k != "peft_type"})
    got = (back.r, back.lora_alpha, back.use_dora, back.target_modules)
    assert got == (16, 32, True, {"q_proj", "v_proj"})


def test_from_peft_defaults_regex_and_overrides() -> None:
    assert lc.LoraConfig.from_peft(peft.LoraConfig()) == lc.LoraConfig()
    cfg = lc.LoraConfig.from_peft(peft.LoraConfig(target_modules=r".*\.(q|v)_proj"), quantize="nf4")
    assert cfg.target_modules == r".*\.(q|v)_proj" and cfg.quantize == "nf4"
    every = lc.LoraConfig.from_peft(peft.LoraConfig(target_modules="all-linear"))
    assert every.target_modules == "all-linear"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_lora_weights": "corda"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8, "loftq_iter": 1}}, "loftq"),
        ({"init_lora_weights": False}, "init_lora_weights"),
        ({"init_lora_weights": "eva"}, "init_lora_weights"),
        ({"lora_bias": True}, "lora_bias"),
        ({"use_qalora": True}, "use_qalora"),
        ({"layer_replication": [[0, 2], [1, 3]]}, "layer_replication"),
        ({"target_parameters": ["experts.down_proj"]}, "target_parameters"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"task_type": "QUESTION_ANS"}, "task_type"),
    ],
)
def test_from_peft_refuses_what_lora_core_lacks(kwargs: dict, field: str) -> None:
    pc = peft.LoraConfig()
    for key, value in kwargs.items():  # set after construction: some need optional packages to validate
        setattr(pc, key, value)
    with pytest.raises(ValueError, match=field):
        lc.LoraConfig.from_peft(pc)


def test_from_peft_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match="peft_config"):
        lc.LoraConfig.from_peft({"r": 8})
    with pytest.raises(TypeError, match="peft_config"):
        lc.LoraConfig.from_peft(peft.IA3Config())
    with pytest.raises(TypeError, match="peft_config"):
        lc.LoraConfig.from_peft(lc.LoraConfig())
