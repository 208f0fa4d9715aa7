"""Benchmark the fold: loradem `assemble` against peft `add_weighted_adapter(cat)` + `merge_and_unload` + `save_pretrained`.

    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/bench_assemble.py                  # both bases, ~3 min on 2 CPU cores
    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/bench_assemble.py --bases standin  # only the ~1B stand-in

Bases:
- ``smollm2-135m``: the embedded SmolLM2-135M-Instruct (float32, 540 MB).
- ``standin``: a randomly initialised Llama of about a billion parameters in
  bfloat16 (hidden 2048, 16 layers, intermediate 5632, vocab 32000, untied
  head: 0.95 B parameters, 1.9 GB), the size of a small model a hobbyist merges. It is built once,
  tensor by tensor with ``torch.empty(...).normal_`` and loradem's streamed
  writer (never a model in memory), in 1 GB shards under
  ``$LORADEM_CACHE/bench/`` (default ``~/.cache/loradem/bench/``).

Each base gets three random LoRA adapters on all linear layers (ranks 8, 16,
16; float32 factors like peft saves them; weights 0.6, 0.3, 0.5). Every method
runs in a fresh subprocess that first imports torch + transformers + peft,
then reports its own wall time (imports excluded) and peak RSS (``VmHWM``;
``ru_maxrss`` would include the parent's RSS at fork time); ``os.sync()`` runs before each, so no method pays for the
previous one's write-back. A separate subprocess that only imports torch +
transformers + peft gives the baseline RSS; "extra" is peak RSS minus that
baseline. The parent then compares the outputs tensor by tensor (one tensor
in memory at a time) and checks every target of the first and last layer
against a float64 reference rounded once, bit for bit.

loradem runs four times: three through the page cache (``--no-direct-io``):
``--rehash`` (the base's sha256 for loradem.json read and hashed in full, as on
a base folded for the first time), then with that hash cached
(``$LORADEM_CACHE/fingerprints.json``, as on every later fold of the same base),
then with 100 MB shards; then as by default, cached, with O_DIRECT writes past
the page cache (its shards must equal the buffered run's byte for byte). ``cp`` is ``cp --reflink=never`` of the
base's safetensors files into a fresh folder (a real copy through the page
cache, like every method's output; never a reflink).
Each child also reports its CPU time after imports (user + sys, all threads);
on a 2-core machine the wall time cannot be below half of it.
Targets: loradem >= 4x faster than peft's path, at most 2x a plain copy of the
base's files, and its extra peak memory <= 1/3 of the model's size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WEIGHTS = (0.6, 0.3, 0.5)
RANKS = (8, 16, 16)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STANDIN = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000,
               num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_mb() -> float:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a child
    started by a big parent reports the parent's RSS at fork time (measured here: 1062 MB instead of 810)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e6  # kB -> MB


# ---- children: one method each, in a fresh process ------------------------

def run_peft(base: str, adapters: list[str], out: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")  # the checkpoint's dtype, as loradem keeps it
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, list(WEIGHTS), "merged", combination_type="cat")
    model.set_adapter("merged")
    model.merge_and_unload().save_pretrained(out)


def run_loradem(base: str, adapters: list[str], out: str, shard_mb: float, rehash: bool = False,
                direct: bool = False) -> None:
    from loradem.files import rehash_weights
    from loradem.merge.fold import assemble

    if rehash:
        rehash_weights()
    assemble(base, list(zip(adapters, WEIGHTS)), out, max_shard_size_mb=shard_mb, direct_io=direct, log=lambda *_: None)


def child(args: argparse.Namespace) -> None:
    import peft  # noqa: F401  - the same imports in every child, so "after imports" is comparable
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if args.method != "imports":
        import loradem.merge.fold  # noqa: F401
    after_imports = rss_mb()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if args.method == "peft":
        run_peft(args.base, args.adapters, args.out)
    elif args.method.startswith("loradem"):
        run_loradem(args.base, args.adapters, args.out, args.shard_mb, rehash=args.method == "loradem-rehash",
                    direct=args.method == "loradem-direct")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process, imports excluded
    print(json.dumps({"wall_s": wall, "peak_mb": peak_mb(), "import_mb": after_imports,
                      "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime}))


# ---- inputs -------------------------------------------------------------------

def standin_base(log=print) -> Path:
    """The ~1B bfloat16 Llama stand-in, built once (tensor by tensor, streamed) and cached."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loradem.files import atomic_dir
    from loradem.merge.fold import plan_shards, shard_names
    from loradem.merge.st_writer import SafetensorsWriter, TensorSpec
    from loradem.model.base import cache_root

    final = cache_root() / "bench" / "llama-1b-standin-bf16"
    if (final / "config.json").is_file() and (final / "model.safetensors.index.json").is_file():
        return final
    config = LlamaConfig(**STANDIN, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    names = sorted(shapes)
    specs = [TensorSpec(n, torch.bfloat16, shapes[n]) for n in names]
    shards = plan_shards([s.nbytes for s in specs], 1_000_000_000)
    files = shard_names(len(shards))
    log(f"building the stand-in base ({sum(math.prod(s) for s in shapes.values()) / 1e9:.2f} B parameters) in {final}")
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    with atomic_dir(final, overwrite=True) as tmp:
        for shard, fname in zip(shards, files):
            with SafetensorsWriter(tmp / fname, [specs[i] for i in shard]) as writer:
                for spec in writer.order:
                    if spec.name.endswith("norm.weight"):
                        t = torch.ones(spec.shape, dtype=torch.bfloat16)
                    else:
                        t = torch.empty(spec.shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
                    writer.write(spec.name, t)
                    weight_map[spec.name] = fname
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
    return final


def make_adapters(base: Path, root: Path) -> list[str]:
    """Three random float32 LoRA adapters (ranks 8, 16, 16) on every linear layer of `base`, as peft saves them."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from loradem.vectors.checkpoint import read_base

    checkpoint = read_base(base)
    shapes = {n: s for n, (s, _) in checkpoint.tensors.items() if n.endswith(".weight") and n.split(".")[-2] in TARGETS}
    paths = []
    for seed, rank in enumerate(RANKS):
        gen = torch.Generator().manual_seed(100 + seed)
        tensors = {}
        for name, (rows, cols) in shapes.items():
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) / math.sqrt(cols)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.01
        folder = root / f"adapter{seed}-r{rank}"
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), task_type="CAUSAL_LM",
                   base_model_name_or_path=str(base)).save_pretrained(folder)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        paths.append(str(folder))
    return paths


# ---- measuring and comparing ----------------------------------------------------

def measure(method: str, base: Path, adapters: list[str], out: Path, shard_mb: float = 2000) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--base", str(base), "--out", str(out),
           "--shard-mb", str(shard_mb), "--adapters", *adapters]
    os.sync()  # the previous method's dirty pages are flushed now, not during this one
    load = os.getloadavg()[0]  # other processes on the machine: the numbers are only as quiet as it is
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    result["load"] = load
    return result


def measure_cp(base: Path, out: Path) -> dict:
    """Wall time of `cp --reflink=never` of the base's safetensors files, under the same conditions as `measure`."""
    out.mkdir()
    os.sync()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["cp", "--reflink=never", *map(str, sorted(base.glob("*.safetensors"))), str(out)], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "process_s": wall, "load": load,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime}


def measure_sha256(base: Path) -> dict:
    """Wall time of hashing the base's safetensors files as loradem does (`sha256_file`, one thread), for scale."""
    from loradem.files import sha256_file

    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for p in sorted(base.glob("*.safetensors")):
        sha256_file(p)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "process_s": wall, "load": load,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime}


def _tensors(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(p, framework="pt") as f:
            where.update({k: p for k in f.keys()})
    return where


def compare(a: Path, b: Path) -> tuple[float, float, int]:
    """(max |a - b|, fraction of elements that differ, tensors), one tensor pair in memory at a time."""
    from safetensors import safe_open

    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        raise SystemExit(f"{a} and {b} hold different tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
    worst, differ, total = 0.0, 0, 0
    for name in ta:
        with safe_open(ta[name], framework="pt") as fa, safe_open(tb[name], framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype:
            raise SystemExit(f"{name}: {x.dtype} in {a}, {y.dtype} in {b}")
        diff = x.float() - y.float()
        worst = max(worst, float(diff.abs().max()))
        differ += int((diff != 0).sum())
        total += x.numel()
    return worst, differ / max(1, total), len(ta)


def _read(path: Path, key: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def exact_check(base: Path, adapters: list[str], folded: Path) -> tuple[int, int, int]:
    """Every target of the first and last layer against (base + Σ w·s·B@A in float64) rounded once:
    (tensors checked, tensors equal bit for bit, elements where torch's own float64 -> dtype conversion,
    which rounds twice through float32, would differ)."""
    import torch

    where, base_where = _tensors(folded), _tensors(base)
    layers = sorted({int(n.split(".")[2]) for n in where if n.startswith("model.layers.")})
    names = [f"model.layers.{i}.{part}.{t}.weight" for i in (layers[0], layers[-1])
             for part, targets in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for t in targets]
    equal = twice = 0
    for name in names:
        got = _read(where[name], name)
        ref = _read(base_where[name], name).double()
        module = name.removesuffix(".weight")
        for path, weight in zip(adapters, WEIGHTS):
            a = _read(Path(path) / "adapter_model.safetensors", f"base_model.model.{module}.lora_A.weight").double()
            b = _read(Path(path) / "adapter_model.safetensors", f"base_model.model.{module}.lora_B.weight").double()
            ref += weight * 2.0 * (b @ a)  # lora_alpha = 2r: scale 2
        once = round_once(ref, got.dtype)
        equal += torch.equal(got, once)
        twice += int((ref.to(got.dtype) != once).sum())
    return len(names), equal, twice


def round_once(x, dtype):
    """float64 -> `dtype` with one rounding, by round-to-odd (independent of loradem's `round_into`): float64 ->
    float32 keeping a sticky bit (exact), then torch's round-to-nearest-even (float32 has > 2 extra bits)."""
    import torch

    if dtype in (torch.float32, torch.float64):
        return x.to(dtype)
    bits = x.view(torch.int64)
    low = (1 << 29) - 1
    odd = (bits & ~low) | (((bits & low) != 0).to(torch.int64) << 29)
    return odd.view(torch.float64).to(torch.float32).to(dtype)


def bench(base_spec: str, root: Path, log=print) -> dict:
    from loradem.model.base import resolve_base
    from loradem.vectors.checkpoint import read_base

    base = standin_base(log) if base_spec == "standin" else resolve_base(base_spec)
    size_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
    params = sum(math.prod(s) for s, _ in read_base(base).tensors.values())
    adapters = make_adapters(base, root / "adapters")
    log(f"{base_spec}: {params / 1e9:.2f} B parameters, {size_mb:.0f} MB; measuring ...")
    rows = {"imports only": measure("imports", base, adapters, root / "none")}
    rows["peft cat+merge+save"] = measure("peft", base, adapters, root / "peft")
    rows["loradem --no-direct-io --rehash"] = measure("loradem-rehash", base, adapters, root / "loradem-rehash")
    rows["loradem --no-direct-io"] = measure("loradem", base, adapters, root / "loradem")
    rows["loradem --no-direct-io, 100 MB shards"] = measure("loradem-small", base, adapters, root / "loradem-small", shard_mb=100)
    rows["loradem assemble (O_DIRECT, the default)"] = measure("loradem-direct", base, adapters, root / "loradem-direct")
    rows["cp"] = measure_cp(base, root / "cp")
    rows["sha256 of the base, one thread"] = measure_sha256(base)
    diff_peft, frac_peft, n = compare(root / "loradem", root / "peft")
    diff_shards, _, _ = compare(root / "loradem", root / "loradem-small")
    same_direct = all((root / "loradem" / f.name).read_bytes() == f.read_bytes()
                      for f in (root / "loradem-direct").glob("*.safetensors"))
    exact = exact_check(base, adapters, root / "loradem")
    dtype = str(next(iter(read_base(base).tensors.values()))[1]).removeprefix("torch.")
    return {"base": base_spec, "size_mb": size_mb, "params": params, "rows": rows, "tensors": n, "dtype": dtype,
            "diff_peft": diff_peft, "frac_peft": frac_peft, "diff_shards": diff_shards, "exact": exact,
            "same_direct": same_direct}


def report(result: dict) -> str:
    rows, size = result["rows"], result["size_mb"]
    baseline = rows["imports only"]["import_mb"]
    peft = rows["peft cat+merge+save"]
    lines = [
        f"{result['base']}: {result['params'] / 1e9:.3f} B parameters, {size:.0f} MB of safetensors; "
        f"3 adapters r={'/'.join(map(str, RANKS))} on all linear layers, weights {WEIGHTS}; "
        f"RSS after importing torch+transformers+peft alone: {baseline:.0f} MB",
        "| method | wall s | CPU user + sys s | process s | peak RSS MB | extra MB (peak - imports) | extra / model size | peft wall / wall | wall / cp | load avg before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cp = rows["cp"]["wall_s"]
    for name, r in rows.items():
        if name == "imports only":
            continue
        extra = r["peak_mb"] - baseline if "peak_mb" in r else None
        memory = f"{r['peak_mb']:.0f} | {extra:.0f} | {extra / size:.2f}" if extra is not None else "- | - | -"
        cpu = f"{r['user_s']:.2f} + {r['sys_s']:.2f}" if "user_s" in r else "-"
        lines.append(f"| {name} | {r['wall_s']:.2f} | {cpu} | {r['process_s']:.2f} | {memory} | "
                     f"{peft['wall_s'] / r['wall_s']:.2f}x | {r['wall_s'] / cp:.2f}x | {r['load']:.1f} |")
    for name in ("loradem assemble (O_DIRECT, the default)", "loradem --no-direct-io", "loradem --no-direct-io --rehash"):
        r = rows[name]
        lines.append(f"{name}: {peft['wall_s'] / r['wall_s']:.2f}x faster than peft (target >= 4x), "
                     f"{r['wall_s'] / cp:.2f}x cp (target <= 2x), extra memory {(r['peak_mb'] - baseline) / size:.2f}x "
                     "the model (target <= 0.33x)")
    lines.append(f"max |loradem - peft| over {result['tensors']} tensors: {result['diff_peft']:.3g} "
                 f"({result['frac_peft']:.2%} of elements differ; peft rounds the delta to the base dtype before adding); "
                 f"loradem 2000 MB vs 100 MB shards: {result['diff_shards']:.3g}; "
                 f"O_DIRECT shards byte-identical to --no-direct-io's: {result['same_direct']}; "
                 f"float64 reference rounded once: {result['exact'][1]} of {result['exact'][0]} tensors (all targets of the "
                 f"first and last layer) equal bit for bit; torch's own float64 -> {result['dtype']} conversion would have "
                 f"rounded {result['exact'][2]} of their elements twice and wrongly")
    return "\n".join(lines)


def main(bases: list[str]) -> None:
    results = []
    for spec in bases:
        with tempfile.TemporaryDirectory(prefix="bench-assemble-") as tmp:
            results.append(bench(spec, Path(tmp)))
    from loradem.machine import summary

    print(f"\nbench_assemble {dt.datetime.now().isoformat(timespec='minutes')}, {summary()}\n")
    for r in results:
        print(report(r) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", dest="method")
    parser.add_argument("--base")
    parser.add_argument("--out")
    parser.add_argument("--shard-mb", type=float, default=2000)
    parser.add_argument("--adapters", nargs="*")
    parser.add_argument("--bases", default="smollm2-135m,standin",
                        help="comma-separated: smollm2-135m, standin, or a model folder (default: %(default)s)")
    args = parser.parse_args()
    child(args) if args.method else main(args.bases.split(","))
