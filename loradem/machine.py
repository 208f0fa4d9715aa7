"""What machine a measurement ran on, in the words a reader needs to compare two of them.

    from loradem.machine import describe, summary
    describe()   # {"device": "cpu", "cpu": "AMD EPYC ...", "cores": 2, "threads": 2, "isa": "AVX2", "native_bf16": False, ...}
    summary()    # "cpu: AMD EPYC (2 cores, 2 torch threads; AVX2, bf16 emulated)"

Seconds mean little without it: two 2-core VMs of the same name can differ by 2x per training
step, and bfloat16 matrix products are faster than float32 on a CPU with AVX512-BF16 or AMX but
many times slower on one without (torch then emulates them). Reports and benchmarks record it
beside their timings (benchmarks/RESULTS.md has the measured figures).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe() -> dict:
    """Device, CPU model, cores, torch threads, the CPU's vector instruction set as torch dispatches it, whether
    bfloat16 matrix products run natively on this CPU, and the GPU when one is visible."""
    import torch

    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    info = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16,
        "torch": torch.__version__,
    }
    if info["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summary(info: dict | None = None) -> str:
    """One line: "cpu: <model> (<cores> cores, <threads> torch threads; <isa>, bf16 native|emulated)" (and the GPU)."""
    m = info or describe()
    line = (f"{m['device']}: {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads; {m['isa']}, "
            f"bf16 {'native' if m['native_bf16'] else 'emulated'})")
    return line + (f", GPU {m['gpu']}" if m.get("gpu") else "")
