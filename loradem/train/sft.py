"""Train: one LoRA adapter per source with TRL's SFT trainer, kept at its best validation step.

    from loradem.train.sft import TrainJob, train_all
    job = TrainJob(source="addition", splits=splits, train=TrainSettings(), lora=LoraSettings(), seed=0,
                   adapters_dir=Path("adapters"), base_name="smollm2-135m")
    adapters = train_all([job], base_dir)        # {source name: adapter folder}

A `TrainJob` is everything one source's training needs, already resolved:
its splits, its effective train and LoRA settings, the anchor settings (None
when anchoring is off), the seed, the adapters folder and the base's name for
the card (`pipeline.train_jobs` builds them from a recipe).

Each source trains alone (DEM step 1) into ``<adapters_dir>/<source>-<key>/``,
where the key hashes everything that shapes the result (base weights, data
and splits, effective train and LoRA settings, seed), so a finished folder is
reused and a changed source retrains alone. The folder holds PEFT's
``adapter_config.json`` + ``adapter_model.safetensors`` (the checkpoint with
the lowest validation loss), ``loradem-train.json`` and ``curve.png``. It is
written aside and renamed when complete; TRL's intermediate checkpoints live
inside the partial folder and are deleted before the rename (their
``training_args.bin`` pickle is never read).

Refusals come before any training: `check_jobs` refuses what the data and
settings alone make untrainable (no validation rows, anchored training on
rows that are not chat turns, anchor prompts the settings cannot give);
`loradem check` runs the same function, so the two cannot disagree.
`train_all` runs it on every job before training the first, then
`check_trainable`: what the base's tokenizer and TRL's config refuse.

``loradem-train.json`` cost accounting: ``train_tokens`` = non-padding tokens
fed to the model over all optimizer steps (TRL's ``num_tokens``, a sum of the
attention masks); ``train_seconds`` = wall time of ``trainer.train()``,
evaluations and checkpoint saves included; ``flops_estimate`` =
6 * n_params * train_tokens (n_params counts every base and LoRA parameter).

Rendering (the same in evaluation): a messages row trains as conversational
prompt/completion (prompt = messages[:-1] through the chat template with the
generation prompt, completion = the last assistant turn and what the template
closes it with); loss on the completion only unless ``completion_only_loss:
false``. `loradem.model.render` reproduces these tokens for the search and
evaluation, tested against TRL's own rendering. The loss is TRL's (the
token-weighted cross-entropy of the scored tokens), computed by
`loradem.train.loss` with the vocabulary projected at the scored positions
only, in training and in its evaluations.

Early stopping: with ``early_stopping_patience: N`` transformers'
EarlyStoppingCallback stops after N evaluations without a lower validation
loss; the record says ``stopped_early`` and the real ``steps``; the kept
adapter is still the best evaluated checkpoint.

Subspace adapters: with ``lora.subspace: lori`` `loradem.train.subspace` sets
every LoRA A to a frozen projection shared by all sources and trains each
source's B only under its own sparse random mask; the saved adapter is an
ordinary PEFT LoRA.

Progress: one bar per source in optimizer steps (rate and ETA), and a line per
evaluation ("step 20/80: train loss ..., val loss ...") through `log`, which
prints above the bar.

Jobs with a ``vector`` (a ready distribution vector) are not trained:
`train_all` logs "<name>: uses ready vector <path>" and leaves them out of its
result (`pipeline.finished_adapters` finds them).

Killed mid-source (SIGKILL, power loss): only ``.<source>-<key>.partial-<host>-<pid>``
is left, which `is_finished` never sees (it looks at the final name only) and
the next run on that host deletes (its process is gone) before it restarts that
source **from scratch**. Resuming
from TRL's intermediate checkpoints would mean loading the pickled
``optimizer.pt`` / ``rng_state.pth`` through torch.load, which loradem refuses
to do (checkpoints are saved with ``save_only_model``, adapter weights only).

``vector.json`` (the shareable card, read and checked by `loradem.vectors.card`):
loradem_vector (format version), source, base {name, fingerprint}, data
{fingerprint, rows {train, validation, test}, format}, the effective train and
lora settings, metrics {best_val_loss, best_step, steps, train_tokens},
adapter_sha256 and loradem_version. It is written inside the atomic folder, so
only finished adapters have one; a folder with every other finished file and a
record of its own key gets its card, derived from ``loradem-train.json``, the
next time it is reused (nothing is retrained for a card).

The ML libraries (torch, transformers, peft, trl, datasets) are imported inside
the functions that use them: importing them takes about 10 s, and
`loradem check` and `pipeline.finished_adapters` import this module only for
its jobs, keys and checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import loradem
from loradem.data import anchors as anchor
from loradem.data.rows import Splits
from loradem.errors import LorademError, first_line
from loradem.files import atomic_dir, atomic_write_json, fingerprint_weights, sha256_file, stable_hash
from loradem.model.base import BASE_ALIASES, portable_name
from loradem.plots import figure, save_png, styled
from loradem.recipe import AnchorSettings, LoraSettings, TrainSettings

TRAIN_RECORD = "loradem-train.json"
CARD = "vector.json"
CARD_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FINISHED_FILES = ("adapter_config.json", ADAPTER_WEIGHTS, TRAIN_RECORD, CARD, "curve.png")
FLOPS_FORMULA = "6 * n_params * train_tokens (n_params: every base and LoRA parameter, embeddings included)"
Log = Callable[[str], Any]


# ---- the job, its key and folder -------------------------------------------

@dataclass(frozen=True)
class TrainJob:
    """Everything training one source's adapter needs, resolved by the caller."""

    source: str
    splits: Splits
    train: TrainSettings  # the source's effective settings (its overrides applied)
    lora: LoraSettings
    seed: int
    adapters_dir: Path
    base_name: str  # the base as the user named it (alias, folder or hub id), written on the card
    anchor: AnchorSettings | None = None  # None: trained on its own rows only
    vector: str | None = None  # a ready vector (adapter folder or hub id): the source is not trained

    def __post_init__(self) -> None:
        if self.splits.source != self.source:
            raise ValueError(f"splits are for source {self.splits.source!r}, not {self.source!r}")
        object.__setattr__(self, "adapters_dir", Path(self.adapters_dir))
        if self.anchor is not None and not self.anchor.enabled:
            object.__setattr__(self, "anchor", None)  # disabled settings shape nothing, so they stay out of the key


def adapter_key(job: TrainJob, base_fingerprint: str) -> str:
    """Short hash of everything that decides the adapter's weights (anchor settings only when anchoring is
    on, so adapters trained without anchors keep their keys)."""
    return stable_hash({
        "base": base_fingerprint,
        "data": job.splits.fingerprint,
        "train": job.train.model_dump(),
        "lora": job.lora.model_dump(),
        "seed": job.seed,
        "loradem": loradem.__version__.split(".")[0],
        **({"anchor": anchor.identity(job.anchor)} if job.anchor is not None else {}),
    })


def adapter_dir(job: TrainJob, key: str) -> Path:
    return job.adapters_dir / f"{job.source}-{key}"


def is_finished(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FINISHED_FILES)


# ---- refusals, before any training --------------------------------------------

def check_jobs(jobs: Sequence[TrainJob]) -> None:
    """Raise LorademError for what the train stage would refuse on the jobs' data and settings alone.

    `loradem check` and `train_all` both call it, so a recipe that passes check is not refused later for
    these reasons. Jobs with a ready vector are not trained and not checked.
    """
    checked_anchors: list[AnchorSettings] = []
    for job in jobs:
        if job.vector is not None:
            continue
        if not job.splits.validation:
            raise LorademError(
                f"source {job.source!r}: no validation rows; the best checkpoint is chosen on them "
                "(set `validation:` to a row count or fraction above 0)"
            )
        if job.anchor is None:
            continue
        if job.splits.format != "messages":
            raise LorademError(f"source {job.source!r}: anchored training needs messages rows (the anchors are "
                               f"chat turns), this source has {job.splits.format!r} rows; set anchor.enabled: false")
        if job.anchor.loss == "kl" and not job.train.completion_only_loss:
            raise LorademError(f"source {job.source!r}: anchor.loss: kl scores the anchor rows' reply tokens, which "
                               "needs train.completion_only_loss: true (or use anchor.loss: sft)")
        if job.anchor not in checked_anchors:  # the builtin prompts can be given, a prompts file has prompt rows
            anchor.prompts_for(job.anchor)
            checked_anchors.append(job.anchor)


def check_trainable(jobs: Sequence[TrainJob], base_dir: Path) -> None:
    """What the base's tokenizer and TRL's config would refuse, checked for every job before the first trains:
    a tokenizer without a chat template for messages rows, settings TRL's SFTConfig rejects."""
    trained = [job for job in jobs if job.vector is None]
    if any(job.splits.format == "messages" for job in trained):
        training_tokenizer(base_dir, "messages")
    for job in trained:
        try:
            trainer_configs(job.train, job.lora, seed=job.seed, output_dir=job.adapters_dir / ".unused",
                            fmt=job.splits.format)
        except LorademError as exc:
            raise LorademError(f"source {job.source!r}: {exc}") from None


# ---- one process, or data parallelism (torchrun / accelerate launch) -----------

def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun / accelerate launch job (env RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def output_folder(final: Path) -> Iterator[Path]:
    """`atomic_dir(final)` on the main process. Under data parallelism every rank trains in step, but only
    rank 0 writes the adapter: the others get a throwaway scratch folder (never a ``.partial`` beside
    `final`, which rank 0 would be writing), and all ranks wait until `final` is in place."""
    if is_main_process():
        # a full or read-only disk, at a checkpoint or the final save, is one line (the partial folder is removed)
        with atomic_dir(final, overwrite=True, fix="set the recipe's adapters_dir to a writable folder") as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix=".loradem-rank-") as tmp:
            yield Path(tmp)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _quiet(_: str) -> None:
    pass


# ---- settings -> TRL / PEFT ----------------------------------------------

def trainer_configs(train: TrainSettings, lora: LoraSettings, *, seed: int, output_dir: Path, fmt: str):
    """The one translation from loradem's settings to (trl.SFTConfig, peft.LoraConfig); settings transformers
    rejects (an unknown optimizer name, ...) raise LorademError."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    try:
        sft = SFTConfig(
            output_dir=str(output_dir),
            learning_rate=train.learning_rate,
            max_steps=train.max_steps or -1,
            num_train_epochs=train.epochs,
            per_device_train_batch_size=train.batch_size,
            per_device_eval_batch_size=train.batch_size,
            gradient_accumulation_steps=train.grad_accum,
            max_length=train.max_length,
            warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a fraction of the steps in transformers 5
            lr_scheduler_type=train.lr_scheduler,
            weight_decay=train.weight_decay,
            optim=train.optimizer,
            gradient_checkpointing=train.gradient_checkpointing,
            completion_only_loss=train.completion_only_loss and fmt != "text",
            eval_strategy="steps",
            eval_steps=train.eval_steps,
            save_strategy="steps",
            save_steps=train.eval_steps,
            save_only_model=True,  # adapter weights only: no optimizer / RNG pickles
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            logging_strategy="steps",
            logging_steps=1,
            disable_tqdm=True,
            report_to="none",
            seed=seed,
            bf16=bf16,
            fp16=cuda and not bf16,
            use_cpu=not cuda,
            dataloader_num_workers=0,
        )
    except ValueError as exc:
        raise LorademError(f"train settings: transformers refuses them: {first_line(exc)}") from None
    peft = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return sft, peft


def trl_rows(rows: list[dict], fmt: str) -> list[dict]:
    """Rows as TRL expects them: conversational prompt/completion, plain prompt/completion, or text.

    Keys starting with ``loradem_`` (row tags, e.g. the mixing baseline's source and row index) are kept;
    TRL carries them through tokenization and the Trainer drops them before the model sees a batch.
    """
    if fmt == "messages":
        return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:],
                 **{k: v for k, v in r.items() if k.startswith("loradem_")}} for r in rows]
    return [dict(r) for r in rows]


def load_base_model(base_dir: Path, train: TrainSettings):
    """The base as a causal LM: float32 on CPU (bf16 on GPU), or NF4 prepared for k-bit training."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if train.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    model, info = AutoModelForCausalLM.from_pretrained(base_dir, output_loading_info=True, **kwargs)
    missing = info.get("missing_keys") or []
    if missing:
        raise LorademError(
            f"base {str(base_dir)!r}: its weights lack {len(missing)} tensor(s) the model needs "
            f"(e.g. {sorted(missing)[0]}); transformers would fill them with random values"
        )
    if train.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
        _keep_narrow_4bit_layers_unpacked(model)
    return model


def _keep_narrow_4bit_layers_unpacked(model) -> None:
    """Work around bitsandbytes 0.50.2 on AVX512-BF16 CPUs: in eval mode it repacks 4-bit weights and
    crashes (RuntimeError: shape '[32, 0]' is invalid) when a layer's input width is not a multiple of
    the quantization block (64). Real bases are multiples of 64; tiny test models are not."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if hasattr(module, "support_avx512bf16_for_cpu") and state is not None:
            if module.in_features % state.blocksize:
                module.support_avx512bf16_for_cpu = False


# ---- training -----------------------------------------------------------

def training_tokenizer(base_dir: Path, fmt: str):
    """The base's tokenizer, refused for "messages" rows when it has no chat template to render them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if fmt == "messages" and not tokenizer.chat_template:
        raise LorademError(f"base {str(base_dir)!r}: its tokenizer has no chat template, which \"messages\" data needs")
    return tokenizer


def train_source(
    job: TrainJob,
    base_dir: Path,
    *,
    force: bool = False,
    log: Log = print,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train `job`'s adapter (or reuse a finished one) and return its folder.

    `callbacks` are extra transformers TrainerCallbacks (tests use them to watch or perturb training).
    """
    if job.vector is not None:
        raise LorademError(f"source {job.source!r} uses a ready vector ({job.vector}); it is not trained")
    splits = job.splits
    base_fp = fingerprint_weights(base_dir)
    key = adapter_key(job, base_fp)
    final = adapter_dir(job, key)
    if not force:
        card = missing_card(final, job.base_name, splits)
        if card is not None and is_main_process():
            atomic_write_json(final / CARD, card)
        if is_finished(final) or card is not None:  # the same decision on every rank
            log(f"{job.source}: skipped (finished adapter {final})")
            return final
    check_jobs([job])
    train_rows, anchored = splits.train, None
    if job.anchor is not None:
        # under data parallelism rank 0 alone generates the base's replies; the other ranks read its cache
        rows, info = anchor.anchor_rows(job.anchor, Path(base_dir), job.adapters_dir, log=log,
                                        generate=is_main_process())
        train_rows = anchor.with_anchors(splits.train, rows, job.anchor.fraction, seed=job.seed, source=job.source,
                                         tag=anchor.TAG if job.anchor.loss == "kl" else None)
        anchored = {**anchor.identity(job.anchor), "rows": len(train_rows) - len(splits.train),
                    "cache": info["key"], "generation_seconds": info["spent_seconds"]}
        log(f"{job.source}: + {anchored['rows']} anchor rows ({job.anchor.fraction:.0%} of its training set"
            + (", scored by KL to the base)" if job.anchor.loss == "kl" else ")"))
    with output_folder(final) as tmp:
        record = fit(
            job.source, Path(base_dir), job.train, job.lora, seed=job.seed,
            fmt=splits.format, train_rows=train_rows, val_rows=splits.validation, out=tmp, log=log,
            callbacks=callbacks, anchor_kl=job.anchor is not None and job.anchor.loss == "kl",
        )
        record.update(source=job.source, key=key, base_fingerprint=base_fp, data_fingerprint=splits.fingerprint)
        if anchored:
            record["anchor"] = anchored
        if is_main_process():
            finish_folder(tmp, record, base_name=job.base_name, rows=split_rows(splits), fmt=splits.format)
    log(
        f"{job.source}: trained -> {final} (best step {record['best_step']}/{record['steps']}"
        f"{', stopped early' if record['stopped_early'] else ''}, "
        f"val loss {record['best_val_loss']:.4f}, {record['train_seconds']:.1f} s)"
    )
    return final


def train_all(
    jobs: Sequence[TrainJob],
    base_dir: Path,
    *,
    force: Collection[str] = (),
    log: Log = print,
    callbacks: Sequence[Any] = (),
) -> dict[str, Path]:
    """Train every job whose adapter is not finished, in order; retrain the sources named in `force`.

    Every job is checked (`check_jobs`, `check_trainable`) before the first one trains. Returns
    {source: adapter folder} for the trained sources; jobs with a ready `vector` are skipped.
    """
    by_name = {job.source: job for job in jobs}
    for name in force:
        if name not in by_name:
            raise LorademError(f"--force {name}: no source named {name!r} (have: {', '.join(by_name)})")
        if by_name[name].vector is not None:
            raise LorademError(f"--force {name}: source {name!r} uses a ready vector ({by_name[name].vector}); "
                               "there is nothing to train")
    fingerprint_weights(base_dir)  # fail early on a base without safetensors
    check_jobs(jobs)
    check_trainable(jobs, base_dir)
    log = log if is_main_process() else _quiet
    out: dict[str, Path] = {}
    for job in jobs:
        if job.vector is not None:
            log(f"{job.source}: uses ready vector {job.vector}")
            continue
        out[job.source] = train_source(job, base_dir, force=job.source in force, log=log, callbacks=callbacks)
    return out


def fit(
    name: str,
    base_dir: Path,
    train: TrainSettings,
    lora: LoraSettings,
    *,
    seed: int,
    fmt: str,
    train_rows: list[dict],
    val_rows: list[dict],
    out: Path,
    log: Log,
    callbacks: Sequence[Any] = (),
    prepare: Callable[[Any], dict] | None = None,
    anchor_kl: bool = False,
) -> dict:
    """Run TRL's SFT trainer, save the best adapter into `out`, and return the training record.

    `prepare(trainer)`, if given, runs after TRL has tokenized the rows and before training (the mixing
    baseline uses it to lay out its row schedule); the dict it returns joins the record. With `anchor_kl`, the
    rows tagged ``loradem_anchor`` are scored by KL to the base (train/loss.py).
    """
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from loradem.train import loss
    from loradem.train.callbacks import ProgressBar, ProgressLog

    tokenizer = training_tokenizer(base_dir, fmt)
    scratch = out / "checkpoints"
    sft_config, lora_config = trainer_configs(train, lora, seed=seed, output_dir=scratch, fmt=fmt)
    patience = train.early_stopping_patience
    stopper = EarlyStoppingCallback(early_stopping_patience=patience) if patience else None
    set_seed(seed)  # the LoRA init happens in SFTTrainer.__init__, before Trainer seeds
    model = load_base_model(base_dir, train)
    bar = ProgressBar(f"train {name}") if is_main_process() else None  # rank 0 alone draws it
    trainer = loss.LossPositionsSFTTrainer(  # TRL's trainer, projecting only the scored positions (train/loss.py)
        model=model,
        args=sft_config,
        train_dataset=Dataset.from_list(trl_rows(train_rows, fmt)),
        eval_dataset=Dataset.from_list(trl_rows(val_rows, fmt)),
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=[ProgressLog(name, log), *([bar] if bar else []), *([stopper] if stopper else []), *callbacks],
        anchor_kl=anchor_kl,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if lora.subspace == "lori":  # A frozen and shared, B sparse per source (train/subspace.py)
        from loradem.train.subspace import KeepMasked, constrain

        trainer.add_callback(KeepMasked(constrain(trainer.model, lora, seed=seed, source=name)))
    rows, n_val = len(trainer.train_dataset), len(trainer.eval_dataset)
    dropped = len(train_rows) + len(val_rows) - rows - n_val
    if not rows or not n_val:
        raise LorademError(
            f"source {name!r}: no {'training' if not rows else 'validation'} row has a completion token left "
            f"within max_length={train.max_length}; raise `train.max_length`"
        )
    log(f"{name}: training on {rows} rows, validating on {n_val} "
        f"({'NF4 base' if train.quantization == 'nf4' else 'full-precision base'}, r={lora.r}"
        + (f", LoRI: shared frozen A, B density {lora.density:g}" if lora.subspace == "lori" else "") + ")"
        + (f"; TRL dropped {dropped} row(s) with no completion tokens left after truncation" if dropped else ""))
    extra = prepare(trainer) if prepare else {}
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    state = trainer.state
    stopped_early = bool(stopper and stopper.early_stopping_patience_counter >= patience
                         and state.global_step < state.max_steps)
    if stopped_early:
        log(f"{name}: stopped early at step {state.global_step}/{state.max_steps} "
            f"({patience} evaluation(s) without a lower validation loss)")
    if is_main_process():  # under data parallelism the other ranks never saw the checkpoints
        _check_best_loaded(trainer.model, state)
        trainer.model.save_pretrained(out)  # the best checkpoint, reloaded by load_best_model_at_end
        (out / "README.md").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    tokens = max((e.get("num_tokens", 0) for e in state.log_history if "loss" in e), default=0)
    _, n_params = trainer.model.get_nb_trainable_parameters()
    return {
        "best_step": state.best_global_step,
        "best_val_loss": state.best_metric,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "stopped_early": stopped_early,
        "train_rows": rows,
        "validation_rows": n_val,
        "train_tokens": int(tokens),
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "n_params": n_params,
        "flops_estimate": 6 * n_params * int(tokens),
        "flops_formula": FLOPS_FORMULA,
        "train": train.model_dump(),
        "lora": lora.model_dump(),
        "seed": seed,
        "device": str(trainer.args.device),
        "world_size": trainer.args.world_size,  # processes training in step (torchrun / accelerate launch)
        "versions": _versions(),
        **extra,
        "history": history(state.log_history),
    }


def _check_best_loaded(model, state) -> None:
    """Refuse to save unless the model holds the best checkpoint's adapter weights (the Trainer only
    logs a warning when it cannot reload them)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(state.best_model_checkpoint or "")
    if state.best_global_step is None or folder.name != f"checkpoint-{state.best_global_step}":
        raise RuntimeError(f"training ended without a best checkpoint (best step {state.best_global_step}, {folder})")
    best = load_file(str(folder / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model)
    if best.keys() != live.keys() or not all(torch.equal(best[k], live[k].detach().cpu()) for k in best):
        raise RuntimeError(f"the model does not hold the best checkpoint's weights ({folder}) after training")


# ---- record and card ----------------------------------------------------

def split_rows(splits: Splits) -> dict[str, int]:
    return {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)}


def finish_folder(folder: Path, record: dict, *, base_name: str, rows: dict[str, int], fmt: str) -> None:
    """Write loradem-train.json, vector.json, README.md and curve.png beside the saved adapter in `folder`.

    `record` must hold source, key, base_fingerprint and data_fingerprint besides what `fit` returns.
    """
    from loradem.vectors.card import write_readme

    (folder / TRAIN_RECORD).write_text(json.dumps(_ordered(record), indent=2) + "\n", encoding="utf-8")
    # PEFT records the folder the base was loaded from, a path of this machine; a shared adapter names its base
    # by hub id where it has one, so AutoPeftModelForCausalLM can find it elsewhere (loradem itself checks the
    # base's fingerprint, not this name)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    spec, base_name = base_name, portable_name(base_name)
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    card = make_card(record, base_name=base_name, rows=rows, fmt=fmt, adapter_sha256=sha256_file(folder / ADAPTER_WEIGHTS))
    if spec in BASE_ALIASES:  # the short name it was trained under, for the README's import line
        card["base"]["alias"] = spec
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    write_readme(folder)  # README.md, the adapter's Hugging Face card, from the two files above
    plot_curve(record["history"], folder / "curve.png", title=f"{record['source']} ({record['key']})",
               best_step=record["best_step"])


def make_card(record: dict, *, base_name: str, rows: dict[str, int], fmt: str, adapter_sha256: str) -> dict:
    """The vector.json card of an adapter, from its training record (no training history)."""
    return {
        "loradem_vector": CARD_VERSION,
        "source": record["source"],
        "base": {"name": base_name, "fingerprint": record["base_fingerprint"]},
        "data": {"fingerprint": record["data_fingerprint"], "rows": dict(rows), "format": fmt},
        "train": record["train"],
        "lora": record["lora"],
        **({"anchor": record["anchor"]} if record.get("anchor") else {}),
        "metrics": {k: record[k] for k in ("best_val_loss", "best_step", "steps", "train_tokens")},
        "adapter_sha256": adapter_sha256,
        "loradem_version": (record.get("versions") or {}).get("loradem", loradem.__version__),
    }


def missing_card(folder: Path, base_name: str, splits: Splits) -> dict | None:
    """The card of a finished adapter that lacks only its card (every other finished file, and a record of
    this very key and data), or None; the caller writes it."""
    if (folder / CARD).exists() or not all((folder / f).is_file() for f in FINISHED_FILES if f != CARD):
        return None
    record = json.loads((folder / TRAIN_RECORD).read_text(encoding="utf-8"))
    if record.get("key") != folder.name.rpartition("-")[2] or record.get("data_fingerprint") != splits.fingerprint:
        return None  # not this key's record: the folder stays unfinished and is retrained
    return make_card(record, base_name=portable_name(base_name), rows=split_rows(splits), fmt=splits.format,
                     adapter_sha256=sha256_file(folder / ADAPTER_WEIGHTS))


# ---- history and curve ---------------------------------------------------

def history(log_history: list[dict]) -> list[dict]:
    """[{step, train_loss} | {step, eval_loss}] from the trainer's log history."""
    out = []
    for entry in log_history:
        if "loss" in entry:
            out.append({"step": entry["step"], "train_loss": entry["loss"]})
        if "eval_loss" in entry:
            out.append({"step": entry["step"], "eval_loss": entry["eval_loss"]})
    return out


@styled
def plot_curve(hist: list[dict], path: Path, title: str = "", best_step: int | None = None) -> None:
    """Train and validation loss by step, as a PNG (a dashed line marks the kept step)."""
    fig = figure(6, 3.5)
    ax = fig.subplots()
    for key, label, style in (("train_loss", "train", "-"), ("eval_loss", "validation", "o-")):
        points = [(h["step"], h[key]) for h in hist if key in h]
        if points:
            ax.plot(*zip(*points), style, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"kept (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    save_png(fig, path)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"loradem": loradem.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__}


def _ordered(record: dict) -> dict:
    first = ("source", "key", "base_fingerprint", "data_fingerprint", "best_step", "best_val_loss", "steps")
    return {**{k: record[k] for k in first}, **{k: v for k, v in record.items() if k not in first}}
