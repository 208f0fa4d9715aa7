"""`loradem search`: choose one weight per source with Optuna, on validation loss.

    result = search_weights(recipe, base_dir, adapters, validation, out_dir)
    result["weights"]    # {source: w}, also in out_dir/weights.json

The base and every adapter stay loaded (`loradem.multi`); a trial sets the
adapters' scales and evaluates, so it costs forward passes only. The
objective, minimized, is the mean over sources of each source's validation
loss (first `search.max_rows_per_source` rows, tokenized once).

- Warm start: the first trials are the uniform point (every weight 1/n) and the
  plain sum (every weight 1), clipped to [low, high]: the search can only
  improve on them, on its own objective.
- Samplers: tpe (default, seeded), random, cmaes (needs `cmaes`), gp (needs
  `scipy`), grid (`grid_points` evenly spaced weights per source, visited in a
  seeded random order after the warm-start points; the study then runs
  min(n_trials, grid size + warm-start points) trials).
- Storage: SQLite file out_dir/search.db; the study's name is the recipe's name
  plus a hash of everything that defines the objective (sources, adapter
  contents, base, validation rows, search settings except n_trials). Re-running
  resumes: earlier trials stay, and only n_trials minus the completed ones run.
- Outputs (atomic): weights.json, trials.csv (one row per completed trial) and
  search.png (objective by trial and best so far).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import time
from pathlib import Path
from typing import Callable

from loradem.errors import LorademError
from loradem.io import atomic_write_json, atomic_write_text, fingerprint_weights, stable_hash

MAX_GRID = 100_000
_SAMPLER_NEEDS = {"gp": ("scipy", "pip install scipy"), "cmaes": ("cmaes", "pip install cmaes")}


# ---- the search space -------------------------------------------------------

def warm_start_points(sources: list[str], low: float, high: float) -> list[dict[str, float]]:
    """Uniform (1/n each) then plain sum (1 each), clipped to [low, high], duplicates dropped."""
    clip = lambda w: min(max(w, low), high)  # noqa: E731
    points: list[dict[str, float]] = []
    for w in (1.0 / len(sources), 1.0):
        point = {s: clip(w) for s in sources}
        if point not in points:
            points.append(point)
    return points


def grid_values(low: float, high: float, points: int) -> list[float]:
    """`points` evenly spaced weights from low to high, both ends included exactly."""
    return [low + (high - low) * i / (points - 1) for i in range(points - 1)] + [high]


def build_sampler(settings, seed: int, sources: list[str]):
    """(Optuna sampler, most trials it can use) for settings.sampler; a one-line error when a dependency is missing."""
    import optuna

    name = settings.sampler
    if name in _SAMPLER_NEEDS:
        module, fix = _SAMPLER_NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise LorademError(f"search.sampler: {name!r} needs the {module} package; run `{fix}` or use sampler: tpe")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed), None
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed), None
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed), None
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed), None
    if name == "grid":
        size = settings.grid_points ** len(sources)
        if size > MAX_GRID:
            raise LorademError(
                f"search.grid_points: {settings.grid_points} points for {len(sources)} sources is a grid of {size} points "
                f"(at most {MAX_GRID}); lower grid_points or use sampler: tpe"
            )
        space = {s: grid_values(settings.low, settings.high, settings.grid_points) for s in sources}
        return optuna.samplers.GridSampler(space, seed=seed), size
    raise LorademError(f"search.sampler: expected tpe, random, cmaes, gp or grid, got {name!r}")


def target_trials(settings, grid_size: int | None, n_warm: int) -> int:
    """Completed trials the study should end with."""
    if grid_size is None:
        return settings.n_trials
    return min(settings.n_trials, grid_size + n_warm)


# ---- the study --------------------------------------------------------------

def study_identity(recipe, base_dir: Path, adapters: dict[str, Path], used: dict[str, list[dict]]) -> dict:
    """Everything that defines the objective (not n_trials: more trials continue the same study)."""
    return {
        "sources": [s.name for s in recipe.sources],
        "adapters": {s: fingerprint_weights(adapters[s]) for s in sorted(adapters)},
        "base": str(Path(base_dir).resolve()),
        "validation": {s: stable_hash(rows, 64) for s, rows in sorted(used.items())},
        "max_length": recipe.train.max_length,
        "seed": recipe.seed,
        "search": recipe.search.model_dump(exclude={"n_trials"}),
    }


def storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'search.db').resolve()}"


def open_study(url: str, name: str, sampler):
    """Create the study once (or load it: an interrupted search resumes), minimizing."""
    import optuna

    return optuna.create_study(storage=url, study_name=name, sampler=sampler, direction="minimize", load_if_exists=True)


def enqueue_warm_start(study, points: list[dict[str, float]]) -> int:
    """Queue each warm-start point the study has neither completed nor queued; returns how many were queued."""
    from optuna.trial import TrialState

    seen = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    seen += [t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    queued = 0
    for point in points:
        if point not in seen:
            study.enqueue_trial(point)
            queued += 1
    return queued


def completed(study) -> list:
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def make_objective(model, encoded: dict[str, list], settings) -> Callable:
    """The trial function: suggest a weight per source, set the scales, mean of per-source validation losses."""
    from loradem.evaluate import mean_loss
    from loradem.multi import set_weights

    def objective(trial) -> float:
        weights = {s: trial.suggest_float(s, settings.low, settings.high) for s in encoded}
        t0 = time.perf_counter()
        set_weights(model, weights)
        t1 = time.perf_counter()
        losses = {s: mean_loss(model, enc, batch_size=settings.batch_size) for s, enc in encoded.items()}
        t2 = time.perf_counter()
        trial.set_user_attr("losses", losses)
        trial.set_user_attr("set_seconds", t1 - t0)
        trial.set_user_attr("eval_seconds", t2 - t1)
        return sum(losses.values()) / len(losses)

    return objective


def _log_trial(log: Callable[[str], None], sources: list[str]) -> Callable:
    def callback(study, trial) -> None:
        if trial.value is None:
            return
        ws = " ".join(f"{s}={trial.params[s]:.3f}" for s in sources)
        best = study.best_trial
        log(f"trial {trial.number}: {ws} objective {trial.value:.4f} (best {best.value:.4f}, trial {best.number})")

    return callback


# ---- outputs ----------------------------------------------------------------

def summarize(trials: list, sources: list[str], sampler: str, url: str, name: str) -> dict:
    """weights.json's content from the completed trials."""
    best = min(trials, key=lambda t: (t.value, t.number))
    durations = [t.duration.total_seconds() for t in trials]
    evals = [t.user_attrs.get("eval_seconds", 0.0) for t in trials]
    sets = [t.user_attrs.get("set_seconds", 0.0) for t in trials]
    total = sum(durations)
    return {
        "weights": {s: best.params[s] for s in sources},
        "objective": best.value,
        "per_source_loss": best.user_attrs.get("losses", {}),
        "best_trial": best.number,
        "n_trials": len(trials),
        "sampler": sampler,
        "search_seconds": total,
        "eval_fraction": sum(evals) / total if total > 0 else None,
        "set_weights_seconds_per_trial": sum(sets) / len(sets),
        "study": {"storage": url, "name": name},
    }


def trials_csv(trials: list, sources: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", *[f"w:{s}" for s in sources], "objective", *[f"loss:{s}" for s in sources], "duration_seconds"])
    for t in trials:
        losses = t.user_attrs.get("losses", {})
        writer.writerow(
            [t.number, *[repr(t.params[s]) for s in sources], repr(t.value),
             *[repr(losses[s]) if s in losses else "" for s in sources], f"{t.duration.total_seconds():.6f}"]
        )
    return buf.getvalue()


def plot_search(trials: list, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    from loradem.report import save_png

    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    best = [min(values[: i + 1]) for i in range(len(values))]
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.plot(numbers, values, "o", color="tab:blue", label="trial objective")
    ax.step(numbers, best, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean validation loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(out_dir: Path, result: dict, trials: list, sources: list[str], title: str) -> None:
    atomic_write_text(out_dir / "trials.csv", trials_csv(trials, sources))
    plot_search(trials, out_dir / "search.png", title)
    atomic_write_json(out_dir / "weights.json", result)  # last: its presence means the search is written


# ---- the command ------------------------------------------------------------

def _check_inputs(sources: list[str], adapters: dict[str, Path], validation: dict[str, list[dict]]) -> None:
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


def search_weights(
    recipe, base_dir: Path, adapters: dict[str, Path], validation: dict[str, list[dict]], out_dir: Path, *, log=print
) -> dict:
    """Run (or resume) the weight search; writes weights.json, trials.csv, search.png in out_dir and returns weights.json's content."""
    import optuna

    from loradem.evaluate import encode_for_loss, scored_tokens
    from loradem.multi import check_adapter_folder, load_multi

    settings = recipe.search
    sources = [s.name for s in recipe.sources]
    _check_inputs(sources, adapters, validation)
    adapters = {s: Path(adapters[s]) for s in sources}
    for s in sources:
        check_adapter_folder(s, adapters[s])
    used = {s: list(validation[s])[: settings.max_rows_per_source] for s in sources}
    sampler, grid_size = build_sampler(settings, recipe.seed, sources)
    points = warm_start_points(sources, settings.low, settings.high)
    target = target_trials(settings, grid_size, len(points))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(out_dir)
    name = f"{recipe.name}-{stable_hash(study_identity(recipe, base_dir, adapters, used))}"
    study = open_study(url, name, sampler)
    enqueue_warm_start(study, points)
    remaining = target - len(completed(study))
    log(f"search: study {name!r} in {url}: {len(completed(study))} trials done, {max(remaining, 0)} to run ({settings.sampler})")

    if remaining > 0:
        model, tokenizer = load_multi(base_dir, adapters)
        encoded = {s: encode_for_loss(used[s], tokenizer, recipe.train.max_length) for s in sources}
        for s in sources:
            if scored_tokens(encoded[s]) == 0:
                raise LorademError(f"search: source {s!r}: no completion tokens left within train.max_length={recipe.train.max_length}")
        study.optimize(make_objective(model, encoded, settings), n_trials=remaining, callbacks=[_log_trial(log, sources)])

    trials = completed(study)
    if not trials:
        raise LorademError(f"search: study {name!r} has no completed trial")
    result = summarize(trials, sources, settings.sampler, url, name)
    write_outputs(out_dir, result, trials, sources, f"{recipe.name}: weight search ({settings.sampler})")
    log(f"search: best objective {result['objective']:.4f} at trial {result['best_trial']}: "
        + " ".join(f"{s}={w:.3f}" for s, w in result["weights"].items()))
    return result
