"""The comparison behind the report: every model a run produced or can cheaply make.

    rows = compare_models(recipe, base_dir, adapters, splits, search_record, model_dir)

Rows (names fixed by report.json's contract):
- ``base``              all weights 0
- ``adapter:<source>``  that source's adapter alone (weight 1, the others 0)
- ``mix``               the data-mixing adapter alone (`loradem.train.mix`), when a finished one exists
                        for the current adapters; report.json's ``mix`` gives its cost over DEM's
- ``uniform``           every weight 1/n
- ``sum``               every weight 1 (the plain sum of the vectors)
- ``dem``               the searched weights, evaluated on the *assembled* model
                        folder read back from disk (the artifact users ship)
- ``dem-learned``       the learned per-module weights (learn.enabled)
- ``<variant>:<row>``   for each recipe variant (`variants:`), its own adapters alone, uniform, sum,
                        dem and dem-learned, scored on an in-memory exact fold of its adapters;
                        report.json's ``variants`` gives what each overrides, its search and learning

The first four are the same resident base with all adapters loaded; a row
only changes their scales. Each is scored on every source's held-out test rows
(never seen by training or the search) with the source's metric. When the
recipe lists `eval.lm_eval_tasks`, every row also runs them on the same
in-memory model (`loradem.evaluate.harness`) and carries ``benchmarks``:
{task: {metric: value}}; the task names and their data are checked before any
model runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from loradem.files import read_json
from loradem.recipe import Recipe


def _cost(records: dict[str, dict], used: list[str], search_seconds: float = 0.0) -> dict:
    """Training tokens and seconds of the `used` adapters. An anchored adapter's seconds add the base's generation
    of the anchor rows when its training generated them (the first source to need them; later ones read the cache)."""
    tokens = sum(int(records[n].get("train_tokens") or 0) for n in used)
    seconds = sum(float(records[n].get("train_seconds") or 0.0) + _anchor_seconds(records[n]) for n in used)
    return {
        "train_tokens": tokens,
        "train_seconds": round(seconds, 1),
        "search_seconds": round(search_seconds, 1),
        "total_seconds": round(seconds + search_seconds, 1),
    }


def _anchor_seconds(record: dict) -> float:
    anchored = record.get("anchor")
    return float(anchored.get("generation_seconds") or 0.0) if isinstance(anchored, dict) else 0.0


def _add_learning(cost: dict, learned: dict) -> dict:
    """Learned weights are trained: their tokens count as training tokens, their seconds as training time."""
    cost["train_tokens"] += int(learned.get("learn_tokens") or 0)
    cost["learn_seconds"] = round(float(learned.get("learn_seconds") or 0.0), 1)
    cost["train_seconds"] = round(cost["train_seconds"] + cost["learn_seconds"], 1)
    cost["total_seconds"] = round(cost["total_seconds"] + cost["learn_seconds"], 1)
    return cost


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _increment(search_record: dict, names: list[str], records: dict[str, dict], rows: list[dict],
               learned: dict | None = None) -> dict | None:
    """What adding sources cost under DEM (their adapters + this warm-started search, + relearning the per-module
    weights when the run learns them) vs retraining the mix."""
    previous_from = search_record.get("warm_start")
    if not previous_from or not Path(previous_from).is_file():
        return None
    before = set((read_json(previous_from).get("weights") or {}))
    new = [n for n in names if n not in before]
    if not new:
        return None
    dem = _cost(records, new, float(search_record.get("search_seconds") or 0.0))
    if learned is not None:
        _add_learning(dem, learned)
    mix = next((r["cost"] for r in rows if r["name"] == "mix"), None)
    return {"previous": str(previous_from), "new_sources": new, "dem_cost": dem, "mix_retrain_cost": mix,
            "relearned": learned is not None}


def _records(adapters: dict[str, Path], names: list[str]) -> dict[str, dict]:
    return {n: (read_json(adapters[n] / "loradem-train.json") if (adapters[n] / "loradem-train.json").is_file() else {}) for n in names}


def _search_summary(record: dict) -> dict:
    return {k: record.get(k) for k in ("objective", "n_trials", "sampler", "search_seconds", "eval_fraction")}


def _learn_summary(learned: dict | None) -> dict | None:
    if learned is None:
        return None
    return {k: learned.get(k) for k in ("objective", "initial_objective", "best_step", "steps", "granularity", "n_parameters",
                                        "learn_tokens", "learn_seconds", "fit_rows")}


def _variant_rows(v: dict, base_dir: Path, names: list[str], metrics: dict[str, str], score) -> list[dict]:
    """Rows '<variant>:adapter:<source>', ':uniform', ':sum', ':dem' (the searched weights) and, when the variant
    learns, ':dem-learned', all on one resident base with the variant's adapters folded exactly."""
    from loradem.merge.search import fold_weights

    adapters, search_record, learned = v["adapters"], v["search"], v["learned"]
    records = _records(adapters, names)
    search_seconds = float(search_record.get("search_seconds") or 0.0)
    plan = _fixed_plan(names, records)
    plan.append(("dem", fold_weights(search_record), {k: float(search_record["weights"][k]) for k in names},
                 _cost(records, names, search_seconds)))
    if learned is not None:
        plan.append(("dem-learned", learned["module_weights"], {k: float(w) for k, w in learned["weights"].items()},
                     _add_learning(_cost(records, names, search_seconds), learned)))
    return _score_plan(plan, v["variant"].name + ":", base_dir, adapters, names, metrics, score)


def _fixed_plan(names: list[str], records: dict[str, dict]) -> list[tuple]:
    """(row, weights set, weights shown (None: the same), cost) of each adapter alone, uniform and sum."""
    n = len(names)
    plan = [(f"adapter:{k}", {j: float(j == k) for j in names}, None, _cost(records, [k])) for k in names]
    return plan + [("uniform", {k: 1.0 / n for k in names}, None, _cost(records, names)),
                   ("sum", {k: 1.0 for k in names}, None, _cost(records, names))]


def _score_plan(plan: list[tuple], prefix: str, base_dir: Path, adapters: dict[str, Path], names: list[str],
                metrics: dict[str, str], score) -> list[dict]:
    """Score each planned row on one resident base with `adapters` folded exactly (a row only changes weights)."""
    from loradem.model.soup import load_multi, set_weights

    model, tokenizer = load_multi(base_dir, {k: adapters[k] for k in names}, fold=True)
    rows = []
    for name, weights, shown, cost in plan:
        set_weights(model, weights)
        per_source = score(model, tokenizer, prefix + name)
        rows.append({"name": prefix + name, "per_source": per_source, "average": _average(per_source, metrics),
                     "cost": cost, "weights": shown if shown is not None else weights})
    del model
    return rows


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
    recipe_path: str | None = None,
    learned_record: dict | None = None,
    variants: list[dict] = (),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Evaluate base, each adapter, uniform, sum, the assembled DEM model and (learn.enabled) the learned per-module
    weights; write the report; return its rows."""
    from loradem.model.generate import evaluate_source
    from loradem.evaluate.harness import load_lm_eval_tasks, resolve_include_path, run_lm_eval
    from loradem.train.mix import find_mix
    from loradem.model.soup import load_base, load_multi, load_tokenizer, set_weights
    from loradem.evaluate.report import write_report

    names = [s.name for s in recipe.sources]
    metrics = {s.name: s.metric for s in recipe.sources}
    max_length = recipe.train.max_length
    records = _records(adapters, names)
    predictions: dict[str, dict[str, list[str]]] = {}
    lm_tasks = list(recipe.eval.lm_eval_tasks)
    lm_include = resolve_include_path(recipe.eval.lm_eval_include_path)
    benchmarks: dict[str, dict[str, dict[str, float]]] = {}
    if lm_tasks:  # an unknown task or unreachable data fails here, before any model runs
        load_lm_eval_tasks(lm_tasks, include_path=lm_include, log=log)

    def score(model, tokenizer, row_name: str) -> dict[str, float]:
        out = {}
        for s in recipe.sources:
            res = evaluate_source(model, tokenizer, splits[s.name].test, s.metric, recipe.eval, max_length, log=lambda m: None)
            out[s.name] = res["value"]
            if "predictions" in res:
                predictions.setdefault(row_name, {})[s.name] = res["predictions"]
        log(f"{row_name:<20} " + "  ".join(f"{n}={v:.3f}" for n, v in out.items()))
        if lm_tasks:
            benchmarks[row_name] = run_lm_eval(model, tokenizer, lm_tasks, include_path=lm_include, limit=recipe.eval.lm_eval_limit,
                                               batch_size=recipe.eval.batch_size, log=lambda m: log(f"{row_name:<20} {m}"))
        return out

    plan = [("base", {k: 0.0 for k in names}, None, _cost(records, [])), *_fixed_plan(names, records)]
    rows = _score_plan(plan, "", base_dir, adapters, names, metrics, score)  # a row = one exact fold, plain-speed forward

    mix_dir = find_mix(recipe, base_dir, adapters, splits)
    if mix_dir is not None:  # the data-mixing adapter alone (weight 1), after the per-source rows
        mix_model, mix_tokenizer = load_multi(base_dir, {"mix": mix_dir})
        set_weights(mix_model, {"mix": 1.0})
        per_source = score(mix_model, mix_tokenizer, "mix")
        del mix_model
        mix_record = read_json(mix_dir / "loradem-train.json")
        mix_row = {"name": "mix", "per_source": per_source, "average": _average(per_source, metrics),
                   "cost": _cost({"mix": mix_record}, ["mix"])}
        rows.insert(1 + len(names), mix_row)

    from loradem.merge.search import fold_weights

    dem_weights = {k: float(search_record["weights"][k]) for k in names}
    search_seconds = float(search_record.get("search_seconds") or 0.0)
    learned = learned_record
    assembled = "dem-learned" if learned is not None and recipe.assemble.weights == "learned" else "dem"
    merged = load_base(model_dir)  # the assembled folder scores the row whose weights it folds
    scores = {assembled: score(merged, load_tokenizer(model_dir), assembled)}
    del merged
    if learned is not None:  # the other of the two rows is scored on the exact in-memory fold
        other = "dem" if assembled == "dem-learned" else "dem-learned"
        model, tokenizer = load_multi(base_dir, {k: adapters[k] for k in names}, fold=True)
        set_weights(model, learned["module_weights"] if other == "dem-learned" else fold_weights(search_record))
        scores[other] = score(model, tokenizer, other)
        del model
    rows.append({"name": "dem", "per_source": scores["dem"], "average": _average(scores["dem"], metrics),
                 "cost": _cost(records, names, search_seconds), "weights": dem_weights})
    if learned is not None:
        rows.append({"name": "dem-learned", "per_source": scores["dem-learned"],
                     "average": _average(scores["dem-learned"], metrics),
                     "cost": _add_learning(_cost(records, names, search_seconds), learned),
                     "weights": {k: float(v) for k, v in learned["weights"].items()}})

    variant_extra = {}
    for v in variants:  # each variant's own adapter set, scored on in-memory exact folds, after the recipe's rows
        rows += _variant_rows(v, base_dir, names, metrics, score)
        variant_extra[v["variant"].name] = {
            "description": v["variant"].description, "overrides": v["variant"].overrides(), "out_dir": str(v["recipe"].out_dir),
            "search": _search_summary(v["search"]), "learn": _learn_summary(v["learned"]),
            "vectors": read_json(v["recipe"].out_dir / "vectors.json") if (v["recipe"].out_dir / "vectors.json").is_file() else None,
            "increment": _increment(v["search"], names, _records(v["adapters"], names), rows, v["learned"]),
        }

    extra = {
        "search": _search_summary(search_record),
        "learn": _learn_summary(learned),
        "test_rows": {k: len(splits[k].test) for k in names},
        "model": str(model_dir),
        "predictions": predictions,
    }
    extra["increment"] = _increment(search_record, names, records, rows, learned if assembled == "dem-learned" else None)
    if variant_extra:
        extra["variants"] = variant_extra
    vectors_json = recipe.out_dir / "vectors.json"
    if vectors_json.is_file():
        extra["vectors"] = read_json(vectors_json)
    if mix_dir is not None:
        mix_cost, dem_cost = mix_row["cost"], next(r for r in rows if r["name"] == assembled)["cost"]
        extra["mix"] = {
            "adapter": str(mix_dir),
            "target_tokens": mix_record.get("target_tokens"),
            "shares": mix_record.get("shares"),
            # DEM's cost (the assembled model's row): every per-source adapter's training, the weight search,
            # and the learned weights' training when the model folds them
            "dem_row": assembled,
            "cost_ratio_mix_to_dem": {
                "train_tokens": _ratio(mix_cost["train_tokens"], dem_cost["train_tokens"]),
                "seconds": _ratio(mix_cost["total_seconds"], dem_cost["total_seconds"]),
            },
        }
    if lm_tasks:
        from importlib.metadata import version

        extra["lm_eval"] = {"version": version("lm_eval"), "tasks": lm_tasks, "limit": recipe.eval.lm_eval_limit,
                            "include_path": str(lm_include) if lm_include else None}
        for row in rows:
            if row["name"] in benchmarks:
                row["benchmarks"] = benchmarks[row["name"]]
    write_report(recipe.out_dir, recipe, rows, extra=extra, recipe_path=recipe_path)
    return rows
