"""What `loradem run` would still train for a recipe, found by the same keys training uses: `loradem check` prints it.

    lines = training_status(recipe, splits, baseline="mix")

One line for the recipe and one per variant: its shared warm-up (trained or not), each source's adapter, and with
the mix baseline the data-mixing adapters (natural shares and each `mix.proportions` set). Nothing is loaded,
trained or folded: a bench recipe takes hours, and this says beforehand which parts the cache already holds.

Keys chain: a warmed recipe's adapters are keyed by the warmed base's weights, so until that base is folded their
keys are unknown and they count as to train; the mix's token budget is its adapters' tokens, so the same holds for
the mix until every adapter is trained. A base that is not on this machine yet (the embedded one before its first
conversion, a hub id) gives one line saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from loradem.errors import LorademError
from loradem.files import fingerprint_weights
from loradem.recipe import Recipe


def local_base(spec: str) -> Optional[Path]:
    """The base's folder when it is already on this machine (nothing converted or downloaded), else None."""
    from loradem.model.base import EMBEDDED, SMOLLM2_DIR, cache_root, check_base_folder

    folder = cache_root() / "bases" / SMOLLM2_DIR if spec == EMBEDDED else Path(spec).expanduser()
    try:
        check_base_folder(folder)
    except LorademError:
        return None
    return folder


def _warm_base(recipe: Recipe, base_dir: Path, splits: dict) -> tuple[Optional[Path], str]:
    """(the base the recipe's adapters train from, or None when it is not folded yet; what its warm-up still needs)."""
    from loradem.train.sft import adapter_dir, adapter_key, is_finished
    from loradem.train.warmup import is_folded, warm_dir, warmup_job

    if not recipe.warmup.enabled:
        return base_dir, ""
    job = warmup_job(recipe, splits)
    key = adapter_key(job, fingerprint_weights(base_dir))
    if not is_finished(adapter_dir(job, key)):
        return None, "warm-up to train"
    folder = warm_dir(key)
    if not is_folded(folder, base_dir, adapter_dir(job, key)):
        return None, "warm-up trained, not folded (the run folds it again; its adapters are looked up then)"
    return folder, "warm-up trained"


def _adapters(recipe: Recipe, base: Path, splits: dict) -> tuple[dict[str, Path], list[str]]:
    """(finished adapters by source, sources to train); a ready `vector:` is not trained (and not imported here)."""
    from loradem.pipeline import finished_adapters

    done = finished_adapters(recipe, base, splits, require=False, vectors=False)
    return done, [s.name for s in recipe.sources if s.vector is None and s.name not in done]


def _mix(recipe: Recipe, base_dir: Path, adapters: dict[str, Path], splits: dict) -> str:
    from loradem.pipeline import mix_job
    from loradem.train.mix import plan_grid, plan_mix
    from loradem.train.sft import is_finished

    job = mix_job(recipe, splits)
    try:
        plans = [plan for _, plan in plan_grid(job, base_dir, adapters)] if recipe.mix.proportions \
            else [plan_mix(job, base_dir, adapters)]
    except LorademError as exc:
        return f"mix: cannot be planned ({exc})"
    missing = sum(not is_finished(p.folder) for p in plans)
    what = "mix" if len(plans) == 1 else f"{len(plans)} mixes (natural and tuned shares)"
    return f"{what}: trained" if not missing else f"{what}: {missing} of {len(plans)} to train"


def training_status(recipe: Recipe, splits: dict, *, baseline: Optional[str] = None) -> list[str]:
    """One line per adapter set (the recipe's, then each variant's), then the mix's with baseline="mix"."""
    base_dir = local_base(recipe.base)
    if base_dir is None:
        return [f"trained so far: nothing known yet (the base {recipe.base!r} is fetched or converted by the first run)"]
    lines, own = [], None
    for label, r in (("recipe", recipe), *((f"variant {v.name!r}", recipe.variant(v.name)) for v in recipe.variants)):
        base, warm = _warm_base(r, base_dir, splits)
        done, todo = _adapters(r, base, splits) if base is not None else ({}, [s.name for s in r.sources])
        own = (done, todo) if own is None else own
        trained = sum(s.vector is None for s in r.sources)
        adapters = (f"adapters {trained - len(todo)} of {trained} trained" + (f" (to train: {', '.join(todo)})" if todo else ""))
        lines.append(f"{label}: " + "; ".join(p for p in (warm, adapters if base is not None or "to train" in warm else "") if p))
    if baseline == "mix":
        done, todo = own
        if todo and recipe.mix.tokens == "match":
            lines.append("mix: to train, after the recipe's adapters (its token budget is theirs)")
        else:
            lines.append(_mix(recipe, base_dir, done, splits))
    return lines
