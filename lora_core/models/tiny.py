"""A tiny Llama-shaped, character-level causal transformer and its tokenizer, built into lora_core.

It exists so the training loop, the CLI and the tutorials can run in seconds on a CPU with no download.
The layer *names* copy Llama's (``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj,
lm_head``), so every LoRA target that works on a real Llama works here too::

    ids (B, T) ─ embed_tokens + embed_positions ─┬─ [Block] × n_layer ─ norm ─ lm_head ─ logits (B, T, V)
                                                 │
    Block:  x + o_proj(attn(q_proj, k_proj, v_proj)(rms(x)))  then  x + down_proj(silu(gate_proj) · up_proj)

Learned absolute positions instead of RoPE keep it short; nothing here aims at quality.

The base weights are a pure function of ``(config, seed)`` (a private generator, never the global RNG), so
``"tiny"`` names one fixed base model and an adapter trained on it can be reloaded onto the same base.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Printable ASCII plus newline and tab: enough for English text; anything else maps to <unk>.
_CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


class CharTokenizer:
    """Characters to ids and back, with a fixed vocabulary (so every tiny model agrees on it).

    ids ``0, 1, 2`` are ``<pad>, <eos>, <unk>``; the characters follow.
    """

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2

    def __init__(self) -> None:
        self.itos = [*SPECIAL_TOKENS, *_CHARS]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.stoi.get(c, self.unk_token_id) for c in text]
        return [*ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        first_char = len(SPECIAL_TOKENS)
        return "".join(self.itos[i] for i in ids if not (skip_special_tokens and i < first_char))


@dataclass
class TinyConfig:
    """Sizes of the tiny model. Field names follow transformers' Llama config where one exists."""

    vocab_size: int = len(SPECIAL_TOKENS) + len(_CHARS)
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 128
    num_labels: int = 2  # only used by TinyForSequenceClassification
    dropout: float = 0.0  # on the embeddings (nanoGPT's place); makes the RNG matter in training
    model_type: str = "lora_core_tiny"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "num_labels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TinyConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinyConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyModel(nn.Module):
    """The trunk: embeddings, blocks, final norm. Returns hidden states ``(B, T, C)``."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.embed_positions.num_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings {self.embed_positions.num_embeddings}"
            )
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.embed_tokens(input_ids) + self.embed_positions(pos))  # (B, T, C)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)  # recompute activations in backward
            else:
                x = layer(x)
        return self.norm(x)  # (B, T, C)


class _TinyBase(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = TinyModel(cfg)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's activations in backward (same name as transformers' method)."""
        self.model.gradient_checkpointing = True

    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``path`` (an existing directory), each file
        atomically (weights first: a failure never leaves a new config beside old weights). For a whole
        folder at once, call it inside ``lora_core.atomic.atomic_write_dir`` (as ``lora-core merge`` does)."""
        from safetensors.torch import save_file

        from lora_core.atomic import atomic_write, atomic_write_text

        path = Path(path)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
        atomic_write_text(path / "config.json", json.dumps(asdict(self.config), indent=2))


class TinyCausalLM(_TinyBase):
    """Causal LM: ``forward(input_ids, labels=None)`` → ``.logits (B, T, V)`` and, with labels, ``.loss``.

    Labels follow transformers' convention: same shape as ``input_ids``, shifted inside, ``-100`` ignored.
    """

    def __init__(self, cfg: TinyConfig | None = None, seed: int = 0) -> None:
        cfg = cfg or TinyConfig()
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_weights(seed)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SimpleNamespace:
        logits = self.lm_head(self.model(input_ids))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return SimpleNamespace(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Greedy (or sampled) continuation; returns prompt + new ids ``(B, T + max_new_tokens)``."""
        ids = input_ids
        for _ in range(max_new_tokens):
            context = ids[:, -self.config.max_position_embeddings :]
            logits = self(context).logits[:, -1].float()  # (B, V)
            if do_sample:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


class TinyForSequenceClassification(_TinyBase):
    """Sequence classification: the last non-pad token's hidden state → ``score`` head → ``(B, num_labels)``.

    ``score`` is the head's name in transformers' Llama classifier, so ``task_type="SEQ_CLS"`` finds it.
    """

    def __init__(self, cfg: TinyConfig | None = None, seed: int = 0) -> None:
        cfg = cfg or TinyConfig()
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)
        self._init_weights(seed)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SimpleNamespace:
        h = self.model(input_ids)  # (B, T, C)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            last = attention_mask.long().sum(1) - 1  # right padding: index of the last real token
        logits = self.score(h[torch.arange(h.shape[0], device=h.device), last])  # (B, num_labels)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def load_tiny(path: str | Path) -> TinyCausalLM:
    """Load a tiny causal LM written by ``save_pretrained`` (safetensors only, never pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = TinyConfig(**json.loads((path / "config.json").read_text()))
    model = TinyCausalLM(cfg)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model
