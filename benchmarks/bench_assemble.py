"""Benchmark the fold: loradem `assemble` against peft `add_weighted_adapter(cat)` + `merge_and_unload` + `save_pretrained`.

    .venv/bin/python benchmarks/bench_assemble.py          # ~2 minutes on 2 CPU cores, ~3 GB of /tmp

On the embedded SmolLM2-135M-Instruct (float32, 540 MB) with three random
rank-8 adapters on all linear layers (init_lora_weights=False, B scaled to
small norms like trained ones), each method runs in a fresh subprocess that
reports its own wall time and peak RSS (``ru_maxrss``) and its RSS after
imports; the parent then compares the two outputs tensor by tensor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WEIGHTS = (0.6, 0.3, 0.5)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


# ---- children: one method each, in a fresh process ------------------------

def run_peft(base: str, adapters: list[str], out: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, list(WEIGHTS), "merged", combination_type="cat")
    model.set_adapter("merged")
    model.merge_and_unload().save_pretrained(out)


def run_loradem(base: str, adapters: list[str], out: str, shard_mb: float) -> None:
    from loradem.assemble import assemble

    assemble(base, list(zip(adapters, WEIGHTS)), out, max_shard_size_mb=shard_mb, log=lambda *_: None)


def child(args: argparse.Namespace) -> None:
    import transformers  # noqa: F401  (both use it: peft to load, loradem for the tied-weight map)

    if args.method == "peft":
        import peft  # noqa: F401
    else:
        import loradem.assemble  # noqa: F401
    after_imports = rss_mb()
    start = time.perf_counter()
    if args.method == "peft":
        run_peft(args.base, args.adapters, args.out)
    else:
        run_loradem(args.base, args.adapters, args.out, args.shard_mb)
    print(json.dumps({"wall_s": time.perf_counter() - start, "peak_mb": peak_mb(), "import_mb": after_imports}))


# ---- parent ----------------------------------------------------------------

def make_adapters(base: Path, root: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)  # trained adapters have small deltas; init_lora_weights=False gives large ones
        model.save_pretrained(root / f"adapter{seed}")
        paths.append(str(root / f"adapter{seed}"))
    return paths


def measure(method: str, base: Path, adapters: list[str], out: Path, shard_mb: float = 2000) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--base", str(base), "--out", str(out),
           "--shard-mb", str(shard_mb), "--adapters", *adapters]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def max_abs_diff(a: Path, b: Path) -> tuple[float, int]:
    from safetensors.torch import load_file

    ta = {k: v for p in sorted(a.glob("*.safetensors")) for k, v in load_file(p).items()}
    tb = {k: v for p in sorted(b.glob("*.safetensors")) for k, v in load_file(p).items()}
    if ta.keys() != tb.keys():
        raise SystemExit(f"{a} and {b} hold different tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta), len(ta)


def main(base_spec: str) -> None:
    from loradem.base import resolve_base

    base = resolve_base(base_spec)
    with tempfile.TemporaryDirectory(prefix="bench-assemble-") as tmp:
        root = Path(tmp)
        adapters = make_adapters(base, root)
        rows = {
            "peft cat+merge+save": measure("peft", base, adapters, root / "peft"),
            "loradem assemble": measure("loradem", base, adapters, root / "loradem"),
            "loradem, 100 MB shards": measure("loradem-small", base, adapters, root / "loradem-small", shard_mb=100),
        }
        diff_peft, n = max_abs_diff(root / "loradem", root / "peft")
        diff_base, _ = max_abs_diff(root / "loradem", base)
        diff_shards, _ = max_abs_diff(root / "loradem", root / "loradem-small")
        size_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
    print(f"bench_assemble {dt.date.today().isoformat()}: {base_spec} ({size_mb:.0f} MB), "
          f"3 adapters r=8 all-linear, weights {WEIGHTS}")
    peft = rows["peft cat+merge+save"]
    print(f"{'method':<24} {'wall s':>7} {'process s':>9} {'peak RSS MB':>11} {'after imports MB':>16} {'wall/peft':>9} {'peak/peft':>9}")
    for name, r in rows.items():
        print(f"{name:<24} {r['wall_s']:>7.2f} {r['process_s']:>9.2f} {r['peak_mb']:>11.0f} {r['import_mb']:>16.0f} "
              f"{r['wall_s'] / peft['wall_s']:>9.2f} {r['peak_mb'] / peft['peak_mb']:>9.2f}")
    print(f"max |loradem - peft| over {n} tensors: {diff_peft:.3g}  (max |loradem - base|: {diff_base:.3g}; "
          f"loradem 2000 MB vs 100 MB shards: {diff_shards:.3g})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", dest="method")
    parser.add_argument("--base")
    parser.add_argument("--out")
    parser.add_argument("--shard-mb", type=float, default=2000)
    parser.add_argument("--adapters", nargs="*")
    parser.add_argument("--base-spec", default="smollm2-135m", help="base to benchmark (a folder for a dry run)")
    args = parser.parse_args()
    child(args) if args.method else main(args.base_spec)
