"""The data-mixing baseline at tuned proportions (`mix.proportions`): one mix per share set beside the natural
one, the lowest validation loss chosen, and the `mix-tuned` row charged the whole grid.

    OMP_NUM_THREADS=1 .venv/bin/pytest -q -p no:cacheprovider tests/test_mix_grid.py
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from loradem import pipeline
from loradem.cli import main
from loradem.data.demo import task_rows
from loradem.train import mix
from loradem.errors import LorademError
from loradem.recipe import MixSettings, Recipe, load_recipe
from loradem.train.mix import choose_mix, grid_jobs, plan_grid, plan_mix

GRID = [{"addition": 3, "sort": 1}, {"addition": 1, "sort": 3}]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def task_source(tmp_path: Path, task: str, rows: int, **kw) -> dict:
    data = write_jsonl(tmp_path / f"{task}.jsonl", task_rows(task, rows=rows))
    return {"name": task, "data": data, "validation": 2, "test": 2, **kw}


def recipe_dict(tmp_path: Path, base: Path, proportions) -> dict:
    return {
        "name": "grid",
        "base": str(base),
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 1, "batch_size": 4, "eval_steps": 2, "max_length": 64, "learning_rate": 5e-3},
        "sources": [task_source(tmp_path, "addition", 24), task_source(tmp_path, "sort", 24)],
        "mix": {"proportions": proportions},
        "search": {"n_trials": 2, "max_rows_per_source": 2, "batch_size": 2},
        "eval": {"max_new_tokens": 4, "batch_size": 2, "retention": {"enabled": False}},
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the grid's plan and the choice (no training) ------------------------------------

def test_the_grid_is_the_natural_mix_then_one_mix_per_set_each_under_its_own_key(tmp_path, tiny_base):
    r = Recipe.model_validate({**recipe_dict(tmp_path, tiny_base, GRID), "mix": {"tokens": 900, "proportions": GRID}})
    job = pipeline.mix_job(r, pipeline._splits(r))
    jobs = grid_jobs(job)
    assert [j.proportions for j in jobs] == [{"addition": None, "sort": None}, {"addition": 3.0, "sort": 1.0},
                                             {"addition": 1.0, "sort": 3.0}]
    plans = [p for _, p in plan_grid(job, tiny_base, {})]
    assert plans[0] == plan_mix(job, tiny_base, {})  # the natural mix is today's mix, same key
    assert [p.shares for p in plans] == [pytest.approx({"addition": 0.5, "sort": 0.5}),
                                         pytest.approx({"addition": 0.75, "sort": 0.25}),
                                         pytest.approx({"addition": 0.25, "sort": 0.75})]
    assert len({p.key for p in plans}) == 3 and all(p.folder.name == f"mix-{p.key}" for p in plans)
    assert {p.target_tokens for p in plans} == {900}  # one budget for the whole grid
    # a set with the natural shares (or an earlier set's, scaled) is the same adapter: trained and charged once
    same = replace(job, mix=MixSettings(tokens=900, proportions=[{"addition": 2, "sort": 2}, *GRID, {"addition": 6, "sort": 2}]))
    assert [p.key for _, p in plan_grid(same, tiny_base, {})] == [p.key for p in plans]
    with pytest.raises(ValueError, match=r"mix.proportions\[0\] is for \['addition'\], splits for \['addition', 'sort'\]"):
        replace(job, mix=MixSettings(proportions=[{"addition": 1}]))


def test_the_lowest_validation_loss_is_chosen_and_the_natural_mix_wins_ties():
    assert choose_mix([{"best_val_loss": 0.9}, {"best_val_loss": 0.7}, {"best_val_loss": 0.8}]) == 1
    assert choose_mix([{"best_val_loss": 0.7}, {"best_val_loss": 0.7}]) == 0
    with pytest.raises(LorademError, match=r"mix: mix-abc: loradem-train.json has no best_val_loss to choose by"):
        choose_mix([{"best_val_loss": 0.7}, {"key": "mix-abc", "best_val_loss": None}])


@pytest.mark.parametrize("proportions, message", [
    ([{"addition": 1, "sort": 1, "reverse": 1}],
     r"mix.proportions\[0\]: unknown source 'reverse'; expected a share for each of addition, sort"),
    ([{"addition": 1, "sort": 1}, {"addition": 1}],
     r"mix.proportions\[1\]: no share for source 'sort'; expected a share for each of addition, sort"),
    ([{"addition": 0, "sort": 1}], r"mix.proportions\[0\].addition: Input should be greater than 0 \(got 0\)"),
    ([{"addition": -1, "sort": 1}], r"mix.proportions\[0\].addition: Input should be greater than 0 \(got -1\)"),
    ([{"addition": "half", "sort": 1}], r"mix.proportions\[0\].addition: Input should be a valid number"),
    ([], r"mix.proportions: List should have at least 1 item"),
    ([[0.5, 0.5]], r"mix.proportions\[0\]: Input should be a valid dictionary"),
])
def test_a_malformed_grid_is_refused_with_the_field_and_the_entry(tmp_path, tiny_base, capsys, proportions, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path, tiny_base, proportions)))
    with pytest.raises(LorademError, match=rf"^{path}: {message}"):
        load_recipe(path)
    capsys.readouterr()
    assert main(["check", str(path), "--baseline", "mix"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loradem: error: {path}: mix.proportions") and len(err.strip().splitlines()) == 1


def test_check_accepts_a_grid_and_says_what_it_will_train(tmp_path, tiny_base, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path, tiny_base, GRID)))
    assert load_recipe(path).mix.proportions == [{"addition": 3.0, "sort": 1.0}, {"addition": 1.0, "sort": 3.0}]
    assert main(["check", str(path), "--baseline", "mix"]) == 0
    assert "mix proportions (with --baseline mix): the natural shares + 2 set(s)" in capsys.readouterr().out


# ---- training, choosing, reporting, reusing --------------------------------------------

@pytest.mark.slow
def test_run_trains_the_grid_reports_mix_tuned_at_the_grids_cost_and_reuses_it(tmp_path, tiny_base, monkeypatch, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loradem.data.rows import load_splits
    from loradem.model.generate import evaluate_source

    monkeypatch.chdir(tmp_path)
    recipe = recipe_dict(tmp_path, tiny_base, GRID)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--baseline", "mix"]) == 0
    out = capsys.readouterr().out
    assert "mix 1/3: addition 0.5 sort 0.5 (natural)" in out
    assert "mix 2/3: addition 0.75 sort 0.25" in out and "mix 3/3: addition 0.25 sort 0.75" in out
    run = tmp_path / "runs" / "grid"
    report = json.loads((run / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[:5] == ["base", "adapter:addition", "adapter:sort", "mix", "mix-tuned"]
    rows = {r["name"]: r for r in report["rows"]}

    # one adapter per set plus the natural one, each with its shares recorded and its own key
    grid = report["mix_grid"]
    folders = [(run / s["adapter"]).resolve() for s in grid["sets"]]
    records = [json.loads((f / "loradem-train.json").read_text()) for f in folders]
    assert [s["natural"] for s in grid["sets"]] == [True, False, False]
    assert folders[0] == (run / report["mix"]["adapter"]).resolve()  # the natural set is the `mix` row's adapter
    assert len(set(folders)) == 3 and [f.name for f in folders] == [f"mix-{rec['key']}" for rec in records]
    for s, rec, want in zip(grid["sets"], records, [{"addition": 0.5, "sort": 0.5}, {"addition": 0.75, "sort": 0.25},
                                                    {"addition": 0.25, "sort": 0.75}]):
        assert rec["shares"] == pytest.approx(want) and s["shares"] == rec["shares"]
        assert (s["best_val_loss"], s["train_tokens"]) == (rec["best_val_loss"], rec["train_tokens"])
        total = sum(rec["rows_fed"].values())
        assert all(abs(rec["rows_fed"][n] - want[n] * total) < 1 for n in want)  # the set's shares were fed
    assert len({rec["target_tokens"] for rec in records}) == 1  # the same budget for every set

    # the chosen set is the lowest validation loss, and mix-tuned is that adapter's own scores
    losses = [rec["best_val_loss"] for rec in records]
    assert grid["chosen"] == losses.index(min(losses))
    chosen = folders[grid["chosen"]]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(chosen)).eval()
    r = Recipe.model_validate(recipe)
    for s in r.sources:
        with torch.no_grad():
            res = evaluate_source(model, tok, load_splits(s, r.seed).test, s.metric, r.eval, r.train.max_length,
                                  log=lambda _: None)
        assert rows["mix-tuned"]["per_source"][s.name] == pytest.approx(res["value"], rel=1e-6)

    # mix-tuned is charged every set's training; mix its own
    cost = rows["mix-tuned"]["cost"]
    assert cost["train_tokens"] == sum(rec["train_tokens"] for rec in records) == grid["cost"]["train_tokens"]
    assert cost["train_seconds"] == pytest.approx(round(sum(rec["train_seconds"] for rec in records), 1))
    assert cost["search_seconds"] == 0 and cost["total_seconds"] == cost["train_seconds"]
    assert rows["mix"]["cost"]["train_tokens"] == records[0]["train_tokens"]
    md = (run / "report.md").read_text()
    assert "| `mix-tuned` |" in md and "- Mix proportions (`mix-tuned` = the lowest validation loss of 3 trainings" in md
    assert f"{grid['cost']['train_tokens']:,} training tokens" in md and md.count("**chosen**") == 1

    # a second run reuses every grid adapter: nothing retrains, the weights stay as they were
    before = [sha(f / "adapter_model.safetensors") for f in folders]
    assert main(["train", str(path), "--baseline", "mix"]) == 0
    out = capsys.readouterr().out
    assert "trained ->" not in out
    for f in folders:
        assert f"mix: skipped (finished adapter adapters/{f.name})" in out
    assert [sha(f / "adapter_model.safetensors") for f in folders] == before
    assert pipeline.find_mix_grid(r, tiny_base, pipeline.finished_adapters(r, tiny_base), pipeline._splits(r)) == [
        Path("adapters") / f.name for f in folders]

    # when the natural set wins, mix-tuned is the `mix` row's own adapter: its measures, not a second scoring
    monkeypatch.setattr(mix, "choose_mix", lambda records: 0)
    assert main(["eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mix-tuned            the same model as mix: its scores" in out and out.count("mix-tuned") >= 1
    report = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert report["mix_grid"]["chosen"] == 0
    for key in ("per_source", "held_out", "retention"):
        assert rows["mix-tuned"].get(key) == rows["mix"].get(key), key
    assert report["predictions"]["mix-tuned"] == report["predictions"]["mix"]
