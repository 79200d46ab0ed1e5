"""Bad input gives a ValueError / TypeError that names what is wrong, never a stray exception type from
deep inside (AttributeError, JSONDecodeError, a bare ``float()`` error) nor a silent NaN."""

from __future__ import annotations

import json

import pytest
import torch

from lora_core.quant.checkpoint import read_bnb_state_dict
from lora_core.quant.nf4 import NF4Tensor, quantize_nf4

BLOB = "w.quant_state.bitsandbytes__nf4"


def _state(double_quant: bool) -> dict[str, torch.Tensor]:
    return dict(quantize_nf4(torch.randn(8, 64), 64, double_quant).to_bnb_state("w"))


def _blob(meta: object) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def _with_fields(**fields: object):
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[BLOB] = _blob({**json.loads(bytes(state[BLOB].tolist())), **fields})

    return edit


def _set(key: str, fn):
    return lambda state: state.update({key: fn(state[key].clone())})


# (edit of a double-quantized state dict, what the message must say)
BAD_BLOBS = [
    (lambda s: s.update({BLOB: torch.tensor(list(b"{abc"), dtype=torch.uint8)}), f"{BLOB} is not valid JSON"),
    (lambda s: s.update({BLOB: torch.tensor([0xFF, 0xFE], dtype=torch.uint8)}), f"{BLOB} is not UTF-8"),
    (lambda s: s.update({BLOB: _blob([1, 2])}), f"{BLOB} must be a JSON object.*got a JSON list"),
    (lambda s: s.update({BLOB: _blob("nf4")}), f"{BLOB} must be a JSON object"),
    (lambda s: s.update({BLOB: s[BLOB].float()}), f"{BLOB} must be a uint8 tensor"),
    (_with_fields(shape="abc"), "'shape' must be a list of non-negative ints, got 'abc'"),
    (_with_fields(shape=512), "'shape' must be a list of non-negative ints, got 512"),
    (_with_fields(shape=[8.0, 64]), "'shape' must be a list of non-negative ints"),
    (_with_fields(shape=[-8, 64]), "'shape' must be a list of non-negative ints"),
    (_with_fields(shape=[True, 512]), "'shape' must be a list of non-negative ints"),
    (_with_fields(dtype=3), "'dtype' must name a floating-point torch dtype"),
    (_with_fields(dtype="int8"), "'dtype' must name a floating-point torch dtype.*'int8'"),
    (_with_fields(dtype="Size"), "'dtype' must name a floating-point torch dtype"),
    (_with_fields(nested_offset="x"), "'nested_offset' must be a finite number.*'x'"),
    (_with_fields(nested_offset=[1.0]), "'nested_offset' must be a finite number"),
    (_with_fields(nested_offset=True), "'nested_offset' must be a finite number"),
    (_with_fields(nested_offset=float("nan")), "'nested_offset' must be a finite number.*nan"),
    (_with_fields(nested_offset=float("inf")), "'nested_offset' must be a finite number"),
    (_with_fields(nested_offset=1e39), "'nested_offset' must be a finite number within float32's range"),
    (_with_fields(nested_blocksize="256"), "'nested_blocksize' must be a power-of-two int"),
    (_with_fields(nested_blocksize=0), "'nested_blocksize' must be a power-of-two int"),
    (_set("w.quant_map", lambda t: t.fill_(float("nan"))), "w.quant_map must be finite, got NaN"),
    (_set("w.nested_absmax", lambda t: t.fill_(float("nan"))), "w.nested_absmax must be finite"),
    (_set("w.nested_absmax", lambda t: -t), "w.nested_absmax .* must be >= 0"),
    (_set("w.nested_quant_map", lambda t: t.fill_(float("inf"))), "w.nested_quant_map must be finite"),
]

BAD_PLAIN = [  # without double quantization the absmax is stored as float32
    (_set("w.absmax", lambda t: t.fill_(float("nan"))), "w.absmax must be finite, got NaN"),
    (
        _set("w.absmax", lambda t: t.index_fill_(0, torch.tensor([3]), float("inf"))),
        "w.absmax must be finite",
    ),
    (_set("w.absmax", lambda t: -t), "w.absmax .* must be >= 0"),
    (_set("w.quant_map", lambda t: t.index_fill_(0, torch.tensor([0]), float("nan"))), "w.quant_map must be"),
]


CASES = [(True, e, m) for e, m in BAD_BLOBS] + [(False, e, m) for e, m in BAD_PLAIN]


@pytest.mark.parametrize(
    ("double_quant", "edit", "message"),
    CASES,
    ids=[f"dq={d}:{m.split(' must')[0][-30:]}" for d, _, m in CASES],
)
@pytest.mark.parametrize("reader", ["from_bnb_state", "read_bnb_state_dict"])
def test_malformed_bnb_state_is_a_value_error(double_quant, edit, message, reader) -> None:
    state = _state(double_quant)
    edit(state)
    with pytest.raises(ValueError, match=message):
        if reader == "from_bnb_state":
            NF4Tensor.from_bnb_state(state, "w")
        else:
            read_bnb_state_dict(state)


def test_non_tensor_entry_is_a_type_error() -> None:
    state: dict = _state(True)
    state["w.absmax"] = state["w.absmax"].tolist()
    with pytest.raises(TypeError, match=r"w\.absmax must be a torch\.Tensor, got list"):
        NF4Tensor.from_bnb_state(state, "w")


@pytest.mark.parametrize("double_quant", [False, True])
def test_well_formed_bnb_state_still_reads(double_quant: bool) -> None:
    w = torch.randn(8, 64)
    q = quantize_nf4(w, 64, double_quant)
    back = NF4Tensor.from_bnb_state(q.to_bnb_state("w"), "w")
    assert torch.equal(back.dequantize(), q.dequantize())
    assert back.offset is None or back.offset.dtype == torch.float32


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("weight.nested_absmax", [1.0], "weight.nested_absmax must be a torch.Tensor"),
        ("weight.quant_state.bitsandbytes__nf4", _blob({"quant_type": "nf4"}), "missing"),
        ("weight.quant_state.bitsandbytes__nf4", torch.tensor([0xFF], dtype=torch.uint8), "not UTF-8"),
    ],
)
def test_qlora_load_state_dict_with_a_malformed_entry_reports_it_and_keeps_the_layer(
    key, value, message
) -> None:
    from torch import nn

    from lora_core.lora.qlora import QLoRALinear

    layer = QLoRALinear.from_linear(nn.Linear(64, 8), r=2, alpha=4)
    before = layer.weight
    state = dict(layer.state_dict())
    state[key] = value
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(state)
    assert layer.weight is before


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alpha": INF}, ValueError, "alpha must be a finite number > 0, got inf"),
        ({"alpha": NAN}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": True}, TypeError, "alpha must be a positive number, got True"),
        ({"alpha": "8"}, TypeError, "alpha must be a positive number, got '8'"),
        ({"dropout": "0.1"}, TypeError, r"dropout must be a float in \[0, 1\)"),
        ({"dropout": True}, TypeError, r"dropout must be a float in \[0, 1\)"),
        ({"dropout": NAN}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"use_rslora": "yes"}, TypeError, "use_rslora must be a bool, got 'yes'"),
        ({"use_dora": 1}, TypeError, "use_dora must be a bool, got 1"),
        ({"fan_in_fan_out": "no"}, TypeError, "fan_in_fan_out must be a bool, got 'no'"),
    ],
)
def test_lora_layer_arguments_are_checked(kwargs, error, message, quantized) -> None:
    """``LoRALinear(..., alpha=inf)`` gave an inf scaling, ``alpha="8"`` a bare comparison TypeError,
    ``use_rslora="yes"`` silently meant True; the layer now checks like ``LoraConfig`` does."""
    from torch import nn

    from lora_core.lora.layer import LoRALinear
    from lora_core.lora.qlora import QLoRALinear

    cls = QLoRALinear if quantized else LoRALinear
    base = nn.Linear(16, 16)
    with pytest.raises(error, match=message):
        cls.from_linear(base, **{"r": 4, "alpha": 8.0, **kwargs})
    assert base.weight.requires_grad  # the base was not adopted
