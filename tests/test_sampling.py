"""The sampler's definitions on hand-made logits, checked against transformers' logits processors, and the
decode loop (KV cache, seed, stop strings, streaming) on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lora_core as lc
from lora_core.inference.sampling import (
    SamplingConfig,
    SamplingError,
    apply_repetition_penalty,
    generate,
    generate_ids,
    next_token_probs,
    top_k_mask,
    top_p_mask,
)

transformers = pytest.importorskip("transformers")


def cfg(**kw: object) -> SamplingConfig:
    """No penalty, no truncation unless asked: each test turns on what it checks."""
    return SamplingConfig(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, **kw})


NONE = torch.tensor([], dtype=torch.long)


def test_temperature_to_zero_is_greedy() -> None:
    z = torch.tensor([0.1, 2.0, 1.9, -3.0])
    assert torch.equal(next_token_probs(z, NONE, cfg(temperature=0)), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    cold = next_token_probs(z, NONE, cfg(temperature=1e-3))  # the limit, approached
    assert cold[1] > 1 - 1e-6 and cold.argmax() == 1
    warm = next_token_probs(z, NONE, cfg(temperature=2.0))
    torch.testing.assert_close(warm, torch.softmax(z / 2, -1))


def test_top_k_keeps_exactly_k_tokens_even_with_ties() -> None:
    z = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5, 2.0])
    for k in range(1, 7):
        assert int(top_k_mask(z, k).sum()) == k
    assert top_k_mask(z, 2).tolist() == [False, True, True, False, False, False]  # ties: lower id first
    assert top_k_mask(z, 0).all()
    probs = next_token_probs(z, NONE, cfg(top_k=4))
    assert int((probs > 0).sum()) == 4 and probs[[0, 4]].sum() == 0


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    kept = lambda p: sorted(top_p_mask(probs, p).nonzero().flatten().tolist())
    assert kept(0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(0.51) == [1, 3]
    assert kept(0.8) == [1, 3]  # 0.5 + 0.3 = 0.8 ≥ 0.8
    assert kept(0.81) == [1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]  # the most likely token always survives
    z = probs.log()
    out = next_token_probs(z, NONE, cfg(top_p=0.8))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))


def test_repetition_penalty_is_ctrl_as_transformers_computes_it() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    z = torch.tensor([2.0, -1.0, 0.5, -0.25, 3.0])
    seen = torch.tensor([0, 1, 1, 3])  # a repeated id is penalised once
    out = apply_repetition_penalty(z, seen, 1.5)
    torch.testing.assert_close(out, torch.tensor([2.0 / 1.5, -1.5, 0.5, -0.375, 3.0]))
    ref = RepetitionPenaltyLogitsProcessor(1.5)(seen[None], z[None].clone())[0]
    torch.testing.assert_close(out, ref)


def test_the_whole_pipeline_matches_transformers_processors() -> None:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = torch.randn(50, generator=gen) * 3  # continuous: no ties, so both keep the same sets
        seen = torch.randint(0, 50, (8,), generator=gen)
        c = cfg(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
        chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                                     TopKLogitsWarper(20), TopPLogitsWarper(0.8)])  # fmt: skip
        ref = torch.softmax(chain(seen[None], z[None].clone())[0], -1)
        torch.testing.assert_close(next_token_probs(z, seen, c), ref)


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"max_new_tokens": -1}, "max_new_tokens"), ({"temperature": -0.1}, "temperature"),
     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
     ({"repetition_penalty": 0}, "repetition_penalty"), ({"temperature": float("nan")}, "temperature"),
     ({"stop": [""]}, "stop")],
)  # fmt: skip
def test_bad_settings_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(SamplingError) as info:
        SamplingConfig(**kw)
    assert info.value.field == field and str(info.value).startswith(field)


# ----------------------------------------------------------------------------------- the decode loop


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object]:
    from tiny_llama import save_tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_llama(tmp_path_factory.mktemp("llama") / "m")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_kv_cache_greedy_equals_transformers_greedy(llama: tuple) -> None:
    model, tok = llama
    ids = torch.tensor(tok.encode("To be, or not"))
    ours = list(generate_ids(model, ids, cfg(temperature=0, max_new_tokens=12)))  # cached: one token a step
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)[0, len(ids):]  # fmt: skip
    assert ours == ref.tolist()


def test_without_a_cache_the_window_is_recomputed_and_greedy_is_argmax() -> None:
    model, tok = lc.TinyCausalLM(), lc.CharTokenizer()
    ids = torch.tensor(tok.encode("3 green bottles"))
    ours = list(generate_ids(model, ids, cfg(temperature=0, max_new_tokens=10)))
    ref = model.generate(ids[None], max_new_tokens=10, do_sample=False)[0, len(ids) :]
    assert ours == ref.tolist()


def test_a_seed_makes_sampling_reproducible(llama: tuple) -> None:
    model, tok = llama
    a, b, c = (generate(model, tok, "To be", cfg(max_new_tokens=16, seed=s)) for s in (7, 7, 8))
    assert a == b and a != c
    torch.manual_seed(1)  # seed=None draws from torch's global RNG
    d = generate(model, tok, "To be", cfg(max_new_tokens=16))
    torch.manual_seed(1)
    assert generate(model, tok, "To be", cfg(max_new_tokens=16)) == d


def test_stop_string_ends_the_text_and_streaming_shows_exactly_the_result() -> None:
    model, tok = lc.TinyCausalLM(), lc.CharTokenizer()
    full = generate(model, tok, "3 green", cfg(max_new_tokens=40, seed=3))
    assert len(full) > 20  # (the tiny model may also draw <eos> or skipped special tokens)
    stop = full[12:15]
    cut = full[: full.index(stop)]
    pieces: list[str] = []
    text = generate(model, tok, "3 green", cfg(max_new_tokens=40, seed=3, stop=[stop, "never-there"]),
                    on_text=pieces.append)  # fmt: skip
    assert text == cut and "".join(pieces) == cut
    assert len(pieces) > 1  # streamed piece by piece, not at the end


def test_generation_ends_at_the_end_of_sequence_token(llama: tuple) -> None:
    model, tok = llama
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("hi")])).logits[0, -1]
    # Make <|im_end|> the argmax: greedy decoding must stop right there and show nothing.
    bias = torch.zeros_like(logits)
    bias[tok.eos_token_id] = 1e4
    model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        eos = [tok.eos_token_id]
        assert list(generate_ids(model, torch.tensor(tok.encode("hi")), cfg(temperature=0), eos)) == eos
        assert generate(model, tok, "hi", cfg(temperature=0)) == ""
    finally:
        model.lm_head.bias = None


def test_chat_applies_the_template_and_needs_one() -> None:
    from tiny_llama import build_tokenizer

    from lora_core.inference.sampling import encode_prompt

    tok = build_tokenizer()
    ids = encode_prompt(tok, "hi", chat=True)
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(lc.CharTokenizer(), "hi", chat=True)


def test_generate_leaves_the_model_in_its_mode(tmp_path: Path) -> None:
    model = lc.TinyCausalLM().train()
    generate(model, lc.CharTokenizer(), "a", cfg(max_new_tokens=2, seed=0))
    assert model.training
