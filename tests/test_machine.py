"""The machine a report or benchmark ran on: what torch itself reports, in one line."""

from __future__ import annotations

import torch

from loradem.evaluate.report import markdown
from loradem.machine import describe, summary


def test_describe_is_what_torch_reports_here():
    info = describe()
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["threads"] == torch.get_num_threads() and info["cores"] >= 1
    assert info["isa"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["native_bf16"], bool) and info["torch"] == torch.__version__
    assert info["cpu"]


def test_summary_names_cores_threads_isa_and_bf16():
    cpu = {"device": "cpu", "cpu": "AMD EPYC", "cores": 2, "threads": 1, "isa": "AVX2", "native_bf16": False}
    assert summary(cpu) == "cpu: AMD EPYC (2 cores, 1 torch threads; AVX2, bf16 emulated)"
    gpu = {**cpu, "device": "cuda", "isa": "AVX512", "native_bf16": True, "gpu": "NVIDIA H200"}
    assert summary(gpu) == "cuda: AMD EPYC (2 cores, 1 torch threads; AVX512, bf16 native), GPU NVIDIA H200"


def test_the_report_says_where_it_was_scored():
    rows = [{"name": "base", "per_source": {"a": 0.5}, "average": 0.5,
             "cost": {"train_tokens": 0, "train_seconds": 0, "search_seconds": 0, "total_seconds": 0}}]
    cpu = {"device": "cpu", "cpu": "X", "cores": 2, "threads": 2, "isa": "AVX2", "native_bf16": False}
    md = markdown("r", {"a": "exact_match"}, rows, extra={"machine": cpu})
    assert "this report was scored on cpu: X (2 cores, 2 torch threads; AVX2, bf16 emulated)." in md
    assert "Costs are wall-clock seconds on the machine that ran them." in markdown("r", {"a": "exact_match"}, rows)
