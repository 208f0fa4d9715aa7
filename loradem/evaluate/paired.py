"""How sure is a difference between two report rows? A paired comparison on the same test rows.

    python -m loradem.evaluate.paired recipes/demo-options.yaml anchored-warmup:dem-regmean mix-tuned

Two models scored on the same 60 rows per task differ by a few rows, and a 0.8-point gap in a
held-out average of 360 rows is three rows: the report's yes/no marks cannot say whether that is
a difference or noise. This compares two rows of a finished report (`runs/<name>/report.json`,
which keeps every exact-match prediction) row by row against the recipe's answers: per task the
mean of d = [B right] - [A right] over its rows, with the paired standard error s_d / sqrt(n);
an average over tasks (as the report's in-domain and held-out averages weigh each task equally)
adds the tasks' variances divided by the number of tasks squared. The interval is the normal
approximation, difference +- 1.96 standard errors; it also prints the rows each model alone got
right (the discordant pairs a McNemar test counts). Exact-match tasks only.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

from loradem.data.rows import load_splits
from loradem.errors import LorademError
from loradem.files import read_json
from loradem.model.render import eval_pair, normalize_answer
from loradem.recipe import Recipe, load_recipe

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def correct(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per row: the prediction equals its reference after whitespace normalization (exact match's rule)."""
    if len(predictions) != len(references):
        raise LorademError(f"paired: {len(predictions)} predictions for {len(references)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]


def task_difference(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """B's exact match minus A's on one task's rows: difference, its paired variance (of the mean), and the rows only
    A and only B got right."""
    if len(a) != len(b) or not a:
        raise LorademError(f"paired: the two rows have {len(a)} and {len(b)} scored rows; expected the same, at least 1")
    n = len(a)
    d = [int(y) - int(x) for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) / n if n > 1 else 0.0
    return {"difference": mean, "variance": var, "n": n,
            "only_a": sum(x and not y for x, y in zip(a, b)), "only_b": sum(y and not x for x, y in zip(a, b))}


def averaged_difference(a: dict[str, Sequence[bool]], b: dict[str, Sequence[bool]]) -> dict:
    """B minus A on the average over tasks (each task weighed equally), with its 95% interval; tasks must match."""
    if set(a) != set(b) or not a:
        raise LorademError(f"paired: the two rows were scored on different tasks ({sorted(a)} and {sorted(b)})")
    parts = {t: task_difference(a[t], b[t]) for t in a}
    k = len(parts)
    diff = sum(p["difference"] for p in parts.values()) / k
    se = math.sqrt(sum(p["variance"] for p in parts.values())) / k
    return {"difference": diff, "low": diff - Z95 * se, "high": diff + Z95 * se, "se": se,
            "only_a": sum(p["only_a"] for p in parts.values()), "only_b": sum(p["only_b"] for p in parts.values()),
            "tasks": parts}


def _row_correct(predictions: dict, row: str, references: dict[str, list[str]], what: str) -> dict[str, list[bool]]:
    said = predictions.get(row)
    if said is None:
        raise LorademError(f"paired: report.json has no {what} predictions for row {row!r}")
    missing = sorted(set(references) - set(said))
    if missing:
        raise LorademError(f"paired: row {row!r} has no {what} predictions for {missing}")
    return {t: correct(said[t], references[t][:len(said[t])]) for t in references}


def compare_rows(report: dict, references: dict[str, dict[str, list[str]]], a: str, b: str) -> dict[str, dict]:
    """{"in_domain": ..., "held_out": ...} (those the report has predictions for): B minus A, `averaged_difference`.
    `references` is {"test": {source: answers}, "held_out": {task: answers}} in the report's row order."""
    out = {}
    names = {r["name"] for r in report.get("rows", [])}
    for row in (a, b):
        if row not in names:
            raise LorademError(f"paired: report.json has no row {row!r} (rows: {', '.join(sorted(names))})")
    if references.get("test"):
        preds = report.get("predictions") or {}
        out["in_domain"] = averaged_difference(_row_correct(preds, a, references["test"], "test"),
                                               _row_correct(preds, b, references["test"], "test"))
    if references.get("held_out"):
        preds = (report.get("held_out") or {}).get("predictions") or {}
        out["held_out"] = averaged_difference(_row_correct(preds, a, references["held_out"], "held-out"),
                                              _row_correct(preds, b, references["held_out"], "held-out"))
    return out


def recipe_references(recipe: Recipe) -> dict[str, dict[str, list[str]]]:
    """The answers the report scored against: every exact-match source's test rows and every held-out task's rows,
    split and checked as the run did (nothing is loaded but the data files)."""
    from loradem.evaluate.heldout import held_out_rows

    test = {s.name: [eval_pair(r)[1] for r in load_splits(s, recipe.seed).test]
            for s in recipe.sources if s.metric == "exact_match"}
    held = {t.name: [eval_pair(r)[1] for r in held_out_rows(t)] for t in recipe.eval.held_out}
    return {"test": test, "held_out": held}


def lines(result: dict[str, dict], a: str, b: str) -> list[str]:
    out = []
    for measure, label in (("in_domain", "in-domain"), ("held_out", "held-out")):
        r = result.get(measure)
        if r is None:
            continue
        out.append(f"{label}: {b} - {a} = {100 * r['difference']:+.1f} points (95% CI {100 * r['low']:+.1f} to "
                   f"{100 * r['high']:+.1f}); rows only {a} got right: {r['only_a']}, only {b}: {r['only_b']}")
        for task, t in r["tasks"].items():
            out.append(f"  {task}: {100 * t['difference']:+.1f} ({t['only_a']} vs {t['only_b']} of {t['n']} rows)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loradem.evaluate.paired",
        description="Row B minus row A of a finished report, paired on the same test rows, with a 95% interval: "
                    "in-domain (the sources' test rows) and held-out (the recipe's held-out tasks).")
    parser.add_argument("recipe", help="the recipe whose report to read (runs/<name>/report.json)")
    parser.add_argument("a", help="a report row, e.g. mix-tuned")
    parser.add_argument("b", help="another report row, e.g. dem-regmean")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        report_path = recipe.out_dir / "report.json"
        if not report_path.is_file():
            raise LorademError(f"{report_path}: no report; run `loradem run {args.recipe}` first")
        result = compare_rows(read_json(report_path), recipe_references(recipe), args.a, args.b)
    except LorademError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines(result, args.a, args.b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
