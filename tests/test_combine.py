"""``lc.add_weighted_adapter`` (issue 15): PEFT's numbers for the deterministic combinations (the same two
adapters built in the real peft, combined in both, compared factor by factor and as ΔW), the defining
properties of the random (DARE) ones, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_llama_model
from torch import nn

import lora_core as lc
from lora_core.lora.combine import majority_sign_mask, merge_tensors, prune
from lora_core.lora.surgery import lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(path: Path, r_b: int, targets_b: list[str] = TARGETS) -> tuple[nn.Module, nn.Module]:
    """PEFT's model with adapters "a" (r=4) and "b" (r=r_b), random factors; ours loaded from its files."""
    cfg_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    theirs = peft.get_peft_model(tiny_llama_model(), cfg_a, "a")
    theirs.add_adapter("b", peft.LoraConfig(r=r_b, lora_alpha=3, target_modules=targets_b))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(path)
    ours = lc.load_adapter(tiny_llama_model(), path / "a", adapter_name="a")
    lc.load_adapter(ours, path / "b", adapter_name="b")
    return theirs.eval(), ours


def _peft_layers(theirs: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
            out[name.removeprefix("base_model.model.")] = module
    return out


@pytest.mark.parametrize(
    ("kind", "r_b"),
    [
        ("linear", 4), ("ties", 4), ("magnitude_prune", 4), ("cat", 2), ("svd", 2), ("ties_svd", 4),
        ("magnitude_prune_svd", 2),
    ],
)  # fmt: skip
def test_deterministic_combinations_equal_peft(kind: str, r_b: int, tmp_path: Path) -> None:
    theirs, ours = _pair(tmp_path / "ad", r_b)
    kwargs = {"density": 0.5} if kind not in ("linear", "cat", "svd") else {}
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=kind, **kwargs)
    lc.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "mix", combination_type=kind, **kwargs)
    assert lc.list_adapters(ours) == ["a", "b", "mix"] and lc.active_adapters(ours) == ["a"]
    peft_layers = _peft_layers(theirs)
    compared = 0
    for path, layer in lora_layers(ours):
        p_layer = peft_layers[path]
        torch.testing.assert_close(layer.delta_weight("mix"), p_layer.get_delta_weight("mix"))
        if kind in ("linear", "ties", "magnitude_prune", "cat"):  # SVD factors are unique up to sign only
            torch.testing.assert_close(layer.lora_A["mix"], p_layer.lora_A["mix"].weight)
            torch.testing.assert_close(layer.lora_B["mix"], p_layer.lora_B["mix"].weight)
        compared += 1
    assert compared == 6
    theirs.set_adapter("mix")
    lc.set_adapter(ours, "mix")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=1e-5)


def test_cat_is_exactly_the_weighted_sum_of_updates(tmp_path: Path) -> None:
    _, ours = _pair(tmp_path / "ad", 2)
    lc.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    for _, layer in lora_layers(ours):
        want = 0.7 * layer.delta_weight("a") - 0.4 * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("mix"), want)


def test_dare_keeps_density_and_rescales() -> None:
    t = torch.randn(400, 500, generator=torch.Generator().manual_seed(0)) + 3.0  # no zeros
    kept = prune(t, 0.3, "random", torch.Generator().manual_seed(1))
    nonzero = kept != 0
    assert abs(nonzero.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(kept[nonzero], t[nonzero] / 0.3)
    again = prune(t, 0.3, "random", torch.Generator().manual_seed(1))
    assert torch.equal(kept, again)
    assert not torch.equal(kept, prune(t, 0.3, "random", torch.Generator().manual_seed(2)))
    # dare_linear is unbiased: averaged over draws it approaches the weighted sum
    tensors, w = [t[:50, :50], -t[50:100, :50]], torch.tensor([0.5, 2.0])
    g = torch.Generator().manual_seed(4)
    mean = sum(merge_tensors("dare_linear", tensors, w, 0.5, generator=g) for _ in range(400)) / 400
    want = 0.5 * tensors[0] + 2.0 * tensors[1]
    assert (mean - want).abs().mean() < 0.1 * want.abs().mean()  # one draw alone is off by ~100%


def test_ties_elects_the_sign_and_averages_the_agreeing_entries() -> None:
    t = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 1.0, 4.0], [-0.5, 1.0, -1.0]])  # three task tensors
    total = majority_sign_mask(t, "total")  # sums: -1.5, -1, 5 -> signs -, -, +
    assert total.tolist() == [[False, True, True], [True, False, True], [True, False, False]]
    freq = majority_sign_mask(t, "frequency")  # sign votes: -1, +1, +1
    assert freq.tolist() == [[False, False, True], [True, True, True], [True, True, False]]
    merged = merge_tensors("ties", list(t), torch.ones(3), density=1.0)  # no pruning: sign election only
    torch.testing.assert_close(merged, torch.tensor([(-2.0 - 0.5) / 2, -3.0, (2.0 + 4.0) / 2]))
    torch.testing.assert_close(prune(torch.tensor([0.1, -5.0, 2.0, 0.3]), 0.5, "magnitude"),
                               torch.tensor([0.0, -5.0, 2.0, 0.0]))  # fmt: skip


def test_dare_types_with_a_seed_are_repeatable_and_change_the_model(tmp_path: Path) -> None:
    _, ours = _pair(tmp_path / "ad", 4)
    for kind in ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"):
        lc.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], f"{kind}1", kind, density=0.5, seed=7)
        lc.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], f"{kind}2", kind, density=0.5, seed=7)
        for _, layer in lora_layers(ours):
            d1, d2 = layer.delta_weight(f"{kind}1"), layer.delta_weight(f"{kind}2")
            torch.testing.assert_close(d1, d2)
            assert d1.abs().sum() > 0


def test_errors_name_the_adapters_and_change_nothing(tmp_path: Path) -> None:
    _, ours = _pair(tmp_path / "ad", 2, targets_b=["q_proj"])
    keys = list(ours.state_dict())
    with pytest.raises(ValueError, match="'zz'"):
        lc.add_weighted_adapter(ours, ["a", "zz"], [1.0, 1.0], "mix", "cat")
    with pytest.raises(ValueError, match="'a'"):
        lc.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "a", "cat")
    with pytest.raises(ValueError, match=r"one rank; \['a', 'b'\]"):
        lc.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", "linear")
    with pytest.raises(ValueError, match="density"):
        lc.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", "ties_svd")
    with pytest.raises(ValueError, match=r"but 1 weights"):
        lc.add_weighted_adapter(ours, ["a", "b"], [1.0], "mix", "cat")
    assert list(ours.state_dict()) == keys and lc.list_adapters(ours) == ["a", "b"]
    # different targets: svd/cat combine them (PEFT too); linear refuses
    lc.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", "svd")
    assert "mix" in lc.list_adapters(ours)


def test_linear_refuses_adapters_on_different_layers(tmp_path: Path) -> None:
    _, ours = _pair(tmp_path / "ad", 4, targets_b=["q_proj"])
    with pytest.raises(ValueError, match=r"same layers; \['a', 'b'\]"):
        lc.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", "linear")
    cfg = lc.LoraConfig(r=2, target_modules=["0"], use_dora=True)
    model = lc.apply_lora(nn.Sequential(nn.Linear(8, 8)), cfg)
    lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["0"]), adapter_name="b")
    with pytest.raises(ValueError, match=r"\['default'\] use DoRA"):
        lc.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "mix", "linear")
