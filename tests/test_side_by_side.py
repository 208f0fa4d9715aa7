"""The side-by-side table of several suites' reports (loradem/evaluate/side_by_side.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from loradem.evaluate.paired import compare_rows, recipe_references
from loradem.evaluate.side_by_side import held_out_figure, main, markdown, suite_rows
from loradem.recipe import load_recipe
from test_pipeline import _rows

COST = {"train_tokens": 100, "train_seconds": 600.0, "search_seconds": 0.0, "total_seconds": 600.0}


def _row(name, per_source, held_out=None, kl=None, seconds=600.0):
    row = {"name": name, "per_source": per_source, "average": sum(per_source.values()) / len(per_source),
           "cost": {**COST, "total_seconds": seconds}}
    if held_out is not None:
        row["held_out"] = held_out
    if kl is not None:
        row["retention"] = {"agreement": 0.5, "kl": kl}
    return row


def _suite_a():
    return {"recipe": "a", "metric": {"x": "exact_match", "y": "exact_match"}, "rows": [
        _row("base", {"x": 0.0, "y": 0.0}, {"t": 0.0}, 0.0, seconds=0.0),
        _row("adapter:x", {"x": 0.9, "y": 0.1}, {"t": 0.1}, 0.5),
        _row("adapter:y", {"x": 0.2, "y": 0.8}, {"t": 0.1}, 0.6),
        _row("mix", {"x": 0.9, "y": 0.9}, {"t": 0.3}, 1.0, seconds=1200.0),
        _row("dem", {"x": 0.5, "y": 0.5}, {"t": 0.1}, 0.9),                    # misses in-domain, held-out, adapters
        _row("dem-regmean", {"x": 0.9, "y": 0.85}, {"t": 0.35}, 0.4, seconds=900.0),   # meets all four
        _row("v:adapter:x", {"x": 0.9, "y": 0.1}, {"t": 0.1}, 0.5),            # the recipe's adapters again
        _row("v:adapter:y", {"x": 0.2, "y": 0.8}, {"t": 0.1}, 0.6),
        _row("v:dem", {"x": 0.5, "y": 0.5}, {"t": 0.1}, 0.9),                  # the same model as dem
        _row("v:dem-regmean", {"x": 0.9, "y": 0.85}, {"t": 0.2}, 0.3),         # misses held-out
    ]}


def _suite_b():
    return {"recipe": "b", "metric": {"z": "exact_match"}, "rows": [
        _row("base", {"z": 0.1}, {"u": 0.0}, 0.0, seconds=0.0),
        _row("adapter:z", {"z": 0.6}, {"u": 0.2}, 0.7),
        _row("mix", {"z": 0.7}, {"u": 0.25}, 0.8),
        _row("dem-regmean", {"z": 0.6}, {"u": 0.2}, 0.5),                      # misses in-domain (10 below), held-out
    ]}


def _lines(text):
    return {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}


def test_rows_with_equal_scores_but_other_weights_are_two_models():
    report = _suite_b()
    for name, w in (("uniform", 0.5), ("sum", 1.0)):  # the same scores, folded with other weights
        report["rows"].append({**_row(name, {"z": 0.0}, {"u": 0.0}), "weights": {"z": w}})
    rows, same = suite_rows(report)
    assert "uniform" in rows and "sum" in rows and same == {}


def test_rows_per_suite_with_own_adapters_duplicates_and_the_goal():
    rows, same = suite_rows(_suite_a())
    assert list(rows) == ["base", "own adapters", "mix", "dem", "dem-regmean", "v:dem-regmean"]
    assert rows["own adapters"]["in_domain"] == pytest.approx((0.9 + 0.8) / 2)
    assert same == {"own adapters": ["v:own adapters"], "dem": ["v:dem"]}
    assert rows["dem-regmean"]["missed"] == [] and rows["v:dem-regmean"]["missed"] == ["held_out"]
    assert rows["dem"]["missed"] == ["in_domain", "held_out", "adapters"]
    assert rows["mix"]["missed"] is None and rows["mix"]["minutes"] == 20.0
    assert rows["dem-regmean"]["held_out"] == 0.35 and rows["dem-regmean"]["kl"] == 0.4


def test_markdown_matches_rows_across_suites():
    text = markdown([("a", _suite_a()), ("b", _suite_b())])
    lines = _lines(text)
    assert lines["dem-regmean"] == "| `dem-regmean` | 87.5 | 35.0 | 0.400 | 15.0 | **all four** | 60.0 | 20.0 | 0.500 | 10.0 | misses in-domain, held-out |"
    assert lines["dem"] == "| `dem` | 50.0 | 10.0 | 0.900 | 10.0 | misses in-domain, held-out, adapters | – | – | – | – |  |"
    assert lines["own adapters"].startswith("| `own adapters` | 85.0 | – | – | – |  | 60.0 |")
    assert "v:dem" not in lines  # listed once, under the first name
    assert "One model under several names: `own adapters` = `v:own adapters`; `dem` = `v:dem`." in text
    assert "Meets all four: `dem-regmean`." in text and "Meets all four: none." in text
    assert "Mixes: `mix` in-domain 90.0, held-out 30.0, KL 1.000." in text


def test_out_writes_the_table_and_its_figure(tmp_path, capsys):
    for name, report in (("a", _suite_a()), ("b", _suite_b())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    out = tmp_path / "bench.md"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "![held-out against in-domain, per suite](bench.png)" in text
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {out}, {tmp_path / 'bench.png'}\n"
    assert main([str(tmp_path / "a")]) == 0  # without --out: the table on stdout, no file
    assert capsys.readouterr().out.startswith("# Suites side by side\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "bench.md", "bench.png"]


def test_missing_or_malformed_report_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "report.json").write_text(json.dumps(_suite_a()))
    out = tmp_path / "bench.md"
    assert main([str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'missing' / 'report.json'}: no report; run `loradem run` on its recipe first\n"
    broken = _suite_b()
    del broken["rows"][2]["cost"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "report.json").write_text(json.dumps(broken))
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'b' / 'report.json'}: report: row 2 ('mix'): cost: expected numbers")
    assert not out.exists() and not (tmp_path / "bench.png").exists()


def test_no_figure_without_exact_match_averages():
    loss = {"recipe": "l", "metric": {"x": "loss"}, "rows": [_row("base", {"x": 2.0}), _row("mix", {"x": 1.0})]}
    assert held_out_figure([("l", loss)]) is None
    assert "| `mix` | 1.000 |" in markdown([("l", loss)])


def test_close_merges_get_paired_intervals_from_the_recipes_answers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for task in ("addition", "sort"):
        (tmp_path / "data" / f"{task}.jsonl").write_text(_rows(task, 30))
    (tmp_path / "data" / "held.jsonl").write_text(_rows("reverse", 10))
    recipe = {"name": "tiny", "base": "smollm2-135m",
              "sources": [{"name": "addition", "data": "data/addition.jsonl", "validation": 4, "test": 8},
                          {"name": "sort", "data": "data/sort.jsonl", "validation": 4, "test": 6}],
              "eval": {"held_out": [{"name": "held", "data": "data/held.jsonl"}]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    refs = recipe_references(load_recipe("tiny.yaml"))

    def half(answers):
        return [a if i < len(answers) // 2 else "wrong" for i, a in enumerate(answers)]

    report = {"recipe": "tiny", "recipe_path": "tiny.yaml", "metric": {"addition": "exact_match", "sort": "exact_match"},
              "rows": [_row("mix", {"addition": 0.5, "sort": 0.5}, {"held": 0.5}),
                       _row("dem-regmean", {"addition": 1.0, "sort": 1.0}, {"held": 1.0})],
              "predictions": {"mix": {s: half(a) for s, a in refs["test"].items()}, "dem-regmean": refs["test"]},
              "held_out": {"predictions": {"mix": {t: half(a) for t, a in refs["held_out"].items()},
                                           "dem-regmean": refs["held_out"]}}}
    text = markdown([("tiny", report)])
    # every row `mix` got wrong, `dem-regmean` got right: +50 points on both measures, as paired.py computes them
    expected = compare_rows(report, refs, "mix", "dem-regmean")
    low, high = (f"{100 * expected['in_domain'][k]:+.1f}" for k in ("low", "high"))
    assert f"- `dem-regmean`: in-domain +50.0 (95% CI {low} to {high}) against `mix`; held-out +50.0 (95% CI " in text
    del report["recipe_path"]
    assert "Paired intervals not computed: report.json names no recipe." in markdown([("tiny", report)])
