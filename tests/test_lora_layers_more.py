"""LoRAEmbedding and LoRAConv (nn.Embedding, nn.Conv1d, nn.Conv2d): the linear layer's property tests against
the reference math (lora_core.lora.functional) and the formulas written out, then the real peft both ways."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close
from torch import nn

import lora_core as lc
from lora_core.lora.conv import LoRAConv
from lora_core.lora.embedding import LoRAEmbedding
from lora_core.lora.functional import (
    lora_conv_delta_weight_ref,
    lora_conv_ref,
    lora_embedding_ref,
)

DTYPES = [torch.float32, torch.float64]


# ---- random layers -----------------------------------------------------------------------------------------
@st.composite
def embedding_case(draw):
    """A random nn.Embedding (maybe with a padding_idx), rank, alpha, rsLoRA flag and a batch of ids."""
    num, dim = draw(st.integers(2, 20)), draw(st.integers(1, 12))
    r = draw(st.integers(1, min(num, dim)))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, num - 1)))
    base = nn.Embedding(num, dim, padding_idx=padding_idx, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(num, dim, generator=g, dtype=dtype))
    ids = torch.randint(0, num, (draw(st.integers(1, 3)), draw(st.integers(1, 5))), generator=g)
    return base, r, draw(st.floats(0.25, 16.0)), draw(st.booleans()), ids, g


@st.composite
def conv_case(draw):
    """A random nn.Conv1d or nn.Conv2d (kernel, stride, padding, bias drawn), rank, alpha, rsLoRA, input."""
    nd = draw(st.sampled_from([1, 2]))
    c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    r = draw(st.integers(1, min(c_in * math.prod(kernel), c_out)))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    base = cls(c_in, c_out, kernel, stride=stride, padding=padding, bias=draw(st.booleans()), dtype=dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    spatial = tuple(draw(st.integers(3, 6)) for _ in range(nd))
    x = torch.randn(draw(st.integers(1, 3)), c_in, *spatial, generator=g, dtype=dtype)
    return base, r, draw(st.floats(0.25, 16.0)), draw(st.booleans()), x, g


def _randomize(layer: LoRAEmbedding | LoRAConv, g: torch.Generator, name: str = "default") -> None:
    """Both factors (and DoRA's magnitude) random, so every term of the formulas is non-zero."""
    with torch.no_grad():
        for p in layer.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        if layer.lora_specs[name].use_dora:
            layer.magnitude(name).abs_().add_(0.5)


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r  # from the papers, not from the layer


# ---- embedding ---------------------------------------------------------------------------------------------
@given(embedding_case(), st.booleans())
def test_embedding_at_init_gives_the_base_output_exactly(case, dora):
    base, r, alpha, rslora, ids, _ = case
    expected = base(ids)
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0  # PEFT's init: A = 0, B ~ N(0, 1)
    assert torch.equal(layer(ids), expected)


@given(embedding_case())
def test_embedding_zero_b_gives_the_base_output_exactly(case):
    base, r, alpha, rslora, ids, g = case
    expected = base(ids)
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora)
    _randomize(layer, g)
    with torch.no_grad():
        layer.lora_B.default.zero_()
    assert torch.equal(layer(ids), expected)


@given(embedding_case())
def test_embedding_equals_the_merged_table(case):
    base, r, alpha, rslora, ids, g = case
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora)
    _randomize(layer, g)
    w, s = base.weight.detach(), _scale(alpha, r, rslora)
    a, b = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    assert layer.scaling == pytest.approx(s)
    assert_close(layer(ids).detach(), (w + (s * b @ a).T)[ids])  # ΔW = (s·BA)ᵀ, looked up
    assert_close(layer(ids).detach(), lora_embedding_ref(ids, w, a, b, s, padding_idx=base.padding_idx))


@given(embedding_case())
def test_embedding_dora_matches_the_direct_formula(case):
    base, r, alpha, rslora, ids, g = case
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=True)
    w = base.weight.detach()
    assert_close(layer.lora_magnitude_vector.detach(), torch.sqrt((w * w).sum(dim=0)))  # one per dim
    _randomize(layer, g, "default")
    a, b = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    m, s = layer.lora_magnitude_vector.detach(), _scale(alpha, r, rslora)
    v = w.T + s * b @ a  # (dim, num): the (out, in) frame
    direct = ((m / torch.sqrt((v * v).sum(dim=1)))[:, None] * v).T  # DoRA eq. 5, as a table (num, dim)
    assert_close(layer(ids).detach(), direct[ids])
    assert_close(layer(ids).detach(), lora_embedding_ref(ids, w, a, b, s, m, padding_idx=base.padding_idx))


@given(embedding_case(), st.booleans())
def test_embedding_merge_then_unmerge_restores_the_weight(case, dora):
    base, r, alpha, rslora, ids, g = case
    layer = LoRAEmbedding.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    _randomize(layer, g)
    w0, y = layer.weight.detach().clone(), layer(ids).detach()
    layer.merge()
    assert_close(layer(ids).detach(), y)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(layer.weight.detach(), w0)
    plain = layer.unload()
    assert type(plain) is nn.Embedding and plain.padding_idx == base.padding_idx
    assert not hasattr(plain, "bias")
    assert_close(plain(ids).detach(), y)


def test_embedding_gradients_reach_only_the_adapter(rng):
    base = nn.Embedding(9, 5, padding_idx=2)
    layer = LoRAEmbedding.from_module(base, r=3, alpha=6.0, use_dora=True)
    _randomize(layer, rng)
    ids = torch.tensor([[0, 2, 4, 2], [8, 1, 2, 3]])
    layer(ids).square().sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert a.grad is not None and b.grad is not None and layer.lora_magnitude_vector.grad is not None
    assert torch.count_nonzero(a.grad[:, 2]) == 0  # the padding row gets no gradient, as in the base lookup
    assert torch.count_nonzero(a.grad[:, 0]) > 0 and torch.count_nonzero(a.grad[:, 5]) == 0  # only seen ids


def test_embedding_dropout_is_not_applied_as_in_peft(rng):
    layer = LoRAEmbedding.from_module(nn.Embedding(6, 4), r=2, alpha=2.0, dropout=0.5).train()
    _randomize(layer, rng)
    ids = torch.arange(6)[None]
    assert torch.equal(layer(ids), layer(ids))


def test_embedding_half_precision_base_gets_float32_adapters():
    base = nn.Embedding(8, 4, dtype=torch.bfloat16)
    ids = torch.arange(8)[None]
    layer = LoRAEmbedding.from_module(base, r=2, alpha=2.0)
    assert layer.lora_embedding_B["default"].dtype == torch.float32
    y = layer(ids)
    assert y.dtype == torch.bfloat16 and torch.equal(y, base(ids))


# ---- convolution -------------------------------------------------------------------------------------------
@given(conv_case(), st.booleans())
def test_conv_zero_b_gives_the_base_output_exactly(case, dora):
    base, r, alpha, rslora, x, _ = case
    expected = base(x)
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.equal(layer(x), expected)


@given(conv_case())
def test_conv_equals_the_merged_kernel(case):
    base, r, alpha, rslora, x, g = case
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora)
    _randomize(layer, g)
    w, s = base.weight.detach(), _scale(alpha, r, rslora)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    bias = None if base.bias is None else base.bias.detach()
    # ΔW[o, i, k] = s Σ_r B[o, r] A[r, i, k], written with einsum (not the reshape the code uses)
    delta = s * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    assert_close(lora_conv_delta_weight_ref(a, b, s), delta)
    conv = F.conv1d if w.dim() == 3 else F.conv2d
    direct = conv(x, w + delta, bias, base.stride, base.padding)
    assert_close(layer(x).detach(), direct)
    assert_close(layer(x).detach(), lora_conv_ref(x, w, bias, a, b, s, base.stride, base.padding))


@given(conv_case())
def test_conv_dora_matches_the_direct_formula(case):
    base, r, alpha, rslora, x, g = case
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=True)
    w = base.weight.detach()
    m0 = layer.lora_magnitude_vector.detach()
    assert m0.shape == (1, w.shape[0], *[1] * (w.dim() - 2))  # PEFT's shape
    assert_close(m0.flatten(), torch.sqrt((w * w).flatten(1).sum(dim=1)))
    _randomize(layer, g)
    a, b, m = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.lora_magnitude_vector.detach()
    s = _scale(alpha, r, rslora)
    v = w + s * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    norm = torch.sqrt((v * v).flatten(1).sum(dim=1))  # per output channel, over (in, *k)
    direct_w = (m.flatten() / norm).view(-1, *[1] * (w.dim() - 1)) * v
    bias = None if base.bias is None else base.bias.detach()
    conv = F.conv1d if w.dim() == 3 else F.conv2d
    assert_close(layer(x).detach(), conv(x, direct_w, bias, base.stride, base.padding))
    assert_close(layer(x).detach(), lora_conv_ref(x, w, bias, a, b, s, base.stride, base.padding, m))


@given(conv_case(), st.booleans())
def test_conv_merge_then_unmerge_restores_the_weight(case, dora):
    base, r, alpha, rslora, x, g = case
    cls = type(base)
    layer = LoRAConv.from_module(base, r=r, alpha=alpha, use_rslora=rslora, use_dora=dora)
    _randomize(layer, g)
    w0, y = layer.weight.detach().clone(), layer(x).detach()
    layer.merge()
    assert_close(layer(x).detach(), y)
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight.detach(), w0)
    plain = layer.unload()
    assert type(plain) is cls and plain.weight.shape == w0.shape
    assert_close(plain(x).detach(), y)


@pytest.mark.parametrize("dora", [False, True])
def test_conv_gradients_reach_only_the_adapter_and_gradcheck(dora, rng):
    base = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1, dtype=torch.float64)
    layer = LoRAConv.from_module(base, r=2, alpha=3.0, use_dora=dora)
    _randomize(layer, rng)
    x = torch.randn(2, 2, 4, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad
    assert all(p.grad is not None for p in layer.adapter_parameters("default"))
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if not dora:
        assert torch.autograd.gradcheck(lambda x, a, b: layer(x), (x, a, b))
    else:  # DoRA's norm is detached for A and B by design; x and m see the exact function
        assert torch.autograd.gradcheck(lambda x, m: layer(x), (x, layer.lora_magnitude_vector))


@pytest.mark.parametrize("dora", [False, True])
def test_conv_dropout_applies_to_the_adapter_input_only(dora, rng):
    base = nn.Conv1d(3, 4, 3, padding=1)
    layer = LoRAConv.from_module(base, r=2, alpha=4.0, dropout=0.5, use_dora=dora).train()
    _randomize(layer, rng)
    x = torch.randn(2, 3, 7, generator=rng)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones_like(x), p=0.5, training=True)  # the same draw, as a mask
    w, bias = base.weight.detach(), base.bias.detach()
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    m = layer.lora_magnitude_vector.detach() if dora else None
    assert_close(y.detach(), lora_conv_ref(x, w, bias, a, b, layer.scaling, 1, 1, m, mask))


def test_conv_unbatched_input(rng):
    layer = LoRAConv.from_module(nn.Conv1d(2, 3, 2), r=2, alpha=2.0, use_dora=True)
    _randomize(layer, rng)
    x = torch.randn(2, 6, generator=rng)
    assert_close(layer(x).detach(), layer(x[None]).detach()[0])


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
