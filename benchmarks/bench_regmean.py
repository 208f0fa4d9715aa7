"""RegMean on the demo's adapters: exact match on the test rows and validation loss for each activations choice and alpha.

    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/bench_regmean.py     # ~15 minutes on 2 busy CPU cores

The adapters are the finished demo run's (runs/demo/adapters.json), the rows the recipe's seeded splits:
RegMean takes rows_per_source training rows per source, the scores are on every source's test rows. For
each `activations` ('base', 'own') the Gram matrices are collected once and solved for every alpha ('merged'
makes one block-by-block pass per alpha, and its "Gram s" column is one pass); each
result is written as a PEFT adapter under --out and scored on an exact in-memory fold (the evaluation's
own code: `loradem.model.soup` + `evaluate_source`), into the base the adapters trained from (the warmed
base when the recipe has a warm-up). Each alpha's validation loss is the one `regmean.alpha: [...]` chooses
by (`loradem.merge.regmean.validation_losses`, on the search's validation rows), so the table shows whether
that choice picks the alpha the test rows favour. The plain sum of the adapters is scored first, as a
check that this evaluation reproduces the demo report's row. Prints a markdown table; --json keeps it all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loradem.data.rows import load_splits  # noqa: E402 - after the path above: loradem from this checkout
from loradem.merge.regmean import (  # noqa: E402
    RegMeanJob,
    collect_statistics,
    read_factors,
    sample_rows,
    solve_factors,
    validation_losses,
    write_adapter,
)
from loradem.merge.regmean_merged import merge_blockwise  # noqa: E402
from loradem.pipeline import recipe_base  # noqa: E402
from loradem.model.base import resolve_base  # noqa: E402
from loradem.model.generate import evaluate_source  # noqa: E402
from loradem.model.soup import load_multi, set_weights  # noqa: E402
from loradem.recipe import RegMeanSettings, load_recipe  # noqa: E402


def score(model, tokenizer, recipe, splits) -> dict[str, float]:
    return {s.name: evaluate_source(model, tokenizer, splits[s.name].test, s.metric, recipe.eval, recipe.train.max_length,
                                    log=lambda m: None)["value"] for s in recipe.sources}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--adapters-json", default="runs/demo/adapters.json")
    parser.add_argument("--alphas", default="0,0.5,0.9,1.0")
    parser.add_argument("--activations", default="base,own")
    parser.add_argument("--rows-per-source", type=int, default=64)
    parser.add_argument("--out", default="runs/bench-regmean")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    recipe = load_recipe(args.recipe)
    listing = Path(args.adapters_json)
    adapters = {s: (listing.parent / p["path"]).resolve() for s, p in json.loads(listing.read_text()).items()}
    splits = {s.name: load_splits(s, recipe.seed) for s in recipe.sources}
    base_dir = recipe_base(recipe, resolve_base(recipe.base, log=lambda m: None), splits)  # the adapters' own base
    validation = {s.name: splits[s.name].validation[: recipe.search.max_rows_per_source] for s in recipe.sources}
    names = [s.name for s in recipe.sources]
    results: dict = {"recipe": args.recipe, "adapters": {s: str(p) for s, p in adapters.items()}, "load_before": load,
                     "test_rows": {n: len(splits[n].test) for n in names}, "rows": []}

    t0 = time.time()
    model, tok = load_multi(base_dir, adapters, fold=True)
    set_weights(model, {n: 1.0 for n in names})
    results["sum"] = score(model, tok, recipe, splits)
    results["sum_eval_seconds"] = round(time.time() - t0, 1)
    del model
    print(f"sum: {results['sum']} ({results['sum_eval_seconds']} s)", flush=True)

    factors = read_factors(adapters)
    alphas = [float(a) for a in args.alphas.split(",")]
    for activations in args.activations.split(","):
        settings = RegMeanSettings(enabled=True, rows_per_source=args.rows_per_source, activations=activations)
        job = RegMeanJob(name="bench", settings=settings, out_dir=Path(args.out), seed=recipe.seed,
                         max_length=recipe.train.max_length, batch_size=recipe.search.batch_size)
        rows = sample_rows(job, names, {n: splits[n].train for n in names})
        if activations == "merged":  # one block-by-block pass per alpha, the solves inside it
            candidates, tokens, gram_seconds = merge_blockwise(base_dir, factors, rows, alphas=alphas,
                                                               max_length=job.max_length, batch_size=job.batch_size, log=print)
            solved = {alpha: (merged, ridged, 0.0) for alpha, (merged, ridged) in candidates.items()}
            gram_seconds /= len(alphas)
        else:
            stats = collect_statistics(base_dir, adapters, rows, activations=activations, max_length=job.max_length,
                                       batch_size=job.batch_size, factors=factors, log=print)
            gram_seconds, tokens = stats.seconds, stats.tokens
            solved = {}
            for alpha in alphas:
                t0 = time.time()
                solved[alpha] = (*solve_factors(stats, factors, alpha), time.time() - t0)
            del stats
        t0 = time.time()
        losses = validation_losses(base_dir, {a: m for a, (m, _, _) in solved.items()}, validation,
                                   max_length=job.max_length, batch_size=job.batch_size)
        print(f"validation losses ({time.time() - t0:.1f} s): {losses}", flush=True)
        for alpha, (merged, ridged, solve_seconds) in solved.items():
            folder = Path(args.out) / f"{activations}-alpha{alpha:g}"
            record = {"settings": {**settings.model_dump(), "alpha": alpha}, "tokens": tokens,
                      "gram_seconds": round(gram_seconds, 1), "solve_seconds": round(solve_seconds, 1), "ridged_modules": ridged}
            write_adapter(folder, merged, json.loads((adapters[names[0]] / "adapter_config.json").read_text()), record)
            t0 = time.time()
            model, tok = load_multi(base_dir, {"regmean": folder}, fold=True)
            per_source = score(model, tok, recipe, splits)
            del model
            row = {"activations": activations, "alpha": alpha, "per_source": per_source, "val_loss": losses[alpha],
                   "chosen_on_validation": alpha == min(losses, key=lambda a: (losses[a], a)),
                   "average": sum(per_source.values()) / len(per_source), "gram_seconds": round(gram_seconds, 1),
                   "solve_seconds": round(solve_seconds, 1), "ridged_modules": len(ridged), "tokens": tokens,
                   "eval_seconds": round(time.time() - t0, 1)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)

    results["load_after"] = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    print(f"\nload before: {load}\nload after:  {results['load_after']}\n")
    print("| activations | alpha | " + " | ".join(names) + " | average | validation loss | Gram s | solve s | ridged layers |")
    print("|---|---:|" + "---:|" * (len(names) + 5))
    for r in results["rows"]:
        chosen = " (chosen)" if r["chosen_on_validation"] else ""
        print(f"| {r['activations']} | {r['alpha']:g} | " + " | ".join(f"{100 * r['per_source'][n]:.1f}" for n in names)
              + f" | {100 * r['average']:.1f} | {r['val_loss']:.4f}{chosen} | {r['gram_seconds']} | {r['solve_seconds']} "
              f"| {r['ridged_modules']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
