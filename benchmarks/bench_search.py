"""Benchmark a search trial: loradem (adapters resident, weights re-folded or set as LoRA scales) against a naive merge-and-reload trial.

    .venv/bin/python benchmarks/bench_search.py --threads 1 --trials 2   # SmolLM2-135M, ~2 minutes on 2 busy CPU cores
    .venv/bin/python benchmarks/bench_search.py --recipe recipes/demo.yaml   # the recipe's trained adapters

Validation rows come from the demo data (recipes/demo.yaml's splits, first
--rows per source). Adapters are the recipe's finished ones with --recipe (run
from the folder whose adapters/ holds them), otherwise three random rank-8
adapters on all linear layers (B scaled to small norms like trained ones).
Each kind runs --trials trials at the same seeded random weight points; see
benchmarks/search_overhead.py for what is timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # search_overhead.py beside this script

import torch  # noqa: E402 - after the paths above: loradem from this checkout, search_overhead beside this script
from peft import LoraConfig, get_peft_model  # noqa: E402
from search_overhead import format_overhead, measure_overhead  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from loradem.data.rows import load_splits  # noqa: E402
from loradem.machine import summary as machine_summary  # noqa: E402
from loradem.model.base import resolve_base  # noqa: E402
from loradem.pipeline import finished_adapters  # noqa: E402
from loradem.recipe import load_recipe  # noqa: E402


def random_adapters(base: Path, root: Path, n: int = 3) -> dict[str, Path]:
    out = {}
    for seed in range(n):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)  # trained adapters have small deltas; init_lora_weights=False gives large ones
        model.save_pretrained(root / f"random{seed}")
        out[f"random{seed}"] = root / f"random{seed}"
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m", help="base model: a folder or 'smollm2-135m' (default)")
    parser.add_argument("--recipe", help="use this recipe's finished adapters (and its base) instead of random ones")
    parser.add_argument("--data-recipe", default=str(ROOT / "recipes" / "demo.yaml"), help="recipe whose validation rows are scored")
    parser.add_argument("--trials", type=int, default=3, help="trials of each kind (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=32, help="validation rows per source (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's). On a CPU shared with other busy "
                        "processes use 1: with more, every op waits for a descheduled thread (measured: a rank-8 matmul "
                        "took 16 ms with 2 threads against 0.19 ms with 1 on 2 busy cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data_recipe = load_recipe(args.recipe or args.data_recipe)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        if args.recipe:
            base = resolve_base(data_recipe.base)
            adapters = finished_adapters(data_recipe, base)
            kind = f"finished adapters of {args.recipe}"
        else:
            base = resolve_base(args.base)
            adapters = random_adapters(base, Path(tmp), n=len(data_recipe.sources))
            kind = "random rank-8 all-linear adapters"
        rows = {}
        for src, (name, folder) in zip(data_recipe.sources, list(adapters.items())):
            rows[name] = load_splits(src, data_recipe.seed).validation[: args.rows]
        rng = random.Random(0)
        points = [{s: round(rng.uniform(0.0, 1.5), 3) for s in adapters} for _ in range(args.trials)]
        result = measure_overhead(base, adapters, rows, points, max_length=data_recipe.train.max_length,
                                  batch_size=args.batch_size, log=lambda m: print(m, flush=True))
    print(f"bench_search {dt.date.today().isoformat()}: base {args.recipe and data_recipe.base or args.base}, {kind}, "
          f"{len(adapters)} sources x {args.rows} validation rows, batch {args.batch_size}; {machine_summary()}")
    print(format_overhead(result))
    return result


if __name__ == "__main__":
    main()
