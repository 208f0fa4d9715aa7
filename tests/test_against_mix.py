"""Each merge against data mixing: the best mix on each measure sets the bar, a merge's adapters are the same
variant's, the boundary of "within 5 points" counts as met, and report.md says which merges meet all four."""

from __future__ import annotations

import pytest

from loradem.evaluate.against_mix import against_mix, against_mix_lines
from loradem.evaluate.report import markdown

METRICS = {"add": "exact_match", "sort": "exact_match"}


def row(name, add, sort, held=None, kl=None) -> dict:
    r = {"name": name, "per_source": {"add": add, "sort": sort}, "average": (add + sort) / 2,
         "cost": {"train_tokens": 0, "train_seconds": 0.0, "search_seconds": 0.0, "total_seconds": 0.0}}
    if held is not None:
        r["held_out"] = dict(held)
    if kl is not None:
        r["retention"] = {"agreement": 0.5, "kl": kl}
    return r


def rows() -> list[dict]:
    return [
        row("base", 0.0, 0.0, {"h1": 0.0, "h2": 0.0}, 0.0),
        row("adapter:add", 45 / 60, 0.1, {"h1": 0.0, "h2": 0.0}, 0.6),
        row("adapter:sort", 0.0, 48 / 60, {"h1": 0.0, "h2": 0.0}, 0.6),
        row("mix", 52 / 60, 50 / 60, {"h1": 0.1, "h2": 0.0}, 0.9),          # best in-domain
        row("mix-tuned", 51 / 60, 50 / 60, {"h1": 0.2, "h2": 0.2}, 0.8),    # best held-out and retention
        # 96/120 = mix's 102/120 less exactly 5 points
        row("dem-regmean", 44 / 60, 52 / 60, {"h1": 0.2, "h2": 0.2}, 0.8),
        row("dem", 43 / 60, 52 / 60, {"h1": 0.4, "h2": 0.0}, 0.5),           # 1 row short in-domain
        row("no-warmup:adapter:add", 0.5, 0.0),
        row("no-warmup:adapter:sort", 0.0, 0.5),
        row("no-warmup:dem", 0.5, 0.4),                                      # 80% of its own sort adapter
    ]


def test_each_merge_against_the_best_mix_on_each_measure():
    verdict = against_mix(rows(), METRICS)
    assert verdict["mix"] == {"row": "mix", "average": pytest.approx(102 / 120), "held_out": pytest.approx(0.2),
                              "held_out_row": "mix-tuned", "kl": 0.8, "kl_row": "mix-tuned"}
    by_row = {m["row"]: m for m in verdict["merges"]}
    assert [m["row"] for m in verdict["merges"]] == ["dem-regmean", "dem", "no-warmup:dem"]
    assert by_row["dem-regmean"]["met"] == {"in_domain": True, "held_out": True, "retention": True, "adapters": True}
    assert by_row["dem-regmean"]["goal"] and not by_row["dem"]["goal"]
    assert by_row["dem"]["met"] == {"in_domain": False, "held_out": True, "retention": True, "adapters": True}
    assert by_row["dem"]["shares"] == {"add": pytest.approx(43 / 45), "sort": pytest.approx(52 / 48)}
    # a variant's merge is held to its own adapters, and has no held-out or retention numbers: neither met nor missed
    assert by_row["no-warmup:dem"]["shares"] == {"add": 1.0, "sort": pytest.approx(0.8)}
    assert by_row["no-warmup:dem"]["met"] == {"in_domain": False, "held_out": None, "retention": None, "adapters": False}


def test_the_report_says_which_merges_meet_all_four():
    md = markdown("demo", METRICS, rows())
    lines = md.split("## Against data mixing")[1].splitlines()
    assert "in-domain average at least 80.0 (`mix` 85.0 less 5 points); held-out average at least 20.0 (`mix-tuned`); " \
           "retention KL at most 0.8000 (`mix-tuned`)" in lines[2]
    assert "| `dem-regmean` | 80.0 | 20.0 | 0.8000 | 97.8% | yes | yes | yes | yes |" in lines
    assert "| `no-warmup:dem` | 45.0 | – | – | 80.0% | **no** | – | – | **no** |" in lines
    assert "Meets all four: `dem-regmean`." in lines


def test_without_the_winner_the_closest_merge_and_what_it_misses():
    lines = against_mix_lines(against_mix([r for r in rows() if r["name"] != "dem-regmean"], METRICS))
    assert lines[-1] == "No merge meets all four; the closest is `dem` (misses in-domain)."


def test_no_section_without_a_mix_or_with_a_loss_source():
    assert against_mix([r for r in rows() if not r["name"].startswith("mix")], METRICS) is None
    assert against_mix(rows(), {"add": "exact_match", "sort": "loss"}) is None
    assert "Against data mixing" not in markdown("demo", METRICS, [r for r in rows() if not r["name"].startswith("mix")])


def test_the_figure_is_written_with_a_mix_and_removed_when_a_later_report_has_none(tmp_path):
    from loradem.evaluate.report import write_report

    write_report(tmp_path, "demo", METRICS, rows())
    assert (tmp_path / "against_mix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(tmp_path, "demo", METRICS, [r for r in rows() if not r["name"].startswith("mix")])
    assert not (tmp_path / "against_mix.png").exists() and (tmp_path / "report.md").is_file()
    # no retention numbers: the section is there, the figure (in-domain against KL) is not
    write_report(tmp_path, "demo", METRICS, [{k: v for k, v in r.items() if k != "retention"} for r in rows()])
    assert "## Against data mixing" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "against_mix.png").exists()
