"""The shared format warm-up: one short adapter on every source's rows, folded exactly into the base first.

    from loradem.train.warmup import warm_base
    base = warm_base(recipe, base_dir, splits, log=print)   # base_dir itself when recipe.warmup.enabled is false

Separately trained adapters do not teach each other the answer format the way
rows mixed in one training do. With ``warmup: {enabled: true}`` a recipe first
trains one adapter on a seeded sample of each source's training rows
(``rows_per_source``, drawn with the recipe's seed; never validation or test
rows) for ``steps`` optimizer steps, then folds it at weight 1 into the base
with loradem's exact assembler (`loradem.merge.fold.assemble`: float64, one
rounding to the base's dtype). Every source's adapter trains from that warmed
base θ_w, and every later stage takes θ_w as the base: the model is
θ_w + Σ wᵢ·ΔWᵢ.

- **Training**: the sample is one `TrainJob` of source ``warmup`` over a
  synthetic split (training rows: the samples, in the recipe's source order;
  validation rows: those sources' validation rows, scored once at the last
  step, so they choose nothing), trained by `loradem.train.sft.train_source`
  like any source: recipe-wide ``train:`` settings with ``max_steps`` and
  ``eval_steps`` = ``warmup.steps`` (no early stopping), ``warmup.learning_rate``
  when set, and the recipe's ``lora:``. Its folder is
  ``<adapters_dir>/warmup-<key>/``, the key hashing the base's fingerprint, the
  sampled rows, the settings and the seed, so it is reused like any adapter.
  All sampled sources must share one row format (TRL reads it from the first row).
- **Fold**: into ``<cache>/bases/warm-<key>/`` (the loradem cache,
  `loradem.model.base.cache_root`), written aside and renamed into place: a full
  Hugging Face folder (config, tokenizer files, safetensors) whose
  ``loradem.json`` names the original base (portably, with the sha256
  fingerprint of its weights) and the warm-up adapter (``warmup-<key>`` and its
  sha256). It is reused when that record still matches the base, the adapter
  and its own shards; otherwise folded again.
- **Anchoring**: with ``warmup.anchor: true`` the warm-up's training rows
  also hold anchor rows, as the recipe's ``anchor:`` block describes them
  (generic prompts answered by the original base, a ``fraction`` of the
  rows, learned by ``loss``; `loradem.data.anchors`), so the warmed base
  learns the sources' format without drifting from the base elsewhere. The
  anchor settings join the warm-up's key only then.
- **Pinning**: ``warmup.sources`` (default: every source) fixes which sources
  are sampled, so a source added later leaves θ_w, and with it every other
  adapter's key, unchanged.

`check_warmup` refuses what the warm-up would refuse on the data alone (`loradem
check` and the train stage run it); `warmup_record` is what the report and the
model card say about a warmed base.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from loradem.data.anchors import generation_seconds
from loradem.data.rows import Splits, sample
from loradem.errors import LorademError
from loradem.files import fingerprint_weights, read_json, stable_hash, weights_sha256
from loradem.model.base import cache_root
from loradem.recipe import AnchorSettings, Recipe
from loradem.train.sft import (
    ADAPTER_WEIGHTS,
    TRAIN_RECORD,
    TrainJob,
    adapter_dir,
    adapter_key,
    is_finished,
    is_main_process,
)

WARMUP = "warmup"  # the warm-up adapter's source name: its folder is <adapters_dir>/warmup-<key>
PROVENANCE = "loradem.json"  # written by the fold into the warmed base's folder
Log = Callable[[str], Any]


def warmup_sources(recipe: Recipe) -> list[str]:
    """The sources the warm-up samples: `warmup.sources`, or every source of the recipe."""
    return list(recipe.warmup.sources or [s.name for s in recipe.sources])


def check_warmup(recipe: Recipe, splits: dict[str, Splits]) -> None:
    """Raise LorademError for what the warm-up would refuse on its data alone (nothing when it is off)."""
    if not recipe.warmup.enabled:
        return
    names = warmup_sources(recipe)
    formats = {n: splits[n].format for n in names}
    if len(set(formats.values())) > 1:
        raise LorademError(
            "warmup: the sources' rows have different formats (" + ", ".join(f"{n}: {f}" for n, f in formats.items())
            + "); the warm-up trains on one stream and needs one format; set warmup.sources to sources of one format"
        )
    if not any(splits[n].validation for n in names):
        raise LorademError("warmup: none of its sources has validation rows; its validation loss is recorded on them")


def sample_rows(recipe: Recipe, splits: dict[str, Splits]) -> dict[str, list[dict]]:
    """A seeded sample of each warm-up source's training rows (rows_per_source, or all of them when fewer)."""
    return {name: sample(splits[name].train, recipe.warmup.rows_per_source, seed=recipe.seed, stage="warmup",
                         source=name) for name in warmup_sources(recipe)}


def warmup_job(recipe: Recipe, splits: dict[str, Splits]) -> TrainJob:
    """The warm-up as one `TrainJob` (source 'warmup') over a synthetic split of the sampled rows."""
    check_warmup(recipe, splits)
    names = warmup_sources(recipe)
    sample = sample_rows(recipe, splits)
    train_rows = [row for n in names for row in sample[n]]
    val_rows = [row for n in names for row in splits[n].validation]
    fmt = splits[names[0]].format
    fingerprint = stable_hash({"format": fmt, "train": train_rows, "validation": val_rows}, length=64)
    settings = recipe.warmup
    train = recipe.train.model_copy(update={
        "max_steps": settings.steps, "eval_steps": settings.steps, "early_stopping_patience": None,
        "learning_rate": settings.learning_rate or recipe.train.learning_rate,
    })
    split = Splits(source=WARMUP, format=fmt, train=train_rows, validation=val_rows, test=[], fingerprint=fingerprint)
    return TrainJob(source=WARMUP, splits=split, train=train, lora=recipe.lora, seed=recipe.seed,
                    adapters_dir=Path(recipe.adapters_dir), base_name=recipe.base, anchor=warmup_anchor(recipe))


def warmup_anchor(recipe: Recipe) -> AnchorSettings | None:
    """The anchor settings the warm-up trains with: the recipe's `anchor:` block, switched on, when
    `warmup.anchor` is set (whatever `anchor.enabled` says about the sources' adapters); None otherwise."""
    if not (recipe.warmup.enabled and recipe.warmup.anchor):
        return None
    return recipe.anchor.model_copy(update={"enabled": True})


def warm_dir(key: str) -> Path:
    """Where the base warmed by the warm-up adapter of this key is folded: <cache>/bases/warm-<key>."""
    return cache_root() / "bases" / f"warm-{key}"


def warm_base(recipe: Recipe, base_dir: Path, splits: dict[str, Splits], log: Log = print, *,
              train: bool = True) -> Path:
    """The base `recipe`'s adapters train from and fold into: `base_dir` when its warm-up is off, else the warmed
    base (the warm-up adapter trained unless finished, then folded unless its folder is already in place).

    train=False (the stages after training): a missing warm-up adapter is an error naming the command to run."""
    if not recipe.warmup.enabled:
        return Path(base_dir)
    from loradem.train.sft import train_source

    job = warmup_job(recipe, splits)
    key = adapter_key(job, fingerprint_weights(base_dir))
    adapter = adapter_dir(job, key)
    if not is_finished(adapter):
        if not train:
            raise LorademError(f"recipe {recipe.name!r}: no finished warm-up adapter ({adapter.name}); "
                               "run `loradem train <recipe>` first")
        sources = ", ".join(f"{n} {len(rows)}" for n, rows in sample_rows(recipe, splits).items())
        log(f"{WARMUP}: {recipe.warmup.steps} steps on a sample of the training rows ({sources})")
        adapter = train_source(job, base_dir, log=log)
    folder = warm_dir(key)
    if is_folded(folder, base_dir, adapter):
        return folder
    if is_main_process():
        _fold(recipe, adapter, folder, log)
    _wait_for_rank_0()
    return folder


def _fold(recipe: Recipe, adapter: Path, folder: Path, log: Log) -> None:
    from loradem.merge.fold import assemble

    log(f"{WARMUP}: folding {adapter.name} into the base -> {folder.name} (loradem cache)")
    # the base as the recipe names it (it resolves to base_dir): loradem.json names it portably
    assemble(recipe.base, [(adapter, 1.0)], folder, overwrite=True,
             max_shard_size_mb=recipe.assemble.max_shard_size_mb, direct_io=recipe.assemble.direct_io,
             log=lambda _: None)


def _wait_for_rank_0() -> None:
    """Under data parallelism the other ranks use the warmed base only once rank 0 has put it in place."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_folded(folder: Path, base_dir: Path, adapter: Path) -> bool:
    """Is `folder` the fold of exactly this base and this adapter, with its shards as the fold wrote them?"""
    try:
        record = read_json(folder / PROVENANCE)
        (folded,) = record["adapters"]
        shards = record["shards"]
        if not (folder / "config.json").is_file() or not shards:
            return False
        return (record["base"]["sha256"] == fingerprint_weights(base_dir)
                and folded["name"] == adapter.name and folded["sha256"] == weights_sha256(adapter / ADAPTER_WEIGHTS)
                and folded["weight"] == 1.0
                and all((folder / f).is_file() and weights_sha256(folder / f) == sha for f, sha in shards.items()))
    except (LorademError, OSError, KeyError, TypeError, ValueError):
        return False


def warmup_record(recipe: Recipe, warm: Path, relative_to: Path) -> dict:
    """What a report and a model card say about `recipe`'s warmed base `warm`: the original base (portable name and
    sha256), the warm-up adapter (its folder relative to `relative_to`, its sha256), the warmed base's folder name
    and sha256, what the warm-up trained on and its training cost (with an anchored warm-up, the base's generation
    of the anchor replies when the warm-up generated them). No path of this machine."""
    record = read_json(Path(warm) / PROVENANCE)
    (folded,) = record["adapters"]
    adapter = Path(recipe.adapters_dir) / folded["name"]
    train = read_json(adapter / TRAIN_RECORD) if (adapter / TRAIN_RECORD).is_file() else {}
    return {
        "base": record["base"],
        "adapter": {"name": folded["name"], "path": os.path.relpath(adapter, relative_to), "sha256": folded["sha256"]},
        "warmed_base": {"name": Path(warm).name, "sha256": fingerprint_weights(warm)},
        "sources": warmup_sources(recipe),
        "rows_per_source": recipe.warmup.rows_per_source,
        "steps": train.get("steps"),
        "train_rows": train.get("train_rows"),
        "best_val_loss": train.get("best_val_loss"),
        "train_tokens": int(train.get("train_tokens") or 0),
        "train_seconds": round(float(train.get("train_seconds") or 0.0) + generation_seconds(train), 3),
        **({"anchor": _anchor_record(train["anchor"])} if isinstance(train.get("anchor"), dict) else {}),
    }


def _anchor_record(anchored: dict) -> dict:
    """An anchored warm-up's anchor rows as the report shows them (the prompts file by hash, never by path)."""
    return {k: anchored.get(k) for k in ("prompts", "n", "fraction", "loss", "rows", "generation_seconds")}


def with_base_name(jobs: list[TrainJob], base: Path, base_dir: Path) -> list[TrainJob]:
    """The jobs as they train from `base`: a warmed base is named by its folder (an adapter made for it names it,
    not the original base); jobs on `base_dir` itself are unchanged."""
    if Path(base) == Path(base_dir):
        return jobs
    return [replace(job, base_name=str(base)) for job in jobs]
