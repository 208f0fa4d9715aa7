"""loradem.train.loss: the SFT loss computed on the scored positions only equals TRL's own, in value, LoRA gradients
and logged metrics, and a whole `fit` trains as TRL's path does.

Tolerances: the models are float64 where they can be, so the reference, the model's full logits in float64, is
matched to 1e-12; TRL's fused head folds its logit tiles in float32 whatever the model's dtype, so TRL's values are
matched to float32 precision (relative 1e-6 for losses and entropy; gradients within 2e-6 of each tensor's largest
element). NF4 and `fit` run in
float32 (bitsandbytes and TRL's trainer as loradem uses them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, set_seed
from trl import SFTTrainer

from loradem.data.demo import task_rows
from loradem.errors import LorademError
from loradem.model.render import IGNORE
from loradem.recipe import LoraSettings, TrainSettings
from loradem.train import loss
from loradem.train.loss import LossPositionsSFTTrainer, accepts_logits_to_keep
from loradem.train.sft import fit, load_base_model, trainer_configs, trl_rows


def rows(per_task: int = 4) -> list[dict]:
    return [r for task in ("addition", "reverse", "sort") for r in task_rows(task, rows=per_task)]


def make(cls, base: Path, out: Path, *, dtype=torch.float64, nf4: bool = False, **settings):
    """A trainer as `sft.fit` configures one (no saves or evaluations), with a non-zero LoRA (every factor gets a
    gradient), the same in every trainer made."""
    train = TrainSettings(max_length=256, max_steps=2, batch_size=4, eval_steps=2,
                          quantization="nf4" if nf4 else "none", **settings)
    sft, lora = trainer_configs(train, LoraSettings(r=4, alpha=8), seed=0, output_dir=out, fmt="messages")
    sft.save_strategy, sft.eval_strategy, sft.load_best_model_at_end = "no", "no", False
    model = load_base_model(base, train) if nf4 else AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    set_seed(0)
    trainer = cls(model=model, args=sft, train_dataset=Dataset.from_list(trl_rows(rows(), "messages")),
                  processing_class=AutoTokenizer.from_pretrained(base), peft_config=lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return trainer


def batch_of(trainer) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def reference_loss(model, batch: dict, num_items=None) -> torch.Tensor:
    """The summed cross-entropy of the scored next tokens from the model's full logits, over `num_items` or the
    scored count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                              reduction="sum")
    return total / (num_items if num_items is not None else (labels != IGNORE).sum())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("num_items", [None, 97])
def test_the_loss_and_lora_gradients_equal_trls_and_the_full_logits(tiny_base, tmp_path, checkpointing, num_items):
    ours = make(LossPositionsSFTTrainer, tiny_base, tmp_path / "a", gradient_checkpointing=checkpointing)
    trl = make(SFTTrainer, tiny_base, tmp_path / "b", gradient_checkpointing=checkpointing)
    ref = make(SFTTrainer, tiny_base, tmp_path / "c", gradient_checkpointing=checkpointing)
    batch = batch_of(ours)
    scored = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert 0 < scored < 0.5 * int(batch["attention_mask"].sum())  # completion-only: most positions are not scored
    assert ours.scored_path_refusal(ours.model, dict(batch)) is None
    n = None if num_items is None else torch.tensor(num_items)

    loss_ours = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=n)
    loss_trl = trl.compute_loss(trl.model, dict(batch), num_items_in_batch=n)
    loss_ref = reference_loss(ref.model, batch, n)
    for x in (loss_ours, loss_trl, loss_ref):
        x.backward()
    assert loss_ours.dtype == torch.float64
    assert loss_ours.item() == pytest.approx(loss_ref.item(), rel=1e-12)
    assert loss_ours.item() == pytest.approx(loss_trl.item(), rel=1e-6)
    if num_items is not None:  # summed over the batch's scored tokens, divided by the step's count
        assert loss_ours.item() == pytest.approx(reference_loss(ref.model, batch).item() * scored / num_items, rel=1e-12)

    g_ours, g_trl, g_ref = lora_grads(ours.model), lora_grads(trl.model), lora_grads(ref.model)
    assert g_ours.keys() == g_trl.keys() == g_ref.keys() and len(g_ours) == 2 * 7 * 2
    for name in g_ours:
        assert g_ours[name].abs().max() > 0, name
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-10, atol=1e-14, msg=name)
        # TRL's float32 fold: off by up to ~6e-7 of the tensor's largest element (element-wise up to 6e-4)
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=0, atol=2e-6 * g_trl[name].abs().max().item(),
                                   msg=name)


def test_the_logged_metrics_equal_trls_in_training_and_evaluation(tiny_base, tmp_path):
    ours = make(LossPositionsSFTTrainer, tiny_base, tmp_path / "a")
    trl = make(SFTTrainer, tiny_base, tmp_path / "b")
    batch = batch_of(ours)
    # every other scored label set to the model's own first choice, so the accuracy is neither 0 nor 1
    with torch.no_grad():
        guess = ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    scored = (batch["labels"][:, 1:] != IGNORE).nonzero()
    for i, t in scored[::2].tolist():
        batch["labels"][i, t + 1] = guess[i, t]
    for mode in ("train", "eval"):
        for trainer in (ours, trl):
            trainer.model.train(mode == "train")
            trainer.compute_loss(trainer.model, dict(batch))
        got, want = ours._metrics[mode], trl._metrics[mode]
        assert got.keys() == want.keys() == {"entropy", "mean_token_accuracy", "num_tokens"}
        assert 0.3 < want["mean_token_accuracy"][0] < 1
        assert got["mean_token_accuracy"] == want["mean_token_accuracy"]
        assert got["entropy"][0] == pytest.approx(want["entropy"][0], rel=1e-6)
        assert got["num_tokens"] == want["num_tokens"]
    assert ours._metrics["train"]["num_tokens"] == [int(batch["attention_mask"].sum())]  # evaluation adds none


def test_a_batch_with_no_scored_token_gives_a_zero_loss_that_still_backpropagates(tiny_base, tmp_path):
    ours = make(LossPositionsSFTTrainer, tiny_base, tmp_path / "a")
    batch = batch_of(ours)
    batch["labels"][:] = IGNORE
    value = ours.compute_loss(ours.model, dict(batch))
    value.backward()
    assert value.item() == 0.0
    assert all(g.abs().max() == 0 for g in lora_grads(ours.model).values())
    assert ours._metrics["train"]["mean_token_accuracy"] == [0.0]


@pytest.mark.slow
def test_nf4_loss_and_gradients_equal_trls(tiny_base_tied, tmp_path):
    ours = make(LossPositionsSFTTrainer, tiny_base_tied, tmp_path / "a", nf4=True)
    trl = make(SFTTrainer, tiny_base_tied, tmp_path / "b", nf4=True)
    assert type(ours.model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    batch = batch_of(ours)
    assert ours.scored_path_refusal(ours.model, dict(batch)) is None
    loss_ours = ours.compute_loss(ours.model, dict(batch))
    loss_trl = trl.compute_loss(trl.model, dict(batch))
    loss_ours.backward()
    loss_trl.backward()
    assert loss_ours.item() == pytest.approx(loss_trl.item(), rel=1e-5)
    g_ours, g_trl = lora_grads(ours.model), lora_grads(trl.model)
    assert g_ours.keys() == g_trl.keys() and g_ours
    for name in g_ours:
        # bitsandbytes' CPU kernels round to bfloat16 steps: the paths differ by at most one element's last bits
        # (measured: 4.7e-5 of the tensor's largest element, one LoRA factor; every other one is equal)
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=0, atol=2e-4 * g_trl[name].abs().max().item(),
                                   msg=name)


class NoLogitsToKeep(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs.pop("logits_to_keep", None)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_trls_path_is_taken_where_the_scored_path_does_not_apply(tiny_base, tmp_path):
    ours = make(LossPositionsSFTTrainer, tiny_base, tmp_path / "a")
    batch = batch_of(ours)
    assert accepts_logits_to_keep(ours.model) and ours.scored_path_refusal(ours.model, dict(batch)) is None
    free = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert "padding-free" in ours.scored_path_refusal(ours.model, free)
    assert "pre-shifted" in ours.scored_path_refusal(ours.model, {**batch, "shift_labels": batch["labels"]})
    assert "full outputs" in ours.scored_path_refusal(ours.model, dict(batch), return_outputs=True)

    everything = make(LossPositionsSFTTrainer, tiny_base, tmp_path / "b", completion_only_loss=False)
    trl = make(SFTTrainer, tiny_base, tmp_path / "c", completion_only_loss=False)
    full = batch_of(everything)
    assert "completion_only_loss" in everything.scored_path_refusal(everything.model, dict(full))
    assert everything.compute_loss(everything.model, dict(full)).item() == trl.compute_loss(trl.model, dict(full)).item()

    plain = NoLogitsToKeep.from_pretrained(tiny_base)
    assert not accepts_logits_to_keep(plain)
    assert accepts_logits_to_keep(AutoModelForCausalLM.from_pretrained(tiny_base))


@pytest.mark.slow
def test_fit_trains_as_trls_path_does(tiny_base, tmp_path, monkeypatch):
    """Six optimizer steps with three evaluations through `sft.fit`: the same train and validation losses, and the
    same token count, as with TRL's own loss (float32; the difference is TRL's float32 tile fold against
    log_softmax, accumulated over the steps)."""
    train = TrainSettings(max_length=256, max_steps=6, batch_size=4, eval_steps=2, learning_rate=5e-3)
    data = rows(8)

    def run(name: str) -> dict:
        return fit(name, tiny_base, train, LoraSettings(r=4, alpha=8), seed=0, fmt="messages",
                   train_rows=data[:18], val_rows=data[18:], out=tmp_path / name, log=lambda _: None)

    calls = []
    real = loss.scored_loss
    monkeypatch.setattr(loss, "scored_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = run("ours")
    assert len(calls) == 6 + 3 * 2  # every training batch, and every evaluation batch (6 rows, 2 batches of 4)
    def trls(*args, anchor_kl: bool, **kwargs):  # what fit builds, as TRL's own trainer (no anchor rows here)
        assert anchor_kl is False
        return SFTTrainer(*args, **kwargs)

    monkeypatch.setattr(loss, "LossPositionsSFTTrainer", trls)
    theirs = run("theirs")
    assert len(calls) == 12

    def curve(record: dict, key: str) -> list[tuple[int, float]]:
        return [(h["step"], h[key]) for h in record["history"] if key in h]

    for key in ("train_loss", "eval_loss"):
        got, want = curve(ours, key), curve(theirs, key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) == (6 if key == "train_loss" else 3)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), key
    assert want[0][1] > want[-1][1]  # it learned: the validation loss fell
    assert (ours["best_step"], ours["train_tokens"]) == (theirs["best_step"], theirs["train_tokens"])
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["r"] == 4


def test_learned_weights_loss_equals_the_models_own_full_logits_loss(tiny_base, tmp_path):
    """`merge.learn`'s training loss, the cross-entropy of `scored_logits`, against transformers' own (labels=)."""
    from loradem.model.generate import collate_right, scored_logits
    from loradem.model.render import encode_for_loss

    trainer = make(SFTTrainer, tiny_base, tmp_path / "a")
    model = trainer.model
    encoded = encode_for_loss(rows(), AutoTokenizer.from_pretrained(tiny_base), 256)
    ids, mask, labels = collate_right(encoded, torch.device("cpu"))
    ours = torch.nn.functional.cross_entropy(*scored_logits(model, ids, mask, labels))
    ours.backward()
    g_ours = lora_grads(model)
    model.zero_grad()
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    for name, g in lora_grads(model).items():
        torch.testing.assert_close(g_ours[name], g, rtol=1e-10, atol=1e-14, msg=name)


# ---- KL anchoring -------------------------------------------------------------------

def make_anchored(base: Path, out: Path, **settings):
    """`make`'s trainer with anchor_kl on and every other row tagged an anchor row."""
    train = TrainSettings(max_length=256, max_steps=2, batch_size=4, eval_steps=2, **settings)
    sft, lora = trainer_configs(train, LoraSettings(r=4, alpha=8), seed=0, output_dir=out, fmt="messages")
    sft.save_strategy, sft.eval_strategy, sft.load_best_model_at_end = "no", "no", False
    tagged = [{**r, loss.ANCHOR_TAG: i % 2 == 1} for i, r in enumerate(trl_rows(rows(), "messages"))]
    set_seed(0)
    return LossPositionsSFTTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), args=sft,
                                   train_dataset=Dataset.from_list(tagged),
                                   processing_class=AutoTokenizer.from_pretrained(base), peft_config=lora,
                                   anchor_kl=True)


def randomize_lora(model) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)


def reference_anchored_loss(model, batch: dict) -> torch.Tensor:
    """From full logits: cross-entropy at the source rows' scored positions, KL(base ‖ model) at the anchor rows',
    summed over the scored count."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    log_q = model(**inputs).logits[:, :-1].log_softmax(-1)
    with torch.no_grad(), model.disable_adapter():
        log_p = model(**inputs).logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    total = log_q.new_zeros(())
    for i, t in (labels != IGNORE).nonzero().tolist():
        if batch[loss.ANCHOR_TAG][i]:
            total = total + (log_p[i, t].exp() * (log_p[i, t] - log_q[i, t])).sum()
        else:
            total = total - log_q[i, t, labels[i, t]]
    return total / (labels != IGNORE).sum()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_kl_anchor_rows_are_scored_by_kl_to_the_base_and_source_rows_by_cross_entropy(tiny_base, tmp_path,
                                                                                       checkpointing):
    ours = make_anchored(tiny_base, tmp_path / "a", gradient_checkpointing=checkpointing)
    ref = make_anchored(tiny_base, tmp_path / "b")
    for trainer in (ours, ref):
        randomize_lora(trainer.model)
    batch = batch_of(ours)
    assert batch[loss.ANCHOR_TAG].tolist() == [i % 2 == 1 for i in range(len(ours.train_dataset))]
    loss_ours = ours.compute_loss(ours.model, dict(batch))
    loss_ref = reference_anchored_loss(ref.model, batch)
    loss_ours.backward()
    loss_ref.backward()
    assert loss_ours.item() == pytest.approx(loss_ref.item(), rel=1e-12)
    plain = make(LossPositionsSFTTrainer, tiny_base, tmp_path / "c")  # the same rows, all scored by cross-entropy
    assert abs(plain.compute_loss(plain.model, batch_of(plain)).item() - loss_ours.item()) > 1e-3
    g_ours, g_ref = lora_grads(ours.model), lora_grads(ref.model)
    for name in g_ours:
        assert g_ours[name].abs().max() > 0, name
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-10, atol=1e-14, msg=name)
    kl = ours._metrics["train"]["anchor_kl"]
    assert len(kl) == 1 and kl[0] > 0


def test_kl_anchor_rows_cost_nothing_while_the_adapter_is_the_base(tiny_base, tmp_path):
    trainer = make_anchored(tiny_base, tmp_path / "a")  # PEFT's init: B = 0, so the model is the base
    batch = batch_of(trainer)
    batch[loss.ANCHOR_TAG][:] = True
    value = trainer.compute_loss(trainer.model, dict(batch))
    value.backward()
    assert value.item() == 0.0
    assert max(g.abs().max().item() for g in lora_grads(trainer.model).values()) < 1e-12
    assert trainer._metrics["train"]["anchor_kl"] == [0.0]


def test_kl_anchor_rows_refuse_trls_own_path(tiny_base, tmp_path):
    trainer = make_anchored(tiny_base, tmp_path / "a", completion_only_loss=False)
    with pytest.raises(LorademError, match=r"^anchor.loss: kl needs loradem's scored-positions loss, and this batch "
                                           r"cannot take it: completion_only_loss is off: every token is scored; "
                                           r"use anchor.loss: sft$"):
        trainer.compute_loss(trainer.model, batch_of(trainer))
