"""RegMean (arXiv 2212.09849) on LoRA deltas: one exact low-rank adapter that best reproduces every source's delta on its own inputs.

    job = RegMeanJob(name="demo", settings=RegMeanSettings(enabled=True, alpha=0.9), out_dir=Path("runs/demo/regmean"),
                     seed=0, max_length=128, batch_size=16)
    record = regmean_merge(job, base_dir, {"add": Path("adapters/add-…"), "sort": ...}, train_rows, log=print)
    assemble(base_dir, [(Path("runs/demo/regmean"), 1.0)], "runs/demo/model")   # an ordinary PEFT adapter

What it solves. For each LoRA-adapted Linear layer (input x a row vector, y = x·Wᵀ), source i's delta is
ΔWᵢ = sᵢ·Bᵢ·Aᵢ (out×in), and Xᵢ holds that layer's inputs on source i's training rows (non-padding tokens
only; labels are not used). With Gᵢ = XᵢᵀXᵢ / nᵢ (the mean Gram matrix over its nᵢ tokens, as RegMean's
reference code keeps it, so each source counts equally however long its rows are), the merged delta is

    ΔW*ᵀ = argmin Σᵢ ‖XᵢΔWᵀ − XᵢΔWᵢᵀ‖² / nᵢ = (Σᵢ Gᵢ)⁻¹ · Σᵢ Gᵢ·ΔWᵢᵀ,

with every Gᵢ's off-diagonal entries scaled by `alpha` first (1: plain least squares; 0: only the diagonal,
so each input feature k gets the average of the deltas' columns k weighted by E[x_k²]). On deltas this is
RegMean on the full fine-tuned weights θ₀ + ΔWᵢ exactly (the θ₀ part passes through unchanged). A source
without a LoRA on a layer has ΔWᵢ = 0 there; its Gram still counts, as it would for full models.

Why it stays low-rank. Σᵢ Gᵢ·ΔWᵢᵀ = Σᵢ (Gᵢ·Aᵢᵀ)·sᵢBᵢᵀ, so with Ãᵢᵀ = (ΣG)⁻¹·Gᵢ·Aᵢᵀ (in×rᵢ, one solve for all
sources at once) the result is B̃·Ã with B̃ = [s₁B₁ … sₙBₙ] and Ã = [Ã₁; …; Ãₙ]: a LoRA of rank Σrᵢ and
scale 1 (lora_alpha = r), written as a PEFT adapter folder that loradem's assembler folds like any other.
No dense out×in delta is ever formed; the cost is the Gram matrices (in×in per layer, float64) and one
Cholesky solve per layer. The factors are stored in float64, so the fold rounds the result once.

Statistics are accumulated in float64 as the rows stream through the model (`collect_statistics`), and only
what the solve needs is kept: Σᵢ Gᵢ per layer, and Gᵢ·Aᵢᵀ and diag(Gᵢ) per source, so several alphas can be
solved from one collection (`solve_factors`). `activations` says whose layer inputs Xᵢ are: the base
model's ('base'), base + source i's own adapter ('own', as RegMean uses each fine-tuned model's own), or the
merge's own, one decoder block at a time ('merged', RegMean++: loradem/merge/regmean_merged.py).

With ``settings.anchor`` = λ > 0 one more set of rows joins the sum as a source whose delta is zero: generic
prompts with the base's own replies (``anchors``, rows_per_source of them), G₀ weighted by λ:

    ΔW*ᵀ = (Σᵢ Gᵢ + λ·G₀)⁻¹ · Σᵢ Gᵢ·ΔWᵢᵀ,   i.e. Ãᵢᵀ = (Σᵢ Gᵢ + λ·G₀)⁻¹·Gᵢ·Aᵢᵀ,

the least squares with λ·‖X₀ΔWᵀ‖²/n₀ added: the merge also keeps each layer's outputs on generic inputs as
they are. Still rank Σrᵢ, still exact.

Refused with one line: embedding LoRA and fan_in_fan_out layers (RegMean merges Linear layers on their
inputs), and full module copies (``modules_to_save``: no low-rank delta to merge).

Writes out_dir/ (atomically, replacing a previous result): adapter_config.json, adapter_model.safetensors and
regmean.json (settings, token counts, cost, the identity of its inputs); a finished result whose identity
(adapters, base, rows, settings) is unchanged is reused.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Optional
from dataclasses import dataclass
from pathlib import Path

import torch

from loradem.data.rows import sample
from loradem.errors import LorademError
from loradem.files import atomic_dir, fingerprint_weights, read_json, stable_hash
from loradem.model import soup
from loradem.model.generate import collate_right, mean_loss
from loradem.model.layers import PEFT_PREFIX, canonical_module
from loradem.model.render import encode_for_loss
from loradem.progress import progress
from loradem.recipe import RegMeanSettings
from loradem.vectors.lora import CONFIG_FILE, SAFETENSORS_FILE, load_adapter

RECORD_FILE = "regmean.json"
ANCHOR = "(anchor)"  # the generic rows' name among the sources' (not a valid source name), zero delta
# a layer whose Cholesky pivot falls below this share of its largest diagonal entry is treated as singular
SINGULAR = 1e-12
# the ridge then added to the diagonal, relative to the mean diagonal entry
RIDGE = 1e-8


@dataclass(frozen=True, kw_only=True)
class RegMeanJob:
    """What one RegMean merge needs, resolved: the pipeline builds it from a recipe, Python callers write it."""

    name: str
    settings: RegMeanSettings
    out_dir: Path  # the adapter folder written (runs/<name>/regmean)
    seed: int
    max_length: int  # tokens per row (a recipe's train.max_length)
    batch_size: int  # rows per forward pass while collecting the Gram matrices

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))


@dataclass(frozen=True)
class Factor:
    """One source's LoRA on one layer: ΔW = scale · b @ a (float64, base layout out×in)."""

    a: torch.Tensor  # r × in
    b: torch.Tensor  # out × r
    scale: float


@dataclass
class GramStatistics:
    """What the solve needs, per LoRA layer (module path), all float64 and divided by each source's token count."""

    sources: list[str]
    tokens: dict[str, int]  # non-padding tokens per source
    gram: dict[str, torch.Tensor]  # module -> Σᵢ Gᵢ  (in × in)
    gram_a: dict[str, dict[str, torch.Tensor]]  # module -> source -> Gᵢ·Aᵢᵀ  (in × rᵢ), sources with a LoRA there
    diag: dict[str, dict[str, torch.Tensor]]  # module -> source -> diag(Gᵢ)  (in), the same sources
    seconds: float = 0.0


# ---- inputs ---------------------------------------------------------------------

def sample_rows(job: RegMeanJob, sources: list[str], train: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """A seeded sample of each source's training rows (rows_per_source, or all of them when fewer)."""
    out = {}
    for s in sources:
        rows = list(train.get(s) or [])
        if not rows:
            raise LorademError(f"regmean: source {s!r}: no training rows to take the Gram matrices from")
        out[s] = sample(rows, job.settings.rows_per_source, seed=job.seed, stage="regmean", source=s)
    return out


def read_factors(adapters: dict[str, Path]) -> dict[str, dict[str, Factor]]:
    """module -> source -> its LoRA factors, refusing what RegMean cannot merge (one line naming adapter and module)."""
    out: dict[str, dict[str, Factor]] = {}
    for source, folder in adapters.items():
        adapter = load_adapter(folder)
        for m in adapter.lora.values():
            if m.kind != "linear" or m.fan_in_fan_out:
                what = "an embedding LoRA" if m.kind == "embedding" else "a fan_in_fan_out (Conv1D) LoRA"
                raise LorademError(f"regmean: adapter {folder}: {m.module} is {what}; RegMean merges Linear layers only")
        copies = [f.key for f in adapter.full.values() if not f.base_copy]  # base copies come only with embedding LoRA
        if copies:
            raise LorademError(f"regmean: adapter {folder}: {copies[0]} is a full module copy (modules_to_save), which has "
                               "no low-rank delta to merge; train the adapter without modules_to_save")
        for m in adapter.lora.values():
            b, a = adapter.lowrank(m)
            out.setdefault(m.module, {})[source] = Factor(a=a, b=b, scale=m.scale)
    return out


# ---- the Gram matrices ------------------------------------------------------------

class GramCollector:
    """Forward pre-hooks on the LoRA layers: each batch's non-padding inputs of every layer, added in float64."""

    def __init__(self, stats: GramStatistics, factors: dict[str, dict[str, Factor]], modules: dict[str, torch.nn.Module],
                 device: torch.device):
        self.stats, self.factors = stats, factors
        self.a_t = {m: {s: f.a.T.contiguous().to(device) for s, f in per.items()} for m, per in factors.items()}
        self.source: str | None = None
        self.weight = 0.0  # 1 / the current source's token count
        self.keep: torch.Tensor | None = None  # flattened non-padding mask of the current batch
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]

    def batch(self, mask: torch.Tensor) -> None:
        self.keep = mask.reshape(-1).bool()
        self._last = None

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if x.shape[:-1].numel() != self.keep.numel():
                raise LorademError(f"regmean: {name}: its input has {x.shape[:-1].numel()} positions, the batch "
                                   f"{self.keep.numel()}; RegMean needs every layer to see every token")
            if self._last is not None and self._last[0] is x:  # q/k/v (and gate/up) read the same tensor
                _, xs, xtx = self._last
            else:
                xs = x.detach().reshape(-1, x.shape[-1])[self.keep].double()
                xtx = xs.T @ xs
                self._last = (x, xs, xtx)
            self.stats.gram[name].add_(xtx, alpha=self.weight)
            if self.source in self.a_t[name]:
                self.stats.gram_a[name][self.source].addmm_(xtx, self.a_t[name][self.source], alpha=self.weight)
                self.stats.diag[name][self.source].add_(xtx.diagonal(), alpha=self.weight)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None


def empty_statistics(sources: list[str], tokens: dict[str, int], factors: dict[str, dict[str, Factor]],
                     device: torch.device) -> GramStatistics:
    """Zeroed float64 statistics for these LoRA layers, to be filled by a GramCollector."""
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    width = {m: next(iter(per.values())).a.shape[1] for m, per in factors.items()}  # the layer's input features
    return GramStatistics(
        sources=sources, tokens=tokens, gram={m: zeros(width[m], width[m]) for m in factors},
        gram_a={m: {s: zeros(width[m], f.a.shape[0]) for s, f in per.items()} for m, per in factors.items()},
        diag={m: {s: zeros(width[m]) for s in per} for m, per in factors.items()},
    )


def collect_statistics(base_dir: Path, adapters: dict[str, Path], rows: dict[str, list[dict]], *, activations: str,
                       max_length: int, batch_size: int, factors: dict[str, dict[str, Factor]] | None = None,
                       weights: dict[str, float] | None = None, log: Callable[[str], None] = print) -> GramStatistics:
    """Stream each source's rows through the model ('base': the base; 'own': base + that source's adapter) and
    accumulate, per LoRA layer, Σᵢ wᵢGᵢ and each carrying source's Gᵢ·Aᵢᵀ and diag(Gᵢ) (Gᵢ = XᵢᵀXᵢ / nᵢ; wᵢ from
    `weights`, default 1). A key of `rows` without an adapter (`ANCHOR`) counts in the sum with a zero delta, its
    rows through the base."""
    if activations not in ("base", "own"):
        raise LorademError(f"regmean.activations: expected 'base' or 'own' here ('merged' is merge_blockwise), got {activations!r}")
    weights = weights or {}
    sources = list(rows)
    factors = factors if factors is not None else read_factors(adapters)
    t0 = time.time()
    model, tokenizer = soup.load_multi(base_dir, adapters, fold=True)
    layers = dict(zip((canonical_module(m) for m in getattr(model, soup.MODULES_ATTR)), getattr(model, soup.LAYERS_ATTR)))
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise LorademError(f"regmean: LoRA module {missing[0]} is not a LoRA layer of the loaded model")
    device = next(model.parameters()).device
    encoded = {s: [ids for ids, _ in encode_for_loss(rows[s], tokenizer, max_length)] for s in sources}
    tokens = {s: sum(len(ids) for ids in encoded[s]) for s in sources}
    for s in sources:
        if tokens[s] == 0:
            raise LorademError(f"regmean: source {s!r}: its rows have no tokens")
    stats = empty_statistics(sources, tokens, factors, device)
    # the logits are not needed, only the layers' inputs: keep one position unless lm_head itself carries a LoRA
    lm_head = model.get_output_embeddings()
    keep_logits = {} if any(layers[m] is lm_head for m in factors) else {"logits_to_keep": 1}
    collector = GramCollector(stats, factors, {m: layers[m] for m in factors}, device)
    for s in sources:
        encoded[s].sort(key=len)  # similar lengths together: less padding
    batches = {s: [encoded[s][i:i + batch_size] for i in range(0, len(encoded[s]), batch_size)] for s in sources}
    try:
        with progress(sum(len(b) for b in batches.values()), "regmean", unit="batch") as bar, torch.inference_mode():
            for s in sources:
                soup.set_weights(model, {t: float(activations == "own" and t == s) for t in adapters})
                collector.source, collector.weight = s, weights.get(s, 1.0) / tokens[s]
                for batch in batches[s]:
                    ids, mask, _ = collate_right([(x, x) for x in batch], device)
                    collector.batch(mask)
                    model(input_ids=ids, attention_mask=mask, **keep_logits)
                    bar.update(1)
    finally:
        collector.close()
    stats.seconds = time.time() - t0
    log(f"regmean: Gram matrices of {len(factors)} LoRA layers on {', '.join(f'{s} {tokens[s]}' for s in sources)} tokens "
        f"({activations} activations) in {stats.seconds:.1f} s")
    return stats


# ---- the solve --------------------------------------------------------------------

def solve_factors(stats: GramStatistics, factors: dict[str, dict[str, Factor]], alpha: float
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """module -> (Ã, B̃) with B̃·Ã = ΔW* (float64, on the CPU), and the modules that needed a ridge to be solved."""
    if not 0.0 <= alpha <= 1.0:
        raise LorademError(f"regmean.alpha: expected a number from 0 to 1, got {alpha!r}")
    out, ridged = {}, []
    for m, per in factors.items():
        gram = stats.gram[m]
        # Σᵢ Gᵢ with off-diagonals scaled by alpha, and each Gᵢ·Aᵢᵀ the same way: α·GᵢAᵢᵀ + (1−α)·diag(Gᵢ)·Aᵢᵀ
        lhs = gram * alpha
        lhs.diagonal().copy_(gram.diagonal())
        rhs = torch.cat([stats.gram_a[m][s] * alpha + stats.diag[m][s][:, None] * (1.0 - alpha) * f.a.T.to(gram.device)
                         for s, f in per.items()], dim=1)
        chol, singular = _cholesky(lhs)
        if singular:
            ridge = RIDGE * float(lhs.diagonal().mean()) or RIDGE
            chol, still = _cholesky(lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device))
            if still:
                raise LorademError(f"regmean: {m}: the Gram matrix is singular even with a ridge of {ridge:.3g}")
            ridged.append(m)
        a_new = torch.cholesky_solve(rhs, chol).T.cpu()
        b_new = torch.cat([f.b * f.scale for f in per.values()], dim=1)
        out[m] = (a_new.contiguous(), b_new.contiguous())
    return out, ridged


def _cholesky(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(L, singular): a failed factorization, or a pivot that vanishes against the largest diagonal entry, is singular."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return chol, True
    pivots = chol.diagonal() ** 2
    return chol, bool(pivots.min() <= SINGULAR * float(matrix.diagonal().max()))


def alphas(settings: RegMeanSettings) -> list[float]:
    """The candidate alphas: the one given, or the list's."""
    return [float(a) for a in settings.alpha] if isinstance(settings.alpha, list) else [float(settings.alpha)]


@torch.no_grad()
def fold_delta(target: torch.Tensor, original: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """target = original + b·a, summed in float64 and rounded once to target's dtype, as the assembler folds."""
    target.copy_((original.double() + b.double().to(target.device) @ a.double().to(target.device)).to(target.dtype))


@torch.no_grad()
def validation_losses(base_dir: Path, candidates: dict[float, dict[str, tuple[torch.Tensor, torch.Tensor]]],
                      validation: dict[str, list[dict]], *, max_length: int, batch_size: int) -> dict[float, float]:
    """Each candidate merge's validation loss, the mean over sources of each source's token-weighted loss on its
    rows (the search's objective with equal importance): the base is loaded once, and each candidate's deltas are
    folded into the merged layers exactly as the assembler folds them (float64 sum, rounded once), then undone."""
    model = soup.load_base(base_dir).eval()
    tokenizer = soup.load_tokenizer(base_dir)
    encoded = {s: encode_for_loss(rows, tokenizer, max_length) for s, rows in validation.items()}
    modules = sorted({m for merged in candidates.values() for m in merged})
    originals = {m: model.get_submodule(m).weight.detach().clone() for m in modules}
    out = {}
    with progress(len(candidates), "regmean alphas", unit="alpha") as bar:
        for alpha, merged in candidates.items():
            for m, weight in originals.items():
                if m in merged:
                    fold_delta(model.get_submodule(m).weight, weight, *merged[m])
                else:
                    model.get_submodule(m).weight.copy_(weight)
            out[alpha] = sum(mean_loss(model, e, batch_size=batch_size) for e in encoded.values()) / len(encoded)
            bar.update(1)
    del model
    return out


# ---- the adapter --------------------------------------------------------------------

def write_adapter(folder: Path, merged: dict[str, tuple[torch.Tensor, torch.Tensor]], template: dict, record: dict) -> None:
    """A PEFT LoRA adapter of the merged factors (scale 1 on every layer: lora_alpha = r), plus regmean.json; `folder`
    is written aside and replaces any previous one only when complete."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {m: a.shape[0] for m, (a, _) in merged.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # a layer of another total rank (sources with different ranks or targets) is named exactly, escaped
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(merged),
        lora_dropout=0.0, bias="none", task_type=template.get("task_type"),
        base_model_name_or_path=template.get("base_model_name_or_path"), inference_mode=True,
    )
    tensors = {}
    for m, (a, b) in merged.items():
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b
    with atomic_dir(folder, overwrite=True) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _identity(job: RegMeanJob, base_dir: Path, adapters: dict[str, Path], rows: dict[str, list[dict]],
              validation: Optional[dict[str, list[dict]]] = None) -> str:
    return stable_hash({
        **({"validation": {s: stable_hash(r, 64) for s, r in validation.items()}} if validation else {}),
        "adapters": {s: fingerprint_weights(adapters[s]) for s in adapters},  # in order: the order of B̃'s blocks
        "base": fingerprint_weights(base_dir),
        "rows": {s: stable_hash(r, 64) for s, r in rows.items()},
        "max_length": job.max_length,
        "batch_size": job.batch_size,
        "seed": job.seed,
        # without the anchor, results merged before the option existed keep their identity
        "regmean": job.settings.model_dump(exclude={"enabled"} | (set() if job.settings.anchor else {"anchor"})),
    })


def regmean_merge(job: RegMeanJob, base_dir: Path, adapters: dict[str, Path], train: dict[str, list[dict]], *,
                  validation: Optional[dict[str, list[dict]]] = None, anchors: Optional[list[dict]] = None,
                  anchor_seconds: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """Collect the Gram matrices on a seeded sample of `train` rows (and of `anchors`, the generic rows, when
    settings.anchor > 0), solve (for each candidate alpha, keeping the one with the lowest loss on `validation`'s
    rows), and write job.out_dir as a PEFT adapter; returns regmean.json's content (reused when its identity is
    unchanged). `anchor_seconds` is what generating the anchors' replies cost the caller now, charged to this merge."""
    if not adapters:
        raise LorademError("regmean: expected at least one adapter")
    weight = job.settings.anchor
    if weight and not anchors:
        raise LorademError("regmean.anchor: no anchor rows to take the generic Gram matrix from")
    sources = list(adapters)
    if len(alphas(job.settings)) > 1:
        validation = {s: list(r) for s, r in (validation or {}).items() if s in adapters and r}
        if not validation:
            raise LorademError(f"regmean.alpha: the candidates {alphas(job.settings)} (a list, as the default is) are "
                               "chosen between on validation rows, and no source has any; give one alpha, e.g. 0.99")
    else:
        validation = None
    rows = sample_rows(job, sources, train)
    if weight:
        rows[ANCHOR] = sample(list(anchors), job.settings.rows_per_source, seed=job.seed, stage="regmean", source=ANCHOR)
    identity = _identity(job, base_dir, adapters, rows, validation)
    done = job.out_dir / RECORD_FILE
    if done.is_file() and (job.out_dir / SAFETENSORS_FILE).is_file():
        try:
            previous = read_json(done)
        except LorademError:
            previous = {}
        if previous.get("identity") == identity:
            log(f"regmean: reusing {job.out_dir} (same adapters, rows and settings)")
            return previous

    factors = read_factors(adapters)
    settings = job.settings
    if settings.activations == "merged":  # each block's Gram matrices depend on the blocks merged before it
        from loradem.merge.regmean_merged import merge_blockwise

        candidates, tokens, gram_seconds = merge_blockwise(base_dir, factors, rows, alphas=alphas(settings),
                                                           max_length=job.max_length, batch_size=job.batch_size,
                                                           weights={ANCHOR: weight}, log=log)
        solve_seconds = 0.0  # inside the block-by-block pass
    else:
        stats = collect_statistics(base_dir, adapters, rows, activations=settings.activations,
                                   max_length=job.max_length, batch_size=job.batch_size, factors=factors,
                                   weights={ANCHOR: weight}, log=log)
        tokens, gram_seconds = stats.tokens, stats.seconds
        t0 = time.time()
        candidates = {alpha: solve_factors(stats, factors, alpha) for alpha in alphas(settings)}
        solve_seconds = time.time() - t0
    chosen, losses, choose_seconds = alphas(settings)[0], None, 0.0
    if len(candidates) > 1:
        t0 = time.time()
        losses = validation_losses(base_dir, {a: merged for a, (merged, _) in candidates.items()}, validation,
                                   max_length=job.max_length, batch_size=job.batch_size)
        chosen = min(losses, key=lambda a: (losses[a], a))  # the lowest loss; a tie goes to the smaller alpha
        choose_seconds = time.time() - t0
        log("regmean: validation loss by alpha: " + ", ".join(f"{a:g} {v:.4f}" for a, v in losses.items())
            + f" -> alpha {chosen:g}")
    merged, ridged = candidates[chosen]
    if ridged:
        log(f"regmean: {len(ridged)} layer(s) had a singular Gram matrix and were solved with a ridge of "
            f"{RIDGE:g} × their mean diagonal (e.g. {ridged[0]})")
    record = {
        "sources": sources,
        "adapters": {s: str(p) for s, p in adapters.items()},
        "settings": settings.model_dump(),
        "rows": {s: len(r) for s, r in rows.items()},
        "tokens": tokens,
        "modules": len(merged),
        "ranks": sorted({a.shape[0] for a, _ in merged.values()}),  # Σrᵢ over the sources with a LoRA on each layer
        "ridged_modules": ridged,
        "alpha": chosen,
        **({"validation_loss_by_alpha": {f"{a:g}": round(v, 6) for a, v in losses.items()}} if losses else {}),
        **({"anchor": {"weight": weight, "rows": len(rows[ANCHOR]), "generation_seconds": round(anchor_seconds, 3)}}
           if weight else {}),
        "gram_seconds": round(gram_seconds, 3),
        "solve_seconds": round(solve_seconds, 3),
        **({"choose_seconds": round(choose_seconds, 3)} if losses else {}),
        "regmean_seconds": round(gram_seconds + solve_seconds + choose_seconds + anchor_seconds, 3),
        "identity": identity,
    }
    template = read_json(Path(adapters[sources[0]]) / CONFIG_FILE)
    write_adapter(job.out_dir, merged, template, record)
    log(f"regmean: wrote {job.out_dir} (rank {'/'.join(map(str, record['ranks']))}, alpha {chosen:g}, {settings.activations} activations; "
        f"Gram {gram_seconds:.1f} s, solve {solve_seconds:.1f} s)")
    return record


def is_regmean_adapter(folder: Path) -> bool:
    """A finished RegMean adapter folder (its record is written with the weights, in one rename)."""
    return (Path(folder) / RECORD_FILE).is_file() and (Path(folder) / SAFETENSORS_FILE).is_file()

