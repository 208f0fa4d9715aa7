"""The comparison behind the report: every model a run produced or can cheaply make.

    rows = compare_models(recipe, base_dir, adapters, splits, search_record, model_dir)

Rows (names fixed by report.json's contract):
- ``base``              all weights 0
- ``adapter:<source>``  that source's adapter alone (weight 1, the others 0)
- ``uniform``           every weight 1/n
- ``sum``               every weight 1 (the plain sum of the vectors)
- ``dem``               the searched weights, evaluated on the *assembled* model
                        folder read back from disk (the artifact users ship)

The first four are the same resident base with all adapters loaded; a row
only changes their scales. Each is scored on every source's held-out test rows
(never seen by training or the search) with the source's metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from loradem.io import read_json
from loradem.recipe import Recipe


def _cost(records: dict[str, dict], used: list[str], search_seconds: float = 0.0) -> dict:
    tokens = sum(int(records[n].get("train_tokens") or 0) for n in used)
    seconds = sum(float(records[n].get("train_seconds") or 0.0) for n in used)
    return {
        "train_tokens": tokens,
        "train_seconds": round(seconds, 1),
        "search_seconds": round(search_seconds, 1),
        "total_seconds": round(seconds + search_seconds, 1),
    }


def _average(per_source: dict[str, float], metrics: dict[str, str]) -> float | None:
    if len(set(metrics.values())) != 1:
        return None  # an average of exact match and loss means nothing
    return sum(per_source.values()) / len(per_source)


def compare_models(
    recipe: Recipe,
    base_dir: Path,
    adapters: dict[str, Path],
    splits: dict,
    search_record: dict,
    model_dir: Path,
    *,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Evaluate base, each adapter, uniform, sum and the assembled DEM model; write the report; return its rows."""
    from loradem.evaluate import evaluate_source
    from loradem.multi import load_base, load_multi, load_tokenizer, set_weights
    from loradem.report import write_report

    names = [s.name for s in recipe.sources]
    metrics = {s.name: s.metric for s in recipe.sources}
    max_length = recipe.train.max_length
    records = {n: (read_json(adapters[n] / "loradem-train.json") if (adapters[n] / "loradem-train.json").is_file() else {}) for n in names}
    predictions: dict[str, dict[str, list[str]]] = {}

    def score(model, tokenizer, row_name: str) -> dict[str, float]:
        out = {}
        for s in recipe.sources:
            res = evaluate_source(model, tokenizer, splits[s.name].test, s.metric, recipe.eval, max_length, log=lambda m: None)
            out[s.name] = res["value"]
            if "predictions" in res:
                predictions.setdefault(row_name, {})[s.name] = res["predictions"]
        log(f"{row_name:<20} " + "  ".join(f"{n}={v:.3f}" for n, v in out.items()))
        return out

    n = len(names)
    candidates: list[tuple[str, dict[str, float], list[str]]] = [("base", {k: 0.0 for k in names}, [])]
    for name in names:
        candidates.append((f"adapter:{name}", {k: float(k == name) for k in names}, [name]))
    candidates.append(("uniform", {k: 1.0 / n for k in names}, names))
    candidates.append(("sum", {k: 1.0 for k in names}, names))

    model, tokenizer = load_multi(base_dir, {k: adapters[k] for k in names})
    rows = []
    for row_name, weights, used in candidates:
        set_weights(model, weights)
        per_source = score(model, tokenizer, row_name)
        rows.append({"name": row_name, "per_source": per_source, "average": _average(per_source, metrics),
                     "cost": _cost(records, used), "weights": weights})
    del model

    dem_weights = {k: float(search_record["weights"][k]) for k in names}
    merged = load_base(model_dir)
    per_source = score(merged, load_tokenizer(model_dir), "dem")
    rows.append({"name": "dem", "per_source": per_source, "average": _average(per_source, metrics),
                 "cost": _cost(records, names, float(search_record.get("search_seconds") or 0.0)),
                 "weights": dem_weights})

    extra = {
        "search": {k: search_record.get(k) for k in ("objective", "n_trials", "sampler", "search_seconds", "eval_fraction")},
        "test_rows": {k: len(splits[k].test) for k in names},
        "model": str(model_dir),
        "predictions": predictions,
    }
    write_report(recipe.out_dir, recipe, rows, extra=extra)
    return rows
