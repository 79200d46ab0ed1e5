"""QLoRALinear: outputs and ALL gradients equal a dense LoRALinear that holds dequant(W), in every mode;
only the packed weight is saved for backward; device/dtype moves; merge/unload; state-dict keys."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close
from torch import nn

from lora_core.lora.layer import LoRALinear
from lora_core.lora.nf4_linear import nf4_linear
from lora_core.lora.qlora import NF4Linear, QLoRALinear
from lora_core.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


def make_pair(n_in: int, n_out: int, r: int, use_dora: bool, double_quant: bool = True, seed: int = 0):
    """A QLoRALinear and a dense LoRALinear whose base is exactly dequant(W), with identical adapters."""
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    q = QLoRALinear.from_linear(base, r=r, alpha=2 * r, use_dora=use_dora, double_quant=double_quant)
    dense_base = nn.Linear(n_in, n_out)
    with torch.no_grad():
        dense_base.weight.copy_(dequantize_nf4(q.weight))
        dense_base.bias.copy_(q.bias)
    d = LoRALinear.from_linear(dense_base, r=r, alpha=2 * r, use_dora=use_dora)
    with torch.no_grad():
        for p in q.lora_A.parameters():
            p.normal_()
        for p in q.lora_B.parameters():
            p.normal_()
        if use_dora:
            q.lora_magnitude_vector.uniform_(0.5, 2.0)
        d.load_state_dict({k: v for k, v in q.state_dict().items() if k.startswith("lora_")}, strict=False)
    for m in (q, d):
        m.bias.requires_grad_(True)  # cover the bias gradient too
    return q, d


def outputs_and_grads(layer: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def assert_same(q: QLoRALinear, d: LoRALinear, x: torch.Tensor) -> None:
    yq, gxq, gq = outputs_and_grads(q, x)
    yd, gxd, gd = outputs_and_grads(d, x)
    assert_close(yq, yd)
    assert_close(gxq, gxd)
    assert set(gq) == set(gd) and {"bias", "lora_A.weight", "lora_B.weight"} <= set(gq)
    for name in gq:
        assert_close(gq[name], gd[name])


@pytest.mark.parametrize("use_dora", [False, True])
def test_train_eval_and_train_after_eval_match_dense(use_dora: bool) -> None:
    q, d = make_pair(70, 33, 4, use_dora)
    x = torch.randn(2, 5, 70)
    assert_same(q, d, x)  # train mode
    q.eval(), d.eval()
    assert_same(q, d, x)  # eval mode (gradients still flow)
    with torch.no_grad():
        q(x), d(x)  # an inference pass ...
    q.train(), d.train()
    assert_same(q, d, torch.randn(2, 5, 70))  # ... must not leave stale state behind (bnb 0.50.2 does)


@given(
    n_in=st.integers(1, 80), n_out=st.integers(1, 40), r=st.integers(1, 4), batch=st.integers(1, 4),
    double_quant=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_matches_dense_on_drawn_shapes(n_in, n_out, r, batch, double_quant, seed) -> None:
    r = min(r, n_in, n_out)
    q, d = make_pair(n_in, n_out, r, use_dora=False, double_quant=double_quant, seed=seed)
    assert_same(q, d, torch.randn(batch, n_in))


def test_backward_saves_only_the_packed_weight() -> None:
    q, _ = make_pair(64, 48, 2, use_dora=False)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert saved  # the adapters save their inputs; the base must not save a dense weight
    assert not any(t.shape == (48, 64) or t.shape == (64, 48) for t in saved)


def test_nf4_linear_gradients_in_float64() -> None:
    """gradcheck of the Function itself: grad_x = grad_out · dequant(W), grad_b = Σ grad_out."""
    q = quantize_nf4(torch.randn(6, 10, dtype=torch.float64))
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: nf4_linear(x, q, b), (x, b))


def test_to_and_half_keep_nf4_dtypes() -> None:
    q, _ = make_pair(64, 32, 2, use_dora=False, double_quant=False)
    before = {k: v.dtype for k, v in q.weight.tensors().items()}
    q.half()
    assert {k: v.dtype for k, v in q.weight.tensors().items()} == before  # absmax stays float32
    assert q.lora_A.weight.dtype == torch.float16 and q.bias.dtype == torch.float16
    q.to("meta")
    assert q.weight.device.type == "meta"
    assert {k: (v.dtype, v.device.type) for k, v in q.weight.tensors().items()} == {
        k: (dt, "meta") for k, dt in before.items()
    }


def test_state_dict_uses_bitsandbytes_names_and_round_trips() -> None:
    q, _ = make_pair(40, 24, 2, use_dora=True)
    keys = set(q.state_dict())
    assert keys == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A.weight", "lora_B.weight",
        "lora_magnitude_vector",
    }  # fmt: skip
    assert q.state_dict()["weight"].dtype == torch.uint8
    other, _ = make_pair(40, 24, 2, use_dora=True, seed=9)
    other.load_state_dict(q.state_dict())
    x = torch.randn(4, 40)
    with torch.no_grad():
        assert torch.equal(other(x), q(x))
    # a dense base checkpoint loads too (quantized on the way in)
    dense = nn.Linear(40, 24)
    other.load_state_dict(dense.state_dict(), strict=False)
    assert torch.equal(dequantize_nf4(other.weight), dequantize_nf4(quantize_nf4(dense.weight.detach())))


@pytest.mark.parametrize("strict", [True, False])
def test_packed_weight_without_its_quant_state_is_reported_as_unusable_not_missing(strict: bool) -> None:
    q, _ = make_pair(40, 24, 2, use_dora=False)
    state = q.state_dict()
    del state["weight.quant_state.bitsandbytes__nf4"]  # the uint8 codes are there, the blob is not
    other, _ = make_pair(40, 24, 2, use_dora=False, seed=9)
    before = other.weight.packed.clone()
    with pytest.raises(RuntimeError) as info:
        other.load_state_dict(state, strict=strict)
    message = str(info.value)
    assert "weight: present (torch.uint8" in message
    assert "no 'weight.quant_state.bitsandbytes__nf4' entry" in message
    assert "Missing key" not in message  # it is there; it just cannot be read
    assert torch.equal(other.weight.packed, before)  # nothing half-loaded


def test_merge_warns_with_error_and_unload() -> None:
    q, d = make_pair(64, 32, 4, use_dora=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = d(x)
        dense = q.unload(dequantize=True)  # exact: no requantization
        assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
        assert_close(dense(x), expected)
        assert not q.merged and isinstance(q.weight, NF4Tensor)
        with pytest.warns(UserWarning, match="requantization error"):
            q.merge()
        err = q.requantization_error
        half_gap = (1.0 - 0.6961928009986877) / 2  # the widest NF4 gap, [-1, -0.696], halved
        assert err is not None and 0 < err <= half_gap * dense.weight.abs().max() * 1.01  # + double quant
        # the merged 4-bit layer is close to, but not exactly, the exact merge: |Δy| ≤ err · Σ|x|
        assert ((q(x) - expected).abs() <= err * x.abs().sum(-1, keepdim=True) + 1e-4).all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = q.unload(dequantize=False)
        assert isinstance(frozen, NF4Linear)
        assert torch.equal(frozen(x), q(x))


def test_unload_dequantize_of_a_merged_layer_warns_and_returns_the_requantized_merge() -> None:
    """Once merged, the NF4 base holds requantize(W + sBA) and the exact sum is gone: unload(dequantize=True)
    returns dequant of that (documented) and says so, with the error recorded at merge time."""
    q, d = make_pair(64, 32, 4, use_dora=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.merge()
    held = dequantize_nf4(q.weight)  # (out, in): what the 4-bit base holds after the merge
    with pytest.warns(UserWarning, match=r"already merged.*requantization error max \|ΔW\| = [0-9.e-]+"):
        dense = q.unload(dequantize=True)
    assert torch.equal(dense.weight.detach(), held)
    d.merge()  # the exact merge, in float32
    assert not torch.equal(dense.weight.detach(), d.weight.detach())  # so the result is not the exact one


def test_bad_input_to_nf4_linear() -> None:
    q = quantize_nf4(torch.randn(4, 8))
    with pytest.raises(ValueError, match="features"):
        nf4_linear(torch.randn(2, 7), q)
    with pytest.raises(ValueError, match="bias"):
        nf4_linear(torch.randn(2, 8), q, torch.zeros(5))
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_linear(torch.randn(2, 8), torch.randn(4, 8))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got torch\.int64"):
        nf4_linear(torch.ones(2, 8, dtype=torch.long), q)  # was: W rounded to integers, silently


def test_apply_lora_nf4_end_to_end(tmp_path) -> None:
    """apply_lora(quantize="nf4") → QLoRA layers; a training step moves only adapters; unload_lora
    (dequantize=True) gives a dense model with the same outputs."""
    import lora_core.lora.surgery as lc
    from lora_core.lora.config import LoraConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", quantize="nf4", quant_block_size=32)
    model = lc.apply_lora(model, cfg)
    assert isinstance(model[0], QLoRALinear) and isinstance(model[2], QLoRALinear)
    assert model[0].weight.block_size == 32 and model[0].weight.double_quant
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 32)
    model(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        y = model(x)
        dense = lc.unload_lora(model, dequantize=True)
        assert all(type(m) is nn.Linear for m in (dense[0], dense[2]))
        assert_close(dense(x), y)


def test_trainable_parameters_counts_the_4bit_base_like_the_dense_model() -> None:
    """A QLoRA model reports the same totals as its dense twin: NF4 bases count by the elements they stand
    for, although they are no nn.Parameter."""
    import lora_core.lora.surgery as lc
    from lora_core.lora.config import LoraConfig

    def build(quantize: str) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
        return lc.apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", quantize=quantize))

    dense, quantized = lc.trainable_parameters(build("none")), lc.trainable_parameters(build("nf4"))
    assert quantized.total == dense.total == (32 * 64 + 64) + (64 * 16 + 16) + 4 * (32 + 64) + 4 * (64 + 16)
    assert quantized.trainable == dense.trainable == 4 * (32 + 64) + 4 * (64 + 16)


@pytest.mark.parametrize("dequantize", [False, True])
@pytest.mark.parametrize("merged_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_unload_keeps_the_train_eval_mode(dequantize: bool, merged_first: bool, training: bool) -> None:
    """Both unload paths built the plain module with ``nn.Module.__init__`` (or ``NF4Linear(...)``), which
    is in training mode: an eval model came back with its unloaded layers training."""
    import lora_core as lc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, 32))
    lc.apply_lora(model, lc.LoraConfig(r=2, target_modules=["0", "2"], quantize="nf4"))
    model.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # merging into 4 bits warns
        if merged_first:
            model[0].merge()
        single = model[2].unload(dequantize=dequantize)
        assert single.training is training
        out = lc.unload_lora(model, dequantize=dequantize)
    assert [m.training for m in out.modules()] == [training] * 4
    assert isinstance(out[0], nn.Linear if dequantize else NF4Linear)


def test_unload_with_dequantize_gives_a_plain_dense_model_also_for_quantize_base_layers() -> None:
    """``quantize_base`` (the default under quantize="nf4") stores the non-target layers as frozen NF4Linear;
    ``unload_lora(dequantize=True)`` (what ``lora-core merge`` does) left them in 4 bit, so the "dense" merged
    model was not dense. Now every layer is an nn.Linear holding the weights the model computed with."""
    import lora_core as lc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    lc.apply_lora(model, lc.LoraConfig(r=4, target_modules=["0"], quantize="nf4"))
    assert isinstance(model[2], NF4Linear) and isinstance(model[4], NF4Linear)  # quantize_base
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    x = torch.randn(8, 64)
    want = model(x).detach()
    frozen_weight = dequantize_nf4(model[2].base.q, torch.float32)
    plain = lc.unload_lora(model, dequantize=True)
    assert [type(m) for m in plain if not isinstance(m, nn.ReLU)] == [nn.Linear] * 3
    assert torch.equal(plain[2].weight, frozen_weight)
    assert plain[2].weight.requires_grad  # as before apply_lora, like every unloaded parameter
    assert_close(plain(x), want, torch.float32)
