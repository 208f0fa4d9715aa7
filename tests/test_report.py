"""The report: every row and column in report.json and report.md, numbers that follow their inputs, atomic output."""

from __future__ import annotations

import json

import pytest

from loradem.errors import LorademError
from loradem.evaluate.report import write_report
from loradem.model.generate import exact_match

PNG = b"\x89PNG\r\n\x1a\n"
REFS = ["579", "49", "22", "1000"]
METRICS = {"add": "exact_match", "rev.words": "loss"}


def cost(train_tokens=0, train=0.0, search=0.0) -> dict:
    return {"train_tokens": train_tokens, "train_seconds": train, "search_seconds": search, "total_seconds": train + search}


def make_rows(dem_predictions: list[str]) -> list[dict]:
    dem_em = exact_match(dem_predictions, REFS)
    return [
        {"name": "base", "per_source": {"add": 0.0, "rev.words": 3.21}, "average": 1.605, "cost": cost()},
        {"name": "adapter:add", "per_source": {"add": 0.75, "rev.words": 2.5}, "average": 1.625, "cost": cost(12000, 50.0)},
        {"name": "uniform", "per_source": {"add": 0.25, "rev.words": 2.0}, "average": 1.125, "cost": cost(24000, 100.0),
         "weights": {"add": 0.5, "rev.words": 0.5}},
        {"name": "dem", "per_source": {"add": dem_em, "rev.words": 1.8766}, "average": (dem_em + 1.8766) / 2,
         "cost": cost(24000, 100.0, 12.0), "weights": {"add": 0.8, "rev.words": 1.25}},
    ]


def table_row(md: str, name: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith(f"| `{name}` |") and "%" in l)
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_has_every_row_and_column(tmp_path):
    rows = make_rows(["579", "49", "x", "1000"])
    write_report(tmp_path / "out", "demo", METRICS, rows, extra={"recipe_path": "recipes/demo.yaml", "weights_file": "weights.json"},
                 reproduce="loradem run recipes/demo.yaml")
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(doc) == ["recipe", "metric", "rows", "recipe_path", "weights_file"]
    assert doc["recipe"] == "demo" and doc["metric"] == {"add": "exact_match", "rev.words": "loss"}
    assert doc["rows"] == rows and doc["weights_file"] == "weights.json"
    md = (tmp_path / "out" / "report.md").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| model |"))
    for col in ("add (exact match)", "rev.words (loss)", "average", "train tokens", "train s", "search / merge s", "total s"):
        assert col in header
    assert table_row(md, "base") == ["`base`", "0.0%", "3.210", "1.605", "0", "0.0", "0.0", "0.0"]
    assert table_row(md, "dem") == ["`dem`", "75.0%", "1.877", "1.313", "24,000", "100", "12.0", "112"]
    assert "| `dem` | 0.800 | 1.250 |" in md and "| `uniform` | 0.500 | 0.500 |" in md  # the weights table
    assert md.endswith("## How to reproduce\n\n```\nloradem run recipes/demo.yaml\n```\n")
    for png in ("per_source.png", "cost_vs_score.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG


def test_a_changed_prediction_moves_the_report(tmp_path):
    out = tmp_path / "out"
    write_report(out, "demo", METRICS, make_rows(["579", "49", "x", "1000"]))
    before_md, before_png = (out / "report.md").read_text(), (out / "per_source.png").read_bytes()
    write_report(out, "demo", METRICS, make_rows(["579", "49", "22", "1000"]))  # one more right answer
    md = (out / "report.md").read_text()
    assert table_row(before_md, "dem")[1] == "75.0%" and table_row(md, "dem")[1] == "100.0%"
    assert json.loads((out / "report.json").read_text())["rows"][3]["per_source"]["add"] == 1.0
    assert (out / "per_source.png").read_bytes() != before_png
    assert table_row(md, "base") == table_row(before_md, "base")
    assert "How to reproduce" not in md  # no command given, none printed


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[1]["per_source"].pop("rev.words"), r"row 1 \('adapter:add'\): per_source: expected a value for each of"),
        (lambda rows: rows[2]["cost"].pop("search_seconds"), r"row 2 \('uniform'\): cost: expected numbers for"),
        (lambda rows: rows[3]["per_source"].update({"add": float("nan")}), r"row 3 \('dem'\): per_source.add: expected a finite"),
        (lambda rows: rows[3].update({"name": "base"}), r"row 3 \('base'\): name: appears twice"),
    ],
)
def test_bad_rows_leave_the_earlier_report_intact(tmp_path, mutate, message):
    out = tmp_path / "out"
    write_report(out, "demo", METRICS, make_rows(REFS))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rows = make_rows(REFS)
    mutate(rows)
    with pytest.raises(LorademError, match=message):
        write_report(out, "demo", METRICS, rows)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_all_loss_sources_print_loss_averages(tmp_path):
    rows = [{"name": "base", "per_source": {"a": 2.34567}, "average": 2.34567, "cost": cost()},
            {"name": "dem", "per_source": {"a": None}, "average": None, "cost": cost(10, 1.0, 2.0), "weights": {"a": 1.0}}]
    write_report(tmp_path / "out", "lm", {"a": "loss"}, rows)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| `base` | 2.346 | 2.346 | 0 |" in md and "| `dem` | – | – | 10 |" in md


def test_summary_states_what_an_added_source_cost_including_relearned_weights():
    from loradem.evaluate.report import summary_lines

    inc = {"previous": "runs/demo/search/weights.json", "new_sources": ["uppercase"],
           "dem_cost": {"train_tokens": 54226, "total_seconds": 555.2},
           "mix_retrain_cost": {"train_tokens": 132524, "total_seconds": 1375.0}}
    plain = summary_lines([], {"increment": inc})
    assert plain == ["- Adding uppercase under DEM: 54,226 training tokens and 555 s (the new adapter(s) + a search warm-started "
                     "from runs/demo/search/weights.json); retraining the mixing baseline on all sources: 132,524 tokens, 1375 s."]
    relearned = summary_lines([], {"increment": {**inc, "relearned": True}})
    assert relearned[0].replace(" + relearning the per-module weights", "") == plain[0] and "+ relearning" in relearned[0]
    grid = summary_lines([], {"increment": {**inc, "mix_retrain_row": "mix-tuned"}})
    assert grid[0] == plain[0].replace("mixing baseline on", "mixing baseline (every set of its proportion grid) on")


def test_a_regmean_row_shows_its_merge_seconds_and_the_run_says_how_it_merged(tmp_path):
    """RegMean's passes are what its row paid beside training: they fill the search / merge column (the row has no
    search), the mixing cost line names them, and the Run section says which activations and alpha made the merge."""
    rows = make_rows(["579", "49", "x", "1000"])
    regmean_cost = {**cost(24000, 100.0), "regmean_seconds": 331.4, "total_seconds": 431.4}
    rows.append({"name": "dem-regmean", "per_source": {"add": 0.5, "rev.words": 1.5}, "average": 1.0, "cost": regmean_cost})
    record = {"settings": {"activations": "merged"}, "alpha": 0.99, "validation_loss_by_alpha": {"0.95": 0.109, "0.99": 0.101},
              "rows": {"add": 64, "rev.words": 64}, "modules": 210, "ranks": [24], "ridged_modules": [], "regmean_seconds": 331.4}
    mix = {"dem_row": "dem-regmean", "cost_ratio_mix_to_dem": {"train_tokens": 0.926, "seconds": 0.893}}
    write_report(tmp_path, "demo", METRICS, rows, extra={"regmean": record, "search": {"n_trials": 16}, "mix": mix})
    md = (tmp_path / "report.md").read_text()
    assert table_row(md, "dem-regmean")[-3:] == ["100", "331", "431"]
    assert table_row(md, "dem")[-3:] == ["100", "12.0", "112"]
    assert ("- RegMean (`dem-regmean`): merged activations, alpha 0.99 chosen by validation loss of 0.95: 0.109, "
            "0.99: 0.101; Gram matrices on 128 training rows, 210 layers, one exact LoRA of rank 24; 331 s.") in md
    assert "(DEM = all per-source adapters + the RegMean merge)." in md


def test_cost_vs_score_labels_every_composition_and_greys_single_adapters():
    from loradem.evaluate.report import cost_vs_score_figure

    rows = make_rows(["579", "49", "x", "x"])
    rows.append({"name": "v:adapter:add", "per_source": {"add": 0.5, "rev.words": 2.0}, "average": 1.25, "cost": cost(9000, 40.0)})
    rows.append({"name": "v:dem", "per_source": {"add": 0.5, "rev.words": 1.5}, "average": 1.0, "cost": cost(18000, 80.0, 9.0)})
    ax = cost_vs_score_figure({"add": "exact_match", "rev.words": "loss"}, rows).axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["base", "dem", "uniform", "v:dem"]
    greys = [line for line in ax.lines if line.get_label() == "one adapter alone"]
    assert len(greys) == 1 and list(greys[0].get_xdata()) == [50.0, 40.0] and list(greys[0].get_ydata()) == [1.625, 1.25]
