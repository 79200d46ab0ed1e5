"""save_adapter / load_adapter: PEFT's directory layout, safetensors only, and loads that fail cleanly."""

from __future__ import annotations

import copy
import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora_core as lc
from lora_core.lora import adapters
from lora_core.lora.surgery import lora_layers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict(
            {"q_proj": nn.Linear(6, 6), "v_proj": nn.Linear(6, 4), "out": nn.Linear(4, 3)}
        )
        self.classifier = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body["q_proj"](x))
        return self.classifier(self.body["out"](self.body["v_proj"](h)))


@pytest.fixture
def base() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def _adapted(base: nn.Module, **kwargs) -> nn.Module:
    model = lc.apply_lora(
        copy.deepcopy(base), lc.LoraConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"], **kwargs)
    )
    torch.manual_seed(2)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.3)
        if layer.use_dora:
            with torch.no_grad():
                layer.lora_magnitude_vector.mul_(1.5)
    if model.classifier.weight.requires_grad:
        nn.init.normal_(model.classifier.weight)
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_dora": True, "use_rslora": True},
        {"task_type": "SEQ_CLS", "bias": "lora_only"},
        {"init": "pissa"},
    ],
)
def test_save_then_load_reproduces_the_model(base, tmp_path, kwargs):
    model = _adapted(base, **kwargs)
    y = model(X)
    out = lc.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny/net")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny/net"
    assert config["r"] == 2 and config["lora_alpha"] == 3
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.body.q_proj.lora_A.weight"].shape == (2, 6)
    assert tensors["base_model.model.body.v_proj.lora_B.weight"].shape == (4, 2)
    assert all(k.startswith("base_model.model.") for k in tensors)
    if kwargs.get("use_dora"):
        assert tensors["base_model.model.body.v_proj.lora_magnitude_vector"].shape == (4,)
    if kwargs.get("task_type"):
        assert (
            "base_model.model.classifier.weight" in tensors
            and "base_model.model.body.q_proj.base_layer.bias" in tensors
        )
    loaded = lc.load_adapter(copy.deepcopy(base), out)
    assert torch.equal(loaded(X), y)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    trainable = lc.load_adapter(copy.deepcopy(base), out, is_trainable=True)
    assert lc.trainable_parameters(trainable).trainable == lc.trainable_parameters(model).trainable


def test_save_works_on_a_merged_model_and_overwrites(base, tmp_path):
    model = _adapted(base, use_dora=True)
    y = model(X)
    lc.merge_lora(model)
    lc.save_adapter(model, tmp_path)
    lc.save_adapter(model, tmp_path)  # overwriting is fine; no temporary files stay behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(lc.load_adapter(copy.deepcopy(base), tmp_path)(X), y)


def _corrupt(tmp_path, base, edit):
    lc.save_adapter(_adapted(base), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))


P = "base_model.model.body."


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t, c: t.update({P + "v_proj.lora_B.weight": torch.zeros(5, 2)}),
            "v_proj.lora_B.weight.*shape",
        ),
        (lambda t, c: t.pop(P + "v_proj.lora_A.weight"), "no tensor 'body.v_proj.lora_A.weight'"),
        (lambda t, c: t.update({P + "out.lora_A.weight": torch.zeros(2, 4)}), "out.lora_A.weight"),
        (lambda t, c: c.update(target_modules=["q_proj", "k_proj"]), "k_proj"),
        (lambda t, c: c.update(r=4), "q_proj.lora_A.weight.*shape"),
        (lambda t, c: c.update(lora_alpha=-1), "alpha"),
        (lambda t, c: c.update(use_dora=True), "lora_magnitude_vector"),
        (lambda t, c: c.update(modules_to_save=["classifier"]), "classifier.weight"),
    ],
)
def test_a_load_that_does_not_fit_leaves_the_model_as_it_was(base, tmp_path, edit, message):
    _corrupt(tmp_path, base, edit)
    target = copy.deepcopy(base)
    before = _state(target)
    grads = [p.requires_grad for p in target.parameters()]
    with pytest.raises(ValueError, match=message):
        lc.load_adapter(target, tmp_path)
    after = _state(target)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in target.parameters()] == grads and not list(lora_layers(target))


def test_missing_files_and_pickles(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lc.load_adapter(base, tmp_path / "nope")
    lc.save_adapter(_adapted(base), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({}, tmp_path / "adapter_model.bin")  # a pickle is never read
    with pytest.raises(FileNotFoundError, match="safetensors"):
        lc.load_adapter(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    save_file({}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="JSON"):
        lc.load_adapter(base, tmp_path)


def test_load_into_a_model_that_has_lora_already(base, tmp_path):
    model = _adapted(base)
    lc.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="already has LoRA"):
        lc.load_adapter(model, tmp_path)


def test_save_without_lora_is_an_error(base, tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        lc.save_adapter(base, tmp_path)


# ---- saving is atomic per adapter: the previous adapter survives any failure, byte for byte -------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("cfg_kwargs", "save_kwargs", "error", "message"),
    [
        ({}, {"base_model_name_or_path": 42}, TypeError, "base_model_name_or_path must be a str"),
        ({}, {"base_model_name_or_path": b"tiny"}, TypeError, "base_model_name_or_path must be a str"),
        ({"base_model_name_or_path": object()}, {}, TypeError, "base_model_name_or_path must be a str"),
    ],
)
def test_a_config_that_cannot_be_written_leaves_the_old_adapter(
    base, tmp_path, cfg_kwargs, save_kwargs, error, message
):
    out = tmp_path / "adapter"
    lc.save_adapter(_adapted(base), out)
    (out / "README.md").write_text("model card")
    before = _snapshot(out)
    with pytest.raises(error, match=message):
        lc.save_adapter(_adapted(base, use_dora=True, **cfg_kwargs), out, **save_kwargs)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind
    lc.load_adapter(copy.deepcopy(base), out)


def test_a_path_is_recorded_as_a_string(base, tmp_path):
    out = lc.save_adapter(_adapted(base), tmp_path / "a", base_model_name_or_path=tmp_path / "base")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_the_weights_leaves_nothing_half_written(base, tmp_path, monkeypatch):
    # The seam: the module's own reference to safetensors' save_file, the call that writes the big file.
    monkeypatch.setattr(adapters, "save_file", _disk_full)
    with pytest.raises(OSError, match="No space"):
        lc.save_adapter(_adapted(base), tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary
    monkeypatch.undo()
    out = lc.save_adapter(_adapted(base), tmp_path / "adapter")
    before = _snapshot(out)
    monkeypatch.setattr(adapters, "save_file", _disk_full)
    with pytest.raises(OSError, match="No space"):
        lc.save_adapter(_adapted(base, use_dora=True), out)
    assert _snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_saving_over_an_adapter_keeps_the_other_files_in_its_folder(base, tmp_path):
    out = lc.save_adapter(_adapted(base), tmp_path / "adapter")
    (out / "README.md").write_text("model card")
    (out / "other").mkdir()  # e.g. PEFT's subfolder for a second adapter
    (out / "other" / "adapter_config.json").write_text("{}")
    model = _adapted(base, use_dora=True)
    lc.save_adapter(model, out)
    names = ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert (out / "README.md").read_text() == "model card"
    assert (out / "other" / "adapter_config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    torch.testing.assert_close(lc.load_adapter(copy.deepcopy(base), out)(X), model(X))


def test_save_argument_types(base, tmp_path):
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        lc.save_adapter(None, tmp_path)
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike"):
        lc.save_adapter(_adapted(base), None)
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ValueError, match=r"path .* is not a directory"):
        lc.save_adapter(_adapted(base), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


# ---- bad input to load_adapter: a clear error and the model unchanged ------------------------------------
def _fingerprint(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]], list[bool]]:
    return (
        _state(model),
        [(n, type(m)) for n, m in model.named_modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _assert_unchanged(model: nn.Module, before) -> None:
    state, types, grads = _fingerprint(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert types == before[1] and grads == before[2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_tensor_is_refused_by_name(base, tmp_path, bad):
    def edit(t, c):
        t[P + "v_proj.lora_B.weight"][1, 0] = bad

    _corrupt(tmp_path, base, edit)
    target = copy.deepcopy(base)
    before = _fingerprint(target)
    with pytest.raises(ValueError, match=r"'body\.v_proj\.lora_B\.weight'.*(nan|inf)"):
        lc.load_adapter(target, tmp_path)
    _assert_unchanged(target, before)


def test_unreadable_files_are_value_errors_naming_the_file(base, tmp_path):
    lc.save_adapter(_adapted(base), tmp_path)
    target = copy.deepcopy(base)
    before = _fingerprint(target)
    config = tmp_path / "adapter_config.json"
    good = config.read_bytes()
    config.write_bytes(good.replace(b'"LORA"', b'"LOR\xff"'))  # not UTF-8
    with pytest.raises(ValueError, match=r"adapter_config\.json.*UTF-8"):
        lc.load_adapter(target, tmp_path)
    config.write_bytes(good)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*not a valid safetensors"):
        lc.load_adapter(target, tmp_path)
    _assert_unchanged(target, before)


def test_load_argument_types(base, tmp_path):
    lc.save_adapter(_adapted(base), tmp_path)
    target = copy.deepcopy(base)
    before = _fingerprint(target)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got NoneType"):
        lc.load_adapter(target, None)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got NoneType"):
        lc.load_adapter(None, tmp_path)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_in_peft_keys_and_in_the_old_lora_core_keys(base, tmp_path, bias):
    model = _adapted(base, bias=bias)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and p.requires_grad:
                p.normal_()
    y = model(X)
    lc.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    biases = sorted(k.removeprefix("base_model.model.") for k in tensors if k.endswith("bias"))
    adapted = ["body.q_proj.base_layer.bias", "body.v_proj.base_layer.bias"]
    assert biases == (adapted if bias == "lora_only" else ["body.out.bias", *adapted, "classifier.bias"])
    # lora_core wrote `<path>.bias` for an adapted layer before: such adapters still load
    old = {k.replace(".base_layer.bias", ".bias"): v for k, v in tensors.items()}
    save_file(old, tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(lc.load_adapter(copy.deepcopy(base), tmp_path)(X), y)
    # both names for one bias, with different values: ambiguous, refused
    both = {**tensors, P + "q_proj.bias": tensors[P + "q_proj.base_layer.bias"] + 1}
    save_file(both, tmp_path / "adapter_model.safetensors")
    target = copy.deepcopy(base)
    before = _fingerprint(target)
    with pytest.raises(ValueError, match=r"q_proj\.bias.*different values"):
        lc.load_adapter(target, tmp_path)
    _assert_unchanged(target, before)
