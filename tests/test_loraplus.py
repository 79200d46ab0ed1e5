"""LoRA+ as an optimizer factory (``lc.loraplus_optimizer``): its groups and learning rates, one step equal
to a hand-built optimizer's, any optimizer class, and the errors naming the argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_core as lc


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["0", "2"], init="gaussian", bias="lora_only"))
    with torch.no_grad():  # B = 0 would make A's gradient zero: give B values so both groups move
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def _lr_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_groups_and_learning_rates() -> None:
    model = _model()
    opt = lc.loraplus_optimizer(model, lr=1e-3, ratio=16, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    lr_of = _lr_of(model, opt)
    assert set(lr_of) == {n for n, p in model.named_parameters() if p.requires_grad}  # frozen ones left out
    assert "0.weight" not in lr_of and "1.weight" not in lr_of
    for layer in ("0", "2"):
        assert lr_of[f"{layer}.lora_A.weight"] == (1e-3, 0.1)
        assert lr_of[f"{layer}.lora_B.weight"] == (pytest.approx(1.6e-2), 0.1)
        assert lr_of[f"{layer}.bias"] == (1e-3, 0.0)  # 1-D: no weight decay
    assert len(opt.param_groups) == 3


def test_one_step_equals_a_hand_built_optimizer() -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 8)
    ours, ref = _model(), _model()
    opt = lc.loraplus_optimizer(ours, lr=1e-2, ratio=4, betas=(0.8, 0.9), eps=1e-6)
    a_params = [p for n, p in ref.named_parameters() if p.requires_grad and "lora_B" not in n]
    b_params = [p for n, p in ref.named_parameters() if p.requires_grad and "lora_B" in n]
    hand = torch.optim.AdamW(
        [{"params": a_params, "lr": 1e-2}, {"params": b_params, "lr": 4e-2}],
        lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0,
    )  # fmt: skip
    for model, o in ((ours, opt), (ref, hand)):
        for _ in range(2):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    moved = _model()
    for (name, p), q in zip(ours.named_parameters(), moved.parameters()):
        assert torch.equal(p, q) != p.requires_grad, name  # every trained tensor moved, frozen ones did not


def test_any_optimizer_and_lr_groups() -> None:
    model = _model()
    opt = lc.loraplus_optimizer(model, lr=0.1, ratio=2, optimizer_cls=torch.optim.SGD, momentum=0.9,
                                lr_groups={r"^0\.": 0.5})  # fmt: skip
    assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0.9 for g in opt.param_groups)
    lr_of = _lr_of(model, opt)
    assert lr_of["0.lora_A.weight"][0] == pytest.approx(0.05)
    assert lr_of["0.lora_B.weight"][0] == pytest.approx(0.1)  # 0.1 × 0.5 × 2
    assert lr_of["2.lora_B.weight"][0] == pytest.approx(0.2)
    groups = lc.loraplus_param_groups(model, lr=0.1, ratio=1)
    assert [g["lr"] for g in groups] == [0.1]  # ratio 1: plain LoRA, one group


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"lr": 0}, ValueError, "lr"),
        ({"lr": "1e-3"}, TypeError, "lr"),
        ({"lr": 1e-3, "ratio": -1}, ValueError, "ratio"),
        ({"lr": 1e-3, "ratio": float("nan")}, ValueError, "ratio"),
        ({"lr": 1e-3, "weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"lr": 1e-3, "optimizer_cls": "adamw"}, TypeError, "optimizer_cls"),
        ({"lr": 1e-3, "optimizer_cls": nn.Linear}, TypeError, "optimizer_cls"),
        ({"lr": 1e-3, "lr_groups": [("a", 1.0)]}, TypeError, "lr_groups"),
        ({"lr": 1e-3, "lr_groups": {"(": 1.0}}, ValueError, "lr_groups"),
    ],
)
def test_errors_name_the_argument(kwargs: dict, exc: type, name: str) -> None:
    with pytest.raises(exc, match=name):
        lc.loraplus_optimizer(_model(), **kwargs)


def test_nothing_to_train_and_not_a_module() -> None:
    with pytest.raises(ValueError, match="requires_grad"):
        lc.loraplus_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)
    with pytest.raises(TypeError, match="model"):
        lc.loraplus_optimizer([nn.Parameter(torch.zeros(2))], lr=1e-3)
