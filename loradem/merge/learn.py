"""Learned per-module weights (LoRA Soups' CAT, arXiv 2410.13025): one weight per source per LoRA module, fit by gradient.

    job = LearnJob(name="demo", settings=LearnSettings(steps=60), importance={"add": 1.0, "sort": 1.0},
                   out_dir=Path("runs/demo/learn"), seed=0, max_length=128, validation_rows=32, eval_batch_size=16)
    result = learn_weights(job, base_dir, adapters, train_rows, validation_rows, log=print)
    result["module_weights"]["sort"]["model.layers.3.mlp.up_proj"]  -> 0.82

Every adapter stays loaded, unmerged, on the frozen base. In each LoRA module m, adapter i's
scale becomes a trainable number c_{m,i}·sᵢ, so the model computes θ₀ + Σᵢ c_{m,i}·ΔW_{m,i}. Only the
c's train (3 sources × 210 modules = 630 numbers on SmolLM2-135M) with Adam on completion-only
cross-entropy. The batches come from a seeded sample of each source's *training* rows, shuffled
together. Validation loss (the search's objective, on the search's rows) is measured at the start
and every `eval_every` steps; the best c's are kept, so the result is never worse on validation
than the starting point. Test rows are never seen.

Why: one weight per source cannot resolve interference between LoRA vectors trained apart; per-module
weights let each source act where its vector matters (benchmarks/RESULTS.md has what this measured).

Writes out_dir/weights.json (atomically, last), out_dir/learn.png (loss curves and mean weight per
layer), and reuses a finished result whose identity (adapters, base, rows, settings) is unchanged.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loradem.data.rows import sample
from loradem.errors import LorademError
from loradem.files import atomic_write_json, fingerprint_weights, make_dir, read_json, stable_hash
from loradem.merge.search import weighted_mean
from loradem.model import soup
from loradem.model.generate import collate_right, mean_loss, scored_logits
from loradem.model.layers import canonical_module, layer_index
from loradem.model.render import encode_for_loss
from loradem.plots import figure, save_png, styled
from loradem.progress import progress
from loradem.recipe import LearnSettings


@dataclass(frozen=True, kw_only=True)
class LearnJob:
    """What one fit of per-module weights needs, resolved: the pipeline builds it from a recipe, Python callers write it."""

    name: str  # titles the plot
    settings: LearnSettings
    importance: dict[str, float]  # source -> its weight in the validation objective, in the sources' order
    out_dir: Path
    seed: int
    max_length: int  # tokens per row (a recipe's train.max_length)
    validation_rows: int  # validation rows per source: the search's max_rows_per_source, so both select on the same rows
    eval_batch_size: int  # rows per forward pass when scoring validation loss (the search's batch_size)

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", dict(self.importance))
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    @property
    def sources(self) -> list[str]:
        return list(self.importance)


def _identity(job: LearnJob, base_dir: Path, adapters: dict[str, Path], fit: dict[str, list[dict]], val: dict[str, list[dict]]) -> str:
    return stable_hash({
        "adapters": {s: fingerprint_weights(adapters[s]) for s in sorted(adapters)},
        "base": fingerprint_weights(base_dir),
        "fit": {s: stable_hash(rows, 64) for s, rows in sorted(fit.items())},
        "validation": {s: stable_hash(rows, 64) for s, rows in sorted(val.items())},
        "importance": dict(job.importance),
        "max_length": job.max_length,
        "seed": job.seed,
        "learn": job.settings.model_dump(),
    })


def fit_rows(job: LearnJob, train: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """A seeded sample of each source's training rows (rows_per_source, or all of them when fewer)."""
    out = {}
    for s in job.sources:
        rows = list(train.get(s) or [])
        if not rows:
            raise LorademError(f"learn: source {s!r}: no training rows to fit the weights on")
        out[s] = sample(rows, job.settings.rows_per_source, seed=job.seed, stage="learn", source=s)
    return out


def _module_keys(model, granularity: str):
    """(canonical module path, its key, its LoRA layer) for every LoRA module; the key is the module path ('module')
    or 'layers.<i>' ('layer'; modules outside the decoder blocks keep their own)."""
    for module, layer in zip(getattr(model, soup.MODULES_ATTR), getattr(model, soup.LAYERS_ATTR)):
        canon = canonical_module(module)
        index = layer_index(canon)
        yield canon, (f"layers.{index}" if granularity == "layer" and index is not None else canon), layer


def attach_weights(model, sources: list[str], granularity: str, init: float) -> dict[tuple[str, str], torch.nn.Parameter]:
    """Replace each LoRA layer's scale of each source by a trainable c·s (shared per decoder layer for 'layer').

    Returns {(key, source): parameter holding c·s}; key is the canonical module path ('module') or
    'layers.<i>' ('layer'; modules outside the blocks keep their own). Everything else is frozen.
    """
    names = soup.adapter_names(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params: dict[tuple[str, str], torch.nn.Parameter] = {}
    scales: dict[tuple[str, str], float] = {}
    for _, key, layer in _module_keys(model, granularity):
        for s in sources:
            n = names[s]
            if n not in layer.scaling:
                continue
            s0 = float(layer.scaling[n])
            if (key, s) not in params:
                device = layer.lora_A[n].weight.device if n in layer.lora_A else None
                params[(key, s)] = torch.nn.Parameter(torch.tensor(s0 * init, dtype=torch.float32, device=device))
                scales[(key, s)] = s0
            elif scales[(key, s)] != s0:
                raise LorademError(f"learn: granularity 'layer': source {s!r} has different LoRA scales within {key}; use 'module'")
            layer.scaling[n] = params[(key, s)]
    setattr(model, "_loradem_learn_scales", scales)
    return params


def module_weights(model, params: dict, sources: list[str], granularity: str) -> dict[str, dict[str, float]]:
    """{source: {canonical module: c}} for every LoRA module (a 'layer' weight repeated over its modules)."""
    names = soup.adapter_names(model)
    scales = getattr(model, "_loradem_learn_scales")
    out: dict[str, dict[str, float]] = {s: {} for s in sources}
    for canon, key, layer in _module_keys(model, granularity):
        for s in sources:
            if names[s] in layer.scaling:
                out[s][canon] = float(params[(key, s)].detach()) / scales[(key, s)]
    return out


def _batches(encoded: list, batch_size: int, steps: int, seed: int):
    """`steps` batches, epoch after epoch over the encoded rows, reshuffled each epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        yield [encoded[i] for i in order[:batch_size]]
        del order[:batch_size]


def _val_loss(model, val_encoded: dict[str, list], importance: dict[str, float], batch_size: int) -> tuple[float, dict[str, float]]:
    per = {s: mean_loss(model, enc, batch_size=batch_size) for s, enc in val_encoded.items() if importance[s] > 0}
    return weighted_mean(per, importance), per


def learn_weights(job: LearnJob, base_dir: Path, adapters: dict[str, Path], train: dict[str, list[dict]],
                  validation: dict[str, list[dict]], *, log: Callable[[str], None] = print) -> dict:
    """Fit, or reuse, the per-module weights on `train` rows (a sample), keeping the best on the first
    job.validation_rows `validation` rows; writes job.out_dir/weights.json and learn.png, returns weights.json's content."""
    settings = job.settings
    sources = job.sources
    missing = [s for s in sources if s not in adapters]
    if missing:
        raise LorademError(f"learn: no adapter for source(s) {', '.join(missing)}")
    out_dir = job.out_dir
    fit = fit_rows(job, train)
    val = {s: list(validation.get(s) or [])[: job.validation_rows] for s in sources}
    for s in sources:
        if not val[s]:
            raise LorademError(f"learn: source {s!r}: no validation rows (the weights are selected on validation loss)")
    identity = _identity(job, base_dir, adapters, fit, val)
    done = out_dir / "weights.json"
    if done.is_file():
        try:
            previous = read_json(done)
        except LorademError:
            previous = {}
        if previous.get("identity") == identity:
            log(f"learn: reusing {done} (same adapters, rows and settings)")
            return previous

    t0 = time.time()
    torch.manual_seed(job.seed)
    model, tokenizer = soup.load_multi(base_dir, {s: adapters[s] for s in sources})
    params = attach_weights(model, sources, settings.granularity, settings.init)
    importance = job.importance
    # a source of importance 0 is not fit on (as in the search), but its weights still learn from the others' rows
    encoded = [row for s in sources if importance[s] > 0 for row in encode_for_loss(fit[s], tokenizer, job.max_length)]
    val_encoded = {s: encode_for_loss(val[s], tokenizer, job.max_length) for s in sources}
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(list(params.values()), lr=settings.learning_rate)
    log(f"learn: {len(params)} weights ({settings.granularity}), {settings.steps} steps of {settings.batch_size} rows "
        f"from {len(encoded)} training rows; validation loss every {settings.eval_every} steps")

    def snapshot() -> dict:
        return {k: p.detach().clone() for k, p in params.items()}

    model.eval()  # no dropout: the weights are fit to the model that will be folded
    best_loss, best_per = _val_loss(model, val_encoded, importance, job.eval_batch_size)
    initial = best_loss
    best_step, best = 0, snapshot()
    history: list[dict] = [{"step": 0, "val_loss": best_loss}]
    log(f"learn: step 0 validation loss {best_loss:.4f}")
    tokens = 0
    with progress(settings.steps, "learn", unit="step") as bar:
        for step, batch in enumerate(_batches(encoded, settings.batch_size, settings.steps, job.seed), start=1):
            ids, mask, labels = collate_right(batch, device)
            # the mean cross-entropy of the completion tokens, with the vocabulary projected at those positions only
            loss = torch.nn.functional.cross_entropy(*scored_logits(model, ids, mask, labels))
            if not torch.isfinite(loss):
                raise LorademError(f"learn: step {step}: the training loss is {loss.item()} (try a lower learn.learning_rate)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens += int(mask.sum())
            entry = {"step": step, "train_loss": float(loss.detach())}
            if step % settings.eval_every == 0 or step == settings.steps:
                value, per = _val_loss(model, val_encoded, importance, job.eval_batch_size)
                entry["val_loss"] = value
                if value < best_loss:
                    best_loss, best_per, best_step, best = value, per, step, snapshot()
                log(f"learn: step {step}/{settings.steps} train loss {entry['train_loss']:.4f} validation loss {value:.4f} "
                    f"(best {best_loss:.4f} at step {best_step}, {time.time() - t0:.0f} s)")
            history.append(entry)
            bar.update(1)

    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best[k])
    weights = module_weights(model, params, sources, settings.granularity)
    result = {
        "weights": {s: sum(w.values()) / len(w) for s, w in weights.items()},
        "module_weights": weights,
        "objective": best_loss,
        "objective_name": "val_loss",
        "per_source": best_per,
        "initial_objective": initial,
        "best_step": best_step,
        "steps": settings.steps,
        "granularity": settings.granularity,
        "n_parameters": len(params),
        "learn_tokens": tokens,
        "learn_seconds": round(time.time() - t0, 3),
        "fit_rows": {s: len(rows) for s, rows in fit.items()},
        "settings": settings.model_dump(),
        "history": history,
        "identity": identity,
    }
    make_dir(out_dir)  # a full or read-only disk here, or in the two writes below, is one line
    plot_learning(result, out_dir / "learn.png", f"{job.name}: learned per-module weights")
    atomic_write_json(done, result)  # last: its presence means the result is complete
    log(f"learn: best validation loss {best_loss:.4f} at step {best_step} (start {initial:.4f}), "
        f"{tokens} tokens in {result['learn_seconds']:.0f} s; mean weights "
        + " ".join(f"{s}={w:.3f}" for s, w in result["weights"].items()))
    return result


@styled
def plot_learning(result: dict, path: Path, title: str) -> None:
    """Left: training and validation loss by step. Right: each source's mean learned weight per decoder layer."""
    fig = figure(11, 4)
    left, right = fig.subplots(1, 2)
    hist = result["history"]
    left.plot([h["step"] for h in hist if "train_loss" in h], [h["train_loss"] for h in hist if "train_loss" in h],
              lw=0.8, alpha=0.6, label="training batch loss")
    left.plot([h["step"] for h in hist if "val_loss" in h], [h["val_loss"] for h in hist if "val_loss" in h],
              marker="o", label="validation loss")
    left.axvline(result["best_step"], color="grey", ls=":", label=f"kept (step {result['best_step']})")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    for s, weights in result["module_weights"].items():
        by_layer: dict[int, list[float]] = {}
        for module, w in weights.items():
            i = layer_index(module)
            if i is not None:
                by_layer.setdefault(i, []).append(w)
        layers = sorted(by_layer)
        right.plot(layers, [sum(by_layer[i]) / len(by_layer[i]) for i in layers], marker=".", label=s)
    right.axhline(result["settings"]["init"], color="grey", ls=":", lw=0.8)
    right.set_xlabel("decoder layer")
    right.set_ylabel("mean learned weight")
    right.legend()
    fig.suptitle(title)
    save_png(fig, path)
