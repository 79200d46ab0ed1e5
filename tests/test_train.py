"""The training loop on the tiny built-in model: it learns, trains only what requires grad, and its
schedule, grouping, accumulation, checkpointing and divergence handling do what the config says."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tolerances import assert_close
from torch import nn

import lora_core as lc
from lora_core.training.data import PackedDataset, load_dataset
from lora_core.training.loop import CHECKPOINT_NAME, lr_factor, param_groups

TEXT = "".join(
    f"The {w} sat on the mat; the mat was {c}.\n"
    for w, c in zip(["cat", "dog", "hen"] * 30, ["red", "blue"] * 45)
)


@pytest.fixture
def text_data(tmp_path: Path) -> tuple[PackedDataset, PackedDataset]:
    (tmp_path / "t.txt").write_text(TEXT)
    train, held_out = load_dataset(tmp_path / "t.txt", lc.CharTokenizer(), block_size=32, eval_fraction=0.1)
    return train, held_out


def quick(**kw: object) -> lc.TrainConfig:
    return lc.TrainConfig(**{"lr": 3e-3, "batch_size": 4, "max_steps": 6, "progress": False, **kw})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_tiny_model_learns_and_writes_metrics_and_curve(text_data, tmp_path: Path) -> None:
    train, held_out = text_data
    model = lc.TinyCausalLM()
    before = lc.evaluate(model, held_out)
    assert abs(before - math.log(model.config.vocab_size)) < 0.1  # random init ≈ uniform over the vocabulary
    result = lc.train(model, train, held_out, quick(max_steps=25, eval_every=10, output_dir=tmp_path / "run"))
    assert result.eval_loss < before - 1.0
    assert result.eval_loss == pytest.approx(lc.evaluate(model, held_out))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 26))
    assert [x["step"] for x in lines if "eval_loss" in x] == [10, 20, 25]
    assert all(x["tokens_per_s"] > 0 for x in lines if "loss" in x)
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_parameters_that_require_grad_change(text_data) -> None:
    model = lc.TinyCausalLM()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name or "lm_head" in name)
    before = snapshot(model)
    lc.train(model, text_data[0], config=quick(max_steps=2))
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name


def test_grad_accumulation_equals_a_bigger_batch_with_uneven_targets() -> None:
    """The loss is normalised by the target count of the whole global batch. With ``-100`` labels spread
    unevenly (prompt/response data) micro-batches hold different counts of targets: a per-micro-batch mean
    would weight tokens unequally and accumulation would differ from the bigger batch."""
    gen = torch.Generator().manual_seed(0)
    vocab = lc.TinyConfig().vocab_size
    ids = torch.randint(0, vocab, (8, 16), generator=gen)
    labels = ids.clone()
    for i in range(8):  # example i learns only its last i + 1 tokens: 1 ... 8 targets
        labels[i, : 15 - i] = -100
    data = PackedDataset(ids, labels)  # 8 examples = one global batch: each step sees all of them
    fresh = lc.TinyCausalLM()
    with torch.no_grad():
        logits = fresh(ids).logits  # (8, 16, V)
    expected = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert lc.evaluate(fresh, data) == pytest.approx(float(expected), rel=1e-5)
    runs = {}
    for batch_size, grad_accum in ((8, 1), (2, 4), (1, 8)):
        model = lc.TinyCausalLM()
        cfg = quick(batch_size=batch_size, grad_accum=grad_accum, max_steps=2)
        result = lc.train(model, data, config=cfg)
        assert result.history[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
        runs[batch_size] = model
    for b in (2, 1):
        for pa, pb in zip(runs[8].parameters(), runs[b].parameters()):
            assert_close(pa.detach(), pb.detach())


def test_gradient_checkpointing_gives_the_same_result(text_data) -> None:
    a, b = lc.TinyCausalLM(), lc.TinyCausalLM()
    lc.train(a, text_data[0], config=quick(max_steps=2))
    lc.train(b, text_data[0], config=quick(max_steps=2, gradient_checkpointing=True))
    assert b.model.gradient_checkpointing
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_close(pa.detach(), pb.detach())


def test_warmup_then_cosine_linear_constant() -> None:
    # warm-up of 4 steps reaches the full lr on its 4th step; 10 steps in all, 6 of decay.
    assert [lr_factor(s, 10, 4, "constant", 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, "cosine", 0.0) == 1.0
    assert lr_factor(7, 10, 4, "cosine", 0.0) == pytest.approx(0.5)  # halfway through the decay: cos(π/2)
    assert lr_factor(7, 10, 4, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 10, 4, "cosine", 0.1) == pytest.approx(0.1)  # min_lr_ratio at step == total
    assert lr_factor(9, 10, 4, "constant", 0.0) == 1.0
    # the last step taken (9) is one decay step short of the floor, as in transformers' schedulers
    assert lr_factor(9, 10, 4, "linear", 0.0) == pytest.approx(1 / 6)


def test_the_loop_applies_the_schedule_step_by_step(text_data) -> None:
    # 2 warm-up steps, then cosine over the remaining 4 (progress 0, 1/4, 1/2, 3/4 at the steps taken)
    result = lc.train(lc.TinyCausalLM(), text_data[0], config=quick(lr=1e-2, warmup_steps=2, max_steps=6))
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    expected = [1e-2 * f for f in (0.5, 1.0, *cosine)]
    assert [h["lr"] for h in result.history if "lr" in h] == pytest.approx(expected)


def test_loraplus_and_per_layer_lr_groups() -> None:
    class WithAdapters(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer0 = nn.ModuleDict({"lora_A": nn.Linear(4, 2, bias=False), "lora_B": nn.Linear(2, 4)})
            self.layer1 = nn.ModuleDict({"lora_A": nn.Linear(4, 2, bias=False), "lora_B": nn.Linear(2, 4)})

    model = WithAdapters()
    cfg = quick(lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16.0, lr_groups={r"^layer0\.": 0.5})
    lr_of = {}
    for group in param_groups(model, cfg):
        for p in group["params"]:
            lr_of[next(n for n, q in model.named_parameters() if q is p)] = (
                group["lr"],
                group["weight_decay"],
            )
    assert lr_of["layer0.lora_A.weight"] == (5e-4, 0.1)
    assert lr_of["layer0.lora_B.weight"] == (pytest.approx(8e-3), 0.1)  # 1e-3 × 0.5 × 16
    assert lr_of["layer0.lora_B.bias"] == (pytest.approx(8e-3), 0.0)  # no decay on 1-D parameters
    assert lr_of["layer1.lora_A.weight"] == (1e-3, 0.1)
    assert lr_of["layer1.lora_B.weight"] == (pytest.approx(1.6e-2), 0.1)


def test_sequence_classification(tmp_path: Path) -> None:
    tok = lc.CharTokenizer()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=gen)
    ids = torch.stack([torch.tensor(tok.encode(("yes " if y else "no! ") * 3)) for y in labels.tolist()])

    class ClsData(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": labels[i]}

    model = lc.TinyForSequenceClassification()
    cfg = quick(task="SEQ_CLS", lr=1e-2, batch_size=8, max_steps=15)
    before = lc.evaluate(model, ClsData(), cfg)
    result = lc.train(model, ClsData(), ClsData(), cfg)
    assert result.eval_loss < 0.2 < before
    with torch.no_grad():
        predicted = model(ids).logits.argmax(-1)
    assert (predicted == labels).float().mean() == 1.0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_data, tmp_path: Path) -> None:
    model = lc.TinyCausalLM()
    poison = {"on": False}
    model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else None)
    seen = {}

    def on_step(step: int, metrics: dict) -> None:
        seen[step] = snapshot(model)
        poison["on"] = step == 3

    cfg = quick(output_dir=tmp_path / "run", checkpoint_every=2, on_step=on_step)
    with pytest.raises(lc.TrainingDiverged, match=r"loss became nan .* at step 4.*checkpoint.pt \(step 2\)"):
        lc.train(model, text_data[0], config=cfg)
    for name, p in model.named_parameters():  # the bad step never touched the weights
        assert torch.equal(p, seen[3][name]), name
    state = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 2
    assert torch.equal(state["trainable"]["lm_head.weight"], seen[2]["lm_head.weight"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [CHECKPOINT_NAME, "metrics.jsonl"]


def test_resume_in_process_matches_an_uninterrupted_run(text_data, tmp_path: Path) -> None:
    cfg_model = lc.TinyConfig(dropout=0.2)  # dropout: resuming must restore the RNG too
    full = lc.TinyCausalLM(cfg_model)
    lc.train(full, text_data[0], config=quick(seed=1))

    part = lc.TinyCausalLM(cfg_model)

    def stop_at_4(step: int, metrics: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lc.train(
            part,
            text_data[0],
            config=quick(seed=1, output_dir=tmp_path, checkpoint_every=3, on_step=stop_at_4),
        )
    resumed = lc.TinyCausalLM(cfg_model)  # a fresh process would rebuild the model from scratch
    lc.train(
        resumed, text_data[0], config=quick(seed=1, output_dir=tmp_path, checkpoint_every=3, resume=True)
    )
    for (name, pf), pr in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(pf, pr), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 4 was dropped, then logged again
    changes = (
        ({"lr": 1e-3}, r"settings: lr \(checkpoint 0.003, now 0.001\)\. Resume"),
        (
            {"adam_betas": (0.9, 0.95), "max_grad_norm": 0.5},
            r"adam_betas \(.*\); max_grad_norm \(checkpoint 1.0, now 0.5\)\. Resume",
        ),
        ({"fingerprint_extra": {"r": 8}}, r"settings: r \(checkpoint '<not recorded>', now 8\)\. Resume"),
    )
    for changed, message in changes:  # every differing setting is named
        with pytest.raises(ValueError, match=message):
            lc.train(
                lc.TinyCausalLM(cfg_model),
                text_data[0],
                config=quick(seed=1, output_dir=tmp_path, resume=True, **changed),
            )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"schedule": "step"}, "schedule"),
        ({"task": "TOKEN_CLS"}, "task"),
        ({"lr_groups": {"(": 1.0}}, "lr_groups"),
        ({"max_steps": 0}, "max_steps"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        lc.TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
        ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": float("inf")}, ValueError, "max_grad_norm"),
        ({"loraplus_lr_ratio": float("nan")}, ValueError, "loraplus_lr_ratio"),
        ({"loraplus_lr_ratio": float("inf")}, ValueError, "loraplus_lr_ratio"),
        ({"adam_eps": float("nan")}, ValueError, "adam_eps"),
        ({"adam_betas": (0.9, float("nan"))}, ValueError, r"adam_betas\[1\]"),
        ({"adam_betas": (1.0, 0.999)}, ValueError, r"adam_betas\[0\]"),
        ({"min_lr_ratio": float("nan")}, ValueError, "min_lr_ratio"),
        ({"lr_groups": {"x": float("nan")}}, ValueError, "lr_groups"),
        ({"lr": "1e-3"}, TypeError, "lr"),
        ({"weight_decay": "0.1"}, TypeError, "weight_decay"),
        ({"max_grad_norm": True}, TypeError, "max_grad_norm"),
        ({"batch_size": True}, ValueError, "batch_size"),
        ({"resume": "yes"}, TypeError, "resume"),
        ({"fingerprint_extra": {"data": object()}}, TypeError, "fingerprint_extra"),
        ({"fingerprint_extra": {"lr": 1.0}}, ValueError, "fingerprint_extra"),
    ],
)
def test_config_rejects_non_finite_and_mistyped_values(kwargs: dict, error: type, field: str) -> None:
    with pytest.raises(error, match=f"TrainConfig.{field}"):
        lc.TrainConfig(**kwargs)


def test_weights_that_overflow_are_never_checkpointed(text_data, tmp_path: Path) -> None:
    """A huge lr gives finite loss and grad norm but inf weights after the update: the step that did it
    raises, and the checkpoint on disk stays the last good (finite) one."""
    model = lc.TinyCausalLM()
    big = {"on": False}

    def on_step(step: int, metrics: dict) -> None:
        big["on"] = step == 2

    cfg = quick(output_dir=tmp_path / "run", checkpoint_every=1, on_step=on_step, weight_decay=0.0)
    original_step = torch.optim.AdamW.step

    def exploding_step(self, *args, **kwargs):  # the update of step 3 overflows (as lr=1e30 would)
        out = original_step(self, *args, **kwargs)
        if big["on"]:
            with torch.no_grad():
                next(iter(self.param_groups[0]["params"])).mul_(float("inf"))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", exploding_step)
        with pytest.raises(lc.TrainingDiverged, match=r"step 3 .*checkpoint.pt \(step 2\)"):
            lc.train(model, text_data[0], config=cfg)
    state = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_data_without_any_target_is_refused(text_data) -> None:
    held_out = text_data[0]
    no_targets = PackedDataset(held_out.input_ids, torch.full_like(held_out.labels, -100))
    with pytest.raises(ValueError, match="no target"):  # it used to report a loss of 0.0 for every step
        lc.train(lc.TinyCausalLM(), no_targets, config=quick(max_steps=2))

    class Plain(torch.utils.data.Dataset):  # not a PackedDataset: the check reads the examples
        def __len__(self) -> int:
            return len(no_targets)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return no_targets[i]

    with pytest.raises(ValueError, match="no target"):
        lc.train(lc.TinyCausalLM(), Plain(), config=quick(max_steps=2))


def test_too_little_data_or_nothing_to_train(text_data) -> None:
    with pytest.raises(ValueError, match="fewer than one global batch"):
        lc.train(lc.TinyCausalLM(), text_data[1].subset(slice(0, 2)), config=quick(batch_size=4))
    held_out = text_data[1]
    no_targets = PackedDataset(held_out.input_ids, torch.full_like(held_out.labels, -100))
    with pytest.raises(ValueError, match="no target"):  # not a loss of 0, which reads as a perfect model
        lc.evaluate(lc.TinyCausalLM(), no_targets)
    frozen = lc.TinyCausalLM().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        lc.train(frozen, text_data[0], config=quick())


def test_chunked_loss_on_a_transformers_llama_matches_the_logits_path() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (8, 16), generator=gen)
    labels = ids.clone()
    labels[::2, :9] = -100  # prompt-style masking on half the examples
    data = PackedDataset(ids, labels)
    runs = {}
    for chunked in (True, False):
        torch.manual_seed(0)
        lora = lc.LoraConfig(r=4, target_modules="all-linear")
        model = lc.apply_lora(transformers.LlamaForCausalLM(config), lora)
        head_calls: list[int] = []
        model.lm_head.register_forward_hook(lambda m, i, o, calls=head_calls: calls.append(1))
        cfg = quick(batch_size=2, grad_accum=2, max_steps=3, chunked_loss=chunked)
        before = lc.evaluate(model, data, cfg)
        result = lc.train(model, data, data, cfg)
        assert bool(head_calls) != chunked  # the chunked path reads lm_head.weight, never calls the head
        runs[chunked] = (model, before, result)
    (chunked_model, chunked_before, chunked_result), (logits_model, logits_before, logits_result) = (
        runs[True],
        runs[False],
    )
    with torch.no_grad():
        expected = logits_model(input_ids=ids, labels=labels).loss  # transformers' own loss
    assert logits_result.eval_loss == pytest.approx(float(expected), rel=1e-5)
    assert chunked_before == pytest.approx(logits_before, rel=1e-5)
    assert chunked_result.eval_loss == pytest.approx(logits_result.eval_loss, rel=1e-5)
    train_losses = [[h["loss"] for h in r.history if "loss" in h] for r in (chunked_result, logits_result)]
    assert len(train_losses[0]) == 3 and train_losses[0] == pytest.approx(train_losses[1], rel=1e-5)
    for pa, pb in zip(chunked_model.parameters(), logits_model.parameters()):
        assert_close(pa.detach(), pb.detach())


def test_adamw_is_fused_where_torch_can_fuse_it() -> None:
    """lc.train asks for torch's fused AdamW (one kernel over all adapter tensors) when every trainable
    tensor is floating point on one CPU or CUDA device, and the for-loop one otherwise."""
    from lora_core.training.loop import _can_fuse_adamw

    cpu = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, dtype=torch.bfloat16, requires_grad=True)]
    assert _can_fuse_adamw(cpu)
    assert not _can_fuse_adamw([*cpu, torch.zeros(3, device="meta")])  # two devices
    assert not _can_fuse_adamw([torch.zeros(3, device="meta")])  # not a device fused AdamW runs on
