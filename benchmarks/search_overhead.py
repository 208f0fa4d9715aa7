"""What a search trial costs beyond its evaluation: loradem's scale change against a naive merge-and-reload.

    result = measure_overhead(base_dir, adapters, validation, points, max_length=128, batch_size=16)
    print(format_overhead(result))
    .venv/bin/python benchmarks/bench_search.py          # the same on SmolLM2-135M

Both trial kinds score the same tokenized validation rows with the same
function (`generate.mean_loss`) at the same weight points:

- loradem (what the search runs): every adapter resident on one base
  (`soup.load_multi(fold=True)`, once, timed apart); a trial is `set_weights`
  (the weighted deltas re-folded into the Linear weights) + the evaluation.
- loradem scales: the same with fold=False: `set_weights` only changes LoRA
  scales, and every evaluation runs the unmerged adapters' extra matmuls.
- naive: a trial loads the base fresh, loads every adapter with PEFT, builds
  the weighted adapter with `add_weighted_adapter(combination_type="cat")`
  (exact, unlike "linear") and `merge_and_unload`s it, then evaluates.

Non-evaluation fraction = (trial time - evaluation time) / trial time. The two
losses at each point must agree (both compute θ₀ + Σ wᵢ·ΔWᵢ); the largest
relative difference is reported. PEFT's cat inherits use_rslora from the first
adapter (a known PEFT behaviour), so adapters trained with rsLoRA make the naive losses wrong.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Callable

from peft import PeftModel

from loradem.model import generate, render
from loradem.model.soup import load_base, load_multi, peft_adapter_name, set_weights


def _naive_model(base_dir: Path, adapters: dict[str, Path], weights: dict[str, float]):
    names = {s: peft_adapter_name(i, s) for i, s in enumerate(adapters)}
    model = None
    for s, folder in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(load_base(base_dir), str(folder), adapter_name=names[s], is_trainable=False)
        else:
            model.load_adapter(str(folder), adapter_name=names[s], is_trainable=False)
    model.add_weighted_adapter([names[s] for s in adapters], [float(weights[s]) for s in adapters], "merged", combination_type="cat")
    model.set_adapter("merged")
    return model.merge_and_unload().eval()


def measure_overhead(
    base_dir: Path, adapters: dict[str, Path], validation: dict[str, list[dict]], points: list[dict[str, float]], *,
    max_length: int = 256, batch_size: int = 16, log: Callable[[str], None] = print,
) -> dict:
    """Time loradem trials and naive trials at the same `points`; returns per-trial timings, fractions, ratio and loss agreement."""
    sources = list(adapters)
    runs: dict[str, list[dict]] = {}
    load_seconds: dict[str, float] = {}
    encoded: dict[str, list] = {}

    def score(m) -> dict[str, float]:
        return {s: generate.mean_loss(m, encoded[s], batch_size=batch_size) for s in sources}

    for key, fold in (("loradem", True), ("scales", False)):
        t0 = time.perf_counter()
        model, tok = load_multi(base_dir, adapters, fold=fold)
        load_seconds[key] = time.perf_counter() - t0
        if not encoded:
            encoded = {s: render.encode_for_loss(validation[s], tok, max_length) for s in sources}
            for s in sources:  # warm-up (first-call allocations, kernel choice), untimed: one batch per source
                generate.mean_loss(model, encoded[s][:batch_size], batch_size=batch_size)
        runs[key] = []
        for i, w in enumerate(points):
            a = time.perf_counter()
            set_weights(model, w)
            b = time.perf_counter()
            losses = score(model)
            c = time.perf_counter()
            runs[key].append({"weights": w, "setup_seconds": b - a, "eval_seconds": c - b, "trial_seconds": c - a, "losses": losses})
            log(f"overhead: {key} trial {i}: {c - a:.3f} s (set_weights {1e3 * (b - a):.2f} ms)")
        del model
        gc.collect()
    fast = runs["loradem"]
    slow = []
    for i, w in enumerate(points):
        a = time.perf_counter()
        merged = _naive_model(base_dir, adapters, w)
        b = time.perf_counter()
        losses = score(merged)
        c = time.perf_counter()
        slow.append({"weights": w, "setup_seconds": b - a, "eval_seconds": c - b, "trial_seconds": c - a, "losses": losses})
        log(f"overhead: naive trial {i}: {c - a:.3f} s (load + cat merge {b - a:.3f} s)")
        del merged
        gc.collect()

    def summary(trials: list[dict]) -> dict:
        total = sum(t["trial_seconds"] for t in trials)
        return {
            "trials": trials,
            "trial_seconds_median": statistics.median(t["trial_seconds"] for t in trials),
            "eval_seconds_median": statistics.median(t["eval_seconds"] for t in trials),
            "setup_seconds_median": statistics.median(t["setup_seconds"] for t in trials),
            "non_eval_fraction": sum(t["setup_seconds"] for t in trials) / total,
        }

    rel = max(
        abs(other[i]["losses"][s] - n["losses"][s]) / abs(n["losses"][s])
        for other in (fast, runs["scales"]) for i, n in enumerate(slow) for s in sources
    )
    out = {"sources": sources, "rows": {s: len(validation[s]) for s in sources}, "load_seconds": load_seconds,
           "loradem": summary(fast), "scales": summary(runs["scales"]), "naive": summary(slow), "max_rel_loss_diff": rel}
    out["ratio"] = out["naive"]["trial_seconds_median"] / out["loradem"]["trial_seconds_median"]
    return out


def format_overhead(result: dict) -> str:
    """A small table: per-trial medians, the non-evaluation fraction of each kind, and the ratio."""
    lines = [f"{'trial kind':<28}{'trial s':>9}{'eval s':>9}{'other s':>10}{'non-eval':>10}"]
    for key, label in (("loradem", "loradem (fold, the search)"), ("scales", "loradem (LoRA scales)"),
                       ("naive", "naive (load + cat merge)")):
        r = result[key]
        lines.append(f"{label:<28}{r['trial_seconds_median']:>9.3f}{r['eval_seconds_median']:>9.3f}"
                     f"{r['setup_seconds_median']:>10.4f}{100 * r['non_eval_fraction']:>9.2f}%")
    n = len(result["loradem"]["trials"])
    lines.append(f"naive / loradem (fold) trial time: {result['ratio']:.2f}x  ({n} trials each, medians; one-time load: "
                 f"fold {result['load_seconds']['loradem']:.2f} s, scales {result['load_seconds']['scales']:.2f} s)")
    lines.append(f"max relative loss difference, loradem (both kinds) vs naive: {result['max_rel_loss_diff']:.2e}")
    return "\n".join(lines)
