"""Data mixing, the baseline DEM is measured against: one adapter on every source's rows, at equal compute.

    loradem train recipes/demo.yaml --baseline mix       # after (or with) the per-source adapters
    folder = train_mix(job, base_dir, adapters)           # adapters: {source: finished adapter folder}

A `MixJob` is everything the mix needs, already resolved (`pipeline.mix_job`
builds it from a recipe): every source's splits and mix_proportion, the
recipe-wide train and LoRA settings, the mix settings, the seed, the adapters
folder and the base's name for the card.

What it trains, exactly:

- **Rows**: every source's training split (the same splits the per-source
  adapters used), as one stream. A source's share is its ``mix_proportion``
  (normalized to sum 1; every source sets it or none does) or, by default, its
  share of all training rows. Slot k of the stream goes to the source furthest
  below its share (share·k − rows so far; ties to the earlier source), so after
  any number of rows every source's count is within one row of its share.
  Within a source, rows cycle through a permutation seeded by (seed,
  source, pass): a source that runs out starts a new shuffled pass. The Trainer
  reads the stream in order (sequential sampler), so what `mix_stream` yields is
  what is fed.
- **Budget**: ``mix.tokens: match`` (default) is the sum of the per-source
  adapters' ``train_tokens`` (their ``loradem-train.json``, else their
  ``vector.json`` card), so both methods see the same number of training
  tokens; or a number. Row lengths come from TRL's own tokenization, so the
  stream is cut at the end of the first optimizer step whose cumulative tokens
  reach the target, and that step count becomes ``max_steps`` (the learning-rate
  schedule ends there). `TokenBudget` independently stops training at the first
  optimizer step whose counted tokens (TRL's ``num_tokens``, the attention-mask
  sum) reach the target, and evaluates and checkpoints that step: the count is
  within one batch of the target.
- **Settings**: the recipe-wide ``train:`` and ``lora:`` blocks (per-source
  overrides do not apply; ``max_steps`` / ``epochs`` are replaced by the
  budget). Validation on the union of every source's validation rows (mean loss
  over their completion tokens); the best checkpoint by that loss is kept, with
  early stopping if the recipe asks for it.
- **Cache**: ``<adapters_dir>/mix-<key>/``; the key hashes what shapes the
  weights: base, every source's data fingerprint, the shares, the token target
  (which is where the per-source adapters enter), the settings and the seed.
  Written atomically with ``loradem-train.json`` (plus ``target_tokens``,
  ``shares``, ``rows_fed`` per source, ``source_tokens``) and a ``vector.json``
  card whose source is ``mix``.

**Tuned proportions** (``mix.proportions``, a list of {source: share} sets):
`train_mix_grid` trains the natural mix above, then one more mix per set
(the same budget and settings; the set's shares replace the natural ones, so
each is cached under its own key), logging "mix 2/3: addition 0.5 reverse
0.25 sort 0.25" as each starts. `choose_mix` picks the lowest validation loss
(the record's ``best_val_loss``: the value checkpoint selection uses, never
test rows); `grid_record` is what the report keeps of every set, with the
whole grid's training cost, which the ``mix-tuned`` row carries.

    folders = train_mix_grid(job, base_dir, adapters)     # natural first, then each set
    grid = grid_record(folders)                           # {"chosen": i, "sets": [...], "cost": {...}}

All sources must share one row format (TRL reads a dataset's format from its
first row, and a stream of mixed formats crashes it). `check_mix` refuses that,
partly set proportions and a mix without validation rows before any training;
`loradem check` runs the same function.

Progress: one bar in optimizer steps, as for every source (`sft.fit`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import loradem
from loradem.data.rows import Splits
from loradem.errors import LorademError
from loradem.files import fingerprint_weights, read_json, stable_hash
from loradem.recipe import LoraSettings, MixSettings, TrainSettings
from loradem.train.sft import CARD, TRAIN_RECORD, finish_folder, fit, is_finished, is_main_process, output_folder

MIX = "mix"
Log = Callable[[str], Any]


@dataclass(frozen=True)
class MixJob:
    """Everything training the data-mixing adapter needs, resolved by the caller."""

    splits: dict[str, Splits]  # every source's splits, in the recipe's order
    proportions: dict[str, float | None]  # each source's mix_proportion (None: unset)
    train: TrainSettings  # the recipe-wide settings: per-source overrides do not apply to the mix
    lora: LoraSettings
    mix: MixSettings
    seed: int
    adapters_dir: Path
    base_name: str  # the base as the user named it, written on the card

    def __post_init__(self) -> None:
        if list(self.proportions) != list(self.splits):
            raise ValueError(f"proportions are for {list(self.proportions)}, splits for {list(self.splits)}")
        for i, shares in enumerate(self.mix.proportions or []):  # the recipe refuses these with the field's name
            if sorted(shares) != sorted(self.splits):
                raise ValueError(f"mix.proportions[{i}] is for {sorted(shares)}, splits for {sorted(self.splits)}")
        object.__setattr__(self, "adapters_dir", Path(self.adapters_dir))

    @property
    def names(self) -> list[str]:
        return list(self.splits)


@dataclass(frozen=True)
class MixPlan:
    folder: Path
    key: str
    target_tokens: int
    shares: dict[str, float]
    source_tokens: dict[str, int] | None  # per-source adapter tokens when tokens: match
    fmt: str
    base_fingerprint: str
    data_fingerprint: str


# ---- refusals and the plan (no training) -------------------------------------

def check_mix(job: MixJob) -> None:
    """Raise LorademError for what the mix would refuse on its data and settings alone (`loradem check` and
    `plan_mix` both call it): sources of different row formats, mix_proportion set for some sources only,
    no validation rows at all."""
    formats = {n: job.splits[n].format for n in job.names}
    if len(set(formats.values())) > 1:
        raise LorademError(
            "mix: the sources' rows have different formats (" + ", ".join(f"{n}: {f}" for n, f in formats.items())
            + "); the mixing baseline trains on one stream and needs one format (a source's chat_template: true turns prompt/completion rows into messages rows)"
        )
    _check_proportions(job.proportions)
    if not any(job.splits[n].validation for n in job.names):
        raise LorademError("mix: no source has validation rows; the best checkpoint is chosen on them")


def _check_proportions(given: dict[str, float | None]) -> None:
    unset = [n for n, p in given.items() if p is None]
    if unset and len(unset) < len(given):
        have = [n for n in given if n not in unset]
        raise LorademError(
            f"mix: sources[].mix_proportion: set for {', '.join(have)} but not for {', '.join(unset)}; "
            "set it for every source or for none (default: proportional to training rows)"
        )


def mix_shares(job: MixJob) -> dict[str, float]:
    """Each source's share of the stream: its mix_proportion, or its share of the training rows; sums to 1."""
    _check_proportions(job.proportions)
    if any(p is None for p in job.proportions.values()):
        raw = {n: float(len(job.splits[n].train)) for n in job.names}
    else:
        raw = {n: float(p) for n, p in job.proportions.items()}
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()}


def adapter_tokens(name: str, folder: Path) -> int:
    """Training tokens of a finished adapter: its loradem-train.json, else its vector.json card."""
    folder = Path(folder)
    for path, read in ((folder / TRAIN_RECORD, lambda d: d.get("train_tokens")),
                       (folder / CARD, lambda d: (d.get("metrics") or {}).get("train_tokens"))):
        if path.is_file():
            tokens = read(read_json(path))
            if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
                return tokens
    raise LorademError(
        f"mix: tokens: match needs source {name!r}'s training tokens, but {folder} has no train_tokens "
        f"in {TRAIN_RECORD} or {CARD}; set `mix.tokens` to a number"
    )


def target_tokens(job: MixJob, adapters: dict[str, Path]) -> tuple[int, dict[str, int] | None]:
    """(token budget, per-source adapter tokens or None): the sum of the adapters' tokens, or mix.tokens."""
    if job.mix.tokens != "match":
        return int(job.mix.tokens), None
    missing = [n for n in job.names if n not in adapters]
    if missing:
        raise LorademError(
            f"mix: tokens: match needs every source's finished adapter to count its training tokens; none for "
            f"{', '.join(missing)} (run `loradem train <recipe>` first, or set `mix.tokens` to a number)"
        )
    per = {n: adapter_tokens(n, adapters[n]) for n in job.names}
    return sum(per.values()), per


def mix_settings(train: TrainSettings) -> dict:
    """The training settings that shape the mix (max_steps / epochs are replaced by the token budget)."""
    return train.model_dump(exclude={"max_steps", "epochs"})


def plan_mix(job: MixJob, base_dir: Path, adapters: dict[str, Path]) -> MixPlan:
    """Where the mix adapter lives and what it will be trained on; raises LorademError if it cannot be trained."""
    check_mix(job)
    shares = mix_shares(job)
    target, per = target_tokens(job, adapters)
    base_fp = fingerprint_weights(base_dir)
    data_fp = stable_hash({"data": {n: job.splits[n].fingerprint for n in job.names}, "shares": shares}, length=64)
    key = stable_hash({
        "base": base_fp,
        "data": data_fp,
        "target_tokens": target,
        "train": mix_settings(job.train),
        "lora": job.lora.model_dump(),
        "seed": job.seed,
        "loradem": loradem.__version__.split(".")[0],
    })
    fmt = job.splits[job.names[0]].format
    return MixPlan(job.adapters_dir / f"{MIX}-{key}", key, target, shares, per, fmt, base_fp, data_fp)


def find_mix(job: MixJob, base_dir: Path, adapters: dict[str, Path]) -> Path | None:
    """The finished mix adapter for these per-source adapters, or None (also when it could not be trained)."""
    try:
        plan = plan_mix(job, base_dir, adapters)
    except LorademError:
        return None
    return plan.folder if is_finished(plan.folder) else None


# ---- tuned proportions: the grid ----------------------------------------------

def grid_jobs(job: MixJob) -> list[MixJob]:
    """The natural mix, then one job per `mix.proportions` set (its shares in place of the sources' own)."""
    sets = job.mix.proportions or []
    return [job, *(replace(job, proportions={n: float(shares[n]) for n in job.names}) for shares in sets)]


def plan_grid(job: MixJob, base_dir: Path, adapters: dict[str, Path]) -> list[tuple[MixJob, MixPlan]]:
    """Each grid job with its plan, natural first; a set whose shares equal an earlier one's is the same adapter
    and appears once."""
    out: list[tuple[MixJob, MixPlan]] = []
    for j in grid_jobs(job):
        plan = plan_mix(j, base_dir, adapters)
        if all(plan.key != p.key for _, p in out):
            out.append((j, plan))
    return out


def describe_shares(shares: dict[str, float]) -> str:
    return " ".join(f"{n} {p:.3g}" for n, p in shares.items())


def train_mix_grid(
    job: MixJob,
    base_dir: Path,
    adapters: dict[str, Path],
    *,
    force: bool = False,
    log: Log = print,
    callbacks: Sequence[Any] = (),
) -> list[Path]:
    """Train (or reuse) the natural mix and one mix per `mix.proportions` set; their folders, natural first."""
    grid = plan_grid(job, base_dir, adapters)
    folders = []
    for i, (j, plan) in enumerate(grid, 1):
        if len(grid) > 1 and is_main_process():
            log(f"{MIX} {i}/{len(grid)}: {describe_shares(plan.shares)}" + (" (natural)" if i == 1 else ""))
        folders.append(train_mix(j, base_dir, adapters, force=force, log=log, callbacks=callbacks))
    return folders


def find_mix_grid(job: MixJob, base_dir: Path, adapters: dict[str, Path]) -> list[Path] | None:
    """Every finished grid adapter, natural first, when the job has `mix.proportions` and all of them are
    finished; else None (a partial grid would price and choose from less than it claims)."""
    if not job.mix.proportions:
        return None
    try:
        grid = plan_grid(job, base_dir, adapters)
    except LorademError:
        return None
    folders = [plan.folder for _, plan in grid]
    return folders if all(is_finished(f) for f in folders) else None


def choose_mix(records: Sequence[dict]) -> int:
    """Index of the lowest validation loss (``best_val_loss``: every source's validation completion tokens);
    the earlier on a tie, so the natural mix wins ties."""
    losses = [r.get("best_val_loss") for r in records]
    for r, loss in zip(records, losses):
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise LorademError(f"mix: {r.get('key', '?')}: {TRAIN_RECORD} has no best_val_loss to choose by")
    return min(range(len(records)), key=lambda i: (losses[i], i))


def grid_record(folders: Sequence[Path], relative_to: Path | None = None) -> dict:
    """What the report keeps of the grid: each set's adapter (relative to `relative_to` when given, else its
    folder name), shares, validation loss, tokens and seconds (natural first), the chosen index, and the whole
    grid's training cost (what `mix-tuned` is charged)."""
    records = [read_json(Path(f) / TRAIN_RECORD) for f in folders]
    sets = [{
        "adapter": os.path.relpath(f, relative_to) if relative_to is not None else Path(f).name,
        "natural": i == 0,
        "shares": r.get("shares"),
        "best_val_loss": r.get("best_val_loss"),
        "train_tokens": int(r.get("train_tokens") or 0),
        "train_seconds": round(float(r.get("train_seconds") or 0.0), 1),
    } for i, (f, r) in enumerate(zip(folders, records))]
    return {
        "chosen": choose_mix(records),
        "chosen_by": "validation loss (mean over every source's validation completion tokens)",
        "sets": sets,
        "cost": {"train_tokens": sum(s["train_tokens"] for s in sets),
                 "train_seconds": round(sum(float(r.get("train_seconds") or 0.0) for r in records), 1)},
    }


# ---- the row stream ------------------------------------------------------------

def mix_stream(shares: dict[str, float], rows: dict[str, Sequence[int]], seed: int) -> Iterator[tuple[str, int]]:
    """Endless (source, row id) stream: each slot goes to the source furthest below its share; within a
    source, rows cycle through a permutation seeded by (seed, source, pass)."""
    names = list(shares)
    for n in names:
        if not rows[n]:
            raise LorademError(f"mix: source {n!r} has no training rows left to mix")
    count = dict.fromkeys(names, 0)
    queue: dict[str, list[int]] = {n: [] for n in names}
    passes = dict.fromkeys(names, 0)
    slot = 0
    while True:
        slot += 1
        name = max(names, key=lambda n: shares[n] * slot - count[n])  # max() keeps the first of equals
        if not queue[name]:
            order = list(rows[name])
            random.Random(f"{seed}:mix:{name}:{passes[name]}").shuffle(order)
            queue[name], passes[name] = order[::-1], passes[name] + 1
        count[name] += 1
        yield name, queue[name].pop()


def take_steps(stream: Iterator[Any], length: Callable[[Any], int], target: int, per_step: int) -> list:
    """Items of `stream` in whole optimizer steps of `per_step`, up to the first step whose total length reaches `target`."""
    out, total = [], 0
    while total < target or len(out) % per_step:
        item = next(stream)
        out.append(item)
        total += length(item)
    return out


# ---- training ------------------------------------------------------------------

def train_mix(
    job: MixJob,
    base_dir: Path,
    adapters: dict[str, Path],
    *,
    force: bool = False,
    log: Log = print,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train the data-mixing adapter (or reuse the finished one) and return its folder."""
    from loradem.train.callbacks import TokenBudget  # transformers' trainer stack: imported when training

    plan = plan_mix(job, base_dir, adapters)
    log = log if is_main_process() else (lambda _: None)
    if is_finished(plan.folder) and not force:
        log(f"{MIX}: skipped (finished adapter {plan.folder})")
        return plan.folder
    names, splits = job.names, job.splits
    train_rows = [{**row, "loradem_source": n, "loradem_row": i} for n in names for i, row in enumerate(splits[n].train)]
    val_rows = [row for n in names for row in splits[n].validation]
    log(f"{MIX}: budget {plan.target_tokens:,} training tokens"
        + (" (the per-source adapters' sum)" if plan.source_tokens else " (mix.tokens)")
        + "; shares " + ", ".join(f"{n} {p:.3f}" for n, p in plan.shares.items()))
    budget = TokenBudget(plan.target_tokens)

    def prepare(trainer) -> dict:
        return _lay_out(trainer, plan, names, job.seed, log)

    with output_folder(plan.folder) as tmp:
        record = fit(MIX, Path(base_dir), job.train, job.lora, seed=job.seed, fmt=plan.fmt,
                     train_rows=train_rows, val_rows=val_rows, out=tmp, log=log,
                     callbacks=[budget, *callbacks], prepare=prepare)
        record["train"] = _effective(job.train, record["max_steps"])
        record.update(source=MIX, key=plan.key, base_fingerprint=plan.base_fingerprint,
                      data_fingerprint=plan.data_fingerprint, target_reached_at_step=budget.reached_at)
        rows = {split: sum(len(getattr(splits[n], split)) for n in names) for split in ("train", "validation", "test")}
        if is_main_process():
            finish_folder(tmp, record, base_name=job.base_name, rows=rows, fmt=plan.fmt)
    log(f"{MIX}: trained -> {plan.folder} ({record['train_tokens']:,} tokens for a target of {plan.target_tokens:,}; "
        f"best step {record['best_step']}/{record['steps']}, val loss {record['best_val_loss']:.4f}, "
        f"{record['train_seconds']:.1f} s)")
    return plan.folder


def _lay_out(trainer, plan: MixPlan, names: list[str], seed: int, log: Log) -> dict:
    """Replace the trainer's (tokenized, TRL-filtered) training rows by the mixed stream, read in order,
    and end the schedule at the step that reaches the token budget."""
    dataset = trainer.train_dataset
    position = {(s, i): j for j, (s, i) in enumerate(zip(dataset["loradem_source"], dataset["loradem_row"]))}
    lengths = [len(ids) for ids in dataset["input_ids"]]
    rows = {n: sorted(i for (s, i) in position if s == n) for n in names}
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    stream = mix_stream(plan.shares, rows, seed)
    order = take_steps(stream, lambda item: lengths[position[item]], plan.target_tokens, per_step)
    fed = {n: 0 for n in names}
    for n, _ in order:
        fed[n] += 1
    trainer.train_dataset = dataset.select([position[item] for item in order])
    args.train_sampling_strategy = "sequential"
    args.max_steps = len(order) // per_step
    planned = sum(lengths[position[item]] for item in order)
    log(f"{MIX}: {len(order)} rows in {args.max_steps} steps of {per_step} ({planned:,} tokens): "
        + ", ".join(f"{n} {fed[n]}" for n in names))
    return {
        "target_tokens": plan.target_tokens,
        "planned_tokens": planned,
        "shares": plan.shares,
        "rows_fed": fed,
        "source_tokens": plan.source_tokens,
    }


def _effective(train: TrainSettings, steps: int) -> dict:
    """The train settings as the mix ran them: max_steps is the budget's step count."""
    return {**train.model_dump(), "max_steps": steps}
