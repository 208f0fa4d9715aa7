"""loradem.files: write aside and rename; leftovers of dead writers are cleaned, a live writer's are not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from loradem.errors import LorademError
from loradem.files import atomic_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_removes_dead_writers_partials_and_keeps_live_and_other_hosts(tmp_path):
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".out.partial-{host}-{dead_pid()}",
            "legacy_dead": f".out.partial-{dead_pid()}",
            "mine": f".out.partial-{host}-{os.getpid()}",
            "live": f".out.partial-{host}-{live.pid}",
            "other_host": f".out.partial-not-{host}-{dead_pid()}",
            "other_name": f".outer.partial-{host}-{dead_pid()}",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "half.bin").write_bytes(b"x")
        with atomic_dir(tmp_path / "out") as scratch:
            assert scratch.name == f".out.partial-{host}-{os.getpid()}" and not any(scratch.iterdir())
            (scratch / "done.txt").write_text("ok")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["out", names["live"], names["other_host"], names["other_name"]])
        assert (tmp_path / "out" / "done.txt").read_text() == "ok"
    finally:
        live.kill()
        live.wait()


def test_atomic_dir_leaves_no_partial_and_keeps_the_old_folder_on_failure(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "out", overwrite=True) as scratch:
            (scratch / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_a_dead_writers_old_folder_is_removed_or_put_back(tmp_path):
    """kill -9 during an --overwrite replace leaves `.<name>.old-<host>-<pid>`: removed when the new folder is in
    place, put back when the writer died between the two renames (so the earlier result survives)."""
    host = socket.gethostname()
    replaced = tmp_path / "a"
    replaced.mkdir()
    (replaced / "new.txt").write_text("new")
    (tmp_path / f".a.old-{host}-{dead_pid()}").mkdir()
    between = tmp_path / f".b.old-{host}-{dead_pid()}"
    between.mkdir()
    (between / "model.txt").write_text("earlier")
    with atomic_dir(tmp_path / "a", overwrite=True) as scratch:
        (scratch / "x").write_text("1")
    with pytest.raises(LorademError, match="already exists"):  # put back, so it is an existing result again
        with atomic_dir(tmp_path / "b"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "b" / "model.txt").read_text() == "earlier"
