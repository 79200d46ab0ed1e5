"""GGUF export, in-process: every dtype read back by transformers' GGUF loader, the metadata llama.cpp reads,
llama.cpp's q/k permutation, and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import assert_close

import lora_core as lc
from lora_core.inference.gguf import check_exportable, permute_qk, write_gguf

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from tiny_llama import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("llama") / "m", tie=request.param)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def rounded(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A copy whose matrices went through the same rounding as the file's (vectors stay f32)."""
    import copy

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]  # fmt: skip
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                a = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)))
    return out


def read_back(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def logits(model: torch.nn.Module, tok: object) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok.encode("To be, or not to be: 10 green bottles")])).logits


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_reads_back_the_same_logits(llama: tuple, dtype: str, tmp_path: Path) -> None:
    model, tok = llama
    path = write_gguf(model, tok, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    back = read_back(path)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    # Exactly the weights written: the file's rounding applied to the model gives the same logits ...
    reference = model if dtype == "f32" else rounded(model, dtype)
    assert_close(logits(back, tok), logits(reference, tok))
    # ... and within the dtype's own tolerance of the unrounded model (q8_0: ≈ 8 bits, like bf16, a bit worse)
    rel = (logits(back, tok) - logits(model, tok)).abs().max() / logits(model, tok).abs().max()
    assert rel < {"f32": 1e-6, "f16": 5e-3, "bf16": 3e-2, "q8_0": 1e-1}[dtype], float(rel)


def test_metadata_is_what_llama_cpp_reads(llama: tuple, tmp_path: Path) -> None:
    model, tok = llama
    path = write_gguf(model, tok, tmp_path / "m.gguf", dtype="q8_0", name="tiny-ft")
    reader = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    c = model.config
    expected = {
        "general.architecture": "llama", "general.name": "tiny-ft", "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.vocab_size": c.vocab_size, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
    }  # fmt: skip
    assert {k: f[k] for k in expected} == expected
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert f["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # CONTROL for special tokens, then NORMAL
    names = {t.name: t for t in reader.tensors}
    # llama.cpp's names (the gguf package's own map agrees) and its types: norms f32, matrices q8_0
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        assert tmap.get_name(hf_name, try_suffixes=(".weight",)) in names, hf_name
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(names["blk.0.attn_k.weight"].shape) == [64, 32]  # GGUF lists ne0 (the input dim) first
    assert ("output.weight" in names) == (not c.tie_word_embeddings)


def test_qk_permutation_is_undone_by_transformers_loader() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 2 * 3, dtype=torch.float32).reshape(8 * 2, 3)  # 2 heads of 8 rows
    p = permute_qk(w, n_head=2)
    # per head, rows of the first half and the second half alternate: 0, 4, 1, 5, 2, 6, 3, 7
    assert p[:8, 0].tolist() == [w[i, 0].item() for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    config = {"num_attention_heads": 2, "num_key_value_heads": 2}
    undone = LlamaTensorProcessor(config).process(p.numpy(), "blk.0.attn_q.weight").weights
    assert np.array_equal(undone, w.numpy())


def test_refusals_name_the_reason(llama: tuple) -> None:
    model, tok = llama
    with pytest.raises(ValueError, match=r"supports llama models.*lora_core_tiny"):
        check_exportable(lc.TinyCausalLM(), tok)
    with pytest.raises(ValueError, match=r"byte-level BPE tokenizers.*CharTokenizer"):
        check_exportable(model, lc.CharTokenizer())
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_exportable(model, tok, "q4_0")
