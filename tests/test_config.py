"""LoraConfig: validation names the field; the PEFT JSON round trip; PEFT's own config files are read."""

from __future__ import annotations

import json

import pytest

from lora_core import LoraConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"bias": "some"}, "bias"),
        ({"init": "loftq_iter_"}, "init"),
        ({"init": "pissa_niter_"}, "init"),
        ({"task_type": "CLS"}, "task_type"),
        ({"quantize": "int8"}, "quantize"),
        ({"quant_block_size": 48}, "quant_block_size"),
        ({"quant_block_size": 8192}, "quant_block_size"),
        ({"target_modules": "(unclosed"}, "target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": -2}}, "alpha_pattern"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"target_modules": r".*\.q", "layers_to_transform": [1]}, "layers_to_transform"),
        ({"target_modules": r".*\.q", "layers_pattern": "h"}, "layers_pattern"),
        ({"target_modules": ["q"], "layers_pattern": "h"}, "layers_pattern needs layers_to_transform"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"r": 2.0}, "r"), ({"use_dora": "yes"}, "use_dora"), ({"target_modules": [1, 2]}, "target_modules")],
)
def test_bad_types_raise_type_error(kwargs, field):
    with pytest.raises(TypeError, match=field):
        LoraConfig(**kwargs)


def test_normalisation_and_helpers():
    cfg = LoraConfig(r=4, alpha=16, target_modules=("q", "v"), layers_to_transform=2, task_type="SEQ_CLS")
    assert cfg.target_modules == ["q", "v"] and cfg.layers_to_transform == [2]
    assert cfg.scale(4, 16.0) == 4.0 and LoraConfig(use_rslora=True).scale(4, 16.0) == 8.0
    assert cfg.effective_modules_to_save() == ["classifier", "score"]
    pat = LoraConfig(r=2, rank_pattern={r"layers\.1\.q": 8}, alpha_pattern={"v": 3})
    assert pat.rank_and_alpha("model.layers.1.q") == (8, 8.0)
    assert pat.rank_and_alpha("model.layers.11.q") == (2, 8.0)  # the pattern must match a dotted suffix
    assert pat.rank_and_alpha("model.layers.0.v") == (2, 3.0)


def test_peft_dict_round_trip():
    cfg = LoraConfig(
        r=4, alpha=8, dropout=0.1, target_modules=["q_proj"], exclude_modules="x", bias="lora_only",
        use_rslora=True, use_dora=True, init="pissa", modules_to_save=["score"], task_type="CAUSAL_LM",
        layers_to_transform=[0, 2], layers_pattern="layers", rank_pattern={"q": 2}, alpha_pattern={"q": 4.0},
    )  # fmt: skip
    data = json.loads(json.dumps(cfg.to_peft_dict()))
    assert data["peft_type"] == "LORA" and data["lora_alpha"] == 8 and data["init_lora_weights"] == "pissa"
    assert LoraConfig.from_peft_dict(data) == cfg
    assert LoraConfig.from_peft_dict(data, quantize="nf4").quantize == "nf4"


def test_reads_the_config_peft_writes(tmp_path):
    peft = pytest.importorskip("peft")
    pc = peft.LoraConfig(
        r=4, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True,
        init_lora_weights="gaussian", task_type="CAUSAL_LM", rank_pattern={"v_proj": 2},
    )  # fmt: skip
    pc.save_pretrained(str(tmp_path))
    cfg = LoraConfig.from_peft_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.init, cfg.use_rslora) == (4, 32.0, 0.05, "gaussian", True)
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"] and cfg.rank_pattern == {"v_proj": 2}
    # and PEFT reads ours
    back = peft.LoraConfig(**{k: v for k, v in cfg.to_peft_dict().items() if k != "peft_type"})
    assert (back.r, back.lora_alpha, back.init_lora_weights) == (4, 32.0, "gaussian")


@pytest.mark.parametrize(
    "extra",
    [{"peft_type": "IA3"}, {"lora_bias": True}, {"use_qalora": True}, {"init_lora_weights": "corda"},
     {"some_future_field": 3}],
)  # fmt: skip
def test_unsupported_peft_features_are_refused(extra):
    data = {**LoraConfig(target_modules=["q"]).to_peft_dict(), **extra}
    with pytest.raises(ValueError, match=next(iter(extra))):
        LoraConfig.from_peft_dict(data)


@pytest.mark.parametrize("ltt", [-1, [-1], [0, -2], (3, -1)])
def test_negative_layer_indices_are_refused_as_int_or_list(ltt):
    """``-1`` was accepted (and matched no layer) while ``[-1]`` was refused."""
    with pytest.raises(ValueError, match="layers_to_transform must be a non-negative int or a list of them"):
        LoraConfig(target_modules=["q"], layers_to_transform=ltt)


@pytest.mark.parametrize("targets", [[], ()])
def test_empty_target_modules_says_so(targets):
    """An empty list used to fail only in apply_lora, blaming exclude_modules / layers_to_transform."""
    with pytest.raises(ValueError, match=r"target_modules is an empty list.*'all-linear', or None"):
        LoraConfig(target_modules=targets)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"r": NAN}, TypeError, "r must be an int"),
        ({"r": True}, TypeError, "r must be an int"),
        ({"r": "8"}, TypeError, "r must be an int"),
        ({"alpha": NAN}, ValueError, "alpha must be a finite number > 0, got nan"),
        ({"alpha": INF}, ValueError, "alpha must be a finite number > 0, got inf"),
        ({"alpha": -INF}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": True}, TypeError, "alpha must be a positive number, got True"),
        ({"alpha": "16"}, TypeError, "alpha must be a positive number"),
        ({"dropout": NAN}, ValueError, r"dropout must be in \[0, 1\), got nan"),
        ({"dropout": INF}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": True}, TypeError, "dropout must be a float"),
        ({"dropout": "0.1"}, TypeError, "dropout must be a float"),
        ({"quant_block_size": True}, ValueError, "quant_block_size"),
        ({"quant_block_size": 64.0}, ValueError, "quant_block_size"),
        ({"quant_block_size": "64"}, ValueError, "quant_block_size"),
        ({"layers_to_transform": True}, ValueError, "layers_to_transform"),
        ({"layers_to_transform": 1.0}, ValueError, "layers_to_transform"),
        ({"layers_to_transform": "1"}, ValueError, "layers_to_transform"),
        ({"rank_pattern": {"q": NAN}}, TypeError, r"rank_pattern\['q'\] must be an int"),
        ({"rank_pattern": {"q": True}}, TypeError, r"rank_pattern\['q'\] must be an int"),
        ({"alpha_pattern": {"q": NAN}}, ValueError, r"alpha_pattern\['q'\] must be a finite number"),
        ({"alpha_pattern": {"q": INF}}, ValueError, r"alpha_pattern\['q'\] must be a finite number"),
        ({"alpha_pattern": {"q": "2"}}, TypeError, r"alpha_pattern\['q'\] must be a positive number"),
        ({"rank_pattern": {5: 2}}, TypeError, "rank_pattern keys must be regex strings, got 5"),
        ({"alpha_pattern": {None: 2.0}}, TypeError, "alpha_pattern keys must be regex strings"),
        ({"double_quant": 1}, TypeError, "double_quant must be a bool"),
        ({"use_rslora": "false"}, TypeError, "use_rslora must be a bool"),
        ({"base_model_name_or_path": 5}, TypeError, "base_model_name_or_path must be a string or None"),
        ({"base_model_name_or_path": True}, TypeError, "base_model_name_or_path must be a string or None"),
    ],
)
def test_numeric_and_flag_fields_refuse_nan_inf_strings_and_bools(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoraConfig(target_modules=["q"], **kwargs)


def test_an_nf4_base_is_recorded_and_read_back_but_the_caller_decides():
    cfg = LoraConfig(r=4, target_modules=["q"], quantize="nf4", quant_block_size=128, double_quant=False)
    data = json.loads(json.dumps(cfg.to_peft_dict()))
    record = {"quantize": "nf4", "quant_block_size": 128, "double_quant": False}
    assert data["lora_core_quantization"] == record
    assert LoraConfig.from_peft_dict(data) == cfg  # what the adapter was trained on
    assert LoraConfig.from_peft_dict(data, quantize="none").quantize == "none"  # load_adapter's choice wins
    assert "lora_core_quantization" not in LoraConfig(target_modules=["q"]).to_peft_dict()  # dense: none
    with pytest.raises(ValueError, match="is not a quantization record"):
        LoraConfig.from_peft_dict({**data, "lora_core_quantization": {"bits": 3}})
