"""OLoRA and PiSSA with a randomized SVD (``init="olora"`` / ``"pissa_niter_<N>"``, PEFT's
``init_lora_weights`` values): equal to PEFT's on the same model, outputs unchanged at step 0, the math
they promise, and PEFT adapters made with them load."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import lora_core as lc


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 20))


@pytest.mark.parametrize("init", ["olora", "pissa_niter_4"])
def test_equal_to_peft(init: str) -> None:
    base = tiny()
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=init)
    torch.manual_seed(7)  # the randomized SVD draws from the global RNG: the same draws in both
    theirs = peft.get_peft_model(copy.deepcopy(base), pc)
    torch.manual_seed(7)
    ours = lc.apply_lora(copy.deepcopy(base), lc.LoraConfig.from_peft(pc))
    assert lc.get_lora_config(ours).init == init
    for name in ("0", "2"):
        layer, ref = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        for mine, peft_w in ((layer.lora_A.weight, ref.lora_A["default"].weight),
                             (layer.lora_B.weight, ref.lora_B["default"].weight),
                             (layer.weight, ref.base_layer.weight)):  # fmt: skip
            torch.testing.assert_close(mine, peft_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_2", "pissa_niter_16"])
def test_outputs_unchanged_at_init(init: str) -> None:
    base = tiny().double()
    x = torch.randn(5, 24, dtype=torch.float64)
    cfg = lc.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], init=init)
    model = lc.apply_lora(copy.deepcopy(base), cfg)
    torch.testing.assert_close(model(x), base(x), rtol=1e-10, atol=1e-10)  # W − s·BA + s·BA
    layer = model.get_submodule("0")
    assert layer.lora_B.weight.abs().sum() > 0 and layer.lora_A.weight.abs().sum() > 0


def test_the_math() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 24, dtype=torch.float64)
    a, b = lc.lora.inits.olora_factors(w, 4)  # B orthonormal columns, BA = W's projection onto them
    torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(b @ a, b @ b.T @ w)
    # enough subspace iterations: the randomized SVD finds the exact top-r approximation (what "pissa" gives)
    w = torch.randn(32, 4, dtype=torch.float64) @ torch.randn(4, 24, dtype=torch.float64)  # rank 4
    a, b = lc.lora.inits.pissa_niter_factors(w, 4, scaling=2.0, niter=4)
    torch.testing.assert_close(2.0 * b @ a, w)


def test_peft_adapters_made_with_them_load(tmp_path: Path) -> None:
    base = tiny()
    x = torch.randn(3, 24)
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="olora")
    theirs = peft.get_peft_model(copy.deepcopy(base), pc)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))  # "trained"
    theirs.save_pretrained(tmp_path / "olora")
    assert (tmp_path / "olora" / "adapter_config.json").read_text().count('"olora"') == 1
    ours = lc.load_adapter(copy.deepcopy(base), tmp_path / "olora")  # re-runs OLoRA on the base, as PEFT
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    lc.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_qlora_olora_requantizes_the_residual() -> None:
    model = lc.apply_lora(tiny(), lc.LoraConfig(r=4, target_modules=["0"], quantize="nf4", init="olora"))
    err = model.get_submodule("0").requantization_error
    assert err is not None and 0 < err < 0.1


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "loftq_iter_0x", "corda", "OLoRA", 3])
def test_bad_init_names_the_argument(init: object) -> None:
    with pytest.raises(ValueError, match="init"):
        lc.LoraConfig(init=init)
    with pytest.raises(ValueError, match="init"):
        lc.LoRALinear.from_linear(nn.Linear(4, 3), r=1, alpha=1.0, init=init)


def _nf4_error(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(lc.dequantize_nf4(lc.quantize_nf4(w, 64, False), w.dtype) - w))


@pytest.mark.parametrize("iters", [1, 5])
def test_loftq_fits_nf4_and_the_adapter_together(iters: int) -> None:
    torch.manual_seed(4)
    dense = nn.Linear(128, 64)
    w = dense.weight.detach().clone()
    init = "loftq" if iters == 1 else f"loftq_iter_{iters}"
    q = lc.QLoRALinear.from_linear(copy.deepcopy(dense), r=8, alpha=16, init=init, double_quant=False)
    a, _, q_ref = lc.lora.inits.loftq_factors(w, 8, 2.0, iters, 64, False)
    assert torch.equal(q.base.q.packed, q_ref.packed) and torch.equal(q.lora_A.weight, a)
    approx = lc.dequantize_nf4(q.base.q, torch.float32) + q.scaling * q.lora_B.weight @ q.lora_A.weight
    err = float(torch.linalg.matrix_norm(approx.detach() - w))
    # NF4(W) + s·BA is closer to W than NF4(W) alone (QLoRA's start); a random W has a flat spectrum, so
    # rank 8 of 64 takes only part of the quantization error away
    assert err < 0.9 * _nf4_error(w)
    if iters == 1:  # Alg. 1, one step: Q = NF4(W), s·BA = the best rank-r approximation of W − dequant(Q)
        qw = lc.quantize_nf4(w, 64, False)
        assert torch.equal(q.base.q.packed, qw.packed)
        res = w - lc.dequantize_nf4(qw, torch.float32)
        u, s, vh = torch.linalg.svd(res)
        torch.testing.assert_close(q.scaling * q.lora_B.weight @ q.lora_A.weight,
                                   u[:, :8] @ torch.diag(s[:8]) @ vh[:8], rtol=1e-4, atol=1e-5)  # fmt: skip


def test_loftq_more_iterations_fit_better_and_dense_bases_take_dequant_q() -> None:
    torch.manual_seed(5)
    dense = nn.Linear(128, 64)
    w = dense.weight.detach().clone()
    errs = []
    for iters in (1, 5):
        a, b, q = lc.lora.inits.loftq_factors(w, 8, 2.0, iters)
        errs.append(float(torch.linalg.matrix_norm(lc.dequantize_nf4(q, torch.float32) + 2.0 * b @ a - w)))
    assert errs[1] < errs[0]
    layer = lc.LoRALinear.from_linear(copy.deepcopy(dense), r=8, alpha=16, init="loftq_iter_5")
    torch.testing.assert_close(layer.weight, lc.dequantize_nf4(q, torch.float32), rtol=0, atol=0)


def test_loftq_in_a_config_and_peft_round_trip() -> None:
    cfg = lc.LoraConfig(r=4, target_modules=["0"], init="loftq_iter_3", quantize="nf4")
    data = cfg.to_peft_dict()
    assert data["init_lora_weights"] == "loftq" and data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    assert lc.LoraConfig.from_peft_dict(data, quantize="nf4") == cfg
    pc = peft.LoraConfig(r=4, target_modules=["0"])
    # set after construction: PEFT's LoraConfig needs scipy to validate a LoftQ config
    pc.init_lora_weights, pc.loftq_config = "loftq", {"loftq_bits": 4, "loftq_iter": 2}
    assert lc.LoraConfig.from_peft(pc).init == "loftq_iter_2"
    model = lc.apply_lora(tiny(), lc.LoraConfig(r=4, target_modules=["0", "2"], init="loftq", quantize="nf4"))
    assert model.get_submodule("0").lora_B.weight.abs().sum() > 0
