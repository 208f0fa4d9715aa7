"""Paired differences between two report rows: per-row exact match against the recipe's answers, the difference of
the task-averaged scores and its interval, checked against numpy on the per-row differences."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml

from loradem import pipeline
from loradem.errors import LorademError
from loradem.evaluate.paired import Z95, averaged_difference, compare_rows, correct, main, recipe_references, task_difference
from loradem.model.generate import exact_match
from loradem.recipe import load_recipe
from test_pipeline import _rows


def bools(n: int, p: float, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < p for _ in range(n)]


def test_one_task_matches_numpy_on_the_row_differences():
    a, b = bools(60, 0.5, 1), bools(60, 0.6, 2)
    got = task_difference(a, b)
    d = np.array(b, dtype=float) - np.array(a, dtype=float)
    assert got["difference"] == pytest.approx(d.mean(), abs=1e-15)
    assert got["variance"] == pytest.approx(d.var(ddof=1) / len(d), rel=1e-12)
    assert got["only_a"] == int(((d < 0)).sum()) and got["only_b"] == int((d > 0).sum())


def test_the_average_weighs_tasks_equally_and_adds_their_variances():
    a = {"x": bools(60, 0.5, 3), "y": bools(20, 0.2, 4)}
    b = {"x": bools(60, 0.7, 5), "y": bools(20, 0.3, 6)}
    got = averaged_difference(a, b)
    diffs = {t: np.array(b[t], dtype=float) - np.array(a[t], dtype=float) for t in a}
    mean = (diffs["x"].mean() + diffs["y"].mean()) / 2
    se = np.sqrt(sum(d.var(ddof=1) / len(d) for d in diffs.values())) / 2
    assert got["difference"] == pytest.approx(mean, abs=1e-15)
    assert got["se"] == pytest.approx(se, rel=1e-12)
    assert (got["low"], got["high"]) == (pytest.approx(mean - Z95 * se), pytest.approx(mean + Z95 * se))


def test_identical_rows_differ_by_exactly_nothing():
    a = {"x": bools(30, 0.5, 7)}
    got = averaged_difference(a, a)
    assert (got["difference"], got["low"], got["high"], got["only_a"], got["only_b"]) == (0.0, 0.0, 0.0, 0, 0)


def test_mismatched_rows_and_tasks_are_refused():
    with pytest.raises(LorademError, match="3 and 2 scored rows"):
        task_difference([True] * 3, [True] * 2)
    with pytest.raises(LorademError, match="different tasks"):
        averaged_difference({"x": [True]}, {"y": [True]})
    with pytest.raises(LorademError, match="2 predictions for 1 references"):
        correct(["a", "b"], ["a"])


def test_correct_is_exact_match_row_by_row():
    preds, refs = ["12", " 3 4", "x", "Y"], ["12", "3  4", "y", "Y"]
    assert correct(preds, refs) == [True, True, False, True]
    assert sum(correct(preds, refs)) / len(refs) == exact_match(preds, refs)


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """A recipe with two exact-match sources and a held-out task, and a report.json as a run leaves it: row `good`
    answers every row right, row `half` the first half of each task."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for task in ("addition", "sort"):
        (tmp_path / "data" / f"{task}.jsonl").write_text(_rows(task, 30))
    (tmp_path / "data" / "held.jsonl").write_text(_rows("reverse", 10))
    recipe = {
        "name": "tiny", "base": "smollm2-135m",
        "sources": [{"name": "addition", "data": "data/addition.jsonl", "validation": 4, "test": 8},
                    {"name": "sort", "data": "data/sort.jsonl", "validation": 4, "test": 6}],
        "eval": {"held_out": [{"name": "held", "data": "data/held.jsonl"}]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    refs = recipe_references(load_recipe(path))

    def half(answers):
        return [a if i < len(answers) // 2 else "wrong" for i, a in enumerate(answers)]

    rows = [{"name": n} for n in ("good", "half")]
    report = {"rows": rows,
              "predictions": {"good": refs["test"], "half": {s: half(a) for s, a in refs["test"].items()}},
              "held_out": {"predictions": {"good": refs["held_out"], "half": {t: half(a) for t, a in refs["held_out"].items()}}}}
    out = load_recipe(path).out_dir
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(report))
    return path, refs, report


def test_references_are_the_test_split_the_run_scored(scored):
    path, refs, _ = scored
    recipe = load_recipe(path)
    splits = pipeline._splits(recipe)
    assert refs["test"]["addition"] == [r["messages"][-1]["content"] for r in splits["addition"].test]
    assert [len(v) for v in refs["test"].values()] == [8, 6] and len(refs["held_out"]["held"]) == 10


def test_rows_of_a_report_are_compared_on_both_measures(scored):
    _, refs, report = scored
    got = compare_rows(report, refs, "half", "good")
    # half of every task wrong in `half`: in-domain (0.5 + 0.5) / 2, held-out 0.5, all for `good`
    assert got["in_domain"]["difference"] == 0.5 and got["in_domain"]["only_b"] == 4 + 3
    assert got["held_out"]["difference"] == 0.5 and got["held_out"]["only_a"] == 0
    with pytest.raises(LorademError, match="no row 'mix'"):
        compare_rows(report, refs, "mix", "good")


def test_the_command_prints_the_difference_and_says_what_is_missing(scored, capsys):
    path, _, _ = scored
    assert main([str(path), "half", "good"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("in-domain: good - half = +50.0 points (95% CI +")
    assert "held: +50.0 (0 vs 5 of 10 rows)" in out
    (load_recipe(path).out_dir / "report.json").unlink()
    assert main([str(path), "half", "good"]) == 1
    assert "no report; run `loradem run" in capsys.readouterr().err
