"""Several adapters in one model (issue 15), against the real ``peft`` where it has the same feature.

The same two adapters (different targets, ranks, one DoRA) are built in PEFT with random factors, saved in
PEFT's multi-adapter layout and loaded into lora_core; every switch (one adapter, the other, both,
disabled, a mixed batch) must give PEFT's outputs, and lora_core's own files must load back into PEFT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_llama_model
from torch import nn

import lora_core as lc
from lora_core.lora.surgery import lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
CFG_DEFAULT = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
CFG_FR = {"r": 2, "lora_alpha": 6, "target_modules": ["v_proj", "down_proj"], "use_dora": True}


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEFT's save_pretrained of a model with adapters "default" and "fr": default at the root, fr/."""
    model = peft.get_peft_model(tiny_llama_model(), peft.LoraConfig(**CFG_DEFAULT))
    model.add_adapter("fr", peft.LoraConfig(**CFG_FR))
    _randomize(model, 1)
    path = tmp_path_factory.mktemp("peft") / "adapters"
    model.save_pretrained(path)
    return path


def _peft_model(path: Path) -> nn.Module:
    model = peft.PeftModel.from_pretrained(tiny_llama_model(), path)
    model.load_adapter(path / "fr", adapter_name="fr")
    return model.eval()


def _ours(path: Path) -> nn.Module:
    model = lc.load_adapter(tiny_llama_model(), path)
    return lc.load_adapter(model, path / "fr", adapter_name="fr")


def test_peft_layout_loads_and_every_switch_matches_peft(peft_dir: Path) -> None:
    theirs, ours = _peft_model(peft_dir), _ours(peft_dir)
    assert (peft_dir / "fr" / "adapter_model.safetensors").is_file()
    assert lc.list_adapters(ours) == ["default", "fr"]
    assert lc.active_adapters(ours) == ["default"]  # loading one more does not switch (PEFT's rule)
    base = _logits(tiny_llama_model())
    alone = {}
    for active in ("default", "fr"):
        theirs.base_model.set_adapter(active)
        lc.set_adapter(ours, active)
        assert lc.active_adapters(ours) == [active]
        alone[active] = _logits(ours)
        torch.testing.assert_close(alone[active], _logits(theirs), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(alone[active], base, atol=1e-3)
    with theirs.disable_adapter(), lc.disable_adapter(ours):
        torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_logits(ours), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)  # restored


def test_two_active_lora_adapters_add_their_updates_like_peft(tmp_path: Path) -> None:
    """Several active adapters: PEFT's sum of updates. (With a DoRA adapter among several active ones PEFT
    rescales the other adapters' updates too, an order-dependent result; lora_core adds each adapter's own
    update, which test_several_active_fused_equals_reference checks layer by layer.)"""
    theirs = peft.get_peft_model(tiny_llama_model(), peft.LoraConfig(**CFG_DEFAULT))
    theirs.add_adapter("b", peft.LoraConfig(**{**CFG_FR, "use_dora": False, "use_rslora": True}))
    _randomize(theirs, 2)
    theirs.save_pretrained(tmp_path / "a")
    ours = lc.load_adapter(tiny_llama_model(), tmp_path / "a")
    lc.load_adapter(ours, tmp_path / "a" / "b", adapter_name="b")
    theirs.base_model.set_adapter(["default", "b"])
    lc.set_adapter(ours, ["default", "b"])
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)
    lc.set_adapter(ours, "b")
    assert not torch.allclose(_logits(ours), _logits(theirs), atol=1e-3)


def test_state_dict_keys_are_peft_in_memory_keys(peft_dir: Path) -> None:
    """Adapter "fr"'s keys are PEFT's (``lora_A.fr.weight``); "default" keeps lora_core's single-adapter
    keys (``lora_A.weight``, ``lora_magnitude_vector``)."""
    theirs, ours = _peft_model(peft_dir), _ours(peft_dir)

    def norm(key: str) -> str:  # PEFT's key without its wrappers, DoRA's magnitude as ours
        key = key.removeprefix("base_model.model.").replace(".base_layer", "")
        return key.replace("lora_magnitude_vector.fr.weight", "lora_magnitude.fr.weight")

    peft_fr = {norm(k) for k in theirs.state_dict() if ".fr." in k}
    ours_fr = {k for k in ours.state_dict() if ".fr." in k}
    assert ours_fr == peft_fr and ours_fr
    ours_default = {k for k in ours.state_dict() if "lora_" in k and ".fr." not in k}
    assert ours_default == {norm(k).replace(".default", "") for k in theirs.state_dict() if ".default." in k}
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in ours_default)
    layer = ours.model.layers[0].self_attn.v_proj
    assert layer.lora_A.weight is layer.lora_A["default"] and layer.lora_A["fr"].shape == (2, 32)


def test_save_adapter_multi_layout_loads_in_peft(peft_dir: Path, tmp_path: Path) -> None:
    ours = _ours(peft_dir)
    lc.save_adapter(ours, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "fr",
    ]  # fmt: skip
    theirs = _peft_model(tmp_path / "out")
    for active in ("default", "fr"):
        theirs.base_model.set_adapter(active)
        lc.set_adapter(ours, active)
        torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-5, rtol=1e-5)
    lc.save_adapter(ours, tmp_path / "only_fr", adapter_names=["fr"])
    assert not (tmp_path / "only_fr" / "adapter_config.json").exists()
    again = lc.load_adapter(tiny_llama_model(), tmp_path / "only_fr" / "fr", adapter_name="fr")
    torch.testing.assert_close(_logits(again), _logits(ours), atol=1e-6, rtol=1e-6)


def test_apply_lora_adds_inactive_frozen_adapter_and_set_adapter_trains_it() -> None:
    model = lc.apply_lora(tiny_llama_model(), lc.LoraConfig(r=4, target_modules=["q_proj"]))
    lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), adapter_name="b")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, lc.LoRALinear) and o_proj.active_adapters == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." not in n for n in trainable)
    lc.set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)


def test_errors_name_the_adapters_and_leave_the_model_unchanged(peft_dir: Path) -> None:
    model = _ours(peft_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="'nope'"):
        lc.set_adapter(model, ["fr", "nope"])
    assert lc.active_adapters(model) == ["default"]
    with pytest.raises(ValueError, match="'fr'"):
        lc.apply_lora(model, lc.LoraConfig(target_modules=["q_proj"]), adapter_name="fr")
    with pytest.raises(ValueError, match="'fr'"):
        lc.load_adapter(model, peft_dir / "fr", adapter_name="fr")
    with pytest.raises(ValueError, match="'default' is active"):
        lc.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="'ghost'"):
        lc.delete_adapter(model, "ghost")
    with pytest.raises(ValueError, match="'ghost'"), lc.mixed_adapters(model, ["fr", "ghost", "__base__"]):
        pass
    with pytest.raises(ValueError, match="not allowed"):
        lc.apply_lora(model, lc.LoraConfig(target_modules=["q_proj"]), adapter_name="a.b")
    assert list(model.state_dict()) == keys
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_delete_adapter_drops_its_tensors_and_empty_layers(peft_dir: Path) -> None:
    model = _ours(peft_dir)
    lc.delete_adapter(model, "fr")
    assert lc.list_adapters(model) == ["default"]
    assert not any(".fr." in k or "magnitude" in k for k in model.state_dict())
    mlp = model.model.layers[0].mlp.down_proj  # only "fr" adapted it
    assert type(mlp) is nn.Linear
    torch.testing.assert_close(_logits(model), _logits(lc.load_adapter(tiny_llama_model(), peft_dir)))
    lc.load_adapter(model, peft_dir / "fr", adapter_name="fr")
    lc.set_adapter(model, "fr")
    lc.delete_adapter(model, "default")
    assert lc.list_adapters(model) == ["fr"]
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_disable_adapter_restores_state_on_error_and_around_a_merge(peft_dir: Path) -> None:
    model = _ours(peft_dir)
    lc.set_adapter(model, ["default", "fr"])
    adapted, base = _logits(model), _logits(tiny_llama_model())
    with pytest.raises(RuntimeError), lc.disable_adapter(model):
        torch.testing.assert_close(_logits(model), base)
        raise RuntimeError("inside")
    torch.testing.assert_close(_logits(model), adapted)
    lc.merge_lora(model)
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)
    with lc.disable_adapter(model):
        torch.testing.assert_close(_logits(model), base, atol=1e-5, rtol=1e-5)
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_merge_named_adapters_one_after_the_other_then_unmerge(peft_dir: Path) -> None:
    """Merging "fr", then "default" too, gives the forward with both active (each adapter's change
    against W₀, DoRA included); unmerge gives W₀ back."""
    model = _ours(peft_dir)
    lc.set_adapter(model, ["default", "fr"])
    both = _logits(model)
    lc.set_adapter(model, "fr")
    want = _logits(model)
    with pytest.raises(ValueError, match="'nope'"):
        lc.merge_lora(model, adapter_names=["nope"])
    lc.merge_lora(model, adapter_names=["fr"])
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].self_attn.v_proj.merged_adapters == ["fr"]
    lc.merge_lora(model, adapter_names=["default"])
    assert model.model.layers[0].self_attn.v_proj.merged_adapters == ["fr", "default"]
    torch.testing.assert_close(_logits(model), both, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        lc.merge_lora(model, adapter_names=["fr", "default"])
    lc.unmerge_lora(model)
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.v_proj.weight,
        tiny_llama_model().model.layers[0].self_attn.v_proj.weight,
        atol=1e-5,
        rtol=0,
    )


def test_several_active_fused_equals_reference() -> None:
    """One active adapter may take the fused Function (fused_mode("always") runs it on CPU, float64);
    several take the reference; both give the reference's numbers."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12).double()
    layer = lc.LoRALinear.from_linear(base, r=4, alpha=8.0)
    layer.add_adapter("b", r=3, alpha=3.0, use_dora=True)
    layer.add_adapter("c", r=2, alpha=2.0)
    for name in layer.adapter_names():
        with torch.no_grad():
            layer.lora_B[name].normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    for active in (["b"], ["c"], ["default", "b", "c"]):
        layer.active_adapters = active
        with lc.fused_mode("always"):
            fused = layer(x)
        with lc.fused_mode("never"):
            ref = layer(x)
        want = base(x) + sum(_alone(layer, n, x) - base(x) for n in active)
        torch.testing.assert_close(fused, want)
        torch.testing.assert_close(ref, want)


def _alone(layer: lc.LoRALinear, name: str, x: torch.Tensor) -> torch.Tensor:
    saved = layer.active_adapters
    layer.active_adapters = [name]
    try:
        with lc.fused_mode("never"):
            return layer(x)
    finally:
        layer.active_adapters = saved


def test_single_default_adapter_keeps_its_keys_and_attributes() -> None:
    model = lc.apply_lora(tiny_llama_model(), lc.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    keys = {k for k in model.state_dict() if "lora_" in k}
    assert keys == {
        f"model.layers.{i}.self_attn.q_proj.{leaf}"
        for i in (0, 1) for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }  # fmt: skip
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.shape == (4, 32) and layer.r == 4 and layer.use_dora
    assert isinstance(layer.lora_magnitude_vector, nn.Parameter)


# ---- mixed batches: one adapter per row -------------------------------------------------------------------
ROWS = ["fr", "__base__", "default"]


def _rows_alone(model: nn.Module, names: list[str], ids: torch.Tensor = IDS) -> torch.Tensor:
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with lc.disable_adapter(model):
                out.append(_logits(model, ids[i : i + 1]))
        else:
            lc.set_adapter(model, name)
            out.append(_logits(model, ids[i : i + 1]))
    return torch.cat(out)


def test_mixed_batch_equals_each_row_with_its_adapter_alone(peft_dir: Path) -> None:
    model = _ours(peft_dir)
    with lc.mixed_adapters(model, ROWS):
        mixed = _logits(model)
    assert all(layer.row_adapters is None for _, layer in lora_layers(model))  # restored
    torch.testing.assert_close(mixed, _rows_alone(model, ROWS), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one name per row"), lc.mixed_adapters(model, ["fr", "default"]):
        _logits(model)
    lc.merge_lora(model)
    with pytest.raises(ValueError, match="merged"), lc.mixed_adapters(model, ROWS):
        pass


def test_mixed_batch_equals_peft_adapter_names(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny_llama_model(), peft.LoraConfig(**CFG_DEFAULT))
    theirs.add_adapter("b", peft.LoraConfig(**{**CFG_FR, "use_dora": False}))
    _randomize(theirs, 4)
    theirs.eval().save_pretrained(tmp_path / "a")
    ours = lc.load_adapter(tiny_llama_model(), tmp_path / "a")
    lc.load_adapter(ours, tmp_path / "a" / "b", adapter_name="b")
    rows = ["b", "default", "__base__"]
    with torch.no_grad():
        want = theirs(IDS, adapter_names=rows).logits
    with lc.mixed_adapters(ours, rows):
        torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=1e-5)


def test_mixed_batch_backward_trains_each_adapter_on_its_rows() -> None:
    """Gradients of a mixed batch = the sum of each adapter's gradients on its own rows (float64, DoRA
    too). PEFT refuses ``adapter_names`` in training mode; lora_core trains several adapters at once."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    model = lc.apply_lora(net, lc.LoraConfig(r=3, target_modules=["0", "2"], dropout=0.0))
    lc.apply_lora(model, lc.LoraConfig(r=2, alpha=4.0, target_modules=["2"], use_dora=True), adapter_name="b")
    for _, layer in lora_layers(model):
        for name in layer.adapter_names():
            with torch.no_grad():
                layer.lora_B[name].normal_()
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    rows = ["b", "default", "b", "__base__", "default"]
    with lc.mixed_adapters(model, rows):
        model(x).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for name in ("default", "b"):
        idx = [i for i, n in enumerate(rows) if n == name]
        for _, layer in lora_layers(model):
            layer.active_adapters = [name] if name in layer.lora_specs else []
        model(x[idx]).square().sum().backward()
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(mixed) == set(alone) and any(".b." in n for n in mixed)
    assert any("lora_A.weight" in n for n in mixed)
    for n in mixed:
        torch.testing.assert_close(mixed[n], alone[n])


def test_mixed_batch_on_an_nf4_base() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=["0", "2"], quantize="nf4", init="gaussian"))
    lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["0"], init="gaussian"), adapter_name="b")
    for _, layer in lora_layers(model):
        assert isinstance(layer, lc.QLoRALinear)
        for name in layer.adapter_names():
            with torch.no_grad():
                layer.lora_B[name].normal_()
    x = torch.randn(3, 64)
    rows = ["b", "default", "__base__"]
    with torch.no_grad(), lc.mixed_adapters(model, rows):
        mixed = model(x)
    with torch.no_grad():
        want = []
        for i, name in enumerate(rows):
            if name == "__base__":
                with lc.disable_adapter(model):
                    want.append(model(x[i : i + 1]))
            else:
                lc.set_adapter(model, name)
                want.append(model(x[i : i + 1]))
    torch.testing.assert_close(mixed, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_a_first_adapter_with_another_name_saves_in_its_subfolder(tmp_path: Path) -> None:
    """As PEFT's ``get_peft_model(..., adapter_name="x")``: keys ``lora_A.x.weight``, files in ``path/x``."""
    cfg = lc.LoraConfig(r=2, target_modules=["q_proj"], init="gaussian")
    model = lc.apply_lora(tiny_llama_model(), cfg, adapter_name="x")
    assert lc.list_adapters(model) == ["x"] and lc.active_adapters(model) == ["x"]
    assert "model.layers.0.self_attn.q_proj.lora_A.x.weight" in model.state_dict()
    _randomize(model, 5)
    lc.save_adapter(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x"]
    folder = tmp_path / "out" / "x"
    theirs = peft.PeftModel.from_pretrained(tiny_llama_model(), folder, adapter_name="x").eval()
    torch.testing.assert_close(_logits(model), _logits(theirs), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not allowed"):
        lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="forward")


def test_unload_merges_every_active_adapter(peft_dir: Path) -> None:
    model = _ours(peft_dir)
    lc.set_adapter(model, ["default", "fr"])
    want = _logits(model)
    plain = lc.unload_lora(model)
    assert not any(isinstance(m, lc.LoRALinear) for m in plain.modules())
    assert lc.list_adapters(plain) == []
    torch.testing.assert_close(_logits(plain), want, atol=1e-5, rtol=1e-5)


def test_same_seed_same_init_as_peft_for_every_adapter() -> None:
    """The factors draw the same random numbers as PEFT's nn.Linear-based layers (and as lora_core did
    before named adapters): seeded runs stay reproducible across the change."""
    torch.manual_seed(0)
    ours = lc.apply_lora(nn.Sequential(nn.Linear(16, 12)), lc.LoraConfig(r=4, target_modules=["0"]))
    lc.apply_lora(ours, lc.LoraConfig(r=2, target_modules=["0"]), adapter_name="b")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(16, 12)), peft.LoraConfig(r=4, target_modules=["0"]))
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["0"]))
    layer, p_layer = ours[0], theirs.base_model.model[0]
    for name in ("default", "b"):
        assert torch.equal(layer.lora_A[name], p_layer.lora_A[name].weight)
        assert torch.equal(layer.lora_B[name], p_layer.lora_B[name].weight)
