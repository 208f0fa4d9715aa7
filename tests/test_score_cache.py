"""Scores kept across runs: a second run of the same models and evaluation scores nothing and reports the same
numbers; a changed adapter (same path), a changed setting or an unreadable entry is scored again; a held-out task
added later is the only measure taken, and a source added later is scored alone on the rows that do not change."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loradem.evaluate import compare
from loradem.evaluate.compare import EvalPlan, EvalSource, compare_models
from loradem.model.generate import generate_answers
from loradem.model.soup import load_base, load_tokenizer
from loradem.recipe import EvalSettings

PROMPTS = [[{"role": "user", "content": "What is 123 + 456?"}], [{"role": "user", "content": "Sort 42, 7, 19, 3."}]]


@pytest.fixture()
def plan(tiny_base, tmp_path) -> EvalPlan:
    from test_multi import make_adapter

    own = generate_answers(load_base(tiny_base), load_tokenizer(tiny_base), PROMPTS, max_new_tokens=6, log=None)
    answered = [{"messages": [*p, {"role": "assistant", "content": a}]} for p, a in zip(PROMPTS, own)]
    text = [{"text": "The quick brown fox jumps over the lazy dog"}, {"text": "Uppercase: hello world. HELLO WORLD"}]
    adapters = {name: make_adapter(tiny_base, tmp_path / name, seed=i, r=4, targets=["q_proj", "v_proj"])
                for i, name in enumerate(("answers", "text"))}
    return EvalPlan(
        run_name="cached", sources=(EvalSource("answers", "exact_match", answered), EvalSource("text", "loss", text)),
        settings=EvalSettings(max_new_tokens=6, batch_size=4), max_length=64, base_dir=tiny_base, adapters=adapters,
        search={"weights": {"answers": 0.7, "text": 0.4}, "search_seconds": 1.0}, model_dir=tiny_base,
        out_dir=tmp_path / "run1", score_cache=tmp_path / "scores")


@pytest.fixture()
def scored(monkeypatch) -> list[str]:
    """Each source a row scores, in order (the cache's misses)."""
    calls: list[str] = []
    real = compare.evaluate_source
    monkeypatch.setattr(compare, "evaluate_source", lambda model, tok, rows, metric, *a, **k: calls.append(metric)
                        or real(model, tok, rows, metric, *a, **k))
    return calls


def held_out_task(name: str, questions: list[str]) -> EvalSource:
    return EvalSource(name, "exact_match", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "7"}]}
                                            for q in questions])


def per_row(rows: list[dict]) -> dict:
    return {r["name"]: (r["per_source"], r["average"]) for r in rows}


def test_a_second_run_scores_nothing_and_reports_the_same(plan, scored, tmp_path):
    first = compare_models(plan, log=lambda _: None)
    assert len(scored) == 2 * 6  # base, two adapters, uniform, sum, dem: each on both sources
    assert len(list((tmp_path / "scores").glob("*.json"))) == 2 * 6  # one entry per model and source
    scored.clear()
    lines: list[str] = []
    again = compare_models(replace(plan, out_dir=tmp_path / "run2"), log=lines.append)
    assert scored == []
    assert per_row(again) == per_row(first)
    one, two = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("run1", "run2"))
    assert two["predictions"] == one["predictions"] and two["eval_seconds"] == one["eval_seconds"]
    assert two["eval_cached"] == [r["name"] for r in first] and "eval_cached" not in one
    assert all(line.endswith("(scored by an earlier run: the same weights and evaluation)") for line in lines)


def test_an_adapter_rewritten_in_place_is_scored_again(plan, scored, tmp_path):
    first = per_row(compare_models(plan, log=lambda _: None))
    weights_file = plan.adapters["text"] / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    save_file({k: v * 3 if "lora_B" in k else v for k, v in tensors.items()}, weights_file)  # same path, new weights
    scored.clear()
    lines: list[str] = []
    again = per_row(compare_models(replace(plan, out_dir=tmp_path / "run2"), log=lines.append))
    rescored = [line.split()[0] for line in lines if "earlier run" not in line]
    # every row that folds the text adapter (`dem` is the assembled folder, here the base's own: unchanged)
    assert rescored == ["adapter:text", "uniform", "sum"]
    assert len(scored) == 2 * 3
    assert again["base"] == first["base"] and again["adapter:answers"] == first["adapter:answers"]
    assert again["adapter:text"][0]["text"] != pytest.approx(first["adapter:text"][0]["text"], rel=1e-6)


def test_a_changed_setting_or_unreadable_entry_is_scored_again(plan, scored, tmp_path):
    compare_models(plan, log=lambda _: None)
    scored.clear()
    compare_models(replace(plan, settings=EvalSettings(max_new_tokens=5, batch_size=4), out_dir=tmp_path / "run2"),
                   log=lambda _: None)
    assert len(scored) == 2 * 6  # another evaluation: every row again
    entries = sorted((tmp_path / "scores").glob("*.json"))
    assert len(entries) == 24
    for path in entries:
        path.write_text('{"format": 2, "value": ')  # cut short
    scored.clear()
    rows = compare_models(replace(plan, out_dir=tmp_path / "run3"), log=lambda _: None)
    assert len(scored) == 2 * 6
    def readable(path: Path) -> bool:
        try:
            return "value" in json.loads(path.read_text())
        except ValueError:
            return False

    assert sum(map(readable, entries)) == 12  # this evaluation's twelve, written again; the other's stay as they were
    assert {r["name"] for r in rows} == {"base", "adapter:answers", "adapter:text", "uniform", "sum", "dem"}


def test_a_held_out_task_added_later_is_the_only_measure_taken(plan, scored, tmp_path):
    first_task = held_out_task("h1", ["What is 3 + 4?"])
    compare_models(replace(plan, held_out=(first_task,)), log=lambda _: None)
    assert len(scored) == 6 * 3  # each row: two sources and the task
    scored.clear()
    lines: list[str] = []
    added = held_out_task("h2", ["What is 2 + 5?", "What is 1 + 6?"])
    rows = compare_models(replace(plan, held_out=(first_task, added), out_dir=tmp_path / "run2"), log=lines.append)
    assert scored == ["exact_match"] * 6  # the new task on each row, nothing else
    assert all(line.endswith("(test:answers, test:text, held_out:h1 from an earlier run)") for line in lines), lines
    assert all(set(r["held_out"]) == {"h1", "h2"} for r in rows)
    report = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert report["eval_cached_measures"] == {r["name"]: ["test:answers", "test:text", "held_out:h1"] for r in rows}
    assert "eval_cached" not in report
    assert set(report["held_out"]["predictions"]["base"]) == {"h1", "h2"}
    # dropping it again takes nothing: every remaining measure is kept
    scored.clear()
    again = compare_models(replace(plan, held_out=(first_task,), out_dir=tmp_path / "run3"), log=lambda _: None)
    assert scored == [] and [r["held_out"] for r in again] == [{"h1": r["held_out"]["h1"]} for r in rows]


def test_no_cache_folder_no_reuse(plan, scored, tmp_path):
    for run in ("run1", "run2"):
        compare_models(replace(plan, score_cache=None, out_dir=tmp_path / run), log=lambda _: None)
    assert len(scored) == 2 * 2 * 6 and not (tmp_path / "scores").exists()


def test_rescore_flag_reaches_the_evaluation(monkeypatch):
    from loradem import pipeline
    from loradem.cli import main

    seen = []
    monkeypatch.setattr(pipeline, "evaluate", lambda recipe, rescore=False: seen.append(("eval", rescore)))
    monkeypatch.setattr(pipeline, "run", lambda recipe, force=(), baseline=None, rescore=False: seen.append(("run", rescore)))
    for argv in (["eval", "r.yaml"], ["eval", "r.yaml", "--rescore"], ["run", "r.yaml", "--rescore"], ["run", "r.yaml"]):
        main(argv)
    assert seen == [("eval", False), ("eval", True), ("run", True), ("run", False)]


def test_a_source_added_later_is_scored_alone_on_the_rows_that_did_not_change(plan, scored, tmp_path):
    from test_multi import make_adapter

    compare_models(plan, log=lambda _: None)
    scored.clear()
    lines: list[str] = []
    extra = [{"text": "Count: one two three four five"}]
    grown = replace(plan, sources=(*plan.sources, EvalSource("count", "loss", extra)),
                    adapters={**plan.adapters, "count": make_adapter(plan.base_dir, tmp_path / "count", seed=7, r=4,
                                                                     targets=["q_proj", "v_proj"])},
                    search={"weights": {"answers": 0.7, "text": 0.4, "count": 0.2}, "search_seconds": 1.0},
                    out_dir=tmp_path / "run2")
    rows = compare_models(grown, log=lines.append)
    kept = {line.split()[0] for line in lines if line.endswith("(test:answers, test:text from an earlier run)")}
    assert kept == {"base", "adapter:answers", "adapter:text", "dem"}  # the assembled folder is the base's here
    # those four score the new source alone; the new adapter and every mixture of all three score all three
    assert sorted(scored) == sorted(["loss"] * 4 + ["exact_match", "loss", "loss"] * 3)
    assert all(set(r["per_source"]) == {"answers", "text", "count"} for r in rows)
