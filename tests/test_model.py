"""Model surgery on plain torch models: targets, freezing, merge/unmerge/unload; failures change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import assert_close
from torch import nn

import lora_core as lc
from lora_core.lora.registry import lora_layers
from lora_core.lora.targets import find_targets


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.tanh(self.q_proj(x)) * self.v_proj(x) + self.k_proj(x))


class Tiny(nn.Module):
    """embed → 3 blocks → lm_head; a classifier on the side."""

    def __init__(self, d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(3))
        self.lm_head = nn.Linear(d, vocab)
        self.classifier = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return torch.cat([self.lm_head(h), self.classifier(h)], dim=-1)


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def _randomize(model: nn.Module) -> None:
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.2)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_freezes_the_base_and_keeps_outputs(model):
    y0 = model(IDS)
    keys0 = set(model.state_dict())
    out = lc.apply_lora(model, lc.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert out is model
    assert [p for p, _ in lora_layers(model)] == [
        f"layers.{i}.{n}" for i in range(3) for n in ("q_proj", "v_proj")
    ]
    with lc.fused_mode("never"):
        assert torch.equal(model(IDS), y0)  # the reference adds exactly 0 (B = 0)
    assert_close(model(IDS), y0)  # the CPU training path: oneDNN's GEMMs, within float32 tolerance
    # base keys unchanged; the adapter adds its own
    assert keys0 <= set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"layers.{i}.{n}.lora_{ab}.weight" for i in range(3) for n in ("q_proj", "v_proj") for ab in "AB"
    }
    report = lc.trainable_parameters(model)
    expected = 6 * (2 * 8 + 8 * 2)  # six layers, A (2×8) and B (8×2)
    assert report.trainable == expected
    assert report.total == sum(p.numel() for p in Tiny().parameters()) + expected
    assert report.percent == pytest.approx(100 * expected / report.total)
    assert f"{expected:,}" in str(report) and "trainable%" in str(report)


def test_layers_keep_the_mode_of_the_model(model):
    lc.apply_lora(model, lc.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], dropout=0.5))
    _randomize(model)
    assert not any(m.training for m in model.modules())  # eval model: no adapter dropout
    assert torch.equal(model(IDS), model(IDS))
    model.train()
    assert not torch.equal(model(IDS), model(IDS))  # dropout on the adapter input, as configured


def test_target_forms(model):
    assert find_targets(model, lc.LoraConfig(target_modules=r"layers\.[02]\.k_proj")) == [
        "layers.0.k_proj", "layers.2.k_proj",
    ]  # fmt: skip
    all_linear = find_targets(model, lc.LoraConfig(r=1, target_modules="all-linear"))
    assert "lm_head" not in all_linear and "classifier" in all_linear and len(all_linear) == 10
    cfg = lc.LoraConfig(r=1, target_modules="all-linear", exclude_modules=["k_proj"], layers_to_transform=[1])
    assert find_targets(model, cfg) == ["layers.1.q_proj", "layers.1.v_proj"]  # classifier has no layer index
    seq = lc.LoraConfig(r=1, target_modules="all-linear", task_type="SEQ_CLS")
    assert "classifier" not in find_targets(model, seq)  # trained fully instead


def test_rank_and_alpha_patterns(model):
    cfg = lc.LoraConfig(
        r=2, alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.1\.q_proj": 4},
        alpha_pattern={"v_proj": 1.0}, use_rslora=True,
    )  # fmt: skip
    lc.apply_lora(model, cfg)
    layers = dict(lora_layers(model))
    assert layers["layers.1.q_proj"].r == 4 and layers["layers.0.q_proj"].r == 2
    assert layers["layers.1.q_proj"].scaling == pytest.approx(4 / 2)  # alpha / sqrt(r)
    assert layers["layers.2.v_proj"].scaling == pytest.approx(1 / 2**0.5)


@pytest.mark.parametrize(("bias", "n_bias"), [("none", 0), ("lora_only", 3), ("all", 3 * 3 + 2)])
def test_bias_modes(model, bias, n_bias):
    lc.apply_lora(model, lc.LoraConfig(r=1, target_modules=["q_proj", "k_proj"], bias=bias))
    trained = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert (
        len(trained) == n_bias
    )  # lora_only: q_proj has a bias, k_proj not; all: q, v, norm per block + 2 heads


def test_modules_to_save_and_task_type(model):
    lc.apply_lora(model, lc.LoraConfig(r=1, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert model.classifier.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert lc.get_lora_config(model).modules_to_save == ["classifier"]


def test_merge_unmerge_unload(model):
    lc.apply_lora(model, lc.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    _randomize(model)
    y = model(IDS).detach()
    lc.merge_lora(model)
    assert_close(model(IDS).detach(), y)
    with pytest.raises(ValueError, match="already merged"):
        lc.merge_lora(model)
    lc.unmerge_lora(model)
    with pytest.raises(ValueError, match="not merged"):
        lc.unmerge_lora(model)
    assert_close(model(IDS).detach(), y)
    plain = lc.unload_lora(model)
    assert plain is model and not list(lora_layers(model))
    assert set(plain.state_dict()) == set(Tiny().state_dict())
    assert all(p.requires_grad for p in plain.parameters())  # as before apply_lora
    assert type(plain.layers[0].q_proj) is nn.Linear
    assert not any(m.training for m in plain.modules())  # the model was in eval mode; it stays there
    assert_close(plain(IDS).detach(), y)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lc.merge_lora(plain)


def test_a_model_that_is_one_linear():
    lin = nn.Linear(6, 4)
    layer = lc.apply_lora(lin, lc.LoraConfig(r=2, target_modules=".*"))
    assert isinstance(layer, lc.LoRALinear)
    assert isinstance(lc.unload_lora(layer), nn.Linear)


def test_errors_name_the_field_and_change_nothing(model):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"q_prj.*q_proj"):
        lc.apply_lora(model, lc.LoraConfig(target_modules=["q_proj", "q_prj"]))
    with pytest.raises(ValueError, match="r=9 is larger than min"):
        lc.apply_lora(model, lc.LoraConfig(r=9, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"layers\.0\.norm.*LayerNorm"):  # no LoRA for this layer type
        lc.apply_lora(model, lc.LoraConfig(r=1, target_modules=["q_proj", "layers.0.norm"]))
    with pytest.raises(ValueError, match=r"modules_to_save.*head"):
        lc.apply_lora(model, lc.LoraConfig(r=1, target_modules=["q_proj"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="target_modules is required"):
        lc.apply_lora(model, lc.LoraConfig())
    with pytest.raises(TypeError, match="LoraConfig"):
        lc.apply_lora(model, {"r": 8})
    assert not list(lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    after = _snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lc.apply_lora(model, lc.LoraConfig(r=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        lc.apply_lora(model, lc.LoraConfig(r=1, target_modules=["v_proj"]))


def test_training_moves_only_the_adapter(model):
    base = copy.deepcopy(model)
    lc.apply_lora(model, lc.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"], dropout=0.1))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(IDS).pow(2).mean().backward()
        opt.step()
    base_sd, sd = base.state_dict(), model.state_dict()
    assert all(torch.equal(base_sd[k], sd[k]) for k in base_sd)  # base untouched
    assert any(torch.count_nonzero(layer.lora_B.weight) for _, layer in lora_layers(model))


def _lora_model(quantize: str = "none") -> Tiny:
    torch.manual_seed(0)
    m = Tiny().eval()
    lc.apply_lora(m, lc.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], quantize=quantize))
    _randomize(m)
    return m


def test_merge_and_unmerge_fix_a_partly_merged_model():
    """One layer merged by hand: merge_lora said 'already merged' and unmerge_lora 'not merged', so neither
    could bring the model to a consistent state. Now each acts on the layers that need it."""
    full = _lora_model()
    y_unmerged = full(IDS).detach()
    lc.merge_lora(full)
    y_merged = full(IDS).detach()

    m = _lora_model()
    m.layers[1].v_proj.merge()
    lc.merge_lora(m)
    assert all(layer.merged for _, layer in lora_layers(m))
    assert torch.equal(m(IDS).detach(), y_merged)  # the same float ops, layer by layer
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), full.state_dict().values()))

    m = _lora_model()
    m.layers[0].q_proj.merge()
    lc.unmerge_lora(m)
    assert not any(layer.merged for _, layer in lora_layers(m))
    assert_close(m(IDS).detach(), y_unmerged)

    m = _lora_model()  # more merged than not: unmerge_lora still does the rest
    for path, layer in lora_layers(m):
        if path != "layers.2.q_proj":
            layer.merge()
    lc.unmerge_lora(m)
    assert not any(layer.merged for _, layer in lora_layers(m))
    assert_close(m(IDS).detach(), y_unmerged)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_apply_lora_to_a_missing_device_is_a_value_error_and_changes_nothing(model, device):
    """torch raised AssertionError ('Torch not compiled with CUDA enabled') from the first ``.to``, after
    ``apply_lora`` had already frozen every parameter."""
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"device=.*cuda.* is not available in this process"):
        lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["q_proj"]), device=device)
    assert not list(lora_layers(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("device", "error", "message"),
    [
        ("gpu", ValueError, "device='gpu' is not available"),
        ([0], TypeError, r"device must be a torch\.device, a name such as 'cpu'"),
        (1.5, TypeError, "device must be a torch.device"),
    ],
)
def test_apply_lora_bad_device_names_the_argument(model, device, error, message):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["q_proj"]), device=device)
    assert not list(lora_layers(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
