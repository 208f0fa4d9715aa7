"""Fold θ₀ + Σ wᵢ·ΔWᵢ into the base, tensor by tensor, as an ordinary Hugging Face model folder.

    from loradem.assemble import assemble
    assemble("smollm2-135m", [("adapters/math", 0.6), ("adapters/code", 0.4)], "runs/demo/model")

Contract:
- Exact: each output tensor is (base + Σ wᵢ·sᵢ·LᵢRᵢ) accumulated in float64
  and rounded once to the output dtype; deltas stay low-rank (one ``addmm``
  per module, in row chunks), full copies (``modules_to_save``) add
  wᵢ·(copy − base).
- Streamed: the base is read one tensor at a time (``safe_open``, pread),
  output shards are written with ``safetensors.torch.save_file`` as they fill.
  Peak memory is about one output shard (``max_shard_size_mb``) plus one
  tensor, never the base twice.
- Plan, then execute: `plan_fold` is pure (names, shapes, weights) and raises
  on a target the base lacks or a shape mismatch before any weight is read.
- Tied embeddings stay tied unless an adapter changes one side of the pair
  (a LoRA or a full copy on the input embedding or on lm_head): peft trained
  that adapter with the two sides different, so the exact fold unties them
  (writes ``lm_head.weight`` and sets ``tie_word_embeddings: false``).
- Safe: the folder is written aside and renamed only when complete; any
  refusal or failure leaves nothing, and an existing folder is kept unless
  ``overwrite=True``. Beside the weights: config, generation config and
  tokenizer files copied from the base, ``loradem.json`` (inputs' and
  outputs' sha256) and a ``README.md`` model card.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import numbers
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors.torch import save_file

from loradem import __version__
from loradem.base import resolve_base
from loradem.errors import LorademError
from loradem.io import atomic_dir, fingerprint_weights, read_json, sha256_file
from loradem.lora import FullTensor, LoadedAdapter, LoraModule, load_adapter

COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what an adapter trained on the alias may record
CHUNK_ELEMENTS = 1 << 22  # float64 rows accumulated at once (32 MB)

Shape = tuple[int, ...]


# ---- the plan (pure) ------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One weighted contribution to an output tensor: weight · (LoRA delta or copy − base)."""

    adapter: int  # index into the adapters list
    weight: float
    entry: LoraModule | FullTensor


@dataclass(frozen=True)
class Job:
    """One output tensor: read `source` from the base, add `terms`, verify `checks` (peft's base copies)."""

    name: str
    source: str
    shape: Shape
    dtype: torch.dtype
    terms: tuple[Term, ...] = ()
    checks: tuple[Term, ...] = ()


@dataclass(frozen=True)
class Plan:
    jobs: tuple[Job, ...]
    untied: tuple[str, ...] = field(default=())  # tied tensors written separately because an adapter changed one side


def plan_fold(
    base_tensors: Mapping[str, tuple[Shape, torch.dtype]],
    adapters: Sequence[tuple[LoadedAdapter, float]],
    *,
    tied: Mapping[str, str] | None = None,
) -> Plan:
    """Which base tensor receives which weighted deltas; raises `LorademError` on any mismatch.

    `tied` maps a tensor absent from the checkpoint to the tensor it shares (lm_head.weight ->
    model.embed_tokens.weight). Zero-weight adapters are validated but contribute no terms.
    """
    tied = dict(tied or {})
    terms: dict[str, list[Term]] = {}
    checks: dict[str, list[Term]] = {}
    for i, (adapter, weight) in enumerate(adapters):
        check_weight(weight, adapter.path)
        for entry in (*adapter.lora.values(), *adapter.full.values()):
            target = entry.target
            source = tied.get(target, target)
            if source not in base_tensors:
                raise LorademError(
                    f"adapter {adapter.path}: {_what(entry)} targets {target}, which the base does not have"
                )
            shape = tuple(base_tensors[source][0])
            if tuple(entry.shape) != shape:
                raise LorademError(
                    f"adapter {adapter.path}: {_what(entry)}: shape {list(entry.shape)} does not match the base's "
                    f"{source} {list(shape)} (adapter made for a different base?)"
                )
            if isinstance(entry, FullTensor) and entry.base_copy:
                checks.setdefault(target, []).append(Term(i, float(weight), entry))
            elif weight != 0:
                terms.setdefault(target, []).append(Term(i, float(weight), entry))
    untie = {t: s for t, s in tied.items() if t in terms or s in terms}
    for t, s in tied.items():  # a still-tied target's base copies are checked against its source
        if t not in untie and t in checks:
            checks.setdefault(s, []).extend(checks.pop(t))
    jobs = []
    for name, (shape, dtype) in base_tensors.items():
        jobs.append(Job(name, name, tuple(shape), dtype, tuple(terms.get(name, ())), tuple(checks.get(name, ()))))
        for t in (t for t, s in untie.items() if s == name):
            jobs.append(Job(t, name, tuple(shape), dtype, tuple(terms.get(t, ())), tuple(checks.get(t, ()))))
    return Plan(jobs=tuple(jobs), untied=tuple(untie))


def _what(entry: LoraModule | FullTensor) -> str:
    return f"module {entry.module}" if isinstance(entry, LoraModule) else f"full tensor {entry.key}"


def check_weight(weight: object, adapter: object) -> None:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise LorademError(f"weight for adapter {adapter}: expected a finite number, got {weight!r}")


def plan_shards(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Greedy consecutive shards of at most `max_bytes` (a bigger tensor gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ---- the base checkpoint --------------------------------------------------

@dataclass(frozen=True)
class BaseCheckpoint:
    folder: Path
    config: dict
    files: dict[str, Path]  # tensor name -> safetensors file
    tensors: dict[str, tuple[Shape, torch.dtype]]  # in checkpoint order


def read_base(folder: Path) -> BaseCheckpoint:
    """Index a base folder's safetensors (sharded via model.safetensors.index.json or a single file)."""
    from safetensors import safe_open

    config = read_json(folder / "config.json")
    files: dict[str, Path] = {}
    tensors: dict[str, tuple[Shape, torch.dtype]] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key in files:
                        raise LorademError(f"{path}: tensor {key} is also in {files[key].name}")
                    sl = f.get_slice(key)
                    dtype = ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise LorademError(f"{path}: tensor {key}: unsupported dtype {sl.get_dtype()}")
                    files[key], tensors[key] = path, (tuple(sl.get_shape()), dtype)
        except LorademError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise LorademError(f"{path}: not a valid safetensors file ({_first_line(exc)})") from None
    return BaseCheckpoint(folder, config, files, tensors)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LorademError(f"{index}: expected a non-empty weight_map")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                raise LorademError(f"{index}: shard {name} is listed but missing")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise LorademError(f"{folder}: expected model.safetensors or model.safetensors.index.json")


def tied_pairs(base: BaseCheckpoint) -> dict[str, str]:
    """Tensors the architecture ties that the checkpoint stores once: {lm_head.weight: model.embed_tokens.weight}."""
    import transformers

    pairs: dict[str, str] = {}
    for arch in base.config.get("architectures") or []:
        keys = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None)
        if isinstance(keys, dict):
            pairs.update({t: s for t, s in keys.items() if t not in base.tensors and s in base.tensors})
    return pairs


def may_touch_ties(adapters: Sequence[LoadedAdapter], base: BaseCheckpoint) -> bool:
    """Whether an adapter could change a tied pair, so the tie map is needed (importing it costs ~2 s, ~100 MB).

    transformers ties an absent tensor to an input embedding (nn.Embedding, which peft wraps as an
    Embedding LoRA), so only embedding LoRAs, full tensors or targets absent from the checkpoint can.
    """
    if base.config.get("tie_word_embeddings") is False:
        return False
    return any(
        m.kind == "embedding" or m.target not in base.tensors for a in adapters for m in a.lora.values()
    ) or any(a.full for a in adapters)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- is this adapter for this base? --------------------------------------

def check_same_base(adapter: LoadedAdapter, spec: str, base: BaseCheckpoint) -> None:
    """Refuse an adapter whose recorded base is not this one (by fingerprint, path or name)."""
    train_record = adapter.path / "loradem-train.json"
    if train_record.is_file():
        record = read_json(train_record)
        recorded = record.get("base_fingerprint") if isinstance(record, dict) else None
        if recorded:
            mine = fingerprint_weights(base.folder)
            if recorded != mine:
                raise LorademError(
                    f"adapter {adapter.path}: trained on a base with fingerprint {recorded[:12]}, "
                    f"this base {spec!r} is {mine[:12]} (pass --allow-name-mismatch to fold it anyway)"
                )
            return
    recorded = adapter.base_model_name_or_path
    if not recorded:
        return
    as_path = Path(recorded).expanduser()
    if as_path.is_dir():
        if as_path.resolve() == base.folder.resolve() or _same_weights(as_path, base.folder):
            return
    elif _names(recorded) & (_names(spec) | _names(str(base.folder)) | _names(base.config.get("_name_or_path"))
                             | _names(HUB_IDS.get(spec))):
        return
    raise LorademError(
        f"adapter {adapter.path}: made for base {recorded!r} (base_model_name_or_path), not {spec!r} "
        "(pass --allow-name-mismatch if they are the same model)"
    )


def _names(value: str | None) -> set[str]:
    if not value:
        return set()
    return {value.casefold(), Path(value.rstrip("/")).name.casefold()}


def _same_weights(a: Path, b: Path) -> bool:
    try:
        return fingerprint_weights(a) == fingerprint_weights(b)
    except LorademError:
        return False


# ---- execution -------------------------------------------------------------

def fold_tensor(job: Job, base: torch.Tensor, adapters: Sequence[LoadedAdapter], out_dtype: torch.dtype) -> torch.Tensor:
    """base + Σ w·Δ for one tensor, accumulated in float64 by row chunks and rounded once to `out_dtype`.

    May reuse (and overwrite) `base`'s storage when the dtype does not change.
    """
    for t in job.checks:
        _check_base_copy(adapters[t.adapter], t.entry, base)
    if not job.terms:
        return base if base.dtype == out_dtype else base.to(out_dtype)
    lefts, rights, dense = [], [], []
    for t in job.terms:
        a = adapters[t.adapter]
        if isinstance(t.entry, LoraModule):
            left, right = a.lowrank(t.entry)
            lefts.append(left * (t.weight * t.entry.scale))
            rights.append(right)
        else:
            dense.append((a.tensor(t.entry.key), t.weight))
    # Σ wᵢsᵢ·LᵢRᵢ = [w₁s₁L₁ | w₂s₂L₂ | …] @ [R₁; R₂; …]: one float64 pass over the tensor for all adapters
    left, right = (torch.cat(lefts, dim=1), torch.cat(rights, dim=0)) if lefts else (None, None)
    out = base if base.dtype == out_dtype else torch.empty(base.shape, dtype=out_dtype)
    rows = base.shape[0] if base.dim() else 1
    base2, out2 = base.reshape(rows, -1), out.reshape(rows, -1)  # views: LoRA targets are 2-D already
    dense = [(copy.reshape(rows, -1), weight) for copy, weight in dense]
    step = max(1, CHUNK_ELEMENTS // max(1, base2.shape[1]))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        original = base2[start:end].to(torch.float64)
        acc = original.clone() if dense else original
        if left is not None:
            acc.addmm_(left[start:end], right)
        for copy, weight in dense:
            acc.add_(copy[start:end].to(torch.float64) - original, alpha=weight)
        out2[start:end] = acc
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Exact and one pass: NaN/Inf propagate through a float64 sum, which finite ≤32-bit floats cannot overflow."""
    if not t.is_floating_point():
        return True
    if t.dtype == torch.float64:
        return bool(torch.isfinite(t).all())
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def _check_base_copy(adapter: LoadedAdapter, entry: FullTensor, base: torch.Tensor) -> None:
    copy = adapter.tensor(entry.key)
    if not torch.equal(copy, base.to(copy.dtype)):
        raise LorademError(
            f"adapter {adapter.path}: {entry.key} is peft's saved copy of the base's {entry.target} but differs "
            "from this base (vocabulary resized, or trained on another base)"
        )


def _output_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype in (None, "auto"):
        return None
    if dtype not in OUT_DTYPES:
        raise LorademError(f"dtype: expected auto, {', '.join(OUT_DTYPES)}, got {dtype!r}")
    return OUT_DTYPES[dtype]


def _target_dtype(job: Job, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype if (out_dtype is not None and job.dtype.is_floating_point) else job.dtype


def write_shards(
    plan: Plan,
    base: BaseCheckpoint,
    adapters: Sequence[LoadedAdapter],
    folder: Path,
    *,
    out_dtype: torch.dtype | None,
    max_shard_bytes: int,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Stream the plan's jobs into shards under `folder`; returns {tensor name: shard file}."""
    from safetensors import safe_open

    dtypes = [_target_dtype(j, out_dtype) for j in plan.jobs]
    sizes = [math.prod(j.shape) * d.itemsize for j, d in zip(plan.jobs, dtypes)]
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def read(name: str) -> torch.Tensor:
            path = base.files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt", backend="pread"))
            return handles[path].get_tensor(name)

        done, total, next_report = 0, max(1, sum(sizes)), 0.25
        for shard, fname in zip(shards, names):
            tensors = {}
            for i in shard:
                job = plan.jobs[i]
                out = fold_tensor(job, read(job.source), adapters, dtypes[i])
                if (job.terms or out.dtype != job.dtype) and not all_finite(out):
                    raise LorademError(f"{job.name}: the folded tensor has NaN or Inf in {out.dtype} (weights too large?)")
                tensors[job.name] = out.contiguous()
                weight_map[job.name] = fname
                done += sizes[i]
                if next_report <= done / total < 1:
                    log(f"folded {done / total:.0%} of {total / 1e6:.0f} MB")
                    next_report = (int(done / total * 4) + 1) / 4
            log(f"writing {fname}: {len(shard)} tensors, {sum(sizes[i] for i in shard) / 1e6:.1f} MB")
            save_file(tensors, folder / fname, metadata={"format": "pt"})
            del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


# ---- the command ----------------------------------------------------------

def assemble(
    base: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size_mb: float = 2000,
    allow_name_mismatch: bool = False,
    trust_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write base + Σ wᵢ·ΔWᵢ to `out` as a Hugging Face model folder; returns `out`."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise LorademError(f"{out}: already exists (pass --overwrite to replace it)")
    if not adapters:
        raise LorademError("assemble: expected at least one adapter")
    if not max_shard_size_mb > 0:
        raise LorademError(f"max_shard_size_mb: expected a positive number, got {max_shard_size_mb!r}")
    out_dtype = _output_dtype(dtype)
    spec = str(base)
    folder = resolve_base(spec, log)
    for path, weight in adapters:
        check_weight(weight, path)
    loaded = [load_adapter(path, trust_pickle=trust_pickle) for path, _ in adapters]
    _refuse_overwriting_inputs(out, folder, loaded)
    checkpoint = read_base(folder)
    if not allow_name_mismatch:
        for adapter in loaded:
            check_same_base(adapter, spec, checkpoint)
    touches_ties = may_touch_ties(loaded, checkpoint)
    tied = tied_pairs(checkpoint) if touches_ties else {}
    if touches_ties and not tied and checkpoint.config.get("tie_word_embeddings"):
        archs = ", ".join(checkpoint.config.get("architectures") or ["(none)"])
        raise LorademError(
            f"{folder}: tie_word_embeddings is set but transformers does not say which tensors {archs} ties; "
            "cannot fold an embedding LoRA or full copy exactly"
        )
    plan = plan_fold(checkpoint.tensors, [(a, w) for a, (_, w) in zip(loaded, adapters)], tied=tied)
    for adapter in loaded:
        adapter.check_finite()
    log(f"assembling {len(loaded)} adapter(s) into {folder} -> {out}")
    for name in plan.untied:
        log(f"untying {name} from {tied[name]}: an adapter changes one side of the tied pair")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        weight_map = write_shards(
            plan, checkpoint, loaded, tmp, out_dtype=out_dtype,
            max_shard_bytes=int(max_shard_size_mb * 1e6), log=log,
        )
        _write_config(checkpoint, tmp, dtype, plan.untied)
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        record = provenance(spec, checkpoint, loaded, [w for _, w in adapters], dtype, plan, tmp, weight_map)
        (tmp / "loradem.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record))
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


def _refuse_overwriting_inputs(out: Path, base: Path, adapters: Sequence[LoadedAdapter]) -> None:
    target = out.resolve()
    for p in (base, *(a.path for a in adapters)):
        if target == p.resolve():
            raise LorademError(f"{out}: is an input of this fold; choose another output folder")


def _write_config(base: BaseCheckpoint, folder: Path, dtype: str | None, untied: Sequence[str]) -> None:
    config = dict(base.config)
    if dtype not in (None, "auto"):
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    if untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def provenance(
    spec: str, base: BaseCheckpoint, adapters: Sequence[LoadedAdapter], weights: Sequence[float],
    dtype: str | None, plan: Plan, folder: Path, weight_map: Mapping[str, str],
) -> dict:
    """The loradem.json record: inputs with their sha256, weights, dtype, and each output shard's sha256."""
    return {
        "loradem_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": {"name": spec, "path": str(base.folder.resolve()), "sha256": fingerprint_weights(base.folder)},
        "adapters": [
            {
                "path": str(a.path.resolve()),
                "weights_file": a.weights_file.name,
                "sha256": a.sha256(),
                "weight": float(w),
                "base_model_name_or_path": a.base_model_name_or_path,
            }
            for a, w in zip(adapters, weights)
        ],
        "dtype": dtype or "auto",
        "untied": list(plan.untied),
        "tensors_changed": sum(1 for j in plan.jobs if j.terms),
        "shards": {name: sha256_file(folder / name) for name in dict.fromkeys(weight_map.values())},
    }


def model_card(record: Mapping) -> str:
    """README.md with Hugging Face YAML metadata and the table of adapters and weights."""
    base_name = HUB_IDS.get(record["base"]["name"], record["base"]["name"])
    # the Hub's base_model must be a repo id; a local folder is named in the text only
    meta = f"base_model: {json.dumps(base_name)}\n" if re.fullmatch(r"[\w.-]+/[\w.-]+", base_name) else ""
    dtype = "the base's dtype" if record["dtype"] == "auto" else record["dtype"]
    rows = "\n".join(
        f"| `{Path(a['path']).name}` | {a['weight']:g} | `{a['sha256'][:12]}` | {a['base_model_name_or_path'] or '-'} |"
        for a in record["adapters"]
    )
    untied = (
        f"\nThe tied tensor(s) {', '.join(record['untied'])} were written separately because an adapter changes "
        "one side of the pair (`tie_word_embeddings: false`).\n" if record["untied"] else ""
    )
    return f"""---
{meta}tags: [loradem, dem, lora, merge]
library_name: transformers
---

# Distribution Edited Model

Assembled by loradem {record['loradem_version']} as θ = θ₀ + Σ wᵢ·ΔWᵢ
([DEM, arXiv 2406.15570](https://arxiv.org/abs/2406.15570)): each adapter's
LoRA delta sᵢ·BᵢAᵢ was added to the base `{base_name}` with weight wᵢ,
exactly (float64 accumulation, one rounding to {dtype}).

| adapter | weight | sha256 | trained on |
|---|---|---|---|
{rows}
{untied}
Provenance (inputs' and shards' sha256): `loradem.json`.
"""
