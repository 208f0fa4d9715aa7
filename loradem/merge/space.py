"""The search space: which Optuna parameters a study has, and what weights a trial's parameters mean.

    space = SearchSpace.from_settings(SearchSettings(granularity="layer-groups"), ["add", "rev"], num_layers=30)
    params = space.suggest(trial)       # {"add": 0.7, "rev": 1.1}, or {"add@g0": ..., "add@g1": ...}
    space.weights(params)               # for soup.set_weights: {source: w} or {source: [w per group]}

- granularity 'source': one parameter per source, named after it.
- granularity 'layer-groups': one parameter per (source, layer group), named
  ``<source>@g<i>``; the number of groups is `layer_groups`, at most the base's
  number of decoder blocks (`loradem.model.layers` maps a module to its group).
- global_scale: one more parameter, ``@global_scale`` in [0, 2], that
  multiplies every weight. '@' cannot appear in a source name, so parameter
  names never collide.

A trial's weights are always *effective* weights (already multiplied by the
global scale): what `soup.set_weights` applies and what the assembler folds.

Warm-start points (queued before the sampler runs): a previous best (new
sources at 0, then each new source alone at 0.25, 0.5 and 1.0), then the
uniform point (1/n) and the plain sum (1), all clipped to [low, high].
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import optuna

from loradem.errors import LorademError
from loradem.files import read_json
from loradem.recipe import SearchSettings

GLOBAL = "@global_scale"
GLOBAL_RANGE = (0.0, 2.0)
NEW_SOURCE_VALUES = (0.25, 0.5, 1.0)
MAX_GRID = 100_000
_SAMPLER_NEEDS = {"gp": ("scipy", "pip install scipy"), "cmaes": ("cmaes", "pip install cmaes")}


@dataclass(frozen=True)
class SearchSpace:
    sources: tuple[str, ...]
    low: float
    high: float
    groups: Optional[int] = None  # None: one weight per source
    global_scale: bool = False

    @classmethod
    def from_settings(cls, settings: SearchSettings, sources: list[str], num_layers: int) -> "SearchSpace":
        groups = min(settings.layer_groups, num_layers) if settings.granularity == "layer-groups" else None
        return cls(tuple(sources), settings.low, settings.high, groups, settings.global_scale)

    def source_params(self, source: str) -> list[str]:
        return [source] if self.groups is None else [f"{source}@g{g}" for g in range(self.groups)]

    def param_names(self) -> list[str]:
        names = [p for s in self.sources for p in self.source_params(s)]
        return names + [GLOBAL] if self.global_scale else names

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {p: GLOBAL_RANGE if p == GLOBAL else (self.low, self.high) for p in self.param_names()}

    def suggest(self, trial) -> dict[str, float]:
        return {p: trial.suggest_float(p, lo, hi) for p, (lo, hi) in self.ranges().items()}

    def weights(self, params: dict[str, float]) -> dict[str, float | list[float]]:
        """Effective weights of a parameter point: a float per source, or a list per source (layer groups)."""
        scale = params[GLOBAL] if self.global_scale else 1.0
        if self.groups is None:
            return {s: params[s] * scale for s in self.sources}
        return {s: [params[p] * scale for p in self.source_params(s)] for s in self.sources}

    def mean_weights(self, params: dict[str, float]) -> dict[str, float]:
        """One number per source: the weight, or the mean of its layer-group weights (what modules outside the blocks get)."""
        return {s: w if isinstance(w, float) else sum(w) / len(w) for s, w in self.weights(params).items()}

    def point(self, weights: dict[str, float | list[float]]) -> dict[str, float]:
        """Parameters (global scale 1) that give these weights, clipped to [low, high]; a float fills every group,
        a list of another length is replaced by its mean."""
        clip = lambda w: min(max(float(w), self.low), self.high)  # noqa: E731
        out: dict[str, float] = {}
        for s in self.sources:
            w = weights[s]
            if self.groups is None:
                out[s] = clip(w if not isinstance(w, list) else sum(w) / len(w))
                continue
            per_group = w if isinstance(w, list) and len(w) == self.groups else [sum(w) / len(w) if isinstance(w, list) else w] * self.groups
            out.update({p: clip(x) for p, x in zip(self.source_params(s), per_group)})
        if self.global_scale:
            out[GLOBAL] = 1.0
        return out

    def grid(self, points: int) -> dict[str, list[float]]:
        return {p: grid_values(lo, hi, points) for p, (lo, hi) in self.ranges().items()}


def grid_values(low: float, high: float, points: int) -> list[float]:
    """`points` evenly spaced values from low to high, both ends included exactly."""
    return [low + (high - low) * i / (points - 1) for i in range(points - 1)] + [high]


# ---- warm starts ----------------------------------------------------------------

def read_previous(path: Path) -> dict[str, float | list[float]]:
    """A previous search's best weights from its weights.json: {source: w}, or {source: [w per group]} where it has layer_weights."""
    path = Path(path)
    if not path.is_file():
        raise LorademError(f"search.warm_start: {path}: not found (expected a previous run's weights.json)")
    data = read_json(path)
    weights = data.get("weights") if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not weights:
        raise LorademError(f"{path}: weights: expected a mapping of source name to weight")
    layer = data.get("layer_weights") or {}
    if not isinstance(layer, dict):
        raise LorademError(f"{path}: layer_weights: expected a mapping of source name to a list of weights")
    out: dict[str, float | list[float]] = {}
    for s, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise LorademError(f"{path}: weights.{s}: expected a finite number, got {w!r}")
        out[s] = float(w)
        lw = layer.get(s)
        if lw is not None:
            if not isinstance(lw, list) or not lw or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lw
            ):
                raise LorademError(f"{path}: layer_weights.{s}: expected a non-empty list of finite numbers")
            out[s] = [float(x) for x in lw]
    return out


def warm_start_points(space: SearchSpace, previous: Optional[dict[str, float | list[float]]] = None) -> list[dict[str, float]]:
    """Points to queue before sampling, as parameter dicts, duplicates dropped (see the module docstring)."""
    n = len(space.sources)
    candidates: list[dict[str, float | list[float]]] = []
    if previous:
        new = [s for s in space.sources if s not in previous]
        best = {s: previous.get(s, 0.0) for s in space.sources}
        candidates.append(best)
        for s in new:
            candidates += [{**best, s: v} for v in NEW_SOURCE_VALUES]
    candidates += [{s: 1.0 / n for s in space.sources}, {s: 1.0 for s in space.sources}]
    points: list[dict[str, float]] = []
    for c in candidates:
        p = space.point(c)
        if p not in points:
            points.append(p)
    return points


# ---- samplers -------------------------------------------------------------------

def build_sampler(settings: SearchSettings, seed: int, space: SearchSpace):
    """(Optuna sampler, grid size or None) for settings.sampler; a one-line error when a dependency is missing.

    TPE runs with constant_liar, so workers sharing a study do not all sample the same point while
    others' trials are running (no effect when there are none).
    """
    name = settings.sampler
    if name in _SAMPLER_NEEDS:
        module, fix = _SAMPLER_NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise LorademError(f"search.sampler: {name!r} needs the {module} package; run `{fix}` or use sampler: tpe")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True), None
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed), None
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed), None
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed), None
    if name == "grid":
        n_params = len(space.param_names())
        size = settings.grid_points ** n_params
        if size > MAX_GRID:
            raise LorademError(
                f"search.grid_points: {settings.grid_points} points for {n_params} parameters is a grid of {size} points "
                f"(at most {MAX_GRID}); lower grid_points or use sampler: tpe"
            )
        return optuna.samplers.GridSampler(space.grid(settings.grid_points), seed=seed), size
    raise LorademError(f"search.sampler: expected tpe, random, cmaes, gp or grid, got {name!r}")


def target_trials(settings: SearchSettings, grid_size: Optional[int], n_warm: int) -> int:
    """Finished (complete or pruned) trials the study should end with."""
    if grid_size is None:
        return settings.n_trials
    return min(settings.n_trials, grid_size + n_warm)
