"""Several suites' finished reports in one table: every mix and merge on each suite, with its cost.

    python -m loradem.evaluate.side_by_side runs/demo-options runs/formats-options [--out runs/bench.md]

`make bench` ends with it; with --out the table goes to that file and a figure beside it (bench.png: per
suite, each merge's held-out average against its in-domain average, the mixes as stars, the corner that
meets both bars shaded; merges more than 25 points below the best mix in-domain are only in the table), both
written aside and renamed together. Each run folder's report.json (written by `loradem run`/`eval`) gives, per row, the
in-domain average over the sources' test rows, the held-out average (tasks no source trains on), the KL to the
base on generic prompts and the total cost (training, search and merge, in minutes). Rows are matched across
suites by name, in the order they first appear; a suite without a row shows '–'. Single adapters are not
listed: each adapter set (the recipe's and each variant's) has one row `own adapters`, the mean of each
source's adapter on that source alone (what composition could keep). A variant's row that is the very model
of an earlier row (every measure, its weights and its cost equal, e.g. `rm-anchor:uniform`, which folds the
recipe's adapters by the same weights as `uniform`) is listed once, and named under the table.

Where a suite has a mix row, the column `vs mix` says which of the four criteria of report.md's "Against data
mixing" a merge misses (`loradem/evaluate/against_mix.py`): in-domain within 5 points of the best mix, held-out
at least the best mix's, KL at most the lowest mix's, at least 90% of each of its adapters' own scores. A yes/no
on 60 rows a task cannot tell a small gap from noise, so each merge that misses at most one criterion also gets
its paired 95% intervals against the best mix (`loradem/evaluate/paired.py`: in-domain against the best
in-domain mix, held-out against the best held-out mix), from the predictions in report.json and the answers of
the recipe it names (`recipe_path`, relative to where the command runs; its data must be what the run scored).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from loradem.errors import LorademError
from loradem.evaluate.against_mix import (CRITERIA, IN_DOMAIN_GAP, MIX_ROWS, against_mix, held_out_average, is_merge,
                                          is_single_adapter, percent, retention_kl)
from loradem.evaluate.paired import compare_rows, recipe_references
from loradem.evaluate.report import average_metric, check_rows, format_value
from loradem.files import atomic_write_files, read_json
from loradem.machine import summary as machine_summary
from loradem.plots import figure, png_bytes, styled
from loradem.recipe import load_recipe

OWN = "own adapters"
ZOOM = 20.0  # points of in-domain average below the in-domain bar that the figure still shows
_SHORT = {"in_domain": "in-domain", "held_out": "held-out", "retention": "KL", "adapters": "adapters"}


def load_report(run_dir: Path) -> dict:
    """A finished report.json, its rows checked as the report writer checks them; one line naming the file if not."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise LorademError(f"{path}: no report; run `loradem run` on its recipe first")
    report = read_json(path)
    if not isinstance(report, dict) or not isinstance(report.get("metric"), dict) or not isinstance(report.get("rows"), list):
        raise LorademError(f"{path}: expected a loradem report (keys recipe, metric, rows)")
    try:
        check_rows(report["rows"], list(report["metric"]))
    except LorademError as exc:
        raise LorademError(f"{path}: {exc}") from None
    return report


def _measures(row: dict) -> tuple:
    """What makes two rows one model: the same scores on every measure, weights and cost (a report scores a model
    once and gives a second row of it that row's numbers)."""
    return (row.get("per_source"), row.get("held_out"), row.get("retention"), row.get("average"), row.get("weights"),
            row.get("cost"))


def suite_rows(report: dict) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """({name: {"in_domain", "held_out", "kl", "minutes", "missed"}} in report order, {name: other names of its model}).
    `missed` is None for a row that is not a merge or a report without a mix, else the criteria it misses."""
    rows, sources = report["rows"], list(report["metric"])
    verdict = against_mix(rows, report["metric"])
    missed = {m["row"]: [c for c in CRITERIA if m["met"][c] is False] for m in (verdict or {}).get("merges", [])}
    out: dict[str, dict] = {}
    same: dict[str, list[str]] = {}
    first_of: dict[str, str] = {}
    seen_own: set[str] = set()
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        name = row["name"]
        if is_single_adapter(name):
            prefix = name.partition("adapter:")[0]  # "" or "<variant>:"
            own = prefix + OWN
            if own in out or own in seen_own:
                continue
            adapters = [by_name.get(f"{prefix}adapter:{s}") for s in sources]
            key = repr([_measures(a) if a else None for a in adapters])
            if key in first_of:  # a variant that shares an earlier set's adapters
                same.setdefault(first_of[key], []).append(own)
                seen_own.add(own)
                continue
            first_of[key] = own
            scores = [a["per_source"].get(s) if a else None for a, s in zip(adapters, sources)]
            out[own] = {"in_domain": sum(scores) / len(scores) if None not in scores else None,
                        "held_out": None, "kl": None, "minutes": None, "missed": None}
            continue
        key = repr(_measures(row))
        if key in first_of:  # the same model as an earlier row
            same.setdefault(first_of[key], []).append(name)
            continue
        first_of[key] = name
        out[name] = {"in_domain": row.get("average"), "held_out": held_out_average(row),
                     "kl": retention_kl(row), "minutes": row["cost"]["total_seconds"] / 60,
                     "missed": missed.get(name) if verdict and is_merge(name) else None}
    return out, same


def _cell(value: Optional[float], fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _vs_mix(entry: Optional[dict]) -> str:
    if entry is None or entry["missed"] is None:
        return ""
    return "**all four**" if not entry["missed"] else "misses " + ", ".join(_SHORT[c] for c in entry["missed"])


def _points(x: float) -> str:
    return f"{round(100 * x, 1) or 0.0:+.1f}"  # no "-0.0" for a difference that rounds to nothing


def _interval(r: dict) -> str:
    return f"{_points(r['difference'])} (95% CI {_points(r['low'])} to {_points(r['high'])})"


def interval_lines(report: dict, rows: dict[str, dict]) -> list[str]:
    """For each merge missing at most one criterion: its paired differences from the best mix, in-domain and
    held-out, with 95% intervals; one line saying why when the recipe's answers cannot be read."""
    verdict = against_mix(report["rows"], report["metric"])
    close = [n for n, e in rows.items() if e["missed"] is not None and len(e["missed"]) <= 1]
    if not verdict or not close:
        return []
    mix = verdict["mix"]
    try:
        if not report.get("recipe_path"):
            raise LorademError("report.json names no recipe")
        references = recipe_references(load_recipe(report["recipe_path"]))
        lines = []
        for name in close:
            parts = []
            r = compare_rows(report, references, mix["row"], name).get("in_domain")
            if r:
                parts.append(f"in-domain {_interval(r)} against `{mix['row']}`")
            r = compare_rows(report, references, mix["held_out_row"], name).get("held_out") if mix["held_out_row"] else None
            if r:
                parts.append(f"held-out {_interval(r)} against `{mix['held_out_row']}`")
            if parts:
                lines.append(f"- `{name}`: " + "; ".join(parts))
    except LorademError as exc:
        return [f"Paired intervals not computed: {exc}."]
    return ["Paired differences from the best mix, in points (`python -m loradem.evaluate.paired`):", *lines] if lines else []


def markdown(reports: list[tuple[str, dict]], png: Optional[str] = None) -> str:
    """The side-by-side table of `reports` ([(label, report.json)]), with each suite's best mix and machine."""
    suites = []
    for label, report in reports:
        rows, same = suite_rows(report)
        suites.append((label, report, rows, same))
    names: list[str] = []
    for _, _, rows, _ in suites:
        names += [n for n in rows if n not in names]
    head = ["row"]
    for label, report, _, _ in suites:
        avg = "in-domain" + ("" if average_metric(report["metric"]) == "exact_match" else " (loss)")
        head += [f"{label}: {avg}", "held-out", "KL", "cost (min)", "vs mix"]
    lines = ["# Suites side by side", "",
             "In-domain and held-out averages are exact match in % (held-out: tasks no source trains on); KL is "
             "KL(base ‖ model) per token on generic prompts; cost is training, search and merge in minutes on the "
             "machine that ran it. `vs mix`: the criteria of report.md's \"Against data mixing\" a merge misses.", "",
             *([f"![held-out against in-domain, per suite]({png})", ""] if png else []),
             "| " + " | ".join(head) + " |", "|---|" + "---:|---:|---:|---:|:--|" * len(suites)]
    for name in names:
        cells = [f"`{name}`"]
        for _, report, rows, _ in suites:
            entry = rows.get(name)
            if entry is None:
                cells += ["–", "–", "–", "–", ""]
                continue
            cells += [format_value(entry["in_domain"], average_metric(report["metric"])).rstrip("%"),
                      percent(entry["held_out"]), _cell(entry["kl"], "{:.3f}"), _cell(entry["minutes"], "{:.1f}"),
                      _vs_mix(entry)]
        lines.append("| " + " | ".join(cells) + " |")
    for label, report, rows, same in suites:
        lines += ["", f"**{label}** (`{report.get('recipe_path') or report.get('recipe')}`"
                  + (f", scored on {machine_summary(report['machine'])}" if report.get("machine") else "") + ")."]
        mixes = [n for n in MIX_ROWS if n in rows]
        if mixes:
            lines.append("Mixes: " + "; ".join(
                f"`{n}` in-domain {percent(rows[n]['in_domain'])}, held-out {percent(rows[n]['held_out'])}, "
                f"KL {_cell(rows[n]['kl'], '{:.3f}')}" for n in mixes) + ".")
        goal = [n for n, e in rows.items() if e["missed"] == []]
        if mixes:
            lines.append("Meets all four: " + (", ".join(f"`{n}`" for n in goal) if goal else "none") + ".")
            lines += interval_lines(report, rows)
        if same:
            lines.append("One model under several names: " + "; ".join(
                f"`{first}` = " + ", ".join(f"`{o}`" for o in others) for first, others in same.items()) + ".")
    return "\n".join(lines + [""])


@styled
def held_out_figure(reports: list[tuple[str, dict]]):
    """One panel per suite: each merge's held-out average against its in-domain average (exact match), the mixes as
    stars, the region at most 5 points below the best mix in-domain and at least its held-out shaded (merges more
    than ZOOM points left of that region are left out); None when no suite has both measures."""
    panels = []
    for label, report in reports:
        if average_metric(report["metric"]) != "exact_match":
            continue
        rows, _ = suite_rows(report)
        points = {n: (100 * e["in_domain"], 100 * e["held_out"]) for n, e in rows.items()
                  if e["in_domain"] is not None and e["held_out"] is not None and (is_merge(n) or n in MIX_ROWS)}
        if points:
            panels.append((label, rows, points))
    if not panels:
        return None
    fig = figure(5.2 * len(panels), 4.4)
    for i, (label, rows, points) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        mixes = {n: xy for n, xy in points.items() if n in MIX_ROWS}
        if mixes:  # the region that decides: merges far below the mix in-domain are in the table, not here
            left = max(x for x, _ in mixes.values()) - 100 * IN_DOMAIN_GAP - ZOOM
            points = {n: xy for n, xy in points.items() if xy[0] >= left}
        for name, (x, y) in points.items():
            if name in mixes:
                ax.plot([x], [y], "*", color="black", markersize=11)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
                continue
            goal = rows[name]["missed"] == []
            ax.plot([x], [y], "o", color="tab:green" if goal else "tab:blue")
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -8), fontsize="x-small")
        if mixes:
            best_in = max(x for x, _ in mixes.values())
            best_held = max(y for _, y in mixes.values())
            right = max([x for x, _ in points.values()] + [best_in]) + 3
            top = max([y for _, y in points.values()] + [best_held]) + 3
            bar = best_in - 100 * IN_DOMAIN_GAP
            ax.fill_between([bar, right], best_held, top, color="tab:green", alpha=0.12,
                            label="within 5 points in-domain, held-out at least the best mix's")
            ax.set_xlim(right=right)
            ax.set_ylim(top=top)
            ax.legend(fontsize="x-small", loc="upper left")
        ax.set_title(label)
        ax.set_xlabel("in-domain average exact match (%)")
        ax.set_ylabel("held-out average exact match (%)")
    return fig


def write(reports: list[tuple[str, dict]], out: Path) -> list[Path]:
    """out (the table) and, when there is something to plot, the figure beside it (<stem>.png), in one rename."""
    out = Path(out)
    fig = held_out_figure(reports)
    png = out.with_suffix(".png")
    files = {out: markdown(reports, png.name if fig is not None else None).encode("utf-8")}
    if fig is not None:
        files[png] = png_bytes(fig)
    atomic_write_files(files)
    return list(files)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loradem.evaluate.side_by_side",
        description="Several finished runs' reports (runs/<name>/report.json) in one markdown table: each mix and "
                    "merge's in-domain, held-out and KL scores and its cost, one group of columns per run, which of "
                    "the against-mix criteria each merge misses, and paired 95% intervals against the best mix for "
                    "the merges that miss at most one (they read the recipe each report names, for its answers).")
    parser.add_argument("runs", nargs="+", help="run folders, e.g. runs/demo-options runs/formats-options")
    parser.add_argument("--out", help="write the table to this file and its figure beside it (<name>.png), instead of "
                                      "printing the table")
    args = parser.parse_args(argv)
    try:
        reports = [(Path(r).name, load_report(Path(r))) for r in args.runs]
        if args.out:
            print("wrote " + ", ".join(str(p) for p in write(reports, Path(args.out))))
        else:
            print(markdown(reports), end="")
    except LorademError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
