"""benchmarks/gpu_check.sh: its CPU part (what runs where no GPU is lent) on the tiny model, and its fold comparison.

The CUDA part (bf16 and NF4 training on the GPU, the GPU tokens/s) needs a GPU; here the script is run with no
GPU visible, so it must run the pipeline and the fold check on the CPU and say what it skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # PYTHON relative to the working directory, as a user types it: the script cds into --out before using it
    python = os.path.relpath(sys.executable, cwd) if cwd else sys.executable
    env = {**os.environ, "PYTHON": python, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_without_a_gpu_it_runs_the_pipeline_and_the_fold_check_on_the_cpu(tmp_path, tiny_base_tied):
    out = tmp_path / "check"
    done = run_script("--base", str(tiny_base_tied), "--out", str(out), "--steps", "2", "--learn-steps", "2",
                      cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "no CUDA device: running the CPU parts only" in log
    assert "SKIPPED: bf16 and NF4 training on CUDA, and the GPU tokens/s" in log
    assert "3. SKIPPED (no CUDA)" in log and "bench_train.py --device cuda" not in done.stdout.split("3. SKIPPED")[1]

    # both adapter sets trained on the CPU: the plain one and the NF4 variant
    run = out / "runs" / "gpu-check"
    for listing, quantization in ((run / "adapters.json", "none"), (run / "variants" / "nf4" / "adapters.json", "nf4")):
        entries = json.loads(listing.read_text())
        assert sorted(entries) == ["addition", "sort"]
        for entry in entries.values():
            record = json.loads((listing.parent / entry["path"] / "loradem-train.json").read_text())
            assert (record["train"]["quantization"], record["device"], record["steps"]) == (quantization, "cpu", 2)

    # searched, learned, assembled and evaluated: every row of both sets in the report
    report = json.loads((run / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert {"base", "dem", "dem-learned", "nf4:adapter:addition", "nf4:dem-learned"} <= set(names)
    assert (run / "learn" / "weights.json").is_file() and (run / "search" / "weights.json").is_file()

    # the fold check compared the run's model with a second assembly, and they are byte-identical
    assert "fold check: 1 weight file(s) byte-identical" in log
    assert sha(run / "model" / "model.safetensors") == sha(out / "model-cpu" / "model.safetensors")
    assert "gpu_check: all checks passed" in log


def test_the_fold_comparison_fails_on_any_difference(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    for name in ("x", "same", "other", "fewer"):
        (tmp_path / name).mkdir()
    save_file(tensors, str(tmp_path / "x" / "model.safetensors"))
    save_file(tensors, str(tmp_path / "same" / "model.safetensors"))
    changed = dict(tensors, b=tensors["b"].clone())
    changed["b"][2] = 1.0078125  # one bf16 ulp above 1
    save_file(changed, str(tmp_path / "other" / "model.safetensors"))
    save_file(tensors, str(tmp_path / "fewer" / "model-00001-of-00002.safetensors"))

    ok = run_script("--compare", str(tmp_path / "x"), str(tmp_path / "same"), timeout=120)
    assert ok.returncode == 0 and "1 weight file(s) byte-identical, 2 tensors equal" in ok.stdout
    bad = run_script("--compare", str(tmp_path / "x"), str(tmp_path / "other"), timeout=120)
    assert bad.returncode != 0 and "fold check FAILED: model.safetensors: 1 tensor(s) differ, e.g. b" in bad.stderr
    files = run_script("--compare", str(tmp_path / "x"), str(tmp_path / "fewer"), timeout=120)
    assert files.returncode != 0 and "fold check FAILED: weight files differ" in files.stderr
