"""`loradem search`: choose the DEM weights with Optuna, at the cost of evaluations only.

    job = SearchJob(name="demo", settings=SearchSettings(n_trials=16), importance={"add": 1.0, "rev": 1.0},
                    out_dir=Path("runs/demo/search"), seed=0, max_length=128)
    result = search_weights(job, base_dir, adapters, validation)
    result["weights"]           # {source: w}, also in out_dir/weights.json
    loradem search RECIPE --workers 4 --storage postgresql://user@host/loradem

The base and every adapter stay loaded (`loradem.model.soup`, fold=True); a trial
re-folds the weighted deltas into the resident weights (one addmm per layer
from a kept copy of the base) and evaluates, so it costs forward passes plus a
fraction of a second, never a reload.

- Objective (`settings.objective`): 'val_loss' (minimized), the mean over sources
  of each source's validation loss; 'exact_match' (maximized), the same mean of
  greedy exact match (`job.max_new_tokens`). Both on the first
  `settings.max_rows_per_source` validation rows, tokenized once, and weighted by
  each source's importance (a source of importance 0 is not evaluated).
- Search space, warm starts, samplers: `loradem.merge.space`.
- A non-finite score (a NaN or Inf loss: NaN/Inf adapter weights, an overflow at
  large weights) fails the trial: Optuna records it as FAIL, one log line names
  the trial, its weights and the source, and the sources after it are not
  evaluated. It counts against the trials run but never towards the finished
  ones; when no trial completes, the stage stops with one line and writes nothing.
- Pruning (`settings.pruning`): sources are evaluated one at a time and the
  partial weighted mean is reported after each; Optuna's MedianPruner stops a
  trial worse than the median of earlier trials at the same step. Pruned trials
  stay in the study and trials.csv as PRUNED and are never the best.
- Storage and workers (`loradem.merge.study`): SQLite out_dir/search.db by default,
  or any RDB URL / journal file; the study's name is the job's name plus a
  hash of everything that defines the objective, so re-running resumes:
  earlier trials stay and only n_trials minus the finished (complete or
  pruned) ones run, split over `workers` processes.
- Progress: one bar of finished trials. With one worker the trial callback
  advances it; with several, trials finish in other processes, so the parent
  polls the study's finished-trial count every few seconds. Every finished
  trial also logs one line.
- Outputs (atomic, weights.json last): weights.json, trials.csv (every finished
  trial), search.png (objective by trial, best so far) and, when Optuna can
  compute them, parameter importances in weights.json and importances.png.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import optuna
import torch
from optuna.trial import TrialState
from transformers import AutoConfig

from loradem.errors import LorademError
from loradem.files import atomic_write_json, atomic_write_text, fingerprint_weights, make_dir, stable_hash
from loradem.merge.space import SearchSpace, build_sampler, read_previous, target_trials, warm_start_points
from loradem.merge.study import (
    Storage,
    enqueue_points,
    finished_count,
    importance_evaluator,
    open_study,
    param_importances,
    run_workers,
    split_trials,
    stop_at,
    trials_in,
)
from loradem.model import generate, render, soup
from loradem.plots import save_png
from loradem.progress import Log, progress, quiet_libraries, quiet_optuna, set_verbose, verbose
from loradem.recipe import SearchSettings

DIRECTION = {"val_loss": "minimize", "exact_match": "maximize"}
LABEL = {"val_loss": "validation loss", "exact_match": "exact match"}
POLL_SECONDS = 2.0  # how often the parent reads the study's trial count while workers run


@dataclass(frozen=True, kw_only=True)
class SearchJob:
    """What one weight search needs, resolved: the pipeline builds it from a recipe, Python callers write it."""

    name: str  # prefixes the study's name and titles the plots
    settings: SearchSettings
    importance: dict[str, float]  # source -> its weight in the objective's mean, in the sources' order
    out_dir: Path
    seed: int
    max_length: int  # tokens per validation row (a recipe's train.max_length)
    max_new_tokens: Optional[int] = None  # greedy budget of the exact_match objective (a recipe's eval.max_new_tokens)

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", dict(self.importance))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.settings.objective == "exact_match" and self.max_new_tokens is None:
            raise LorademError("search: the exact_match objective needs max_new_tokens (eval.max_new_tokens)")

    @property
    def sources(self) -> list[str]:
        return list(self.importance)


# ---- the objective ----------------------------------------------------------------

def weighted_mean(values: dict[str, float], importance: dict[str, float]) -> float:
    """Σ importanceₛ·valueₛ / Σ importanceₛ over the sources in `values`."""
    total = sum(importance[s] for s in values)
    return sum(importance[s] * v for s, v in values.items()) / total


def make_evaluators(model, tokenizer, used: dict[str, list[dict]], *, objective: str, max_length: int, batch_size: int,
                    max_new_tokens: Optional[int] = None) -> dict[str, Callable[[], float]]:
    """One zero-argument scorer per source, on rows prepared once (tokenized for the loss; prompts and references for exact match)."""
    out: dict[str, Callable[[], float]] = {}
    for s, rows in used.items():
        if objective == "val_loss":
            encoded = render.encode_for_loss(rows, tokenizer, max_length)
            if generate.scored_tokens(encoded) == 0:
                raise LorademError(f"search: source {s!r}: no completion tokens left within train.max_length={max_length}")
            out[s] = lambda enc=encoded: generate.mean_loss(model, enc, batch_size=batch_size)
        else:
            pairs = [render.eval_pair(row) for row in rows]
            prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
            out[s] = lambda p=prompts, r=refs: generate.exact_match(
                generate.generate_answers(model, tokenizer, p, max_new_tokens=max_new_tokens, batch_size=batch_size, log=None), r)
    return out


class NonFiniteScore(Exception):
    """A source scored NaN or Inf in a trial: Optuna fails that trial (`run_trials` catches this) and the search goes on."""


def make_objective(model, evaluators: dict[str, Callable[[], float]], space: SearchSpace, importance: dict[str, float],
                   *, prune: bool, worker: int = 0) -> Callable:
    """The trial function: suggest, set the LoRA scales, score source by source (reporting partial means when pruning)."""
    order = list(evaluators)

    def objective(trial) -> float:
        params = space.suggest(trial)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("pid", os.getpid())
        t0 = time.perf_counter()
        soup.set_weights(model, space.weights(params))
        t1 = time.perf_counter()
        values: dict[str, float] = {}
        for i, s in enumerate(order):
            values[s] = evaluators[s]()
            if not math.isfinite(values[s]):  # before any report: a pruner takes NaN for a reason to prune
                trial.set_user_attr("non_finite", {"source": s, "value": repr(values[s])})
                raise NonFiniteScore(f"source {s!r} scored {values[s]!r}")
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


def _log_trial(log: Log, space: SearchSpace, worker: Optional[int], on_trial: Optional[Callable[[], None]]) -> Callable:
    who = "" if worker is None else f"[worker {worker}] "

    def callback(study, trial) -> None:
        failed = trial.user_attrs.get("non_finite") if trial.state == TrialState.FAIL else None
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED) and failed is None:
            return
        ws = " ".join(f"{s}={w:.3f}" for s, w in space.mean_weights(trial.params).items())
        if failed is not None:
            log(f"{who}trial {trial.number}: {ws} failed: source {failed['source']!r} scored {failed['value']} "
                "(a non-finite score; the trial does not count)")
            return
        try:
            best = study.best_trial
            tail = f"(best {best.value:.4f}, trial {best.number})"
        except ValueError:
            tail = ""
        what = f"pruned at {trial.value:.4f}" if trial.state == TrialState.PRUNED else f"objective {trial.value:.4f}"
        log(f"{who}trial {trial.number}: {ws} {what} {tail}".rstrip())
        if on_trial is not None:
            on_trial()

    return callback


# ---- a run of trials (in this process, or in one worker process) --------------------

@dataclass
class TrialJob:
    """Everything a process needs to run trials on a study (picklable: workers are spawned)."""

    search: SearchJob
    base_dir: Path
    adapters: dict[str, Path]
    used: dict[str, list[dict]]
    storage: Storage
    study_name: str
    space: SearchSpace
    n_trials: int
    target: int
    worker: Optional[int] = None  # None: the search's own process
    threads: Optional[int] = None
    seed_offset: int = 0
    verbose: bool = False  # the parent's --verbose: a spawned worker starts with the default


def run_trials(job: TrialJob, log: Log = print, on_trial: Optional[Callable[[], None]] = None) -> None:
    """Load the model once and run up to job.n_trials trials, stopping early once the study has job.target finished ones;
    `on_trial` is called after each finished trial."""
    if job.worker is not None:  # a fresh interpreter: the parent's verbosity and library settings did not come along
        set_verbose(job.verbose)
        quiet_libraries()
    quiet_optuna()
    if job.threads:
        torch.set_num_threads(job.threads)
    settings = job.search.settings
    sampler, _ = build_sampler(settings, job.search.seed + job.seed_offset, job.space)
    pruner = optuna.pruners.MedianPruner() if settings.pruning else None
    study = open_study(job.storage, job.study_name, sampler, direction=DIRECTION[settings.objective], pruner=pruner, create=False)
    model, tokenizer = soup.load_multi(job.base_dir, job.adapters, fold=True)  # Linear deltas folded: the forward is the plain model's
    importance = job.search.importance
    scored = {s: rows for s, rows in job.used.items() if importance[s] > 0}
    evaluators = make_evaluators(model, tokenizer, scored, objective=settings.objective, max_length=job.search.max_length,
                                 batch_size=settings.batch_size, max_new_tokens=job.search.max_new_tokens)
    if job.worker is not None:
        log(f"[worker {job.worker}] pid {os.getpid()}: model loaded, up to {job.n_trials} trials")
    objective = make_objective(model, evaluators, job.space, importance, prune=settings.pruning, worker=job.worker or 0)
    with job.storage.writes():  # a full or read-only disk under the study is one line, in a worker process too
        study.optimize(objective, n_trials=job.n_trials, catch=(NonFiniteScore,), callbacks=[_log_trial(log, job.space, job.worker, on_trial), stop_at(job.target)])


# ---- outputs ------------------------------------------------------------------------

def fold_weights(record: dict) -> dict[str, float | list[float]]:
    """What a weights.json folds: each source's weight, or its per-layer-group list when the search had them."""
    weights: dict[str, float | list[float]] = {n: float(w) for n, w in record["weights"].items()}
    weights.update({n: [float(x) for x in w] for n, w in (record.get("layer_weights") or {}).items()})
    return weights


def summarize(trials: list, pruned: list, space: SearchSpace, job: SearchJob, storage: Storage, name: str,
              importances: Optional[dict]) -> dict:
    """weights.json's content from the completed (and pruned) trials."""
    settings = job.settings
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
        "importance": dict(job.importance),
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
        "study": {"name": name, **storage.record(job.out_dir)},  # a study file in the run: relative to weights.json
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


def _optuna_plot(draw: Callable, path: Path) -> None:
    """Run one of optuna.visualization.matplotlib's plots, `draw()` returning its Axes after any additions, and write it.

    Those plots draw through pyplot and restyle it globally (ggplot): the rc context puts the style back, and the
    figure is closed so pyplot keeps no reference to it. Imported here: pyplot costs about a second to import, and
    spawned workers import this module without ever plotting.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = draw()
        try:
            save_png(ax.figure, path)
        finally:
            plt.close(ax.figure)


def plot_search(study, path: Path, title: str, ylabel: str) -> None:
    """Objective by trial and the best so far (Optuna's optimization history), plus pruned trials' partial means,
    which Optuna's plot leaves out."""
    from optuna.visualization.matplotlib import plot_optimization_history

    pruned = trials_in(study, "PRUNED")

    def draw():
        ax = plot_optimization_history(study, target_name=ylabel)
        if pruned:
            ax.scatter([t.number for t in pruned], [t.value for t in pruned], marker="x", color="tab:gray",
                       label="pruned (partial mean)")
        ax.set_title(title)
        ax.legend(loc="best")
        return ax

    _optuna_plot(draw, path)


def plot_importances(study, importances: dict, path: Path, title: str) -> None:
    """Optuna's parameter-importance bars, with the evaluator its values in weights.json come from."""
    from optuna.visualization.matplotlib import plot_param_importances

    params = list(importances["values"])

    def draw():
        ax = plot_param_importances(study, evaluator=importance_evaluator(), params=params)
        ax.set_title(title, loc="left")
        ax.set_xlabel(f"importance ({importances['evaluator']}, {importances['n_trials']} trials)")
        ax.set_ylabel("parameter")
        ax.get_legend().remove()  # one bar series, labelled "Objective Value"
        ax.figure.set_size_inches(6.4, 1.6 + 0.3 * len(params))
        ax.figure.tight_layout()
        return ax

    _optuna_plot(draw, path)


def write_outputs(out_dir: Path, result: dict, study, space: SearchSpace, sources: list[str], title: str) -> None:
    metric = result["objective_name"]
    atomic_write_text(out_dir / "trials.csv", trials_csv(trials_in(study, "COMPLETE", "PRUNED"), space, sources, metric))
    plot_search(study, out_dir / "search.png", title, f"{LABEL[metric]} (weighted mean)")
    if result["importances"]:
        plot_importances(study, result["importances"], out_dir / "importances.png", f"{title}: parameter importances")
    else:
        (out_dir / "importances.png").unlink(missing_ok=True)  # never leave a stale plot of another study
    atomic_write_json(out_dir / "weights.json", result)  # last: its presence means the search is written


# ---- the command ----------------------------------------------------------------------

def study_identity(job: SearchJob, base_dir: Path, adapters: dict[str, Path], used: dict[str, list[dict]]) -> dict:
    """Everything that defines the objective. Not n_trials (more trials continue the same study), nor where the
    study is stored, nor warm starts or pruning; the base by content, so machines with other paths share a study."""
    identity = {
        "sources": job.sources,
        "importance": dict(job.importance),
        "adapters": {s: fingerprint_weights(adapters[s]) for s in sorted(adapters)},
        "base": fingerprint_weights(base_dir),
        "validation": {s: stable_hash(rows, 64) for s, rows in sorted(used.items())},
        "max_length": job.max_length,
        "seed": job.seed,
        "search": job.settings.model_dump(exclude={"n_trials", "storage", "warm_start", "pruning"}),
    }
    if job.settings.objective == "exact_match":
        identity["max_new_tokens"] = job.max_new_tokens
    return identity


def _check_inputs(job: SearchJob, adapters: dict[str, Path], validation: dict[str, list[dict]]) -> None:
    sources = job.sources
    for label, given in (("adapters", adapters), ("validation", validation)):
        missing = [s for s in sources if s not in given]
        extra = sorted(set(given) - set(sources))
        if missing or extra:
            raise LorademError(
                f"search: {label}: expected one entry per source {sources}"
                + (f"; missing: {missing}" if missing else "") + (f"; not a source: {extra}" if extra else "")
            )
    for s in sources:
        if not validation[s]:
            raise LorademError(f"search: source {s!r}: no validation rows (the objective needs at least one)")
    if not any(w > 0 for w in job.importance.values()):
        raise LorademError("sources[].importance: expected at least one source with importance > 0 (the objective is their weighted mean)")
    if job.settings.objective == "exact_match":
        for s in sources:
            try:
                for row in validation[s][: job.settings.max_rows_per_source]:
                    render.eval_pair(row)
            except LorademError as exc:
                raise LorademError(f"search.objective: exact_match: source {s!r}: {exc}") from None


def _previous_weights(job: SearchJob, log: Log) -> tuple[Optional[dict], Optional[str]]:
    """search.warm_start's weights, else this folder's previous weights.json when the sources changed."""
    if job.settings.warm_start:
        path = Path(job.settings.warm_start).expanduser()
        return read_previous(path), str(path)
    own = job.out_dir / "weights.json"
    if own.is_file():
        previous = read_previous(own)
        if sorted(previous) != sorted(job.sources):
            log(f"search: sources changed since {own} ({', '.join(sorted(previous))}); warm-starting from its best weights")
            return previous, str(own)
    return None, None


def _num_layers(base_dir: Path) -> int:
    return soup.num_hidden_layers(AutoConfig.from_pretrained(base_dir))


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _failures(failed: list, space: SearchSpace) -> str:
    """What a study whose trials all failed on non-finite scores says about them, for the stage's one error line."""
    last = failed[-1]
    ws = " ".join(f"{s}={w:.3f}" for s, w in space.mean_weights(last.params).items())
    return (f": {len(failed)} trials failed on a non-finite score (NaN or Inf), the last, trial {last.number} ({ws}), "
            f"when source {last.user_attrs['non_finite']['source']!r} scored {last.user_attrs['non_finite']['value']}; "
            "look for NaN or Inf in the adapters' or the base's weights, or search a narrower weight range")


def search_weights(job: SearchJob, base_dir: Path, adapters: dict[str, Path], validation: dict[str, list[dict]], *,
                   storage: Optional[str] = None, workers: int = 1, log: Log = print) -> dict:
    """Run (or resume) the weight search; writes weights.json, trials.csv, search.png (importances.png) in job.out_dir
    and returns weights.json's content. `storage` (the CLI's --storage) wins over job.settings.storage."""
    settings = job.settings
    sources = job.sources
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LorademError(f"--workers: expected a whole number >= 1, got {workers!r}")
    _check_inputs(job, adapters, validation)
    adapters = {s: Path(adapters[s]) for s in sources}
    for s in sources:
        soup.check_adapter_folder(s, adapters[s])
    used = {s: list(validation[s])[: settings.max_rows_per_source] for s in sources}
    space = SearchSpace.from_settings(settings, sources, _num_layers(base_dir))
    sampler, grid_size = build_sampler(settings, job.seed, space)
    out_dir = job.out_dir
    store = Storage.parse(storage, out_dir, field="--storage") if storage else Storage.parse(settings.storage, out_dir)
    previous, previous_from = _previous_weights(job, log)
    points = warm_start_points(space, previous)
    target = target_trials(settings, grid_size, len(points))

    make_dir(out_dir)
    quiet_optuna()
    name = f"{job.name}-{stable_hash(study_identity(job, base_dir, adapters, used))}"
    study = open_study(store, name, sampler, direction=DIRECTION[settings.objective])
    with store.writes():
        queued = enqueue_points(study, points)
    if previous_from and queued:
        log(f"search: queued {queued} warm-start points from {previous_from}")
    done = finished_count(study)
    remaining = max(target - done, 0)
    log(f"search: study {name!r} in {store.display}: {done} trials done, {remaining} to run "
        f"({settings.sampler}, {len(space.param_names())} parameters, {settings.objective}"
        + (f", {workers} workers" if workers > 1 and remaining else "") + ")")

    if remaining > 0:
        with progress(remaining, "search", unit="trial") as bar:
            base = TrialJob(job, Path(base_dir), adapters, used, store, name, space, remaining, target)
            if workers == 1:
                run_trials(base, log, on_trial=lambda: bar.update(1))
            else:
                threads = max(1, _cpu_count() // workers) if soup.default_device() == "cpu" else None
                jobs = [
                    TrialJob(job, Path(base_dir), adapters, used, store, name, space, n, target,
                             worker=i, threads=threads, seed_offset=i, verbose=verbose())
                    for i, n in enumerate(split_trials(remaining, workers))
                ]

                def poll() -> None:
                    try:
                        n = min(finished_count(study) - done, remaining)
                    except Exception:  # noqa: BLE001 - the bar is a by-product; a busy storage is read at the next poll
                        return
                    if n > bar.n:
                        bar.update(n - bar.n)

                run_workers(run_trials, jobs, log, on_wait=poll, wait_seconds=POLL_SECONDS)
                poll()
        study = open_study(store, name, sampler, direction=DIRECTION[settings.objective], create=False)

    trials, pruned = trials_in(study, "COMPLETE"), trials_in(study, "PRUNED")
    failed = [t for t in trials_in(study, "FAIL") if "non_finite" in t.user_attrs]
    if not trials:
        raise LorademError(f"search: study {name!r} has no completed trial" + (_failures(failed, space) if failed else ""))
    importances = param_importances(study, space.param_names(), log)
    result = summarize(trials, pruned, space, job, store, name, importances)
    if previous_from:  # relative to weights.json's folder, like the study file: the run may move
        result["warm_start"] = os.path.relpath(Path(previous_from).resolve(), Path(out_dir).resolve())
    write_outputs(out_dir, result, study, space, sources, f"{job.name}: weight search ({settings.sampler})")
    log(f"search: best {settings.objective} {result['objective']:.4f} at trial {result['best_trial']} "
        f"({len(trials)} complete, {len(pruned)} pruned" + (f", {len(failed)} failed on a non-finite score" if failed else "")
        + "): " + " ".join(f"{s}={w:.3f}" for s, w in result["weights"].items()))
    if importances:
        log("search: importances " + " ".join(f"{p}={v:.2f}" for p, v in importances["values"].items()))
    return result
