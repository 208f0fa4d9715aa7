"""Fold θ₀ + Σ wᵢ·ΔWᵢ into the base, tensor by tensor, as an ordinary Hugging Face model folder.

    from loradem.merge.fold import assemble
    assemble("smollm2-135m", [("adapters/math", 0.6), ("adapters/code", 0.4)], "runs/demo/model")

Contract:
- Exact: each output tensor is (base + Σ wᵢ·sᵢ·LᵢRᵢ) accumulated in float64
  and rounded once to the output dtype (`round_into`: torch alone rounds
  float64 -> bfloat16/float16 twice, through float32, and is one ulp off in
  about 1e-5 of the elements); deltas stay low-rank (one ``addmm`` per
  module, in row chunks), full copies (``modules_to_save``) add
  wᵢ·(copy − base).
- Streamed: the base is read one tensor at a time (``safe_open``, pread, in
  a reader thread one tensor ahead of the fold) and each folded tensor goes
  straight to its shard file (`loradem.merge.st_writer`: the header is
  computed from the plan; one thread writes and another hashes while the next
  tensor is folded, so the shard's sha256 costs no re-read; a full shard is
  finished in the background while the next one is folded). The inputs'
  sha256 are taken in another thread, the base's from the fingerprint cache
  when it has them (`loradem.files.weights_sha256`). Peak memory is a few
  tensors (the writers hold at most 256 MB together, or one larger tensor;
  plus the tensor being folded, the next one if at most 64 MB, and float64
  row chunks), whatever the shard size; never the base twice. Output shards
  are byte-identical to ``safetensors.torch.save_file`` of the same tensors.
- Weights: one float per adapter, a list (one weight per layer group,
  mapped by `loradem.model.layers.weight_for`; modules outside the decoder layers
  get the list's mean), or a dict (one weight per module, keyed by the
  module's path in the base, `LoraModule.module`; it must name exactly the
  adapter's LoRA modules and full copies).
- ``fold_base="dequantized"``: every tensor transformers quantizes to NF4 is
  replaced by bitsandbytes' de-quantization of its quantization
  (`loradem.merge.nf4`) before the deltas are added, so a QLoRA adapter lands on
  the weights it was trained against. Folding an NF4-trained adapter onto the
  original weights (the default) is allowed but logged.
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

import concurrent.futures
import contextlib
import json
import math
import numbers
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from loradem.errors import LorademError
from loradem.files import atomic_dir, fingerprint_weights
from loradem.merge.model_card import model_card, provenance
from loradem.merge.nf4 import LOAD_DTYPES, load_dtype_of, quantized_tensors, round_trip, settings
from loradem.merge.rounding import finite_limit, round_into
from loradem.merge.st_writer import InflightBudget, SafetensorsWriter, TensorSpec, file_order
from loradem.model.base import resolve_base
from loradem.model.layers import Weight, check_group_count, check_module_values, check_module_weights, weight_for
from loradem.progress import progress
from loradem.vectors.checkpoint import BaseCheckpoint, Shape, may_touch_ties, read_base, tied_pairs
from loradem.vectors.lora import FullTensor, LoadedAdapter, LoraModule, load_adapter
from loradem.vectors.same_base import check_same_base, train_record, trained_on_nf4

COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK_ELEMENTS = 1 << 19  # float64 elements accumulated at once (4 MB: stays in cache)
FOLD_BASES = ("original", "dequantized")
# threads folding row chunks of one tensor at once (one torch thread each); writing, hashing, reading
# ahead and the inputs' sha256 take more, so on a small machine the fold still gets two
FOLD_THREADS = max(2, min(8, (os.cpu_count() or 1) - 3))
READ_AHEAD_BYTES = 64 * 1024 * 1024  # a base tensor up to this size is read while the previous one is folded



# ---- the plan (pure) ------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One weighted contribution to an output tensor: weight · (LoRA delta or copy − base)."""

    adapter: int  # index into the adapters list
    weight: float
    entry: LoraModule | FullTensor


@dataclass(frozen=True)
class Job:
    """One output tensor: read `source` from the base (NF4 round trip if `dequantize`), add `terms`,
    verify `checks` (peft's base copies)."""

    name: str
    source: str
    shape: Shape
    dtype: torch.dtype
    terms: tuple[Term, ...] = ()
    checks: tuple[Term, ...] = ()
    dequantize: bool = False


@dataclass(frozen=True)
class Plan:
    jobs: tuple[Job, ...]
    untied: tuple[str, ...] = field(default=())  # tied tensors written separately because an adapter changed one side


def plan_fold(
    base_tensors: Mapping[str, tuple[Shape, torch.dtype]],
    adapters: Sequence[tuple[LoadedAdapter, Weight]],
    *,
    tied: Mapping[str, str] | None = None,
    num_layers: int | None = None,
    dequantize: frozenset[str] | set[str] = frozenset(),
) -> Plan:
    """Which base tensor receives which weighted deltas; raises `LorademError` on any mismatch.

    `tied` maps a tensor absent from the checkpoint to the tensor it shares (lm_head.weight ->
    model.embed_tokens.weight). A list weight gives one weight per layer group of the base's
    `num_layers` decoder layers; a dict weight one per module (`LoraModule.module`; a full copy's
    module is its target without the parameter name), naming exactly the adapter's modules. Zero
    weights are validated but contribute no terms. Tensors in `dequantize` are read through the NF4
    round trip.
    """
    tied = dict(tied or {})
    terms: dict[str, list[Term]] = {}
    checks: dict[str, list[Term]] = {}
    for i, (adapter, weight) in enumerate(adapters):
        check_weight(weight, adapter.path)
        if isinstance(weight, Mapping):  # a typo'd or missing module must not pass silently
            check_module_weights(weight, _weighted_modules(adapter), f"weight for adapter {adapter.path}")
        elif isinstance(weight, (list, tuple)) and num_layers is None:
            raise LorademError(
                f"weight for adapter {adapter.path}: per-layer-group weights need the base's num_hidden_layers, "
                "which its config.json does not give"
            )
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
            if isinstance(entry, FullTensor) and entry.base_copy:  # checked against the base, never weighted
                checks.setdefault(target, []).append(Term(i, 0.0, entry))
                continue
            w = _weight_of(entry, weight, num_layers)
            if w != 0:
                terms.setdefault(target, []).append(Term(i, w, entry))
    untie = {t: s for t, s in tied.items() if t in terms or s in terms}
    for t, s in tied.items():  # a still-tied target's base copies are checked against its source
        if t not in untie and t in checks:
            checks.setdefault(s, []).extend(checks.pop(t))
    jobs = []
    for name, (shape, dtype) in base_tensors.items():
        jobs.append(Job(name, name, tuple(shape), dtype, tuple(terms.get(name, ())), tuple(checks.get(name, ())),
                        dequantize=name in dequantize))
        for t in (t for t, s in untie.items() if s == name):
            jobs.append(Job(t, name, tuple(shape), dtype, tuple(terms.get(t, ())), tuple(checks.get(t, ()))))
    return Plan(jobs=tuple(jobs), untied=tuple(untie))


def _weight_of(entry: LoraModule | FullTensor, weight: Weight, num_layers: int | None) -> float:
    if isinstance(weight, numbers.Real):
        return float(weight)
    if isinstance(weight, Mapping):
        return weight_for(_module_of(entry), weight, num_layers)
    return weight_for(entry.module if isinstance(entry, LoraModule) else entry.target, list(weight), num_layers)


def _module_of(entry: LoraModule | FullTensor) -> str:
    """The module path a per-module weight names: a LoRA's module, a full copy's target without its parameter."""
    return entry.module if isinstance(entry, LoraModule) else entry.target.rpartition(".")[0]


def _weighted_modules(adapter: LoadedAdapter) -> set[str]:
    """The modules of an adapter that a per-module weight must name (peft's base copies are not weighted)."""
    return {m.module for m in adapter.lora.values()} | {_module_of(f) for f in adapter.full.values() if not f.base_copy}


def _what(entry: LoraModule | FullTensor) -> str:
    return f"module {entry.module}" if isinstance(entry, LoraModule) else f"full tensor {entry.key}"


def check_weight(weight: object, adapter: object) -> None:
    """A finite number, a non-empty list of finite numbers (one per layer group), or a non-empty dict
    module path -> finite number (one per module; `plan_fold` checks the paths against the adapter)."""
    def finite(w: object) -> bool:
        return not isinstance(w, bool) and isinstance(w, numbers.Real) and math.isfinite(w)

    if isinstance(weight, Mapping):
        check_module_values(weight, f"weight for adapter {adapter}", lambda key: f"weight for adapter {adapter}: module {key}")
        return
    if isinstance(weight, (list, tuple)):
        if weight and all(finite(w) for w in weight):
            return
        raise LorademError(f"weight for adapter {adapter}: expected a non-empty list of finite numbers, got {weight!r}")
    if not finite(weight):
        raise LorademError(
            f"weight for adapter {adapter}: expected a finite number or a list of them (one per layer group) "
            f"or a dict of them (one per module), got {weight!r}"
        )


def num_hidden_layers(config: Mapping) -> int | None:
    """The decoder's layer count from a config.json (top level or text_config), if it says."""
    for c in (config, config.get("text_config") or {}):
        n = c.get("num_hidden_layers") if isinstance(c, Mapping) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


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


# ---- execution -------------------------------------------------------------

def fold_tensor(
    job: Job, base: torch.Tensor, adapters: Sequence[LoadedAdapter], out_dtype: torch.dtype,
    quant_dtype: torch.dtype | None = None, pool: concurrent.futures.Executor | None = None,
) -> torch.Tensor:
    """base + Σ w·Δ for one tensor, accumulated in float64 by row chunks and rounded once to `out_dtype`.

    With `job.dequantize`, base is first replaced by its NF4 round trip in `quant_dtype` (default: its
    own dtype). May reuse (and overwrite) `base`'s storage when the dtype does not change. Raises
    `LorademError` when a changed value is NaN or Inf, or would round to Inf in `out_dtype`.
    """
    for t in job.checks:
        _check_base_copy(adapters[t.adapter], t.entry, base)
    if job.dequantize:

        base = round_trip(base, quant_dtype or base.dtype)
    if not job.terms:
        if base.dtype == out_dtype:
            return base
        if out_dtype.is_floating_point and base.is_floating_point() and base.numel():
            _check_finite(job, *torch.aminmax(base.reshape(-1)), out_dtype)  # a narrower dtype can overflow
        if base.dtype == torch.float64:
            out = torch.empty(base.shape, dtype=out_dtype)
            round_into(out, base)
            return out
        return base.to(out_dtype)  # from float32 (or narrower): one rounding
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
    # row chunks of about CHUNK_ELEMENTS stay in cache through convert, addmm, check and round;
    # with a pool, chunks are folded by its threads at once (disjoint rows of `out`)
    step = max(1, CHUNK_ELEMENTS // max(1, base2.shape[1]))
    cols = base2.shape[1]

    def fold_rows(start: int) -> None:
        end = min(rows, start + step)
        acc = _buffer("acc", step * cols)[: (end - start) * cols].view(end - start, cols)
        acc.copy_(base2[start:end])
        if left is not None:
            acc.addmm_(left[start:end], right)
        for copy, weight in dense:
            diff = _buffer("diff", step * cols)[: (end - start) * cols].view(end - start, cols)
            diff.copy_(copy[start:end])
            diff.sub_(base2[start:end])
            acc.add_(diff, alpha=weight)
        stored = round_into(out2[start:end], acc)
        if stored.numel():
            _check_finite(job, *torch.aminmax(stored), out_dtype)

    starts = range(0, rows, step)
    if pool is None or len(starts) < 2:
        for start in starts:
            fold_rows(start)
    else:
        for _ in pool.map(fold_rows, starts):  # re-raises the first chunk's error
            pass
    return out


def _read_ahead(
    executor: concurrent.futures.Executor, read: Callable[[int], torch.Tensor], items: Sequence[int],
    ahead: Callable[[int], bool],
) -> Iterator[tuple[int, torch.Tensor]]:
    """(item, read(item)) in order, every read in `executor`; the next item is read while this one is used
    when `ahead(next)` (a bound on the memory read ahead)."""
    pending: concurrent.futures.Future | None = None
    for k, item in enumerate(items):
        current = pending or executor.submit(read, item)
        pending = executor.submit(read, items[k + 1]) if k + 1 < len(items) and ahead(items[k + 1]) else None
        yield item, current.result()


def _close_shard(writer: SafetensorsWriter, fname: str, hashes: dict[str, str]) -> None:
    """Finish one shard (its last bytes written and hashed) and record its sha256; a failure drops the file."""
    try:
        writer.close()
    except BaseException:
        writer.abort()
        raise
    hashes[fname] = writer.sha256


_BUFFERS = threading.local()


def _buffer(name: str, elements: int) -> torch.Tensor:
    """A float64 scratch of at least `elements`, one per thread and name, reused across tensors."""
    have = getattr(_BUFFERS, name, None)
    if have is None or have.numel() < elements:
        have = torch.empty(elements, dtype=torch.float64)
        setattr(_BUFFERS, name, have)
    return have


def _check_finite(job: Job, low, high, out_dtype: torch.dtype) -> None:
    """NaN fails both comparisons; beyond `finite_limit` a value rounds to Inf in `out_dtype`."""
    limit = finite_limit(out_dtype)
    if not (-limit < float(low) and float(high) < limit):
        raise LorademError(f"{job.name}: the folded tensor has NaN or Inf in {out_dtype} (weights too large?)")


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
    if out_dtype is not None and job.dtype.is_floating_point:
        return out_dtype
    return job.dtype


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch ops on `n` intra-op threads inside the block (restored after).

    The fold runs one thread of small ops (row chunks) beside the writer's and the fingerprint's
    threads. With torch's default pool, each small op is an OpenMP barrier; on a busy machine a
    descheduled pool thread stalls every one of them (measured on 2 shared cores: 1.08 s instead
    of 0.05 s to fold one 5632x2048 tensor), so the fold uses one intra-op thread and gets its
    parallelism from the pipeline instead.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_shards(
    plan: Plan,
    base: BaseCheckpoint,
    adapters: Sequence[LoadedAdapter],
    folder: Path,
    *,
    out_dtype: torch.dtype | None,
    max_shard_bytes: int,
    quant_dtype: torch.dtype | None = None,
    direct: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, str], dict[str, str]]:
    """Stream the plan's jobs into shards under `folder`; returns ({tensor: shard file}, {shard file: sha256}).

    Shards take consecutive jobs; inside a shard, tensors are folded in the file's order, so each
    one is written as soon as it is folded. A reader thread reads the next base tensor (up to
    READ_AHEAD_BYTES) while this one is folded, and a finished shard's last bytes are written and
    hashed while the next shard is folded, its writer sharing one in-flight budget with the next.
    `direct`: write the shards with O_DIRECT (`st_writer.DirectFile`), bypassing the page cache.
    """
    from safetensors import safe_open

    dtypes = [_target_dtype(j, out_dtype) for j in plan.jobs]
    sizes = [math.prod(j.shape) * d.itemsize for j, d in zip(plan.jobs, dtypes)]
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    specs = [[TensorSpec(plan.jobs[i].name, dtypes[i], plan.jobs[i].shape) for i in shard] for shard in shards]
    job_of = {j.name: i for i, j in enumerate(plan.jobs)}
    in_order = [job_of[s.name] for shard in specs for s in file_order(shard)]  # every job, in the files' order
    weight_map: dict[str, str] = {}
    hashes: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        files = stack.enter_context(contextlib.ExitStack())  # entered first: closed after every thread has stopped
        handles: dict[Path, object] = {}

        def read(i: int) -> torch.Tensor:  # only ever called in the reader thread
            path = base.files[plan.jobs[i].source]
            if path not in handles:
                handles[path] = files.enter_context(safe_open(path, framework="pt", backend="pread"))
            return handles[path].get_tensor(plan.jobs[i].source)

        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(FOLD_THREADS, thread_name_prefix="fold"))
        reader = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read"))
        closer = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="close"))
        bar = stack.enter_context(progress(sum(sizes), "assemble", bytes=True))
        bases = _read_ahead(reader, read, in_order, lambda i: sizes[i] <= READ_AHEAD_BYTES)
        budget = InflightBudget()
        closing: concurrent.futures.Future | None = None
        for shard, fname, shard_specs in zip(shards, names, specs):
            log(f"writing {fname}: {len(shard)} tensors, {sum(sizes[i] for i in shard) / 1e6:.1f} MB")
            writer = SafetensorsWriter(folder / fname, shard_specs, budget=budget, direct=direct)
            if direct and not writer.direct:
                log(f"{fname}: the file system refuses O_DIRECT; writing through the page cache")
            try:
                for spec in writer.order:
                    i, tensor = next(bases)
                    job = plan.jobs[i]
                    out = fold_tensor(job, tensor, adapters, dtypes[i], quant_dtype, pool)
                    del tensor
                    writer.write(job.name, out)
                    del out
                    weight_map[job.name] = fname
                    bar.update(sizes[i])
                    if closing is not None and closing.done():
                        closing.result()  # the previous shard failed: stop now
                if closing is not None:
                    closing.result()
            except BaseException:
                writer.abort()
                raise
            closing = closer.submit(_close_shard, writer, fname, hashes)
        if closing is not None:
            closing.result()
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map, hashes


# ---- the command ----------------------------------------------------------

def assemble(
    base: str | Path,
    adapters: Sequence[tuple[str | Path, Weight]],
    out: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size_mb: float = 2000,
    allow_name_mismatch: bool = False,
    trust_pickle: bool = False,
    fold_base: str = "original",
    quant_dtype: str | None = None,
    direct_io: bool = True,
    warm_up: Mapping | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write base + Σ wᵢ·ΔWᵢ to `out` as a Hugging Face model folder; returns `out`.

    A weight is a float, a list of floats (one per layer group) or a dict of them (one per module,
    keyed by the module's path in the base model). ``fold_base="dequantized"``
    folds onto the NF4 round trip of the 4-bit layers, cast first to `quant_dtype` (default: the
    dtype the adapters' training loaded the base in, from loradem-train.json, else the base's).
    ``direct_io`` writes the weights with O_DIRECT (same bytes, no page cache; see `write_shards`); False writes
    through the page cache. ``warm_up``: `base` is a warmed base (`loradem.train.warmup.warmup_record`: the
    original base and the warm-up adapter folded into it), kept in loradem.json as ``warm_up`` and named by the card.
    """
    started = time.perf_counter()
    out = Path(out)
    _check_output(out, overwrite)
    if not adapters:
        raise LorademError("assemble: expected at least one adapter")
    if not max_shard_size_mb > 0:
        raise LorademError(f"max_shard_size_mb: expected a positive number, got {max_shard_size_mb!r}")
    if fold_base not in FOLD_BASES:
        raise LorademError(f"fold_base: expected {' or '.join(FOLD_BASES)}, got {fold_base!r}")
    out_dtype = _output_dtype(dtype)
    spec = str(base)
    folder = resolve_base(spec, log)
    for path, weight in adapters:
        check_weight(weight, path)
    weights = [_plain(w) for _, w in adapters]
    loaded = [load_adapter(path, trust_pickle=trust_pickle) for path, _ in adapters]
    _refuse_overwriting_inputs(out, folder, loaded)
    checkpoint = read_base(folder)
    num_layers = num_hidden_layers(checkpoint.config)
    for (path, _), weight in zip(adapters, weights):
        if isinstance(weight, list) and num_layers is not None:
            check_group_count(len(weight), num_layers, f"weight for adapter {path}")
    if not allow_name_mismatch:
        for adapter in loaded:
            check_same_base(adapter, spec, checkpoint)
    records = [train_record(a) for a in loaded]
    quantized, qdtype = _fold_base(fold_base, quant_dtype, checkpoint, loaded, records, log)
    touches_ties = may_touch_ties(loaded, checkpoint)
    tied = tied_pairs(checkpoint) if touches_ties else {}
    if touches_ties and not tied and checkpoint.config.get("tie_word_embeddings"):
        archs = ", ".join(checkpoint.config.get("architectures") or ["(none)"])
        raise LorademError(
            f"{folder}: tie_word_embeddings is set but transformers does not say which tensors {archs} ties; "
            "cannot fold an embedding LoRA or full copy exactly"
        )
    plan = plan_fold(checkpoint.tensors, list(zip(loaded, weights)), tied=tied,
                     num_layers=num_layers, dequantize=quantized)
    with torch_threads(1):
        for adapter in loaded:
            adapter.check_finite()
    log(f"assembling {len(loaded)} adapter(s) into {folder} -> {out}")
    for name in plan.untied:
        log(f"untying {name} from {tied[name]}: an adapter changes one side of the tied pair")
    # the inputs' sha256 (provenance) are read and hashed beside the fold, not before it (the base's
    # usually come from the fingerprint cache); a daemon thread, so a failed fold does not wait for it
    inputs_sha256 = _in_background(lambda: (fingerprint_weights(folder), [a.sha256() for a in loaded]))
    needed = sum(math.prod(j.shape) * _target_dtype(j, out_dtype).itemsize for j in plan.jobs)
    with atomic_dir(out, overwrite=overwrite, needed_bytes=needed) as tmp, torch_threads(1):
        weight_map, hashes = write_shards(
            plan, checkpoint, loaded, tmp, out_dtype=out_dtype, quant_dtype=qdtype,
            max_shard_bytes=int(max_shard_size_mb * 1e6), direct=direct_io, log=log,
        )
        _write_config(checkpoint, tmp, dtype, plan.untied)
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        base_sha256, adapter_sha256 = inputs_sha256.result()
        record = provenance(spec, checkpoint, loaded, weights, dtype, plan, hashes, base_sha256, adapter_sha256)
        record["fold_base"] = fold_base
        if warm_up is not None:
            record["warm_up"] = dict(warm_up)
        if quantized:
            record["dequantized"] = {**_nf4_settings(), "load_dtype": _dtype_name(qdtype) or "the base's",
                                     "tensors": sum(1 for j in plan.jobs if j.dequantize)}
        (tmp / "loradem.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record))
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


def _plain(weight: Weight) -> float | list[float] | dict[str, float]:
    """A checked weight as plain Python floats: what plan_fold gets and loradem.json records."""
    if isinstance(weight, Mapping):
        return {k: float(w) for k, w in weight.items()}
    if isinstance(weight, (list, tuple)):
        return [float(w) for w in weight]
    return float(weight)


def _in_background(fn: Callable[[], object]) -> concurrent.futures.Future:
    """Run `fn` in a daemon thread; the future holds its result or its exception."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - raised again by future.result()
            future.set_exception(exc)

    threading.Thread(target=run, name="hash inputs", daemon=True).start()
    return future


def _fold_base(
    fold_base: str, quant_dtype: str | None, base: BaseCheckpoint, adapters: Sequence[LoadedAdapter],
    records: Sequence[dict | None], log: Callable[[str], None],
) -> tuple[frozenset[str], torch.dtype | None]:
    """The tensors to de-quantize and the dtype they were quantized in; logs a mismatch with the training."""
    nf4 = [trained_on_nf4(r) for r in records]
    if fold_base == "original":
        for adapter, q in zip(adapters, nf4):
            if q:
                log(f"warning: adapter {adapter.path} was trained on an NF4 (4-bit) base; folding onto the original "
                    "weights (fold_base: original), not the de-quantized ones it was trained against")
        return frozenset(), None
    for adapter, q in zip(adapters, nf4):
        if q is False:
            log(f"warning: adapter {adapter.path} was trained on a full-precision base; fold_base: dequantized "
                "folds it onto the NF4 round trip of the base")

    if quant_dtype is not None:
        if quant_dtype not in LOAD_DTYPES:
            raise LorademError(f"quant_dtype: expected one of {', '.join(LOAD_DTYPES)}, got {quant_dtype!r}")
        qdtype = LOAD_DTYPES[quant_dtype]
    else:
        known = {load_dtype_of(r) for r, q in zip(records, nf4) if q} - {None}
        if len(known) > 1:
            raise LorademError(
                f"fold_base dequantized: the adapters were trained on bases loaded in different dtypes "
                f"({', '.join(sorted(map(str, known)))}); pass quant_dtype"
            )
        qdtype = known.pop() if known else None
    names = quantized_tensors(base.folder) & set(base.tensors)
    if not names:
        raise LorademError(f"{base.folder}: fold_base dequantized: transformers quantizes none of this base's tensors")
    log(f"fold_base dequantized: {len(names)} tensors through the NF4 round trip "
        f"(in {_dtype_name(qdtype) or 'the base dtype'})")
    return frozenset(names), qdtype


def _nf4_settings() -> dict:

    return settings()


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _check_output(out: Path, overwrite: bool) -> None:
    """`--overwrite` replaces only a model folder loradem wrote itself (it holds loradem.json), never any other folder."""
    if not out.exists():
        return
    if not overwrite:
        raise LorademError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.is_dir() or not (out / "loradem.json").is_file():
        raise LorademError(f"{out}: --overwrite replaces only a model folder loradem wrote (with loradem.json); "
                           "this is not one, so choose another output folder")


def _refuse_overwriting_inputs(out: Path, base: Path, adapters: Sequence[LoadedAdapter]) -> None:
    """The output may be neither an input nor a folder that holds one: replacing it would delete the input."""
    target = out.resolve()
    for p in (base, *(a.path for a in adapters)):
        if target == p.resolve() or target in p.resolve().parents:
            raise LorademError(f"{out}: {'is' if target == p.resolve() else 'holds'} an input of this fold ({p}); "
                               "choose another output folder")


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
