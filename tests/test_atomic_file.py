"""loradem.files.atomic_file: one file written aside and renamed into place; nothing half-written is ever left."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from loradem.errors import LorademError
from loradem.files import WriteError, atomic_file


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_file_appears_only_when_the_block_finishes(tmp_path):
    final = tmp_path / "sub" / "model.gguf"
    with atomic_file(final) as tmp:
        assert tmp.parent == final.parent and tmp.name == f".model.gguf.partial-{socket.gethostname()}-{os.getpid()}"
        assert tmp.read_bytes() == b"" and not final.exists()  # created up front: an unwritable place fails before any work
        tmp.write_bytes(b"GGUF new")
    assert listing(final.parent) == {"model.gguf": b"GGUF new"}


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_block_removes_the_partial_and_keeps_the_old_file(tmp_path, interrupt):
    final = tmp_path / "model.gguf"
    final.write_bytes(b"old")
    with pytest.raises(type(interrupt)), atomic_file(final, overwrite=True) as tmp:
        tmp.write_bytes(b"half")
        raise interrupt
    assert listing(tmp_path) == {"model.gguf": b"old"}


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(LorademError, match=rf"^{final}: already exists \(pass --overwrite to replace it\)$"), atomic_file(final):
        pytest.fail("the block ran")
    assert listing(tmp_path) == {"out.bin": b"old"}
    with atomic_file(final, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert listing(tmp_path) == {"out.bin": b"new"}


def test_a_full_disk_in_the_block_is_one_line(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(WriteError) as err, atomic_file(final) as tmp:
        tmp.write_bytes(b"x" * 3000)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == (f"{final}: the disk is full (No space left on device) after 3 kB of the output; "
                              "the partial output was removed, free space and re-run")
    assert err.value.errno == errno.ENOSPC and listing(tmp_path) == {}
    with pytest.raises(WriteError, match=r"the output needs about 5 MB; nothing was written, free space and re-run$"), atomic_file(final, needed_bytes=5_000_000):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors' words
    assert listing(tmp_path) == {}


def test_a_place_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("in the way")
    final = tmp_path / "file" / "out.bin"
    with pytest.raises(WriteError, match=rf"^{final}: cannot write there \(File exists\); choose another output$"), atomic_file(final, fix="choose another output"):
        pytest.fail("the block ran")
    assert listing(tmp_path) == {"file": b"in the way"}


def test_a_dead_writers_partial_is_cleaned_first(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / f".out.bin.partial-{socket.gethostname()}-{proc.pid}").write_bytes(b"left by a killed run")
    with atomic_file(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"whole")
    assert listing(tmp_path) == {"out.bin": b"whole"}


def test_no_module_imports_the_private_partial_path():
    """Writers use atomic_dir/atomic_file rather than hand-rolling the aside-and-rename with files._partial_path."""
    root = Path(__file__).resolve().parent.parent / "loradem"
    users = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "files.py" and "_partial_path" in p.read_text()]
    assert users == []
