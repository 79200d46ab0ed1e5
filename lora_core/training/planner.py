"""Will it fit? Per-rank GPU memory of a LoRA / QLoRA fine-tune of a Llama-shaped model, from its shapes.

``plan_memory(model, gpus=, gpu_gb=, seq=, batch=, ...)`` returns a `MemoryPlan`: bytes per rank for each
part below, their sum, and whether it fits ``gpu_gb`` GiB. ``lora-core plan`` prints it. The shapes it
counts from (``ModelShape``, the built-in models) are in `lora_core.training.model_shapes`. Notation:
``h`` hidden, ``i`` intermediate, ``L`` layers, ``nh`` / ``nkv`` query / key-value heads, ``d = h / nh``
head dim, ``a = nh·d``, ``kv = nkv·d``, ``V`` vocabulary, ``r`` rank, ``N = batch·seq`` tokens per rank,
``b`` bytes of the compute dtype (bf16: 2), ``W`` world size.

- **weights** (frozen base): the 7 linear layers of each block — q (a×h), k, v (kv×h), o (h×a), gate, up
  (i×h), down (h×i) — in NF4 (exact bytes of `lora_core.quant.nf4`: ``ceil(n/2)`` packed + one scale per
  64-block (uint8 with double quantization, + one fp32 per 256 scales; fp32 without) + the 16-entry code
  table, the 256-entry nested table and the offset of each weight: the nested table is one shared tensor
  on the CPU, a copy per weight once moved to a GPU), or dense in ``dtype``. Embedding,
  the output head (unless tied) and the RMSNorm weights stay dense in ``dtype`` (as ``apply_lora`` leaves
  them). FSDP: ``1/W`` of it per rank.
- **adapters**: ``r·(in + out)`` fp32 parameters per targeted linear layer and block; **gradients** the
  same again; **optimizer**: AdamW's two fp32 moments plus its 4-byte ``step`` per parameter tensor.
  All three are whole on every rank, under DDP and under lora_core's FSDP alike (`lora_core.training.fsdp`
  shards only the frozen base); with more than one rank the gradient all-reduce adds one more gradient copy
  (DDP's buckets; FSDP's flattened all-reduce).
- **activations**: what autograd saves for backward (counted tensor by tensor for transformers'
  ``LlamaDecoderLayer`` with SDPA attention and lora_core's fused LoRA layers, `saved_activation_bytes`:
  equal to the bytes saved on CPU, fp32 and bf16) plus the largest transient on top of it
  (`transient_activation_bytes`). The peak live bytes of a real forward + backward of a tiny model lie
  between 0.5× and 1.2× this sum (tests/test_planner.py measured 0.76–0.90).
- **gathered** (FSDP only): the unsharded frozen weights FSDP2 all-gathers — the embedding, head and final
  norm (counted as if gathered for the whole step: an upper bound, each is gathered while it runs) and two
  blocks (the current one and the prefetched next one).
- **overhead**: an explicit allowance, not a measurement: ``OVERHEAD_FIXED_BYTES`` (CUDA context, cuBLAS
  and NCCL workspaces) plus ``OVERHEAD_FRACTION`` of everything else (the caching allocator's
  fragmentation).

With CPU offload (FSDP) the shards of the frozen base live in CPU memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_core.quant.nf4_codes import NF4_CODE

# What is counted from: the model's shapes (`ModelShape`, the built-in models, `model_shape` for a name or
# a config.json) live in `model_shapes`, re-exported here.
from lora_core.training.model_shapes import ALIASES, KNOWN_MODELS, LINEARS, ModelShape, model_shape

GIB = 2**30
NF4_BLOCK = 64  # QLoRA's block size (LoraConfig.quant_block_size's default)
NF4_NESTED_BLOCK = 256  # scales per nested fp32 scale under double quantization (lora_core.quant.nf4)
NF4_NESTED_CODE = 256  # entries of the 8-bit dynamic map the nested scales index
OVERHEAD_FIXED_BYTES = 1 * GIB  # CUDA context + cuBLAS / NCCL workspaces (allowance)
OVERHEAD_FRACTION = 0.10  # allocator fragmentation, as a share of everything else (allowance)
FSDP_GATHERED_BLOCKS = 2  # the block running and the one FSDP2 prefetches
LOGITS_PER_CHUNK = 2**25  # lora_core.training.losses: logits per chunk of the chunked loss
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# ------------------------------------------------------------------------------------------------ weights


def nf4_nbytes(n: int, block_size: int = NF4_BLOCK, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight of ``n`` elements: every tensor of its `NF4Tensor` (``tensors()``)."""
    blocks = -(-n // block_size)
    packed, code = (n + 1) // 2, len(NF4_CODE) * 4
    if not double_quant:
        return packed + 4 * blocks + code  # fp32 scales
    nested = 4 * -(-blocks // NF4_NESTED_BLOCK)
    return packed + blocks + nested + code + 4 * NF4_NESTED_CODE + 4  # uint8 scales, nested, tables, offset


def block_weight_bytes(shape: ModelShape, quantize: str = "nf4", dtype: str = "bf16") -> int:
    """One block's frozen weights: its 7 linear layers (NF4 or ``dtype``) and its 2 RMSNorm weights."""
    b, sizes = DTYPE_BYTES[dtype], [o * i for o, i in shape.linear_shapes().values()]
    linears = sum(nf4_nbytes(n) for n in sizes) if quantize == "nf4" else b * sum(sizes)
    return linears + b * 2 * shape.hidden_size


def root_weight_bytes(shape: ModelShape, dtype: str = "bf16") -> int:
    """The weights outside the blocks, dense in ``dtype``: embedding, head (unless tied), final norm."""
    h, V = shape.hidden_size, shape.vocab_size
    return DTYPE_BYTES[dtype] * (V * h * (1 if shape.tie_word_embeddings else 2) + h)


def base_weight_bytes(shape: ModelShape, quantize: str = "nf4", dtype: str = "bf16") -> int:
    """The whole frozen base (what ``apply_lora`` leaves frozen, NF4 where ``quantize="nf4"``)."""
    return shape.num_hidden_layers * block_weight_bytes(shape, quantize, dtype) + root_weight_bytes(
        shape, dtype
    )


def _one_block(shape: ModelShape) -> ModelShape:
    return ModelShape(**{**shape.__dict__, "num_hidden_layers": 1})


def adapter_params(shape: ModelShape, r: int, targets: tuple[str, ...] = LINEARS) -> int:
    """Trainable LoRA parameters: ``r·(in + out)`` per targeted linear layer of every block."""
    per_block = sum(r * (o + i) for name, (o, i) in shape.linear_shapes().items() if name in targets)
    return shape.num_hidden_layers * per_block


# ------------------------------------------------------------------------------------------- activations


def saved_activation_bytes(
    shape: ModelShape, seq: int, batch: int, r: int, targets: tuple[str, ...] = LINEARS,
    dtype: str = "bf16", grad_ckpt: bool = False,
) -> int:  # fmt: skip
    """Bytes autograd keeps for backward at the end of the forward pass (read off the tensors saved).

    Per token and block, ``b`` bytes each unless said fp32:
        2 RMSNorms     fp32 input copy + fp32 1/rms           2·(h + 1)·4   (block 0's too: apply_lora makes
                                                                            the embedding's output need grad)
        attention      q, out (= o_proj's input), k, v         (2a + 2kv)·b, + SDPA's logsumexp nh·4
        MLP            gate out, up out, silu(gate)            3i·b
        LoRA inputs    normed x of q/k/v, of gate/up,          h·b, h·b, i·b (each only if one of them is
                       down's input silu(gate)·up                              a target; o's is SDPA's out)
        LoRA x·Aᵀ      one per target                          r·b each
    Per model: RoPE cos and sin (2d·b per position, shared by the batch), the final norm (h + 1)·4 per
    token, and the chunked loss's hidden-state gradient h·b per token (`chunked_causal_lm_loss` forms it in
    forward). With gradient checkpointing a block keeps only its input, h·b per token (RoPE is recomputed).

    Exact (tested, fp32 and bf16) for lora_core's fused LoRA path, which saves ``x`` in its own dtype (one
    copy shared by q/k/v and by gate/up) and ``x·Aᵀ``: the path on CUDA. The CPU reference path saves fp32
    copies per layer (more).
    """
    b, f = DTYPE_BYTES[dtype], 4
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    a, kv = shape.num_attention_heads * shape.d, shape.num_key_value_heads * shape.d
    tokens = seq * batch
    model_level = tokens * ((h + 1) * f + h * b)
    if grad_ckpt:
        return model_level + L * tokens * h * b
    lora = sum(r for t in targets if t in LINEARS)
    lora += h * any(t in targets for t in ("q_proj", "k_proj", "v_proj"))
    lora += h * any(t in targets for t in ("gate_proj", "up_proj")) + i * ("down_proj" in targets)
    per_token = 2 * (h + 1) * f + (2 * a + 2 * kv + 3 * i + lora) * b + shape.num_attention_heads * f
    rope = seq * 2 * shape.d * b
    return L * tokens * per_token + model_level + rope


def transient_activation_bytes(
    shape: ModelShape, seq: int, batch: int, r: int, targets: tuple[str, ...] = LINEARS,
    dtype: str = "bf16", grad_ckpt: bool = False, quantize: str = "nf4",
) -> int:  # fmt: skip
    """The largest short-lived working set on top of the saved activations: the larger of

    - one chunk of the chunked loss, ``C·V·(b + 4 + b)`` (its logits, their fp32 copy, D; ``C`` from
      ``lora_core.training.losses.default_chunk_size``, at most N), and
    - one block's backward: the gradients it forms (``(h + a + 2kv + 3i)·b`` per token, roughly what
      flows through q/k/v, SDPA and the MLP), plus, with gradient checkpointing, the block's activations
      recomputed (its share of `saved_activation_bytes` without checkpointing), plus, for an NF4 base,
      the largest weight dequantized into a temporary in the compute dtype (on CUDA a product with more
      than ``FUSED_MAX_M`` rows dequantizes the weight and calls cuBLAS: ``dispatch.nf4_matmul_acc``).
    """
    b, tokens = DTYPE_BYTES[dtype], seq * batch
    h, i = shape.hidden_size, shape.intermediate_size
    a, kv = shape.num_attention_heads * shape.d, shape.num_key_value_heads * shape.d
    chunk = min(tokens, max(64, LOGITS_PER_CHUNK // shape.vocab_size // 64 * 64))
    loss = chunk * shape.vocab_size * (2 * b + 4)
    block = tokens * (h + a + 2 * kv + 3 * i) * b
    if quantize == "nf4":
        block += b * max(o * n for o, n in shape.linear_shapes().values())
    if grad_ckpt:
        block += saved_activation_bytes(_one_block(shape), seq, batch, r, targets, dtype)
    return max(loss, block)


# ------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank (GPU) of each part (module docstring) and whether their sum fits."""

    model: ModelShape
    strategy: str  # "single", "ddp" or "fsdp"
    gpus: int
    gpu_bytes: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int
    overhead: int
    trainable_params: int
    settings: dict = field(default_factory=dict)

    PARTS = ("weights", "adapters", "gradients", "optimizer", "activations", "gathered", "overhead")

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in self.PARTS)

    @property
    def margin(self) -> int:
        """``gpu_bytes − total``: negative when it does not fit."""
        return self.gpu_bytes - self.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    def table(self) -> str:
        """The plan as a text table, one row per part, in GiB per rank, and the verdict."""
        s = self.settings
        head = (
            f"{self.model.name}: {self.strategy} on {self.gpus} × {self.gpu_bytes / GIB:g} GiB, "
            f"seq {s['seq']}, batch {s['batch']} per rank, r={s['r']}, base {s['quantize']}, "
            f"{'gradient checkpointing' if s['grad_ckpt'] else 'no gradient checkpointing'}"
        )
        rows = [f"  {p:<12} {getattr(self, p) / GIB:9.2f} GiB" for p in self.PARTS]
        rows.append(f"  {'total':<12} {self.total / GIB:9.2f} GiB per rank")
        verdict = "fits" if self.fits else "does not fit"
        word = "margin" if self.fits else "short by"
        return "\n".join([head, *rows, f"{verdict}: {word} {abs(self.margin) / GIB:.2f} GiB per rank"])


def plan_memory(
    model: str | ModelShape, *, gpus: int = 1, gpu_gb: float = 24, seq: int = 512, batch: int = 1,
    r: int = 16, targets: str | tuple[str, ...] = "all-linear", quantize: str = "nf4", dtype: str = "bf16",
    grad_ckpt: bool = False, strategy: str = "auto", cpu_offload: bool = False,
) -> MemoryPlan:  # fmt: skip
    """Per-rank memory of a LoRA fine-tune (module docstring for every part and formula).

    Args:
        model: a built-in name (``llama-2-7b``/``7b``, ``llama-2-13b``, ``llama-2-70b``, ``smollm2-135m``), a
            folder with a transformers ``config.json``, or a `ModelShape`.
        gpus: ranks (one GPU each); gpu_gb: GiB per GPU (a "24 GB" card: 24).
        seq, batch: tokens per sequence and sequences per rank per micro-batch.
        r: LoRA rank; targets: ``"all-linear"`` or names out of ``LINEARS``.
        quantize: ``"nf4"`` (QLoRA) or ``"none"`` (base in ``dtype``); dtype: ``"bf16"``, ``"fp16"``,
            ``"fp32"`` (the compute dtype of the dense weights and activations).
        grad_ckpt: gradient checkpointing per block.
        strategy: ``"ddp"`` (every rank holds the whole base), ``"fsdp"`` (the frozen base sharded over
            the ranks; adapters and optimizer whole), or ``"auto"``: DDP where it fits, else FSDP (one
            GPU: ``"single"``).
        cpu_offload: FSDP's CPU offload (FSDP2 ``CPUOffloadPolicy``): the shards of the base live in CPU
            memory; only the gathered blocks reach the GPU.

    Raises:
        ValueError / TypeError: a value out of range or of the wrong type, naming the argument.
    """
    shape = model_shape(model)
    for name, value in (("gpus", gpus), ("seq", seq), ("batch", batch), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if isinstance(gpu_gb, bool) or not isinstance(gpu_gb, (int, float)):
        raise TypeError(f"gpu_gb must be a number of GiB, got {type(gpu_gb).__name__}")
    if not math.isfinite(gpu_gb) or gpu_gb <= 0:
        raise ValueError(f"gpu_gb must be a positive number of GiB, got {gpu_gb!r}")
    if quantize not in ("nf4", "none"):
        raise ValueError(f"quantize must be 'nf4' or 'none', got {quantize!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if not isinstance(cpu_offload, bool) or not isinstance(grad_ckpt, bool):
        raise TypeError(f"grad_ckpt and cpu_offload must be bools, got {grad_ckpt!r}, {cpu_offload!r}")
    if cpu_offload and strategy == "ddp":
        raise ValueError("cpu_offload needs strategy='fsdp' (or 'auto'): DDP keeps the base on every GPU")
    if strategy not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"strategy must be 'auto', 'ddp' or 'fsdp', got {strategy!r}")
    if targets == "all-linear":
        targets = LINEARS
    if isinstance(targets, str) or not targets or any(t not in LINEARS for t in targets):
        raise ValueError(f"targets must be 'all-linear' or some of {', '.join(LINEARS)}; got {targets!r}")
    targets = tuple(dict.fromkeys(targets))  # each layer once, in the order given
    args = (shape, gpus, gpu_gb, seq, batch, r, targets, quantize, dtype, grad_ckpt)
    if strategy == "auto" and not cpu_offload:
        ddp = _plan(*args, "ddp", False)
        return ddp if ddp.fits or gpus == 1 else _plan(*args, "fsdp", False)
    return _plan(*args, "fsdp" if strategy == "auto" else strategy, cpu_offload)


def _plan(
    shape: ModelShape, gpus: int, gpu_gb: float, seq: int, batch: int, r: int, targets: tuple[str, ...],
    quantize: str, dtype: str, grad_ckpt: bool, strategy: str, cpu_offload: bool,
) -> MemoryPlan:  # fmt: skip
    fsdp = strategy == "fsdp" and (gpus > 1 or cpu_offload)
    world = gpus if fsdp else 1
    weights = base_weight_bytes(shape, quantize, dtype)
    params = adapter_params(shape, r, targets)
    n_tensors = 2 * shape.num_hidden_layers * len(targets)  # lora_A and lora_B of every target
    adapters, optimizer = 4 * params, 8 * params + 4 * n_tensors
    act = saved_activation_bytes(shape, seq, batch, r, targets, dtype, grad_ckpt)
    act += transient_activation_bytes(shape, seq, batch, r, targets, dtype, grad_ckpt, quantize)
    gathered = 0
    if fsdp:  # the weights outside the blocks, and two blocks' frozen weights (the adapters are whole)
        block = block_weight_bytes(shape, quantize, dtype)
        gathered = root_weight_bytes(shape, dtype) + FSDP_GATHERED_BLOCKS * block
    comm = adapters if gpus > 1 else 0  # the gradient all-reduce's buffer: one more gradient copy
    parts = [0 if cpu_offload else -(-weights // world), adapters, adapters, optimizer]
    rest = sum(parts) + act + gathered + comm
    overhead = OVERHEAD_FIXED_BYTES + int(OVERHEAD_FRACTION * rest)
    name = "fsdp" if fsdp else "ddp" if gpus > 1 else "single"
    return MemoryPlan(
        model=shape, strategy=name + (" + CPU offload" if cpu_offload else ""), gpus=gpus,
        gpu_bytes=int(gpu_gb * GIB), weights=parts[0], adapters=parts[1], gradients=parts[2] + comm,
        optimizer=parts[3], activations=act, gathered=gathered, overhead=overhead, trainable_params=params,
        settings={"seq": seq, "batch": batch, "r": r, "quantize": quantize, "dtype": dtype,
                  "grad_ckpt": grad_ckpt, "targets": targets, "cpu_offload": cpu_offload},
    )  # fmt: skip


__all__ = [
    "ALIASES",
    "KNOWN_MODELS",
    "LINEARS",
    "MemoryPlan",
    "ModelShape",
    "adapter_params",
    "base_weight_bytes",
    "block_weight_bytes",
    "model_shape",
    "nf4_nbytes",
    "plan_memory",
    "root_weight_bytes",
    "saved_activation_bytes",
    "transient_activation_bytes",
]
