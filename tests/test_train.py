"""loradem.train.sft: one adapter per source, the best validation checkpoint kept, cached by key, atomic on failure.

Training tests use the tiny Llama fixture on the CPU, a few optimizer steps each. The stage takes `TrainJob`s;
most tests build them from a recipe through `pipeline.train_jobs`, one builds its job by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import loradem
from loradem import pipeline
from loradem.data.demo import task_rows
from loradem.data.rows import Splits
from loradem.errors import LorademError
from loradem.files import fingerprint_weights
from loradem.recipe import LoraSettings, Recipe, TrainSettings
from loradem.train.sft import (
    FINISHED_FILES,
    TrainJob,
    adapter_dir,
    adapter_key,
    is_finished,
    plot_curve,
    train_all,
    train_source,
    trainer_configs,
    trl_rows,
)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def recipe_dict(tmp_path: Path, base: Path, sources: list[dict], **train) -> dict:
    return {
        "name": "t",
        "base": str(base),
        "adapters_dir": str(tmp_path / "adapters"),
        "train": {"max_steps": 2, "eval_steps": 1, "batch_size": 4, **train},
        "sources": sources,
    }


def make_recipe(tmp_path: Path, base: Path, sources: list[dict], **train) -> Recipe:
    return Recipe.model_validate(recipe_dict(tmp_path, base, sources, **train))


def jobs(recipe: Recipe, only: list[str] | None = None) -> list[TrainJob]:
    return pipeline.train_jobs(recipe, pipeline._splits(recipe), only=only)


def job(recipe: Recipe, name: str = "addition") -> TrainJob:
    return jobs(recipe, only=[name])[0]


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def addition_source(tmp_path: Path, rows: int = 12, **kw) -> dict:
    data = write_jsonl(tmp_path / "addition.jsonl", task_rows("addition", rows=rows))
    return {"name": "addition", "data": data, "validation": 2, "test": 2, **kw}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def lines(log: list[str], word: str) -> list[str]:
    return [line for line in log if word in line]


class Snapshot(TrainerCallback):
    """Copies of every parameter at the start and end of training, and of the LoRA state after each evaluation."""

    def __init__(self):
        self.begin, self.end, self.at_eval = {}, {}, {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.begin = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.end = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_evaluate(self, args, state, control, model=None, **kw):
        from peft import get_peft_model_state_dict

        self.at_eval[state.global_step] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


class Reverse(TrainerCallback):
    """After step `after`, flip and amplify every lora_B (-5x what was learned) so later validation losses get worse."""

    def __init__(self, after: int):
        self.after = after

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == self.after:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.mul_(-5.0)


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        raise RuntimeError("boom at step %d" % state.global_step)


# ---- pure parts ---------------------------------------------------------

def test_adapter_key_depends_on_what_shapes_the_weights(tmp_path, tiny_base):
    src = addition_source(tmp_path)
    other = {**src, "name": "other"}
    r = make_recipe(tmp_path, tiny_base, [src, other])
    a, o = jobs(r)
    key = adapter_key(a, "base")
    assert key == adapter_key(a, "base") and len(key) == 12
    assert adapter_dir(a, key) == tmp_path / "adapters" / f"addition-{key}"
    assert adapter_key(a, "base2") != key
    assert adapter_key(replace(a, splits=replace(a.splits, fingerprint="data2")), "base") != key
    r_lr = make_recipe(tmp_path, tiny_base, [src, {**other, "train": {"learning_rate": 5e-3}}])
    assert adapter_key(jobs(r_lr)[0], "base") == key  # another source's override
    assert adapter_key(jobs(r_lr)[1], "base") != adapter_key(o, "base")
    assert adapter_key(job(make_recipe(tmp_path, tiny_base, [src], learning_rate=5e-3)), "base") != key
    assert adapter_key(job(make_recipe(tmp_path, tiny_base, [{**src, "lora": {"r": 4}}])), "base") != key
    assert adapter_key(job(r.model_copy(update={"seed": 1})), "base") != key
    # the same settings by hand give the same key; disabled anchor settings shape nothing
    by_hand = TrainJob(source="addition", splits=a.splits, train=TrainSettings(max_steps=2, eval_steps=1, batch_size=4),
                       lora=LoraSettings(), seed=0, adapters_dir=str(tmp_path / "adapters"), base_name="anything")
    assert adapter_key(by_hand, "base") == key and adapter_dir(by_hand, key) == adapter_dir(a, key)
    anchored = replace(by_hand, anchor=r.anchor.model_copy(update={"enabled": True}))
    assert adapter_key(anchored, "base") != key
    assert adapter_key(replace(by_hand, anchor=r.anchor.model_copy(update={"fraction": 0.5})), "base") == key
    with pytest.raises(ValueError, match=r"splits are for source 'addition', not 'other'"):
        replace(by_hand, source="other")


def test_trainer_configs_map_every_setting(tmp_path, tiny_base):
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path)], max_steps=None, epochs=2.0, eval_steps=5,
                    grad_accum=2, learning_rate=3e-4, lr_scheduler="cosine", warmup_ratio=0.1, max_length=64)
    s = r.sources[0]
    sft, lora = trainer_configs(r.train_for(s), r.lora_for(s), seed=7, output_dir=tmp_path / "x", fmt="messages")
    assert (sft.max_steps, sft.num_train_epochs, sft.learning_rate, sft.gradient_accumulation_steps) == (-1, 2.0, 3e-4, 2)
    assert (sft.eval_steps, sft.save_steps, sft.load_best_model_at_end, sft.metric_for_best_model) == (5, 5, True, "eval_loss")
    assert (sft.max_length, sft.seed, sft.warmup_steps, sft.report_to) == (64, 7, 0.1, [])
    assert sft.lr_scheduler_type.value == "cosine" and sft.completion_only_loss is True
    if not torch.cuda.is_available():
        assert sft.use_cpu and not sft.bf16 and not sft.fp16
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.use_rslora) == (8, 16.0, "all-linear", False)
    sft_text, _ = trainer_configs(r.train_for(s), r.lora_for(s), seed=7, output_dir=tmp_path / "x", fmt="text")
    assert sft_text.completion_only_loss is False  # text rows have no completion


def test_trl_rows_are_conversational_prompt_completion():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert trl_rows([row], "messages") == [{"prompt": [row["messages"][0]], "completion": [row["messages"][1]]}]
    assert trl_rows([{"prompt": "p", "completion": "c"}], "prompt_completion") == [{"prompt": "p", "completion": "c"}]


def test_no_validation_rows_is_refused_before_training(tmp_path, tiny_base):
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path, validation=0)])
    with pytest.raises(LorademError, match=r"source 'addition': no validation rows; the best checkpoint is chosen on them"):
        train_all(jobs(r), tiny_base, log=lambda _: None)
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


def test_unknown_source_names_are_refused(tmp_path, tiny_base):
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path)])
    with pytest.raises(LorademError, match=r"--force nope: no source named 'nope' \(have: addition\)"):
        train_all(jobs(r), tiny_base, force=["nope"], log=lambda _: None)
    path = write_recipe(tmp_path, recipe_dict(tmp_path, tiny_base, [addition_source(tmp_path)]))
    with pytest.raises(LorademError, match=r"no source named 'nope' \(have: addition\)"):
        pipeline.train(path, only=["nope"])


def test_train_checks_every_source_and_variant_before_training_the_first(tmp_path, tiny_base):
    good = addition_source(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                   + "\n" + json.dumps({"messages": "not a list"}) + "\n")
    raw = recipe_dict(tmp_path, tiny_base, [good, {"name": "second", "data": str(bad), "validation": 0}])
    with pytest.raises(LorademError, match=r"bad.jsonl: row 2: expected a \"messages\" row"):
        pipeline.train(write_recipe(tmp_path, raw))
    assert not (tmp_path / "adapters").exists()  # the first source was not trained

    pc = {"name": "pc", "validation": 2, "test": 0, "data": write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": f"{i} + 1 =", "completion": str(i + 1)} for i in range(10)])}
    raw = {**recipe_dict(tmp_path, tiny_base, [good, pc]), "variants": [{"name": "anchored", "anchor": {"enabled": True}}]}
    with pytest.raises(LorademError, match=r"variant 'anchored': source 'pc': anchored training needs messages rows"):
        pipeline.train(write_recipe(tmp_path, raw))
    assert not (tmp_path / "adapters").exists()

    # what TRL's config refuses, on the second source, also fails before the first one trains
    raw = recipe_dict(tmp_path, tiny_base, [good, {**pc, "train": {"optimizer": "no_such_optimizer"}}])
    with pytest.raises(LorademError, match=r"source 'pc': train settings: transformers refuses them: no_such_optimizer is not"):
        pipeline.train(write_recipe(tmp_path, raw))
    assert not (tmp_path / "adapters").exists()


def test_outputs_name_their_base_portably(tmp_path):
    from loradem.model.base import portable_name

    assert portable_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("org/model") == "org/model"
    folder = tmp_path / "my-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/models/x"}))
    assert portable_name(str(folder)) == "my-base"  # a recorded path is not a hub id either
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert portable_name(str(folder)) == "meta-llama/Llama-3.2-1B"


def test_the_curve_is_a_png_drawn_without_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    hist = [{"step": 1, "train_loss": 2.0}, {"step": 1, "eval_loss": 2.1}, {"step": 2, "train_loss": 1.5},
            {"step": 2, "eval_loss": 1.7}]
    plot_curve(hist, tmp_path / "curve.png", title="addition (k)", best_step=2)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == []  # no pyplot figure left open


# ---- training -------------------------------------------------------------

@pytest.mark.slow
def test_trained_adapter_loads_and_only_lora_weights_moved(tmp_path, tiny_base, capsys):
    # a job built by hand, no recipe: 8 training rows, batch 4, one epoch: every row is fed exactly once in 2 steps
    rows = task_rows("addition", rows=12)
    splits = Splits("addition", "messages", rows[:8], rows[8:10], rows[10:], fingerprint="addition-data")
    train = TrainSettings(max_steps=None, epochs=1.0, eval_steps=1, batch_size=4)
    addition = TrainJob(source="addition", splits=splits, train=train, lora=LoraSettings(), seed=0,
                      adapters_dir=tmp_path / "adapters", base_name=str(tiny_base))
    snap, log = Snapshot(), []
    folder = train_source(addition, tiny_base, log=log.append, callbacks=[snap])

    # README.md (the adapter's card for a hub) is written but not required: older adapters without it stay finished
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FINISHED_FILES, "README.md"]) and is_finished(folder)
    assert not list(folder.parent.glob(".*partial*"))
    record = json.loads((folder / "loradem-train.json").read_text())
    key = adapter_key(addition, fingerprint_weights(tiny_base))
    assert folder == adapter_dir(addition, key) == tmp_path / "adapters" / f"addition-{key}" and record["key"] == key
    assert (record["source"], record["steps"], record["train_rows"], record["validation_rows"]) == ("addition", 2, 8, 2)
    bar = capsys.readouterr().err  # one progress bar, in optimizer steps
    assert "train addition" in bar and "2/2" in bar and "step" in bar

    # tokens: the non-padding tokens of the 8 rows, each fed once
    tok = AutoTokenizer.from_pretrained(tiny_base)
    expected = sum(len(tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"]) for row in splits.train)
    assert record["train_tokens"] == expected
    base_numel = sum(t.numel() for t in load_file(str(tiny_base / "model.safetensors")).values())
    lora_numel = sum(t.numel() for t in tensors(folder).values())
    assert record["n_params"] == base_numel + lora_numel
    assert record["flops_estimate"] == 6 * record["n_params"] * expected

    # LoRA weights moved from their init (B starts at zero); base weights did not move and equal the file
    base_file = load_file(str(tiny_base / "model.safetensors"))
    lora_names = [n for n in snap.begin if "lora_" in n]
    assert len(lora_names) == 2 * 7 * 2  # A and B, 7 linear modules, 2 layers
    for n in lora_names:
        assert not torch.equal(snap.begin[n], snap.end[n]), n
    for n in snap.begin:
        if "lora_" not in n:
            assert torch.equal(snap.begin[n], snap.end[n]), n
            file_key = n.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(snap.end[n], base_file[file_key]), n

    # PEFT loads it onto the base, with exactly the saved tensors, and it changes the outputs
    from peft import PeftModel, get_peft_model_state_dict

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 123 + 456?"}],
                                                add_generation_prompt=True, tokenize=True)["input_ids"]])
    with torch.no_grad():
        before = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(folder))
    loaded = get_peft_model_state_dict(peft_model)
    saved = tensors(folder)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, before)

    # no path of this machine travels with the adapter: PEFT's config names the base portably
    config_text = (folder / "adapter_config.json").read_text()
    assert json.loads(config_text)["base_model_name_or_path"] == "base" and str(tmp_path) not in config_text
    assert str(tiny_base.parent) not in (folder / "vector.json").read_text()

    # the vector card: the contract card.py reads
    card = json.loads((folder / "vector.json").read_text())
    assert card == {
        "loradem_vector": 1,
        "source": "addition",
        "base": {"name": "base", "fingerprint": fingerprint_weights(tiny_base)},  # the folder's name, not its path
        "data": {"fingerprint": splits.fingerprint, "rows": {"train": 8, "validation": 2, "test": 2}, "format": "messages"},
        "train": train.model_dump(),
        "lora": LoraSettings().model_dump(),
        "metrics": {"best_val_loss": record["best_val_loss"], "best_step": record["best_step"], "steps": 2,
                    "train_tokens": expected},
        "adapter_sha256": hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest(),
        "loradem_version": loradem.__version__,
    }
    assert record["stopped_early"] is False and (record["max_steps"], record["world_size"]) == (2, 1)

    # history and the kept step
    evals = [(h["step"], h["eval_loss"]) for h in record["history"] if "eval_loss" in h]
    assert [s for s, _ in evals] == [1, 2]
    assert [h["step"] for h in record["history"] if "train_loss" in h] == [1, 2]
    assert (record["best_step"], record["best_val_loss"]) == min(evals, key=lambda e: e[1])
    assert lines(log, "step 1/2: train loss") and lines(log, "step 2/2: train loss")


@pytest.mark.slow
def test_the_saved_adapter_is_the_best_validation_checkpoint(tmp_path, tiny_base):
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path, rows=40)], max_steps=6, eval_steps=2)
    snap = Snapshot()
    folder = train_source(job(r), tiny_base, log=lambda _: None, callbacks=[snap, Reverse(after=2)])
    record = json.loads((folder / "loradem-train.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in record["history"] if "eval_loss" in h}
    assert sorted(evals) == [2, 4, 6]
    assert evals[2] < min(evals[4], evals[6])  # the reversal made later checkpoints worse
    assert (record["best_step"], record["best_val_loss"], record["steps"]) == (2, evals[2], 6)
    assert record["stopped_early"] is False  # no patience set: every step runs
    saved = tensors(folder)
    assert saved.keys() == snap.at_eval[2].keys()
    assert all(torch.equal(saved[k], snap.at_eval[2][k]) for k in saved)  # step 2's weights, exactly
    assert not all(torch.equal(saved[k], snap.at_eval[6][k]) for k in saved)
    assert (folder / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_nf4_training_runs_and_saves(tmp_path, tiny_base_tied):
    r = make_recipe(tmp_path, tiny_base_tied, [addition_source(tmp_path)], quantization="nf4")
    folder = train_all(jobs(r), tiny_base_tied, log=lambda _: None)["addition"]
    record = json.loads((folder / "loradem-train.json").read_text())
    assert record["train"]["quantization"] == "nf4" and record["steps"] == 2
    saved = tensors(folder)
    b = [t for k, t in saved.items() if "lora_B" in k]
    assert len(b) == 14 and all(t.abs().sum() > 0 for t in b)  # B started at zero and was trained
    assert all(torch.isfinite(t).all() for t in saved.values())

    from peft import PeftModel

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_tied), str(folder))


@pytest.mark.slow
def test_finished_adapters_are_reused_and_a_changed_source_retrains_alone(tmp_path, tiny_base):
    sources = [
        addition_source(tmp_path),
        {"name": "pc", "validation": 2, "test": 0, "data": write_jsonl(
            tmp_path / "pc.jsonl", [{"prompt": f"{i} + 1 =", "completion": str(i + 1)} for i in range(10)])},
        {"name": "txt", "validation": 2, "test": 0, "data": write_jsonl(
            tmp_path / "txt.jsonl", [{"text": f"the number {i} comes before {i + 1}"} for i in range(10)])},
    ]
    r = make_recipe(tmp_path, tiny_base, sources, max_steps=1)
    log: list[str] = []
    first = train_all(jobs(r), tiny_base, log=log.append)
    assert len(lines(log, ": trained -> ")) == 3 and not lines(log, "skipped")
    before = {name: digest(folder) for name, folder in first.items()}

    log.clear()
    second = train_all(jobs(r), tiny_base, log=log.append)
    assert second == first
    assert sorted(lines(log, "skipped")) == sorted(f"{n}: skipped (finished adapter {p})" for n, p in first.items())
    assert not lines(log, "trained")
    assert {name: digest(folder) for name, folder in second.items()} == before

    # an adapter finished before cards existed (all but vector.json) is reused and gets its card back
    card = (first["txt"] / "vector.json").read_text()
    (first["txt"] / "vector.json").unlink()
    log.clear()
    assert train_all(jobs(r, only=["txt"]), tiny_base, log=log.append) == {"txt": first["txt"]}
    assert lines(log, "txt: skipped") and not lines(log, "trained")
    assert json.loads((first["txt"] / "vector.json").read_text()) == json.loads(card)

    changed = make_recipe(tmp_path, tiny_base, [sources[0], {**sources[1], "train": {"learning_rate": 5e-3}}, sources[2]],
                          max_steps=1)
    log.clear()
    third = train_all(jobs(changed), tiny_base, log=log.append)
    assert [line.split(":")[0] for line in lines(log, ": trained -> ")] == ["pc"]
    assert third["addition"] == first["addition"] and third["txt"] == first["txt"]
    assert third["pc"] != first["pc"] and digest(first["pc"]) == before["pc"]  # the old one is kept
    assert json.loads((third["pc"] / "loradem-train.json").read_text())["train"]["learning_rate"] == 5e-3

    log.clear()
    assert train_all(jobs(r, only=["txt"]), tiny_base, force=["txt"], log=log.append) == {"txt": first["txt"]}
    assert [line.split(":")[0] for line in lines(log, ": trained -> ")] == ["txt"]
    # seeded: retraining the same key gives the same weights, bit for bit
    assert digest(first["txt"])["adapter_model.safetensors"] == before["txt"]["adapter_model.safetensors"]


@pytest.mark.slow
def test_a_failure_mid_training_leaves_no_adapter_and_keeps_the_old_one(tmp_path, tiny_base):
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path)])
    source = job(r)
    adapters = tmp_path / "adapters"
    with pytest.raises(RuntimeError, match="boom at step 1"):
        train_source(source, tiny_base, log=lambda _: None, callbacks=[Boom()])
    assert list(adapters.iterdir()) == []  # neither the adapter nor a partial folder

    folder = train_source(source, tiny_base, log=lambda _: None)
    kept = digest(folder)
    with pytest.raises(RuntimeError, match="boom at step 1"):
        train_source(source, tiny_base, force=True, log=lambda _: None, callbacks=[Boom()])
    assert list(adapters.iterdir()) == [folder] and digest(folder) == kept


@pytest.mark.slow
def test_early_stopping_stops_when_validation_loss_rises_and_keeps_the_best(tmp_path, tiny_base):
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path, rows=40)], max_steps=10, eval_steps=2,
                    early_stopping_patience=1)
    snap, log = Snapshot(), []
    folder = train_source(job(r), tiny_base, log=log.append, callbacks=[snap, Reverse(after=2)])
    record = json.loads((folder / "loradem-train.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in record["history"] if "eval_loss" in h}
    assert sorted(evals) == [2, 4] and evals[4] > evals[2]  # one evaluation without improvement, then stop
    assert (record["steps"], record["max_steps"], record["stopped_early"]) == (4, 10, True)
    assert max(h["step"] for h in record["history"]) == 4
    assert (record["best_step"], record["best_val_loss"]) == (2, evals[2])
    saved = tensors(folder)
    assert all(torch.equal(saved[k], snap.at_eval[2][k]) for k in saved)  # step 2's weights, exactly
    assert lines(log, "addition: stopped early at step 4/10 (1 evaluation(s) without a lower validation loss)")
    assert lines(log, "stopped early, val loss")
    card = json.loads((folder / "vector.json").read_text())
    assert card["metrics"]["steps"] == 4 and card["train"]["early_stopping_patience"] == 1


def test_sources_with_a_ready_vector_are_not_trained(tmp_path, tiny_base):
    ready = tmp_path / "shared-vector"
    ready.mkdir()
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path, vector=str(ready))])
    log: list[str] = []
    assert train_all(jobs(r), tiny_base, log=log.append) == {}
    assert log == [f"addition: uses ready vector {ready}"]
    assert not (tmp_path / "adapters").exists()
    with pytest.raises(LorademError, match=r"--force addition: source 'addition' uses a ready vector .*nothing to train"):
        train_all(jobs(r), tiny_base, force=["addition"], log=log.append)
    with pytest.raises(LorademError, match=r"source 'addition' uses a ready vector"):
        train_source(job(r), tiny_base, log=log.append)


# The child trains one source and parks in on_save, right after TRL wrote its first checkpoint into the
# partial folder, until it is killed: the kill lands mid-source by construction, not by timing.
KILLED_CHILD = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from loradem import pipeline
from loradem.recipe import Recipe
from loradem.train.sft import train_all

class Park(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        Path(sys.argv[3]).write_text(str(state.global_step))
        time.sleep(600)

recipe = Recipe.model_validate_json(Path(sys.argv[1]).read_text())
train_all(pipeline.train_jobs(recipe, pipeline._splits(recipe)), Path(sys.argv[2]), callbacks=[Park()])
"""


@pytest.mark.slow
def test_a_killed_run_leaves_no_finished_adapter_and_the_rerun_restarts_cleanly(tmp_path, tiny_base):
    from loradem.pipeline import finished_adapters

    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path, rows=24)], max_steps=4, eval_steps=2)
    final = adapter_dir(job(r), adapter_key(job(r), fingerprint_weights(tiny_base)))
    adapters = tmp_path / "adapters"
    (tmp_path / "recipe.json").write_text(r.model_dump_json(exclude_unset=True))
    parked = tmp_path / "parked"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(tmp_path / "recipe.json"), str(tiny_base), str(parked)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not parked.exists():
            if child.poll() is not None:
                pytest.fail(f"the child exited ({child.returncode}) before its first checkpoint:\n{child.stdout.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        # mid-source: TRL's step-2 checkpoint sits in the partial folder; nothing under the final name
        partials = list(adapters.glob(f".{final.name}.partial-*"))
        assert len(partials) == 1
        assert (partials[0] / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
        assert not final.exists() and not is_finished(final)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    # after the kill: the leftover is there, and no later stage can take it for an adapter
    assert partials[0].is_dir() and not final.exists() and not is_finished(final)
    assert finished_adapters(r, tiny_base, require=False) == {}
    with pytest.raises(LorademError, match=r"no finished adapter for source\(s\) addition"):
        finished_adapters(r, tiny_base)

    # the re-run removes the leftover and trains the source from scratch
    log: list[str] = []
    assert train_all(jobs(r), tiny_base, log=log.append) == {"addition": final}
    assert lines(log, "addition: trained -> ") and not lines(log, "skipped")
    assert list(adapters.iterdir()) == [final] and is_finished(final)
    assert json.loads((final / "loradem-train.json").read_text())["steps"] == 4
    # from scratch: bit for bit the adapter of a run that was never interrupted
    fresh = make_recipe(tmp_path / "fresh", tiny_base, r.model_dump(mode="json", exclude_unset=True)["sources"], max_steps=4, eval_steps=2)
    (tmp_path / "fresh").mkdir()
    clean = train_all(jobs(fresh), tiny_base, log=lambda _: None)["addition"]
    assert clean.name == final.name
    assert digest(clean)["adapter_model.safetensors"] == digest(final)["adapter_model.safetensors"]
    assert json.loads((clean / "vector.json").read_text()) == json.loads((final / "vector.json").read_text())


@pytest.mark.slow
def test_data_parallel_training_under_torchrun_writes_one_finished_adapter(tmp_path, tiny_base):
    """Two CPU processes (gloo) train one source in step; only rank 0 writes, the other ranks leave nothing."""
    r = make_recipe(tmp_path, tiny_base, [addition_source(tmp_path, rows=24)], max_steps=2, eval_steps=2)
    recipe_yaml = tmp_path / "recipe.yaml"
    recipe_yaml.write_text(r.model_dump_json(exclude_unset=True))  # JSON is YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "loradem.cli", "train", str(recipe_yaml)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    source = job(r)
    final = adapter_dir(source, adapter_key(source, fingerprint_weights(tiny_base)))
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == [final.name] and is_finished(final)
    assert (done.stdout + done.stderr).count("addition: trained -> ") == 1  # rank 0 alone reports
    record = json.loads((final / "loradem-train.json").read_text())
    # 2 steps x batch 4 x 2 ranks = 16 rows fed, counted over both ranks
    tok = AutoTokenizer.from_pretrained(tiny_base)
    lengths = [len(tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"]) for row in source.splits.train]
    assert (record["steps"], record["world_size"]) == (2, 2) and record["train_tokens"] >= 16 * min(lengths)
    assert record["train_tokens"] > 8 * max(lengths)  # more than one process alone could have fed
    assert not list(Path(tempfile.gettempdir()).glob(".loradem-rank-*"))


@pytest.mark.slow
def test_adding_a_source_to_the_recipe_trains_only_that_source(tmp_path, tiny_base):
    first_source = addition_source(tmp_path)
    added = {"name": "sort", "validation": 2, "test": 0, "data": write_jsonl(
        tmp_path / "sort.jsonl", task_rows("sort", seed=0, rows=12))}
    before = train_all(jobs(make_recipe(tmp_path, tiny_base, [first_source], max_steps=1)), tiny_base, log=lambda m: None)
    kept = digest(before["addition"])

    log: list[str] = []
    after = train_all(jobs(make_recipe(tmp_path, tiny_base, [first_source, added], max_steps=1)), tiny_base, log=log.append)
    assert [line.split(":")[0] for line in lines(log, ": trained -> ")] == ["sort"]
    assert lines(log, "addition: skipped")
    assert after["addition"] == before["addition"] and digest(after["addition"]) == kept
    assert is_finished(after["sort"])
