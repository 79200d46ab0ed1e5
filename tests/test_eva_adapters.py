"""Adapters PEFT made with EVA (``init_lora_weights="eva"``: A from the SVD of each layer's inputs, ranks
redistributed by explained variance into ``rank_pattern`` / ``alpha_pattern``) load into lora_core and
compute what PEFT computes. The EVA init itself (running it on data) is not implemented: asking for it is
a ``ValueError``."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_llama_model

import lora_core as lc

peft = pytest.importorskip("peft")
from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights  # noqa: E402


def test_a_peft_eva_adapter_loads_with_its_ranks(tmp_path: Path) -> None:
    base = tiny_llama_model()
    eva = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.9),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": (ids := torch.randint(0, 64, (4, 16), generator=g)),
         "attention_mask": torch.ones_like(ids), "labels": ids}
        for _ in range(6)
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), eva, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    ranks = theirs.peft_config["default"].rank_pattern
    assert ranks and set(ranks.values()) != {4}  # EVA moved rank between layers
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 after EVA: give it values, as training would
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)

    ours = lc.load_adapter(copy.deepcopy(base), tmp_path)
    for path, r in ranks.items():
        assert ours.get_submodule(path).lora_A.weight.shape[0] == r
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want = theirs.eval()(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_the_eva_init_itself_is_refused() -> None:
    with pytest.raises(ValueError, match="init_lora_weights='eva' is not supported"):
        lc.LoraConfig.from_peft(peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva"))
