"""The comparison behind the report: every model a run produced or can cheaply make.

    plan = EvalPlan(run_name="demo", sources=(EvalSource("addition", "exact_match", test_rows), ...),
                    settings=EvalSettings(), max_length=256, base_dir=base, adapters={"addition": folder, ...},
                    search=read_json("runs/demo/search/weights.json"), model_dir=Path("runs/demo/model"),
                    out_dir=Path("runs/demo"))
    rows = compare_models(plan)          # and report.json, report.md, figures in plan.out_dir

Everything it needs arrives in the plan, already resolved (`loradem.pipeline`
builds it from a recipe): the sources with their metric and held-out test
rows, the evaluation settings, the adapters, the searched and learned weight
records, the assembled model folder, the finished mix adapter if any, and each
variant's own adapters and weights.

Rows (names fixed by report.json's contract):
- ``base``              all weights 0 (the original base, also when the recipe warms its own)
- ``warm-base``         the warmed base alone (`loradem.train.warmup`), when the recipe has a warm-up: every
                        other row but ``base``, ``mix`` and ``mix-tuned`` is built on it and charged its training
- ``adapter:<source>``  that source's adapter alone (weight 1, the others 0)
- ``mix``               the data-mixing adapter alone (`loradem.train.mix`), when the plan has a finished one
                        for the current adapters; report.json's ``mix`` gives its cost over DEM's
- ``mix-tuned``         the mix of the proportion grid (`EvalPlan.mix_grid`) with the lowest validation loss,
                        charged the whole grid's training; report.json's ``mix_grid`` records every set
- ``uniform``           every weight 1/n
- ``sum``               every weight 1 (the plain sum of the vectors)
- ``dem``               the searched weights
- ``dem-learned``       the learned per-module weights (when the plan has them)
- ``dem-regmean``       the RegMean adapter at weight 1 (`loradem.merge.regmean`, when the plan has one); its
                        cost adds the Gram matrices' and the solve's seconds; report.json's ``regmean`` its record
- ``<variant>:<row>``   for each variant, its own adapters alone, uniform, sum,
                        dem and dem-learned (and warm-base, with its warm-up; dem-regmean, when it merges by
                        RegMean), scored on an in-memory exact fold of its adapters (or its RegMean adapter)
                        into its own base (its warmed base, with a warm-up);
                        report.json's ``variants`` gives what each overrides, its search and learning

Of ``dem``, ``dem-learned`` and ``dem-regmean``, the row whose weights the assembled model
folds (`EvalPlan.assembled_weights`) is scored on that folder read back from
disk (the artifact users ship); the other on an in-memory exact fold. The
other rows are one resident base with all adapters folded; a row only changes
their scales. Each is scored on every source's held-out test rows (never seen
by training or the search) with the source's metric. When the settings list
`lm_eval_tasks`, every row also runs them on the same in-memory model
(`loradem.evaluate.harness`) and carries ``benchmarks``: {task: {metric:
value}}; the task names and their data are checked before any model runs.

Every row also carries the held-out measures, when the plan has them:
``held_out`` ({task: exact match} on tasks no source trains on, the plan's
`held_out`) and ``retention`` ({"agreement", "kl"} against the base's greedy
replies to generic prompts, `loradem.evaluate.retention`; the base's replies
are cached in ``<out_dir>/retention_base.json``). report.json's
``held_out`` holds the tasks' predictions, ``retention`` the prompts'
record, and ``eval_seconds`` what each measure took per row.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from loradem.data.anchors import generation_seconds
from loradem.evaluate.harness import load_lm_eval_tasks, resolve_include_path, run_lm_eval
from loradem.evaluate.report import write_report
from loradem.evaluate.retention import Reference, base_reference, retention_scores
from loradem.evaluate.score_cache import ScoreCache, folder_fingerprint, rows_fingerprint
from loradem.errors import LorademError
from loradem.files import fingerprint_weights, read_json, stable_hash
from loradem.machine import describe
from loradem.merge.search import fold_weights
from loradem.model.generate import evaluate_source
from loradem.model.render import Prompt
from loradem.model.soup import load_base, load_multi, load_tokenizer, set_weights
from loradem.progress import progress
from loradem.recipe import EvalSettings
from loradem.train.mix import grid_record

Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalSource:
    """One source as evaluation sees it: its name, its metric and its held-out test rows."""

    name: str
    metric: Literal["exact_match", "loss"]
    test: Sequence[dict]


@dataclass(frozen=True)
class RetentionPlan:
    """Base-capability retention as evaluation runs it: the prompts, the reply length, and where they came from."""

    prompts: tuple[Prompt, ...]
    max_new_tokens: int = 24
    source: str = "builtin"  # report.json's record of the prompts: 'builtin' or the file


RETENTION_CACHE = "retention_base.json"  # the base's replies, in the run folder


@dataclass(frozen=True)
class VariantPlan:
    """A variant's own adapter set and weight records, and what the report says about it."""

    name: str
    adapters: dict[str, Path]
    search: dict  # its search/weights.json
    out_dir: Path  # where its vectors.json is read from, and what the report points to
    learned: Optional[dict] = None  # its learn/weights.json, when it learns per-module weights
    description: str = ""
    overrides: dict = field(default_factory=dict)
    warm_dir: Optional[Path] = None  # its warmed base, when it has a warm-up (its adapters' base; None: the plan's)
    warmup: Optional[dict] = None  # `loradem.train.warmup.warmup_record` of that warmed base
    regmean_dir: Optional[Path] = None  # its RegMean adapter folder, when it merges by RegMean


@dataclass(frozen=True)
class EvalPlan:
    """Everything the evaluation stage reads, resolved: no recipe, no YAML."""

    run_name: str  # report.json's "recipe" and report.md's title
    sources: tuple[EvalSource, ...]
    settings: EvalSettings
    max_length: int  # tokens per row for the loss metric, as in training
    base_dir: Path
    adapters: dict[str, Path]  # source -> finished adapter folder
    search: dict  # search/weights.json
    model_dir: Path  # the assembled model
    out_dir: Path  # where the report is written (and vectors.json is read from)
    assembled_weights: Literal["search", "learned", "regmean"] = "search"  # which weights model_dir folds
    learned: Optional[dict] = None  # learn/weights.json, when the run learns per-module weights
    regmean_dir: Optional[Path] = None  # the RegMean adapter folder (regmean.json inside), when the run merges by RegMean
    warm_dir: Optional[Path] = None  # the recipe's warmed base (its adapters' base), when it has a warm-up
    warmup: Optional[dict] = None  # `loradem.train.warmup.warmup_record` of that warmed base
    mix_dir: Optional[Path] = None  # the finished data-mixing adapter for these adapters
    mix_grid: tuple[Path, ...] = ()  # the mix at natural proportions, then at each tuned set (all finished), or ()
    variants: tuple[VariantPlan, ...] = ()
    held_out: tuple[EvalSource, ...] = ()  # exact-match tasks no source trains on, scored on every row
    score_cache: Optional[Path] = None  # where scores are kept across runs (`loradem.evaluate.score_cache`); None: none
    retention: Optional[RetentionPlan] = None  # agreement and KL against the base on every row
    recipe_path: Optional[str] = None  # kept in report.json
    reproduce: Optional[str] = None  # the command report.md gives to reproduce the run


def _cost(records: dict[str, dict], used: list[str], search_seconds: float = 0.0, warmup: Optional[dict] = None) -> dict:
    """Training tokens and seconds of the `used` adapters. An anchored adapter's seconds add the base's generation
    of the anchor rows when its training generated them (the first source to need them; later ones read the cache).
    With `warmup` (the row is built on a warmed base), the warm-up's training counts too, and is also shown apart."""
    tokens = sum(int(records[n].get("train_tokens") or 0) for n in used)
    seconds = sum(float(records[n].get("train_seconds") or 0.0) + generation_seconds(records[n]) for n in used)
    warm = {}
    if warmup is not None:
        warm = {"warmup_tokens": int(warmup.get("train_tokens") or 0),
                "warmup_seconds": round(float(warmup.get("train_seconds") or 0.0), 1)}
        tokens += warm["warmup_tokens"]
        seconds += float(warmup.get("train_seconds") or 0.0)
    return {
        "train_tokens": tokens,
        "train_seconds": round(seconds, 1),
        "search_seconds": round(search_seconds, 1),
        "total_seconds": round(seconds + search_seconds, 1),
        **warm,
    }


def _add_learning(cost: dict, learned: dict) -> dict:
    """Learned weights are trained: their tokens count as training tokens, their seconds as training time."""
    cost["train_tokens"] += int(learned.get("learn_tokens") or 0)
    cost["learn_seconds"] = round(float(learned.get("learn_seconds") or 0.0), 1)
    cost["train_seconds"] = round(cost["train_seconds"] + cost["learn_seconds"], 1)
    cost["total_seconds"] = round(cost["total_seconds"] + cost["learn_seconds"], 1)
    return cost


def _add_regmean(cost: dict, record: dict) -> dict:
    """RegMean's Gram matrices and solve: seconds beside training (no gradient, so no training tokens)."""
    cost["regmean_seconds"] = round(float(record.get("regmean_seconds") or 0.0), 1)
    cost["total_seconds"] = round(cost["total_seconds"] + cost["regmean_seconds"], 1)
    return cost


def _assembled_row(plan: EvalPlan) -> str:
    """The row whose model plan.model_dir holds."""
    if plan.assembled_weights == "learned" and plan.learned is not None:
        return "dem-learned"
    if plan.assembled_weights == "regmean" and plan.regmean_dir is not None:
        return "dem-regmean"
    return "dem"


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _increment(search_record: dict, names: list[str], records: dict[str, dict], rows: list[dict], run_dir: Path,
               learned: dict | None = None) -> dict | None:
    """What adding sources cost under DEM (their adapters + this warm-started search, + relearning the per-module
    weights when the run learns them) vs retraining the mix. `run_dir` holds the search folder (and report.json)."""
    recorded = search_record.get("warm_start")  # relative to search/weights.json's folder (older runs: to the cwd)
    if not recorded:
        return None
    previous_from = next((p for p in (Path(run_dir) / "search" / recorded, Path(recorded)) if p.is_file()), None)
    if previous_from is None:
        return None
    before = set((read_json(previous_from).get("weights") or {}))
    new = [n for n in names if n not in before]
    if not new:
        return None
    dem = _cost(records, new, float(search_record.get("search_seconds") or 0.0))
    if learned is not None:
        _add_learning(dem, learned)
    # with a proportion grid, retraining the mix means retraining every set of it: mix-tuned's cost is the grid's
    mix_row = next((r for name in ("mix-tuned", "mix") for r in rows if r["name"] == name), None)
    return {"previous": os.path.relpath(previous_from.resolve(), Path(run_dir).resolve()), "new_sources": new, "dem_cost": dem,
            "mix_retrain_cost": mix_row["cost"] if mix_row else None, "mix_retrain_row": mix_row["name"] if mix_row else None,
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


def _variant_rows(v: VariantPlan, base_dir: Path, names: list[str], metrics: dict[str, str], score: _Scorer) -> list[dict]:
    """Rows '<variant>:adapter:<source>', ':uniform', ':sum', ':dem' (the searched weights) and, when the variant
    learns, ':dem-learned', all on one resident base with the variant's adapters folded exactly; with a warm-up,
    ':warm-base' first and every row on (and charged) its warmed base; when it merges by RegMean, ':dem-regmean'
    last, its RegMean adapter folded exactly into that base."""
    records = _records(v.adapters, names)
    search_seconds = float(v.search.get("search_seconds") or 0.0)
    plan = _fixed_plan(names, records, v.warmup)
    plan.append(("dem", fold_weights(v.search), {k: float(v.search["weights"][k]) for k in names},
                 _cost(records, names, search_seconds, v.warmup)))
    if v.learned is not None:
        plan.append(("dem-learned", v.learned["module_weights"], {k: float(w) for k, w in v.learned["weights"].items()},
                     _add_learning(_cost(records, names, search_seconds, v.warmup), v.learned)))
    if v.warm_dir is not None:
        plan.insert(0, _warm_row(names, v.warmup))
    rows = _score_plan(plan, v.name + ":", v.warm_dir or base_dir, v.adapters, names, metrics, score)
    if v.regmean_dir is not None:
        name = f"{v.name}:dem-regmean"
        record = read_json(v.regmean_dir / "regmean.json")
        model, tokenizer = load_multi(v.warm_dir or base_dir, {"regmean": v.regmean_dir}, fold=True)
        per_source = score(model, tokenizer, name, identity=_regmean_identity(v.warm_dir or base_dir, record),
                           folders=(v.warm_dir or base_dir, v.regmean_dir))
        del model
        rows.append({"name": name, "per_source": per_source, "average": _average(per_source, metrics),
                     "cost": _add_regmean(_cost(records, names, warmup=v.warmup), record)})
    return rows


def _regmean_identity(base_dir: Path, record: dict) -> str:
    """A RegMean adapter's model: the base it is folded into and what decided the merge (regmean.json's identity:
    the adapters, their base, the rows and the settings)."""
    return json.dumps({"base": str(Path(base_dir).resolve()), "regmean": record["identity"]}, sort_keys=True)


def _regmean_summary(record: dict) -> dict:
    """report.json's record of a RegMean merge: its regmean.json without the identity hashes."""
    return {k: v for k, v in record.items() if k != "identity"}


def _warm_row(names: list[str], warmup: Optional[dict]) -> tuple:
    """The warmed base alone (every adapter at 0 on it), charged the warm-up's training."""
    return ("warm-base", {k: 0.0 for k in names}, None, _cost({}, [], warmup=warmup))


def _fixed_plan(names: list[str], records: dict[str, dict], warmup: Optional[dict] = None) -> list[tuple]:
    """(row, weights set, weights shown (None: the same), cost) of each adapter alone, uniform and sum."""
    n = len(names)
    plan = [(f"adapter:{k}", {j: float(j == k) for j in names}, None, _cost(records, [k], warmup=warmup)) for k in names]
    return plan + [("uniform", {k: 1.0 / n for k in names}, None, _cost(records, names, warmup=warmup)),
                   ("sum", {k: 1.0 for k in names}, None, _cost(records, names, warmup=warmup))]


def _used(weights: dict, name: str) -> bool:
    w = weights.get(name)
    return not (isinstance(w, (int, float)) and w == 0)


def model_identity(base_dir: Path, adapters: dict[str, Path], weights: dict) -> str:
    """What decides an in-memory fold's every weight: the base, each adapter with a non-zero weight, and the
    weights (per source, per source and layer group, or per module). Two rows with the same identity are the
    same model, bit for bit."""
    return json.dumps({"base": str(Path(base_dir).resolve()),
                       "adapters": {k: str(Path(v).resolve()) for k, v in sorted(adapters.items()) if _used(weights, k)},
                       "weights": {k: w for k, w in weights.items() if _used(weights, k)}}, sort_keys=True)


def model_folders(base_dir: Path, adapters: dict[str, Path], weights: dict) -> tuple[Path, ...]:
    """The weights folders an in-memory fold reads (the base and each adapter with a non-zero weight): what the
    score cache fingerprints beside `model_identity`."""
    return (Path(base_dir), *(Path(v) for k, v in sorted(adapters.items()) if _used(weights, k)))


# An assembled folder's files besides its weights that change what it generates (its card and provenance do not).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def folder_identity(model_dir: Path) -> str:
    """A model folder read from disk, by content: its config and tokenizer files (its weights are fingerprinted by
    the score cache), not its path, so another run's folder with the same model reuses its scores. A run scores one
    folder, so no two of its rows share this identity."""
    files = {name: stable_hash((model_dir / name).read_text(errors="replace"), length=16)
             for name in MODEL_FILES if (model_dir / name).is_file()}
    return json.dumps({"folder": files}, sort_keys=True)


def _score_plan(plan: list[tuple], prefix: str, base_dir: Path, adapters: dict[str, Path], names: list[str],
                metrics: dict[str, str], score: _Scorer) -> list[dict]:
    """Score each planned row on one resident base with `adapters` folded exactly (a row only changes weights)."""
    resident = {k: adapters[k] for k in names}
    model, tokenizer = load_multi(base_dir, resident, fold=True)
    rows = []
    for name, weights, shown, cost in plan:
        set_weights(model, weights)
        per_source = score(model, tokenizer, prefix + name, identity=model_identity(base_dir, resident, weights),
                           folders=model_folders(base_dir, resident, weights))
        rows.append({"name": prefix + name, "per_source": per_source, "average": _average(per_source, metrics),
                     "cost": cost, "weights": shown if shown is not None else weights})
    del model
    return rows


def _average(per_source: dict[str, float], metrics: dict[str, str]) -> float | None:
    if len(set(metrics.values())) != 1:
        return None  # an average of exact match and loss means nothing
    return sum(per_source.values()) / len(per_source)


def model_count(plan: EvalPlan) -> int:
    """How many models `compare_models` scores: the length of its progress bar."""
    n = len(plan.sources)
    count = 1 + n + 2 + (plan.mix_dir is not None) + bool(plan.mix_grid) + 1 + (plan.learned is not None)
    count += (plan.regmean_dir is not None) + (plan.warm_dir is not None)
    return count + sum(n + 3 + (v.learned is not None) + (v.warm_dir is not None) + (v.regmean_dir is not None)
                       for v in plan.variants)


class _Scorer:
    """Scores one model on every source's test rows, the held-out tasks and retention (and the lm-eval tasks), one
    log line and one bar step per model; keeps each row's predictions, measures and benchmarks for the report."""

    def __init__(self, plan: EvalPlan, lm_include: Optional[Path], bar, log: Log, reference: Optional[Reference] = None,
                 cache: Optional[ScoreCache] = None):
        self.plan, self.lm_include, self.bar, self.log, self.reference = plan, lm_include, bar, log, reference
        self.cache = cache
        self.cached: list[str] = []  # rows whose every measure came from earlier runs' entries
        self.partly_cached: dict[str, list[str]] = {}  # rows with some measures from earlier runs: which
        self.predictions: dict[str, dict[str, list[str]]] = {}
        self.held_out_predictions: dict[str, dict[str, list[str]]] = {}
        self.held_out: dict[str, dict[str, float]] = {}
        self.retention: dict[str, dict[str, float]] = {}
        self.seconds: dict[str, dict[str, float]] = {}
        self.benchmarks: dict[str, dict[str, dict[str, float]]] = {}
        self.test_scores: dict[str, dict[str, float]] = {}  # each row's test scores, by row name
        self.models: dict[str, str] = {}  # a model's identity -> the row that scored it

    def measures(self) -> list[tuple[str, Callable]]:
        """Each measure a row takes, by its score cache name, with the function that takes it (model, tokenizer,
        row name -> {"value", "predictions" when exact match})."""
        out: list[tuple[str, Callable]] = [(f"test:{s.name}", partial(self._rows, s)) for s in self.plan.sources]
        out += [(f"held_out:{t.name}", partial(self._rows, t)) for t in self.plan.held_out]
        if self.reference is not None:
            out.append(("retention", lambda model, tokenizer, row: {"value": retention_scores(model, tokenizer, self.reference)}))
        if self.plan.settings.lm_eval_tasks:
            out.append(("lm_eval", self._lm_eval))
        return out

    def _rows(self, source: EvalSource, model, tokenizer, row_name: str) -> dict:
        res = evaluate_source(model, tokenizer, source.test, source.metric, self.plan.settings, self.plan.max_length,
                              log=lambda m: None)
        return {"value": res["value"], **({"predictions": res["predictions"]} if "predictions" in res else {})}

    def _lm_eval(self, model, tokenizer, row_name: str) -> dict:
        settings = self.plan.settings
        return {"value": run_lm_eval(model, tokenizer, list(settings.lm_eval_tasks), include_path=self.lm_include,
                                     limit=settings.lm_eval_limit, batch_size=settings.batch_size,
                                     log=lambda m: self.log(f"{row_name:<20} {m}"))}

    def __call__(self, model, tokenizer, row_name: str, identity: Optional[str] = None,
                 folders: Sequence[Path] = ()) -> dict[str, float]:
        """Score `model` as `row_name`; a model whose `identity` (`model_identity`) an earlier row already has is
        not scored again: it takes that row's measures (a variant that changes only its merge reuses the recipe's
        adapter, uniform, sum and searched rows). With a score cache and the weights `folders` the model reads,
        each measure an earlier run took of this model the same way is that run's."""
        if identity is not None:
            if identity in self.models:
                return self.same_as(row_name, self.models[identity])
            self.models[identity] = row_name
        cached = self.cache.model(identity, folders) if self.cache is not None and identity is not None and folders else None
        taken: dict[str, dict] = {}
        reused: list[str] = []
        for part, measure in self.measures():
            key = self.cache.key(cached, part) if cached is not None else None
            entry = self.cache.load(key) if key is not None else None
            if entry is not None:
                reused.append(part)
            else:
                t0 = time.perf_counter()
                entry = measure(model, tokenizer, row_name)
                entry["seconds"] = time.perf_counter() - t0
                if key is not None:
                    self._store(key, entry, row_name)
            taken[part] = entry
        return self._keep(row_name, taken, reused)

    def _store(self, key: str, entry: dict, row_name: str) -> None:
        try:
            self.cache.store(key, entry)
        except LorademError as exc:  # the score stands; only a later run's reuse of it is lost
            self.log(f"{row_name:<20} scores not kept for later runs: {exc}")

    def _keep(self, row_name: str, taken: dict[str, dict], reused: list[str]) -> dict[str, float]:
        """Put a row's measures where the report reads them; log its line and step the bar."""
        def group(prefix: str, tasks: Sequence[EvalSource], predictions: dict) -> tuple[dict, float]:
            parts = {t.name: taken[f"{prefix}:{t.name}"] for t in tasks}
            said = {name: p["predictions"] for name, p in parts.items() if "predictions" in p}
            if said:
                predictions[row_name] = said
            return {name: p["value"] for name, p in parts.items()}, sum(float(p["seconds"]) for p in parts.values())

        out, seconds = group("test", self.plan.sources, self.predictions)
        spent = {"test": seconds}
        line = f"{row_name:<20} " + "  ".join(f"{n}={v:.3f}" for n, v in out.items())
        if self.plan.held_out:
            held, spent["held_out"] = group("held_out", self.plan.held_out, self.held_out_predictions)
            self.held_out[row_name] = held
            line += "  | held-out " + "  ".join(f"{n}={v:.3f}" for n, v in held.items())
        if "retention" in taken:
            kept = self.retention[row_name] = taken["retention"]["value"]
            spent["retention"] = float(taken["retention"]["seconds"])
            line += f"  | agreement={kept['agreement']:.3f} kl={kept['kl']:.4f}"
        if "lm_eval" in taken:
            self.benchmarks[row_name] = taken["lm_eval"]["value"]
        self.seconds[row_name] = {k: round(v, 2) for k, v in spent.items()}
        self.test_scores[row_name] = out
        if reused and len(reused) == len(taken):
            self.cached.append(row_name)
            line += "  (scored by an earlier run: the same weights and evaluation)"
        elif reused:
            self.partly_cached[row_name] = reused
            line += f"  ({', '.join(reused)} from an earlier run)"
        self.log(line)
        self.bar.update(1)
        return out

    def same_as(self, row_name: str, scored: str) -> dict[str, float]:
        """`row_name` is the very model already scored as `scored`: its measures, without scoring it again."""
        for kept in (self.predictions, self.held_out_predictions, self.held_out, self.retention, self.seconds, self.benchmarks):
            if scored in kept:
                kept[row_name] = kept[scored]
        self.log(f"{row_name:<20} the same model as {scored}: its scores")
        self.bar.update(1)
        return self.test_scores[scored]


# The eval settings that decide one measure only: each is part of that measure's key, not of every key.
OWN_SETTINGS = ("held_out", "retention", "lm_eval_tasks", "lm_eval_include_path", "lm_eval_limit")


def _evaluation(plan: EvalPlan, lm_include: Optional[Path]) -> tuple[dict, dict[str, Any]]:
    """Everything but the model that decides a row's measures (the score cache's half of a key): what every
    measure shares, and what decides each measure alone, by its name in `_Scorer.measures`."""
    common = {"settings": plan.settings.model_dump(mode="json", exclude=set(OWN_SETTINGS)), "max_length": plan.max_length}
    parts: dict[str, Any] = {f"test:{s.name}": [s.metric, rows_fingerprint(s.test)] for s in plan.sources}
    parts.update({f"held_out:{t.name}": ["exact_match", rows_fingerprint(t.test)] for t in plan.held_out})
    if plan.retention is not None:
        parts["retention"] = {"prompts": rows_fingerprint(plan.retention.prompts), "max_new_tokens": plan.retention.max_new_tokens,
                              "base": fingerprint_weights(plan.base_dir)}  # KL and agreement are against the original base
    if plan.settings.lm_eval_tasks:
        parts["lm_eval"] = {"tasks": list(plan.settings.lm_eval_tasks), "limit": plan.settings.lm_eval_limit,
                            "files": folder_fingerprint(lm_include) if lm_include is not None else None}
    return common, parts


def compare_models(plan: EvalPlan, *, log: Log = print) -> list[dict]:
    """Evaluate base, each adapter, uniform, sum, the mix adapter (when given), the assembled DEM model and the
    learned per-module weights and the RegMean adapter (when given), then each variant's rows; write the report; return its rows."""
    lm_tasks = list(plan.settings.lm_eval_tasks)
    lm_include = resolve_include_path(plan.settings.lm_eval_include_path)
    if lm_tasks:  # an unknown task or unreachable data fails here, before any model runs
        load_lm_eval_tasks(lm_tasks, include_path=lm_include, log=log)
    reference = None
    if plan.retention is not None:  # the base's replies (cached in the run folder) and its logits on them
        reference = base_reference(plan.base_dir, plan.retention.prompts, max_new_tokens=plan.retention.max_new_tokens,
                                   batch_size=plan.settings.batch_size, cache=Path(plan.out_dir) / RETENTION_CACHE)
    cache = ScoreCache.for_plan(plan.score_cache, *_evaluation(plan, lm_include)) if plan.score_cache is not None else None
    with progress(model_count(plan), "eval", unit="model") as bar:
        score = _Scorer(plan, lm_include, bar, log, reference, cache)
        rows, extra = _score_all(plan, score)
    base_seconds = reference.generation_seconds if reference is not None else 0.0
    plain_text = reference is not None and all(isinstance(p, str) for p in reference.prompts)
    score.reference = reference = None  # the base's logits: about 190 MB on SmolLM2
    for row in rows:  # every row (the mix and the variants' included)
        _add_measures(row, score.held_out.get(row["name"]), score.retention.get(row["name"]))
    if plan.held_out:
        extra["held_out"] = {"rows": {t.name: len(t.test) for t in plan.held_out}, "predictions": score.held_out_predictions}
    if plan.retention is not None:
        extra["retention"] = {"prompts": plan.retention.source, "n": len(plan.retention.prompts),
                              "max_new_tokens": plan.retention.max_new_tokens,
                              "base_replies": RETENTION_CACHE,  # beside report.json
                              "base_generation_seconds": base_seconds, "plain_text": plain_text}
    extra["eval_seconds"] = score.seconds  # per row: test rows, held-out tasks, retention (lm-eval not included)
    if score.cached:  # their eval_seconds are the earlier runs'
        extra["eval_cached"] = score.cached
    if score.partly_cached:  # row -> the measures (and their seconds) an earlier run took
        extra["eval_cached_measures"] = score.partly_cached
    if lm_tasks:
        extra["lm_eval"] = {"version": version("lm_eval"), "tasks": lm_tasks, "limit": plan.settings.lm_eval_limit,
                            # relative to the report: no path of this machine in a shared run folder
                            "include_path": os.path.relpath(lm_include, Path(plan.out_dir).resolve()) if lm_include else None}
        for row in rows:
            if row["name"] in score.benchmarks:
                row["benchmarks"] = score.benchmarks[row["name"]]
    write_report(plan.out_dir, plan.run_name, {s.name: s.metric for s in plan.sources}, rows, extra=extra,
                 reproduce=plan.reproduce)
    return rows


def _add_measures(row: dict, held_out: Optional[dict], retention: Optional[dict]) -> None:
    """Put the held-out measures beside the row's per_source (in place: the row keeps its identity)."""
    items = list(row.items())
    row.clear()
    for key, value in items:
        row[key] = value
        if key == "per_source":
            row.update({k: v for k, v in (("held_out", held_out), ("retention", retention)) if v is not None})


def _score_all(plan: EvalPlan, score: _Scorer) -> tuple[list[dict], dict]:
    """Every row in report order, and report.json's extra data (lm-eval's aside)."""
    names = [s.name for s in plan.sources]
    metrics = {s.name: s.metric for s in plan.sources}
    base_dir, adapters, search_record, learned = plan.base_dir, plan.adapters, plan.search, plan.learned
    records = _records(adapters, names)
    warmup = plan.warmup if plan.warm_dir is not None else None
    own_base = plan.warm_dir or base_dir  # the adapters' base: every row but base and the mix is folded into it

    fixed = [("base", {k: 0.0 for k in names}, None, _cost(records, [])), *_fixed_plan(names, records, warmup)]
    if plan.warm_dir is not None:  # the original base alone, then the warmed base and the rest on it
        model = load_base(base_dir)
        rows = [{"name": "base", "per_source": (per := score(model, load_tokenizer(base_dir), "base",
                                                         identity=model_identity(base_dir, {}, {}), folders=(base_dir,))),
                 "average": _average(per, metrics), "cost": _cost(records, []), "weights": {k: 0.0 for k in names}}]
        del model
        fixed[0] = _warm_row(names, warmup)
        rows += _score_plan(fixed, "", own_base, adapters, names, metrics, score)
    else:
        rows = _score_plan(fixed, "", base_dir, adapters, names, metrics, score)  # a row = one exact fold, plain-speed forward
    first_after = len(rows) - 2  # where the mix rows go: after base (warm-base) and each adapter alone, before uniform

    mix_dir = plan.mix_dir
    if mix_dir is not None:  # the data-mixing adapter alone (weight 1), after the per-source rows
        mix_model, mix_tokenizer = load_multi(base_dir, {"mix": mix_dir})
        set_weights(mix_model, {"mix": 1.0})
        per_source = score(mix_model, mix_tokenizer, "mix", identity=model_identity(base_dir, {"mix": mix_dir}, {"mix": 1.0}),
                           folders=(base_dir, mix_dir))
        del mix_model
        mix_record = read_json(mix_dir / "loradem-train.json")
        mix_row = {"name": "mix", "per_source": per_source, "average": _average(per_source, metrics),
                   "cost": _cost({"mix": mix_record}, ["mix"])}
        rows.insert(first_after, mix_row)
    mix_grid = grid_record(plan.mix_grid, plan.out_dir) if plan.mix_grid else None
    if mix_grid is not None:  # the chosen set alone, charged every set's training, right after `mix`
        chosen = plan.mix_grid[mix_grid["chosen"]]
        if mix_dir is not None and Path(chosen).resolve() == Path(mix_dir).resolve():
            per_source = score.same_as("mix-tuned", "mix")  # the natural set won: the `mix` row's own adapter
        else:
            tuned_model, tuned_tokenizer = load_multi(base_dir, {"mix": chosen})
            set_weights(tuned_model, {"mix": 1.0})
            per_source = score(tuned_model, tuned_tokenizer, "mix-tuned",
                               identity=model_identity(base_dir, {"mix": chosen}, {"mix": 1.0}), folders=(base_dir, Path(chosen)))
            del tuned_model
        grid_records = {f"mix {i}": read_json(f / "loradem-train.json") for i, f in enumerate(plan.mix_grid)}
        rows.insert(first_after + (mix_dir is not None), {
            "name": "mix-tuned", "per_source": per_source, "average": _average(per_source, metrics),
            "cost": _cost(grid_records, list(grid_records))})

    dem_weights = {k: float(search_record["weights"][k]) for k in names}
    search_seconds = float(search_record.get("search_seconds") or 0.0)
    assembled = _assembled_row(plan)
    merged = load_base(plan.model_dir)  # the assembled folder scores the row whose weights it folds
    scores = {assembled: score(merged, load_tokenizer(plan.model_dir), assembled, identity=folder_identity(plan.model_dir),
                               folders=(plan.model_dir,))}
    del merged
    others = [r for r in ("dem", "dem-learned") if r != assembled and (r == "dem" or learned is not None)]
    if others:  # the others are scored on the exact in-memory fold
        resident = {k: adapters[k] for k in names}
        model, tokenizer = load_multi(own_base, resident, fold=True)
        for other in others:
            weights = learned["module_weights"] if other == "dem-learned" else fold_weights(search_record)
            set_weights(model, weights)
            scores[other] = score(model, tokenizer, other, identity=model_identity(own_base, resident, weights),
                                  folders=model_folders(own_base, resident, weights))
        del model
    regmean = read_json(plan.regmean_dir / "regmean.json") if plan.regmean_dir is not None else None
    if regmean is not None and assembled != "dem-regmean":
        model, tokenizer = load_multi(own_base, {"regmean": plan.regmean_dir}, fold=True)
        scores["dem-regmean"] = score(model, tokenizer, "dem-regmean", identity=_regmean_identity(own_base, regmean),
                                      folders=(own_base, plan.regmean_dir))
        del model
    rows.append({"name": "dem", "per_source": scores["dem"], "average": _average(scores["dem"], metrics),
                 "cost": _cost(records, names, search_seconds, warmup), "weights": dem_weights})
    if learned is not None:
        rows.append({"name": "dem-learned", "per_source": scores["dem-learned"],
                     "average": _average(scores["dem-learned"], metrics),
                     "cost": _add_learning(_cost(records, names, search_seconds, warmup), learned),
                     "weights": {k: float(v) for k, v in learned["weights"].items()}})
    if regmean is not None:
        rows.append({"name": "dem-regmean", "per_source": scores["dem-regmean"],
                     "average": _average(scores["dem-regmean"], metrics),
                     "cost": _add_regmean(_cost(records, names, warmup=warmup), regmean)})

    variant_extra = {}
    for v in plan.variants:  # each variant's own adapter set, scored on in-memory exact folds, after the run's rows
        rows += _variant_rows(v, base_dir, names, metrics, score)
        variant_extra[v.name] = {
            "description": v.description, "overrides": v.overrides, "out_dir": os.path.relpath(v.out_dir, plan.out_dir),
            "search": _search_summary(v.search), "learn": _learn_summary(v.learned), "warmup": v.warmup,
            **({"regmean": _regmean_summary(read_json(v.regmean_dir / "regmean.json"))} if v.regmean_dir is not None else {}),
            "vectors": _read_if_file(v.out_dir / "vectors.json"),
            "increment": _increment(v.search, names, _records(v.adapters, names), rows, v.out_dir, v.learned),
        }

    extra = {
        **({"recipe_path": plan.recipe_path} if plan.recipe_path else {}),
        "search": _search_summary(search_record),
        "learn": _learn_summary(learned),
        **({"warmup": warmup} if warmup is not None else {}),
        **({"regmean": _regmean_summary(regmean)} if regmean is not None else {}),
        "test_rows": {s.name: len(s.test) for s in plan.sources},
        "machine": describe(),  # what the evaluation ran on; each adapter's record says where it trained
        "model": os.path.relpath(plan.model_dir, plan.out_dir),  # relative to report.json, as the mix's adapter
        "predictions": score.predictions,
    }
    extra["increment"] = _increment(search_record, names, records, rows, plan.out_dir,
                                    learned if assembled == "dem-learned" else None)
    if variant_extra:
        extra["variants"] = variant_extra
    vectors = _read_if_file(plan.out_dir / "vectors.json")
    if vectors is not None:
        extra["vectors"] = vectors
    if mix_dir is not None:
        mix_cost, dem_cost = mix_row["cost"], next(r for r in rows if r["name"] == assembled)["cost"]
        extra["mix"] = {
            "adapter": os.path.relpath(mix_dir, plan.out_dir),
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
    if mix_grid is not None:
        extra["mix_grid"] = mix_grid
    return rows, extra


def _read_if_file(path: Path) -> Optional[dict]:
    return read_json(path) if path.is_file() else None
