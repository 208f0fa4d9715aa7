"""loradem.progress: the bar shows on a terminal that reports no size, and the libraries' noise is filtered."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

SCRIPT = """
from loradem.progress import progress
with progress(3, "demo-bar", unit="step") as bar:
    bar.update(3)
"""


def test_bar_is_drawn_on_a_terminal_that_reports_no_size():
    """A bare pty reports 0 x 0; tqdm would hide the bar there unless told a size."""
    main, child = pty.openpty()  # a fresh pty has 0 rows and 0 columns
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait()
    os.close(main)
    assert proc.returncode == 0
    assert b"demo-bar: 100%" in out and b"3/3" in out


def test_quiet_libraries_hides_the_bitsandbytes_kernels_line():
    loud = subprocess.run([sys.executable, "-c", "import bitsandbytes, peft"], capture_output=True, text=True, check=True)
    if "gemm_4bit_forward" not in loud.stderr:
        pytest.skip("this CPU never tries bitsandbytes' kernel, so there is no line to hide")
    code = "from loradem.progress import quiet_libraries; quiet_libraries(); import bitsandbytes, peft"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gemm_4bit_forward" not in quiet.stderr
