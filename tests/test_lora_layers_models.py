"""LoRAEmbedding and LoRAConv in models: apply_lora per layer type, several adapters, adapter files against
the real peft both ways, and bad targets refused (the layers' property tests: test_lora_layers_more.py)."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close
from torch import nn

import lora_core as lc
from lora_core.lora.conv import LoRAConv
from lora_core.lora.embedding import LoRAEmbedding


# ---- in a model: apply_lora, several adapters, files -------------------------------------------------------
class Net(nn.Module):
    """ids → Embedding → Conv1d → Conv2d → Linear: one of each layer type."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.c1 = nn.Conv1d(6, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 4, (3, 2), stride=(2, 1))
        self.lin = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.emb(ids).transpose(1, 2))  # (N, 5, T)
        h = self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 3))  # (N, 4, T', 2)
        return self.lin(h.flatten(2).transpose(1, 2))  # (N, T'·2, 3)


TARGETS = ["emb", "c1", "c2", "lin"]
IDS = torch.tensor([[1, 4, 0, 7, 10, 3, 3], [2, 0, 9, 5, 6, 8, 1]])


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_apply_lora_adapts_each_layer_type_and_all_linear_does_not():
    model = lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=4.0, target_modules=TARGETS))
    kinds = [type(m) for m in (model.emb, model.c1, model.c2, model.lin)]
    assert kinds == [LoRAEmbedding, LoRAConv, LoRAConv, lc.LoRALinear]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "emb.lora_embedding_A.default", "emb.lora_embedding_B.default", "c1.lora_A.weight",
        "c1.lora_B.weight", "c2.lora_A.weight", "c2.lora_B.weight", "lin.lora_A.weight", "lin.lora_B.weight",
    }  # fmt: skip
    model(IDS).square().sum().backward()  # gradients reach the adapters only
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    only_linear = lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=4.0, target_modules="all-linear"))
    assert isinstance(only_linear.emb, nn.Embedding) and isinstance(only_linear.c2, nn.Conv2d)


def test_second_adapter_merge_and_files(tmp_path):
    model = lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=4.0, target_modules=TARGETS))
    _perturb(model, 1)
    lc.apply_lora(
        model, lc.LoraConfig(r=3, alpha=3.0, target_modules=["emb", "c2"], use_dora=True), adapter_name="fr"
    )
    _perturb(model, 2)
    assert "emb.lora_embedding_A.fr" in dict(model.named_parameters())  # PEFT's in-memory keys
    assert "c2.lora_A.fr.weight" in dict(model.named_parameters())
    lc.set_adapter(model, ["default", "fr"])
    both = model(IDS).detach()
    with lc.disable_adapter(model):
        plain_out = model(IDS).detach()
    assert not torch.allclose(both, plain_out)
    lc.merge_lora(model)
    assert_close(model(IDS).detach(), both)
    lc.unmerge_lora(model)
    with pytest.raises(ValueError, match="linear layers only"):
        lc.add_weighted_adapter(model, ["default"], [1.0], "both")
    lc.save_adapter(model, tmp_path)
    again = lc.load_adapter(_net(), tmp_path)
    lc.load_adapter(again, tmp_path / "fr", adapter_name="fr")
    lc.set_adapter(again, ["default", "fr"])
    assert_close(again(IDS).detach(), both)


def test_mixed_batches_and_loraplus_groups():
    model = lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=4.0, target_modules=TARGETS, use_dora=True))
    _perturb(model, 6)
    adapted = model(IDS).detach()
    with lc.disable_adapter(model):
        plain = model(IDS).detach()
    with lc.mixed_adapters(model, ["default", "__base__"]):  # row 0 adapted, row 1 the base alone
        mixed = model(IDS).detach()
    assert_close(mixed[0], adapted[0])
    assert_close(mixed[1], plain[1])
    groups = lc.loraplus_param_groups(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_name["emb.lora_embedding_B.default"][0] == pytest.approx(16e-3)  # LoRA+: B's lr × 16
    assert by_name["c2.lora_B.weight"][0] == pytest.approx(16e-3)
    assert by_name["c2.lora_magnitude_vector"] == (pytest.approx(1e-3), 0.0)  # (1, out, 1, 1): no decay
    assert by_name["c2.lora_A.weight"] == (pytest.approx(1e-3), 0.1)


# ---- the real peft, both ways ------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_lora_core(dora, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=dora, lora_dropout=0.1)
    theirs = peft.get_peft_model(_net(), cfg)
    _perturb(theirs, 3)
    theirs.eval()
    want = theirs(IDS).detach()
    theirs.save_pretrained(tmp_path)
    ours = lc.load_adapter(_net(), tmp_path)
    assert_close(ours(IDS).detach(), want)
    merged = theirs.merge_and_unload()
    plain = lc.unload_lora(ours)
    for name, p in merged.named_parameters():  # the same merge math: the same weights
        assert_close(dict(plain.named_parameters())[name].detach(), p.detach())


@pytest.mark.parametrize("dora", [False, True])
def test_lora_core_adapter_loads_in_peft(dora, tmp_path):
    peft = pytest.importorskip("peft")
    ours = lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=3.0, target_modules=TARGETS, use_dora=dora))
    _perturb(ours, 4)
    want = ours(IDS).detach()
    lc.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "ours")).eval()
    assert_close(theirs(IDS).detach(), want)
    # and the files are alike: the same keys and shapes as PEFT writes for the same config
    from safetensors.torch import load_file

    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=dora)
    peft.get_peft_model(_net(), cfg).save_pretrained(tmp_path / "theirs")
    shapes = [
        {k: tuple(v.shape) for k, v in load_file(tmp_path / d / "adapter_model.safetensors").items()}
        for d in ("ours", "theirs")
    ]
    assert shapes[0] == shapes[1]
    assert "base_model.model.emb.lora_embedding_A" in shapes[0]


def test_peft_second_adapter_keys_equal_ours():
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    theirs.add_adapter("fr", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["emb", "c1"]))
    peft_keys = {k.removeprefix("base_model.model.") for k in theirs.state_dict() if ".fr" in k}
    ours = lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=2.0, target_modules=TARGETS))
    lc.apply_lora(ours, lc.LoraConfig(r=2, alpha=2.0, target_modules=["emb", "c1"]), adapter_name="fr")
    assert {k for k in ours.state_dict() if ".fr" in k} == peft_keys
    emb_default = {k.removeprefix("base_model.model.") for k in theirs.state_dict() if "emb.lora_" in k}
    assert {"emb.lora_embedding_A.default", "emb.lora_embedding_B.default"} <= emb_default


def test_a_second_adapter_file_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ours = lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=2.0, target_modules=TARGETS))
    lc.apply_lora(ours, lc.LoraConfig(r=3, alpha=6.0, target_modules=["emb", "c1"]), adapter_name="fr")
    _perturb(ours, 7)
    lc.set_adapter(ours, "fr")
    want = ours(IDS).detach()
    lc.save_adapter(ours, tmp_path)  # "fr" in tmp_path / "fr", PEFT's layout
    theirs = peft.PeftModel.from_pretrained(_net(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "fr"), adapter_name="fr")
    theirs.set_adapter("fr")
    assert_close(theirs.eval()(IDS).detach(), want)


# ---- bad input ---------------------------------------------------------------------------------------------
class _Scaled(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


@pytest.mark.parametrize(
    ("module", "extra", "error", "match"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), {}, ValueError, "groups=2"),
        (nn.Conv1d(2, 3, 3, dilation=2), {}, ValueError, "dilation"),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), {}, ValueError, "padding_mode"),
        (_Scaled(5, 3), {}, ValueError, "own forward"),
        (nn.Embedding(5, 3, sparse=True), {}, ValueError, "sparse=True"),
        (nn.Embedding(5, 3), {"quantize": "nf4"}, ValueError, "nf4.*'layer'.*Embedding"),
        (nn.Conv1d(2, 3, 3), {"quantize": "nf4"}, ValueError, "nf4.*'layer'.*Conv1d"),
        (nn.Embedding(5, 3), {"init": "pissa"}, ValueError, "init='pissa'.*'layer'"),
        (nn.Conv2d(2, 3, 1), {"r": 3}, ValueError, "r=3 is larger"),
        (nn.ConvTranspose1d(2, 3, 3), {}, TypeError, "ConvTranspose1d.*nn.Embedding"),
    ],
)
def test_bad_targets_are_refused_and_the_model_is_unchanged(module, extra, error, match):
    model = nn.Sequential()
    model.add_module("layer", module)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lc.LoraConfig(**{"r": 2, "alpha": 2.0, "target_modules": ["layer"], **extra})
    with pytest.raises(error, match=match):
        lc.apply_lora(model, cfg)
    assert model.layer is module and set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_direct_construction():
    with pytest.raises(TypeError, match=r"nn\.Conv1d or nn\.Conv2d"):
        LoRAConv.from_module(nn.Linear(3, 3), r=1, alpha=1.0)
    with pytest.raises(TypeError, match=r"nn\.Embedding"):
        LoRAEmbedding.from_module(nn.Conv1d(3, 3, 1), r=1, alpha=1.0)
    with pytest.raises(ValueError, match="groups"):
        LoRAConv.from_module(nn.Conv1d(4, 4, 1, groups=4), r=1, alpha=1.0)
    with pytest.raises(ValueError, match="r must be"):
        LoRAEmbedding.from_module(nn.Embedding(5, 3), r=4, alpha=1.0)
    with pytest.raises(ValueError, match="init='olora'"):
        LoRAEmbedding.from_module(nn.Embedding(5, 3), r=1, alpha=1.0, init="olora")
    with pytest.raises(ValueError, match="init='pissa'"):
        LoRAConv.from_module(nn.Conv1d(3, 3, 1), r=1, alpha=1.0, init="pissa")
    layer = LoRAConv.from_module(nn.Conv2d(2, 3, 2), r=1, alpha=1.0)
    with pytest.raises(ValueError, match="shape"):
        layer.base.set_dense_weight(torch.zeros(3, 2))


def test_peft_embed_tokens_adapter_with_its_saved_embedding_loads(tmp_path):
    """PEFT saves a targeted ``embed_tokens``' own weight too (``save_embedding_layers``): it is loaded."""
    peft = pytest.importorskip("peft")
    from tiny_llama import tiny_llama_model

    theirs = peft.get_peft_model(
        tiny_llama_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"])
    )
    _perturb(theirs, 5)
    with torch.no_grad():  # as after resizing / training the embedding: the saved base weight differs
        theirs.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        tmp_path / "adapter_model.safetensors"
    )
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    ours = lc.load_adapter(tiny_llama_model(), tmp_path)
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    assert_close(ours(ids).logits.detach(), theirs(ids).logits.detach())


def test_adapter_for_another_kernel_or_vocabulary_is_refused(tmp_path):
    lc.save_adapter(lc.apply_lora(_net(), lc.LoraConfig(r=2, alpha=2.0, target_modules=TARGETS)), tmp_path)
    other = _net()
    other.c2 = nn.Conv2d(5, 4, (3, 3), stride=(2, 1))  # another kernel size
    with pytest.raises(ValueError, match=r"c2\.lora_A\.weight' has shape \(2, 5, 3, 2\).*\(2, 5, 3, 3\)"):
        lc.load_adapter(other, tmp_path)
    assert type(other.emb) is nn.Embedding  # unchanged
    other = _net()
    other.emb = nn.Embedding(12, 6)  # another vocabulary size
    with pytest.raises(ValueError, match=r"emb\.lora_embedding_A' has shape \(2, 11\)"):
        lc.load_adapter(other, tmp_path)
