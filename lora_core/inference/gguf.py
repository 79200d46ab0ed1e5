"""Write a transformers Llama model (a merged fine-tune) as a GGUF file that llama.cpp / ollama run.

GGUF is one file: a header, key/value metadata (the config, the tokenizer), then the tensors. We write
what llama.cpp's own converter (``convert_hf_to_gguf.py``, class ``LlamaModel``) writes, with the ``gguf``
package's ``GGUFWriter``::

    LlamaForCausalLM (transformers)              GGUF (llama.cpp's names)
    model.embed_tokens.weight                    token_embd.weight
    model.layers.{i}.input_layernorm.weight      blk.{i}.attn_norm.weight        (f32)
    ...self_attn.q_proj / k_proj.weight          blk.{i}.attn_q / attn_k.weight  (rows permuted, below)
    ...self_attn.v_proj / o_proj.weight          blk.{i}.attn_v / attn_output.weight
    ...post_attention_layernorm.weight           blk.{i}.ffn_norm.weight         (f32)
    ...mlp.gate_proj / up_proj / down_proj       blk.{i}.ffn_gate / ffn_up / ffn_down.weight
    model.norm.weight                            output_norm.weight              (f32)
    lm_head.weight                               output.weight   (left out when tied to the embedding)

**The q/k permutation.** transformers' Llama applies RoPE to the two *halves* of each head
(``rotate_half``: dimension j pairs with j + d/2); llama.cpp's rotates *adjacent* pairs (2j, 2j+1), as
Meta's original checkpoints do. The converter reorders the rows of ``W_q`` and ``W_k`` per head so that
row ``j`` of the first half lands at ``2j`` and row ``j`` of the second half at ``2j + 1``::

    W (n_head·d, in) → reshape (n_head, 2, d/2, in) → swap axes 1, 2 → reshape back

(with ``n_head`` = the KV head count for ``W_k``). transformers' GGUF loader applies the inverse.

**Types.** Vectors (norms) stay f32, as llama.cpp keeps them. ``f16`` / ``bf16`` round each matrix;
``q8_0`` stores blocks of 32 values as one f16 scale ``d = max|x| / 127`` and 32 int8 ``round(x / d)``
(8.5 bits per weight); a matrix whose rows are not a multiple of 32 long falls back to f16, as llama.cpp.

**Tokenizer.** Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2) are written as
``tokenizer.ggml.model = "gpt2"``: the vocabulary in its byte-alphabet spelling, the merges, the token
types (special tokens are CONTROL), the bos/eos/unk/pad ids, whether a BOS is added, and the chat
template. ``tokenizer.ggml.pre`` (which regex splits text before BPE) is read off the tokenizer's
pre-tokenizer where it is one llama.cpp names (``gpt2``, ``smollm``, ``llama-bpe``), else ``default``.
SentencePiece vocabularies (Llama 2, Mistral) are not supported yet: ``check_exportable`` says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TYPES = ("f32", "f16", "bf16", "q8_0")
QK8_0 = 32  # values per q8_0 block

# transformers' Llama parameter (inside model.layers.{i}.) → llama.cpp's tensor (inside blk.{i}.)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# llama.cpp's LLAMA3 split regex (its `llama-bpe` pre-tokenizer), as Llama 3's tokenizer.json spells it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for ``W_q`` (``n_head`` heads) or ``W_k`` (``n_head`` = KV heads): per head,
    the first half's rows interleaved with the second half's (``rotate_half`` pairs → adjacent pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- checks


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}  # transformers ≥ 5 keeps it here
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def _backend_json(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _is_byte_level(spec: dict[str, Any] | None) -> bool:
    """Whether a tokenizer.json (as a dict) is byte-level BPE: a BPE model whose decoder is ByteLevel."""
    if spec is None or spec.get("model", {}).get("type") != "BPE":
        return False
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def check_exportable(model: Any, tokenizer: Any, dtype: str = "f16") -> None:
    """Raise ``ValueError`` (one line, naming the reason) if ``write_gguf`` cannot write this model."""
    if dtype not in TYPES:
        raise ValueError(f"dtype must be one of {list(TYPES)}, got {dtype!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type != "llama":
        raise ValueError(
            f"GGUF export supports llama models (transformers' LlamaForCausalLM, e.g. SmolLM2); "
            f"this one is {model_type!r}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("GGUF export: llama with attention or MLP biases is not supported")
    if _rope_type(config) != "default":
        raise ValueError(
            f"GGUF export: rope scaling {_rope_type(config)!r} is not supported (only plain RoPE)"
        )
    if not _is_byte_level(_backend_json(tokenizer)):
        raise ValueError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 use); "
            f"this tokenizer ({type(tokenizer).__name__}) is not one"
        )


# ------------------------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the regex that splits text before BPE, recognised from the tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM's: every digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    return "default"


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    spec = _backend_json(tokenizer)
    assert spec is not None  # check_exportable made sure
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {int(i) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    tokens, types = [], []
    for i in range(vocab_size):  # the model's rows; ids the tokenizer never produces are padding
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    # Whether encoding adds a BOS: ask the tokenizer (its post-processor decides) rather than guess.
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# --------------------------------------------------------------------------------------------- tensors


def _gguf_tensor(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """``(array, raw_dtype)`` for ``GGUFWriter.add_tensor``: vectors f32, matrices in ``dtype``."""
    import gguf

    a = t.detach().to("cpu", torch.float32).numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "q8_0" and a.shape[-1] % QK8_0 == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return a.astype(np.float16), None  # f16, and q8_0's fallback for rows not a multiple of 32


def llama_tensors(model: Any) -> dict[str, torch.Tensor]:
    """GGUF name → tensor (q/k permuted), in the order llama.cpp writes them; ``output`` only if untied."""
    config = model.config
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    n_kv = n_kv or n_head
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for i in range(config.num_hidden_layers):
        for hf, name in LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf}"]
            if name == "attn_q.weight":
                w = permute_qk(w, n_head)
            elif name == "attn_k.weight":
                w = permute_qk(w, n_kv)
            out[f"blk.{i}.{name}"] = w
    out["output_norm.weight"] = state["model.norm.weight"]
    if not tied:
        out["output.weight"] = state["lm_head.weight"]
    return out


def write_gguf(model: Any, tokenizer: Any, path: str | Path, dtype: str = "f16", name: str = "model") -> Path:
    """Write ``model`` (a plain transformers Llama; merge adapters first) and ``tokenizer`` to ``path``.

    Raises:
        ValueError: ``check_exportable`` refuses the model, tokenizer or dtype.
    """
    import gguf

    check_exportable(model, tokenizer, dtype)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    with torch.no_grad():
        for tensor_name, t in llama_tensors(model).items():
            array, raw_dtype = _gguf_tensor(t, dtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


__all__ = ["check_exportable", "llama_tensors", "permute_qk", "write_gguf"]
