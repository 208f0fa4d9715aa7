"""`loradem search`: choose the DEM weights with Optuna, at the cost of evaluations only.

    result = search_weights(recipe, base_dir, adapters, validation, out_dir)
    result["weights"]           # {source: w}, also in out_dir/weights.json
    loradem search RECIPE --workers 4 --storage postgresql://user@host/loradem

The base and every adapter stay loaded (`loradem.model.soup`, fold=True); a trial
re-folds the weighted deltas into the resident weights (one addmm per layer
from a kept copy of the base) and evaluates, so it costs forward passes plus a
fraction of a second, never a reload.

- Objective (`search.objective`): 'val_loss' (minimized), the mean over sources
  of each source's validation loss; 'exact_match' (maximized), the same mean of
  greedy exact match (`eval.max_new_tokens`). Both on the first
  `search.max_rows_per_source` validation rows, tokenized once, and weighted by
  each source's `importance` (a source of importance 0 is not evaluated).
- Search space, warm starts, samplers: `loradem.merge.space`.
- Pruning (`search.pruning`): sources are evaluated one at a time and the
  partial weighted mean is reported after each; Optuna's MedianPruner stops a
  trial worse than the median of earlier trials at the same step. Pruned trials
  stay in the study and trials.csv as PRUNED and are never the best.
- Storage and workers (`loradem.merge.study`): SQLite out_dir/search.db by default,
  or any RDB URL / journal file; the study's name is the recipe's name plus a
  hash of everything that defines the objective, so re-running resumes:
  earlier trials stay and only n_trials minus the finished (complete or
  pruned) ones run, split over `workers` processes.
- Outputs (atomic, weights.json last): weights.json, trials.csv (every finished
  trial), search.png (objective by trial, best so far) and, when Optuna can
  compute them, parameter importances in weights.json and importances.png.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from loradem.errors import LorademError
from loradem.files import atomic_write_json, atomic_write_text, fingerprint_weights, stable_hash
from loradem.merge.space import SearchSpace, build_sampler, read_previous, target_trials, warm_start_points
from loradem.merge.study import Storage, enqueue_points, finished_count, open_study, param_importances, run_workers, split_trials, stop_at, trials_in

DIRECTION = {"val_loss": "minimize", "exact_match": "maximize"}
LABEL = {"val_loss": "validation loss", "exact_match": "exact match"}


# ---- the objective ----------------------------------------------------------------

def weighted_mean(values: dict[str, float], importance: dict[str, float]) -> float:
    """Σ importanceₛ·valueₛ / Σ importanceₛ over the sources in `values`."""
    total = sum(importance[s] for s in values)
    return sum(importance[s] * v for s, v in values.items()) / total


def make_evaluators(model, tokenizer, used: dict[str, list[dict]], recipe) -> dict[str, Callable[[], float]]:
    """One zero-argument scorer per source, on rows prepared once (tokenized for the loss; prompts and references for exact match)."""
    from loradem.model import generate as evaluate
    from loradem.model import render
    from loradem.model.render import eval_pair

    settings = recipe.search
    out: dict[str, Callable[[], float]] = {}
    for s, rows in used.items():
        if settings.objective == "val_loss":
            encoded = render.encode_for_loss(rows, tokenizer, recipe.train.max_length)
            if evaluate.scored_tokens(encoded) == 0:
                raise LorademError(f"search: source {s!r}: no completion tokens left within train.max_length={recipe.train.max_length}")
            out[s] = lambda enc=encoded: evaluate.mean_loss(model, enc, batch_size=settings.batch_size)
        else:
            pairs = [eval_pair(row) for row in rows]
            prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
            out[s] = lambda p=prompts, r=refs: evaluate.exact_match(
                evaluate.generate_answers(model, tokenizer, p, max_new_tokens=recipe.eval.max_new_tokens,
                                          batch_size=settings.batch_size, log=None), r)
    return out


def make_objective(model, evaluators: dict[str, Callable[[], float]], space: SearchSpace, importance: dict[str, float],
                   *, prune: bool, worker: int = 0) -> Callable:
    """The trial function: suggest, set the LoRA scales, score source by source (reporting partial means when pruning)."""
    import optuna

    from loradem.model.soup import set_weights

    order = list(evaluators)

    def objective(trial) -> float:
        params = space.suggest(trial)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("pid", os.getpid())
        t0 = time.perf_counter()
        set_weights(model, space.weights(params))
        t1 = time.perf_counter()
        values: dict[str, float] = {}
        for i, s in enumerate(order):
            values[s] = evaluators[s]()
            if prune and i < len(order) - 1:
                trial.report(weighted_mean(values, importance), step=i)
                if trial.should_prune():
                    trial.set_user_attr("per_source", values)
                    raise optuna.TrialPruned(f"pruned after {i + 1} of {len(order)} sources")
        t2 = time.perf_counter()
        trial.set_user_attr("per_source", values)
        trial.set_user_attr("set_seconds", t1 - t0)
        trial.set_user_attr("eval_seconds", t2 - t1)
        return weighted_mean(values, importance)

    return objective


def _log_trial(log: Callable[[str], None], space: SearchSpace, worker: Optional[int]) -> Callable:
    from optuna.trial import TrialState

    who = "" if worker is None else f"[worker {worker}] "

    def callback(study, trial) -> None:
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        ws = " ".join(f"{s}={w:.3f}" for s, w in space.mean_weights(trial.params).items())
        try:
            best = study.best_trial
            tail = f"(best {best.value:.4f}, trial {best.number})"
        except ValueError:
            tail = ""
        what = f"pruned at {trial.value:.4f}" if trial.state == TrialState.PRUNED else f"objective {trial.value:.4f}"
        log(f"{who}trial {trial.number}: {ws} {what} {tail}".rstrip())

    return callback


# ---- a run of trials (in this process, or in one worker process) --------------------

@dataclass
class TrialJob:
    """Everything a process needs to run trials on a study (picklable: workers are spawned)."""

    recipe: object
    base_dir: Path
    adapters: dict[str, Path]
    used: dict[str, list[dict]]
    storage: Storage
    study_name: str
    space: SearchSpace
    importance: dict[str, float]
    n_trials: int
    target: int
    worker: Optional[int] = None  # None: the search's own process
    threads: Optional[int] = None
    seed_offset: int = 0

    # the recipe's per-source override models are built at import time and do not pickle: send it as JSON
    def __getstate__(self) -> dict:
        return {**self.__dict__, "recipe": self.recipe.model_dump(mode="json")}

    def __setstate__(self, state: dict) -> None:
        from loradem.recipe import Recipe

        self.__dict__.update({**state, "recipe": Recipe.model_validate(state["recipe"])})


def run_trials(job: TrialJob, log: Callable[[str], None] = print) -> None:
    """Load the model once and run up to job.n_trials trials, stopping early once the study has job.target finished ones."""
    import optuna
    import torch

    from loradem.model.soup import load_multi

    if job.threads:
        torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = job.recipe.search
    sampler, _ = build_sampler(settings, job.recipe.seed + job.seed_offset, job.space)
    pruner = optuna.pruners.MedianPruner() if settings.pruning else None
    study = open_study(job.storage, job.study_name, sampler, direction=DIRECTION[settings.objective], pruner=pruner, create=False)
    model, tokenizer = load_multi(job.base_dir, job.adapters, fold=True)  # Linear deltas folded: the forward is the plain model's
    scored = {s: rows for s, rows in job.used.items() if job.importance[s] > 0}
    evaluators = make_evaluators(model, tokenizer, scored, job.recipe)
    if job.worker is not None:
        log(f"[worker {job.worker}] pid {os.getpid()}: model loaded, up to {job.n_trials} trials")
    objective = make_objective(model, evaluators, job.space, job.importance, prune=settings.pruning, worker=job.worker or 0)
    study.optimize(objective, n_trials=job.n_trials, callbacks=[_log_trial(log, job.space, job.worker), stop_at(job.target)])


# ---- outputs ------------------------------------------------------------------------

def fold_weights(record: dict) -> dict[str, float | list[float]]:
    """What a weights.json folds: each source's weight, or its per-layer-group list when the search had them."""
    weights: dict[str, float | list[float]] = {n: float(w) for n, w in record["weights"].items()}
    weights.update({n: [float(x) for x in w] for n, w in (record.get("layer_weights") or {}).items()})
    return weights


def summarize(trials: list, pruned: list, space: SearchSpace, recipe, storage: Storage, name: str, importances: Optional[dict]) -> dict:
    """weights.json's content from the completed (and pruned) trials."""
    settings = recipe.search
    sign = 1 if DIRECTION[settings.objective] == "minimize" else -1
    best = min(trials, key=lambda t: (sign * t.value, t.number))
    durations = [t.duration.total_seconds() for t in trials + pruned]
    evals = [t.user_attrs.get("eval_seconds", 0.0) for t in trials]
    sets = [t.user_attrs.get("set_seconds", 0.0) for t in trials]
    done = sum(t.duration.total_seconds() for t in trials)
    weights = space.weights(best.params)
    result = {
        "weights": space.mean_weights(best.params),
        "objective": best.value,
        "objective_name": settings.objective,
        "direction": DIRECTION[settings.objective],
        "per_source": best.user_attrs.get("per_source", {}),
        "importance": {s.name: s.importance for s in recipe.sources},
        "best_trial": best.number,
        "n_trials": len(trials),
        "n_pruned": len(pruned),
        "sampler": settings.sampler,
        "granularity": settings.granularity,
        "params": dict(best.params),
        "search_seconds": sum(durations),
        "eval_fraction": sum(evals) / done if done > 0 else None,
        "set_weights_seconds_per_trial": sum(sets) / len(sets),
        "processes": len({t.user_attrs["pid"] for t in trials + pruned if "pid" in t.user_attrs}),
        "importances": importances,
        "study": {"storage": storage.display, "name": name},
    }
    if space.groups is not None:
        result["layer_weights"] = weights
        result["layer_groups"] = space.groups
    if space.global_scale:
        result["global_scale"] = best.params["@global_scale"]
    return result


def trials_csv(trials: list, space: SearchSpace, sources: list[str], metric: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    params = space.param_names()
    writer.writerow(["number", "state", *[f"w:{p}" for p in params], "objective", *[f"{metric}:{s}" for s in sources],
                     "worker", "duration_seconds"])
    for t in trials:
        values = t.user_attrs.get("per_source", {})
        writer.writerow(
            [t.number, t.state.name, *[repr(t.params[p]) for p in params], repr(t.value),
             *[repr(values[s]) if s in values else "" for s in sources], t.user_attrs.get("worker", ""),
             f"{t.duration.total_seconds():.6f}"]
        )
    return buf.getvalue()


def plot_search(trials: list, pruned: list, path: Path, title: str, ylabel: str, minimize: bool) -> None:
    from matplotlib.figure import Figure

    from loradem.plots import save_png

    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    pick = min if minimize else max
    best = [pick(values[: i + 1]) for i in range(len(values))]
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.plot(numbers, values, "o", color="tab:blue", label="trial objective")
    if pruned:
        ax.plot([t.number for t in pruned], [t.value for t in pruned], "x", color="tab:gray", label="pruned (partial mean)")
    ax.step(numbers, best, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_importances(importances: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    from loradem.plots import save_png

    items = sorted(importances["values"].items(), key=lambda kv: kv[1])
    fig = Figure(figsize=(6.4, 1.2 + 0.3 * len(items)))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel(f"importance ({importances['evaluator']}, {importances['n_trials']} trials)")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(out_dir: Path, result: dict, trials: list, pruned: list, space: SearchSpace, sources: list[str], title: str) -> None:
    metric = result["objective_name"]
    finished = sorted(trials + pruned, key=lambda t: t.number)
    atomic_write_text(out_dir / "trials.csv", trials_csv(finished, space, sources, metric))
    plot_search(trials, pruned, out_dir / "search.png", title, f"{LABEL[metric]} (weighted mean)", result["direction"] == "minimize")
    if result["importances"]:
        plot_importances(result["importances"], out_dir / "importances.png", f"{title}: parameter importances")
    else:
        (out_dir / "importances.png").unlink(missing_ok=True)  # never leave a stale plot of another study
    atomic_write_json(out_dir / "weights.json", result)  # last: its presence means the search is written


# ---- the command ----------------------------------------------------------------------

def study_identity(recipe, base_dir: Path, adapters: dict[str, Path], used: dict[str, list[dict]]) -> dict:
    """Everything that defines the objective. Not n_trials (more trials continue the same study), nor where the
    study is stored, nor warm starts or pruning; the base by content, so machines with other paths share a study."""
    identity = {
        "sources": [s.name for s in recipe.sources],
        "importance": {s.name: s.importance for s in recipe.sources},
        "adapters": {s: fingerprint_weights(adapters[s]) for s in sorted(adapters)},
        "base": fingerprint_weights(base_dir),
        "validation": {s: stable_hash(rows, 64) for s, rows in sorted(used.items())},
        "max_length": recipe.train.max_length,
        "seed": recipe.seed,
        "search": recipe.search.model_dump(exclude={"n_trials", "storage", "warm_start", "pruning"}),
    }
    if recipe.search.objective == "exact_match":
        identity["max_new_tokens"] = recipe.eval.max_new_tokens
    return identity


def _check_inputs(recipe, sources: list[str], adapters: dict[str, Path], validation: dict[str, list[dict]]) -> None:
    from loradem.model.render import eval_pair

    for label, given in (("adapters", adapters), ("validation", validation)):
        missing = [s for s in sources if s not in given]
        extra = sorted(set(given) - set(sources))
        if missing or extra:
            raise LorademError(
                f"search: {label}: expected one entry per recipe source {sources}"
                + (f"; missing: {missing}" if missing else "") + (f"; not in the recipe: {extra}" if extra else "")
            )
    for s in sources:
        if not validation[s]:
            raise LorademError(f"search: source {s!r}: no validation rows (the objective needs at least one)")
    if not any(src.importance > 0 for src in recipe.sources):
        raise LorademError("sources[].importance: expected at least one source with importance > 0 (the objective is their weighted mean)")
    if recipe.search.objective == "exact_match":
        for s in sources:
            try:
                for row in validation[s][: recipe.search.max_rows_per_source]:
                    eval_pair(row)
            except LorademError as exc:
                raise LorademError(f"search.objective: exact_match: source {s!r}: {exc}") from None


def _previous_weights(recipe, out_dir: Path, sources: list[str], log) -> tuple[Optional[dict], Optional[str]]:
    """search.warm_start's weights, else this folder's previous weights.json when the recipe's sources changed."""
    if recipe.search.warm_start:
        path = Path(recipe.search.warm_start).expanduser()
        return read_previous(path), str(path)
    own = Path(out_dir) / "weights.json"
    if own.is_file():
        previous = read_previous(own)
        if sorted(previous) != sorted(sources):
            log(f"search: sources changed since {own} ({', '.join(sorted(previous))}); warm-starting from its best weights")
            return previous, str(own)
    return None, None


def _num_layers(base_dir: Path) -> int:
    from transformers import AutoConfig

    from loradem.model.soup import num_hidden_layers

    return num_hidden_layers(AutoConfig.from_pretrained(base_dir))


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def search_weights(
    recipe, base_dir: Path, adapters: dict[str, Path], validation: dict[str, list[dict]], out_dir: Path, *,
    storage: Optional[str] = None, workers: int = 1, log=print,
) -> dict:
    """Run (or resume) the weight search; writes weights.json, trials.csv, search.png (importances.png) in out_dir
    and returns weights.json's content. `storage` (the CLI's --storage) wins over recipe.search.storage."""
    import optuna

    from loradem.model.soup import check_adapter_folder, default_device

    settings = recipe.search
    sources = [s.name for s in recipe.sources]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LorademError(f"--workers: expected a whole number >= 1, got {workers!r}")
    _check_inputs(recipe, sources, adapters, validation)
    adapters = {s: Path(adapters[s]) for s in sources}
    for s in sources:
        check_adapter_folder(s, adapters[s])
    used = {s: list(validation[s])[: settings.max_rows_per_source] for s in sources}
    importance = {s.name: s.importance for s in recipe.sources}
    space = SearchSpace.from_settings(settings, sources, _num_layers(base_dir))
    sampler, grid_size = build_sampler(settings, recipe.seed, space)
    out_dir = Path(out_dir)
    store = Storage.parse(storage, out_dir, field="--storage") if storage else Storage.parse(settings.storage, out_dir)
    previous, previous_from = _previous_weights(recipe, out_dir, sources, log)
    points = warm_start_points(space, previous)
    target = target_trials(settings, grid_size, len(points))

    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"{recipe.name}-{stable_hash(study_identity(recipe, base_dir, adapters, used))}"
    study = open_study(store, name, sampler, direction=DIRECTION[settings.objective])
    queued = enqueue_points(study, points)
    if previous_from and queued:
        log(f"search: queued {queued} warm-start points from {previous_from}")
    done = finished_count(study)
    remaining = max(target - done, 0)
    log(f"search: study {name!r} in {store.display}: {done} trials done, {remaining} to run "
        f"({settings.sampler}, {len(space.param_names())} parameters, {settings.objective}"
        + (f", {workers} workers" if workers > 1 and remaining else "") + ")")

    if remaining > 0:
        base = TrialJob(recipe, Path(base_dir), adapters, used, store, name, space, importance, remaining, target)
        if workers == 1:
            run_trials(base, log)
        else:
            threads = max(1, _cpu_count() // workers) if default_device() == "cpu" else None
            jobs = [
                TrialJob(recipe, Path(base_dir), adapters, used, store, name, space, importance, n, target,
                         worker=i, threads=threads, seed_offset=i)
                for i, n in enumerate(split_trials(remaining, workers))
            ]
            run_workers(run_trials, jobs, log)
        study = open_study(store, name, sampler, direction=DIRECTION[settings.objective], create=False)

    trials, pruned = trials_in(study, "COMPLETE"), trials_in(study, "PRUNED")
    if not trials:
        raise LorademError(f"search: study {name!r} has no completed trial")
    importances = param_importances(study, space.param_names(), log)
    result = summarize(trials, pruned, space, recipe, store, name, importances)
    if previous_from:
        result["warm_start"] = previous_from
    write_outputs(out_dir, result, trials, pruned, space, sources, f"{recipe.name}: weight search ({settings.sampler})")
    log(f"search: best {settings.objective} {result['objective']:.4f} at trial {result['best_trial']} "
        f"({len(trials)} complete, {len(pruned)} pruned): " + " ".join(f"{s}={w:.3f}" for s, w in result["weights"].items()))
    if importances:
        log("search: importances " + " ".join(f"{p}={v:.2f}" for p, v in importances["values"].items()))
    return result
