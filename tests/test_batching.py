"""TRL's batching options on loradem's rows: what each feeds the model, and that padding-free batches train exactly
as padded ones do.

The trainers are built as `loradem.train.sft` builds its own (`trainer_configs`, `trl_rows`), then switched to
one of TRL's batching options: ``padding_free`` (rows concatenated into one sequence, boundaries in
``position_ids``), ``packing`` with best-fit-decreasing bins, and length-grouped sampling. The reference for
every row's tokens and loss mask is `loradem.model.render.encode_row`, which the search and evaluation use.
The last test runs benchmarks/bench_train.py, which measures these options' speed, on the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTTrainer

from loradem.data.demo import task_rows
from loradem.model.render import IGNORE, encode_row
from loradem.recipe import LoraSettings, TrainSettings
from loradem.train.sft import trainer_configs, trl_rows

ROOT = Path(__file__).resolve().parents[1]
MODES = ("padded", "padding_free", "packed", "grouped")


def demo_rows(per_task: int = 8) -> list[dict]:
    """Rows of three demo tasks, of different lengths (30-100 tokens with the tiny tokenizer)."""
    return [row for task in ("addition", "reverse", "sort") for row in task_rows(task, rows=per_task)]


def make_trainer(base: Path, rows: list[dict], mode: str, out: Path, *, attn: str = "sdpa", max_length: int = 256,
                 batch_size: int = 4, steps: int = 2) -> SFTTrainer:
    train = TrainSettings(max_length=max_length, max_steps=steps, batch_size=batch_size, eval_steps=steps)
    sft, lora = trainer_configs(train, LoraSettings(r=4, alpha=8), seed=0, output_dir=out, fmt="messages")
    sft.save_strategy, sft.eval_strategy, sft.load_best_model_at_end = "no", "no", False
    if mode == "padding_free":
        sft.padding_free, sft.max_length = True, None  # TRL refuses max_length here; no demo row comes near it
    elif mode == "packed":
        sft.packing, sft.packing_strategy = True, "bfd"
    elif mode == "grouped":
        sft.train_sampling_strategy = "group_by_length"
    else:
        assert mode == "padded"
    set_seed(0)  # the same LoRA initialisation in every trainer
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation=attn)
    return SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(trl_rows(rows, "messages")),
                      processing_class=AutoTokenizer.from_pretrained(base), peft_config=lora)


def batch_rows(batch: dict) -> list[tuple[tuple, tuple]]:
    """(input_ids, labels) of every row in a collated batch: cut by the attention mask of a padded batch, or at
    the position-id resets of a flattened (padding-free or packed) one."""
    ids, labels = batch["input_ids"], batch["labels"]
    if "attention_mask" in batch:
        out = []
        for i, lab, mask in zip(ids, labels, batch["attention_mask"]):
            keep = mask.bool()
            assert (lab[~keep] == IGNORE).all()  # padding is never scored
            out.append((tuple(i[keep].tolist()), tuple(lab[keep].tolist())))
        return out
    assert ids.shape[0] == 1 and "attention_mask" not in batch
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    for a, b in pairwise(starts):
        assert pos[a:b].tolist() == list(range(b - a))  # each row restarts its positions
    return [(tuple(ids[0, a:b].tolist()), tuple(labels[0, a:b].tolist())) for a, b in pairwise(starts)]


@pytest.mark.parametrize("mode", MODES)
def test_every_batching_feeds_each_row_once_with_exactly_its_prompt_masked(tiny_base, tmp_path, mode):
    rows = demo_rows(16)  # 48 rows: length-grouped sampling sorts megabatches of 12 (3 batches)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    expected = sorted((tuple(ids), tuple(labels)) for ids, labels in (encode_row(r, tok, 256) for r in rows))
    trainer = make_trainer(tiny_base, rows, mode, tmp_path / mode)
    fed, per_batch = [], []
    for batch in trainer.get_train_dataloader():  # one epoch
        got = batch_rows(batch)
        fed += got
        per_batch.append(len(got))
    # every training row once, its tokens and its loss mask exactly the reference's: prompt -100, completion scored
    assert sorted(fed) == expected
    if mode == "packed":  # bins of up to 256 tokens hold two or three rows: more rows per step than batch_size
        assert max(per_batch) > 4 and len(per_batch) < len(rows) / 4
    else:
        assert per_batch == [4] * (len(rows) // 4)
    if mode == "grouped":  # batches formed by length: the padding in a batch is less than at random
        lengths = [[len(ids) for ids, _ in batch_rows(b)] for b in trainer.get_train_dataloader()]
        padded = make_trainer(tiny_base, rows, "padded", tmp_path / "p")
        random = [[len(ids) for ids, _ in batch_rows(b)] for b in padded.get_train_dataloader()]
        assert padding(lengths) < padding(random)


def padding(batches: list[list[int]]) -> int:
    """Pad tokens of batches given as their rows' lengths."""
    return sum(len(b) * max(b) - sum(b) for b in batches)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_padding_free_batch_has_the_loss_and_gradients_of_the_same_rows_padded(tiny_base, tmp_path, attn):
    rows = demo_rows()[::3]
    padded = make_trainer(tiny_base, rows, "padded", tmp_path / "p", attn=attn)
    free = make_trainer(tiny_base, rows, "padding_free", tmp_path / "f", attn=attn)
    # the same, non-zero LoRA weights in both models, so every LoRA factor gets a gradient
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(p.shape, generator=gen) * 0.5 for n, p in padded.model.named_parameters() if "lora_" in n}
    for trainer in (padded, free):
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                if n in state:
                    p.copy_(state[n])
    examples = [padded.train_dataset[i] for i in range(len(rows))]
    assert [free.train_dataset[i]["input_ids"] for i in range(len(rows))] == [e["input_ids"] for e in examples]
    batch_p = padded.data_collator(examples)
    batch_f = free.data_collator([free.train_dataset[i] for i in range(len(rows))])
    assert "attention_mask" in batch_p and "position_ids" in batch_f and batch_f["input_ids"].shape[0] == 1

    loss_p = padded.compute_loss(padded.model, dict(batch_p))
    loss_p.backward()
    loss_f = free.compute_loss(free.model, dict(batch_f))
    loss_f.backward()
    assert loss_f.item() == pytest.approx(loss_p.item(), rel=1e-6)
    grads_p, grads_f = lora_grads(padded.model), lora_grads(free.model)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * 7 * 2
    for n in grads_p:
        assert torch.allclose(grads_f[n], grads_p[n], rtol=1e-4, atol=1e-6), n

    # the control: the same flat sequence with positions running on (no row boundaries) lets rows attend to each
    # other, and moves the loss by far more than the tolerance above
    flat = torch.arange(batch_f["input_ids"].shape[1])[None]
    with torch.no_grad():
        leaked = free.compute_loss(free.model, {"input_ids": batch_f["input_ids"], "labels": batch_f["labels"],
                                                "position_ids": flat})
    assert abs(leaked.item() - loss_p.item()) > 1e-4 * abs(loss_p.item())


def test_padding_free_training_steps_equal_padded_ones_and_count_the_same_tokens(tiny_base, tmp_path):
    """Two optimizer steps end to end: the same rows sampled, the same losses, the same non-padding token count."""
    rows = demo_rows()
    logs = {}
    for mode in ("padded", "padding_free"):
        trainer = make_trainer(tiny_base, rows, mode, tmp_path / mode, steps=2)
        trainer.train()
        logs[mode] = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs["padded"]] == [e["step"] for e in logs["padding_free"]] == [1, 2]
    for p, f in zip(logs["padded"], logs["padding_free"]):
        assert f["num_tokens"] == p["num_tokens"]  # position_ids' length == the attention mask's sum
        assert f["loss"] == pytest.approx(p["loss"], rel=1e-5)


@pytest.mark.slow
def test_the_training_benchmark_compares_like_with_like(tiny_base, tmp_path):
    """benchmarks/bench_train.py: loradem's trainer and the plain TRL script with loradem's settings train the same
    batches to the same losses, and every variant counts the same tokens (non-padding, prompt and completion)."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--base", str(tiny_base), "--steps", "2",
         "--threads", "1", "--variants", "loradem,trl-matched,trl-padding-free,trl,trl-validated", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert results["loradem"]["tokens"] == results["trl-matched"]["tokens"] == results["trl-padding-free"]["tokens"]
    assert results["loradem"]["loss"] == pytest.approx(results["trl-matched"]["loss"], rel=1e-6)
    assert results["trl-padding-free"]["loss"] == pytest.approx(results["trl-matched"]["loss"], rel=1e-5)
    assert results["loradem"]["eval_save"] > 0 and results["trl-matched"]["eval_save"] == 0  # only loradem evaluates
    # ... and the plain script that validates and checkpoints like loradem: same training, plus that work
    assert results["trl-validated"]["tokens"] == results["trl"]["tokens"] == results["loradem"]["tokens"]
    assert results["trl-validated"]["loss"] == results["trl"]["loss"]
    assert results["trl-validated"]["eval_save"] > 0 and results["trl"]["eval_save"] == 0
    assert results["trl-validated"]["per_run"][0]["steps_run"] == 2
    assert "| loradem | 8.0 |" in done.stdout
