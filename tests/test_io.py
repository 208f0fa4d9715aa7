"""loradem.files: write aside and rename; leftovers of dead writers are cleaned, a live writer's are not."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


# ---- the fingerprint cache ------------------------------------------------------------

@pytest.fixture
def fp_cache(tmp_path, monkeypatch):
    """A fresh cache folder and a process that has hashed nothing; files count as settled at once; returns the
    list every full hash appends its file's name to."""
    from loradem import files

    monkeypatch.setenv("LORADEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "_FP_KNOWN", {})
    monkeypatch.setattr(files, "_FP_REHASH", False)
    monkeypatch.setattr(files, "SETTLE_NS", 0)
    hashed: list[str] = []
    real = files.sha256_file

    def counting(path, *args, **kw):
        hashed.append(Path(path).name)
        return real(path, *args, **kw)

    monkeypatch.setattr(files, "sha256_file", counting)
    return hashed


def weights_folder(folder: Path, shards: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    return folder


def full_fingerprint(folder: Path) -> str:
    """The fingerprint recomputed here from every byte, independently of loradem.files."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors"), key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def new_process(monkeypatch) -> None:
    """What a new run starts from: nothing hashed in this process (the cache file stays)."""
    from loradem import files

    monkeypatch.setattr(files, "_FP_KNOWN", {})


def test_fingerprint_cache_is_hit_by_the_next_run(fp_cache, tmp_path, monkeypatch):
    from loradem.files import fingerprint_weights, fingerprints_path

    base = weights_folder(tmp_path / "base", {"model-1.safetensors": b"one" * 1000, "model-2.safetensors": b"two"})
    first = fingerprint_weights(base)
    assert first == full_fingerprint(base) and sorted(fp_cache) == ["model-1.safetensors", "model-2.safetensors"]
    assert fingerprint_weights(base) == first and len(fp_cache) == 2  # the same process: remembered
    new_process(monkeypatch)
    assert fingerprint_weights(base) == first and len(fp_cache) == 2  # the next run: from the cache file
    record = json.loads(fingerprints_path().read_text())
    assert sorted(record["files"]) == sorted(str((base / n).resolve()) for n in ("model-1.safetensors", "model-2.safetensors"))
    assert not list(fingerprints_path().parent.glob(".fingerprints.json.partial-*"))


def test_fingerprint_cache_misses_when_a_file_changes(fp_cache, tmp_path, monkeypatch):
    from loradem.files import fingerprint_weights

    base = weights_folder(tmp_path / "base", {"a.safetensors": b"x" * 64, "b.safetensors": b"y" * 64})
    fingerprint_weights(base)
    st = (base / "a.safetensors").stat()
    os.utime(base / "a.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # same bytes, another mtime (past: settled)
    new_process(monkeypatch)
    assert fingerprint_weights(base) == full_fingerprint(base) and fp_cache[2:] == ["a.safetensors"]
    (base / "b.safetensors").write_bytes(b"y" * 65)  # new size (and content)
    new_process(monkeypatch)
    assert fingerprint_weights(base) == full_fingerprint(base) and fp_cache[3:] == ["b.safetensors"]
    replaced = tmp_path / "b2"  # same size, same mtime, another inode: a file renamed over it
    replaced.write_bytes(b"z" * 65)
    st = (base / "b.safetensors").stat()
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replaced, base / "b.safetensors")
    new_process(monkeypatch)
    assert fingerprint_weights(base) == full_fingerprint(base) and fp_cache[4:] == ["b.safetensors"]


def test_rehash_distrusts_the_cache(fp_cache, tmp_path, monkeypatch):
    """A cached hash that no longer matches the bytes (the file changed behind an unchanged stat) is used until
    rehash_weights(), which reads every file again and corrects the cache."""
    from loradem import files

    base = weights_folder(tmp_path / "base", {"model.safetensors": b"weights" * 100})
    right = files.fingerprint_weights(base)
    record = json.loads(files.fingerprints_path().read_text())
    (entry,) = record["files"].values()
    entry["sha256"] = "0" * 64
    files.fingerprints_path().write_text(json.dumps(record))
    new_process(monkeypatch)
    assert files.fingerprint_weights(base) != right and len(fp_cache) == 1  # trusted, by design
    files.rehash_weights()
    assert files.fingerprint_weights(base) == right == full_fingerprint(base) and len(fp_cache) == 2
    assert files.fingerprint_weights(base) == right and len(fp_cache) == 2  # hashed once per process
    monkeypatch.setattr(files, "_FP_REHASH", False)
    new_process(monkeypatch)
    assert files.fingerprint_weights(base) == right and len(fp_cache) == 2  # the cache file was corrected


@pytest.mark.parametrize("damage", ["garbage", "truncated", "one bad entry", "wrong version"])
def test_a_damaged_cache_file_is_ignored_whole_and_rebuilt(fp_cache, tmp_path, monkeypatch, damage):
    from loradem import files

    a = weights_folder(tmp_path / "a", {"model.safetensors": b"a" * 100})
    b = weights_folder(tmp_path / "b", {"model.safetensors": b"b" * 100})
    files.fingerprint_weights(a)
    files.fingerprint_weights(b)
    path = files.fingerprints_path()
    record = json.loads(path.read_text())
    for entry in record["files"].values():  # both poisoned, so any entry trusted would show
        entry["sha256"] = "f" * 64
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        path.write_text(json.dumps(record)[:-20])
    elif damage == "one bad entry":
        record["files"][str((b / "model.safetensors").resolve())]["size"] = "100"
        path.write_text(json.dumps(record))
    else:
        record["version"] = 99
        path.write_text(json.dumps(record))
    new_process(monkeypatch)
    assert files.fingerprint_weights(a) == full_fingerprint(a) and files.fingerprint_weights(b) == full_fingerprint(b)
    assert len(fp_cache) == 4  # nothing trusted: both hashed again
    rebuilt = json.loads(path.read_text())
    assert rebuilt["version"] == files.FINGERPRINTS_VERSION and len(rebuilt["files"]) == 2
    new_process(monkeypatch)
    files.fingerprint_weights(a)
    assert len(fp_cache) == 4


def test_a_file_written_just_now_is_not_remembered(fp_cache, tmp_path, monkeypatch):
    """File timestamps tick coarsely: a file changed within SETTLE_NS could be rewritten with the same stat."""
    from loradem import files

    monkeypatch.setattr(files, "SETTLE_NS", 3_600 * 10**9)
    base = weights_folder(tmp_path / "base", {"model.safetensors": b"fresh"})
    files.fingerprint_weights(base)
    files.fingerprint_weights(base)
    assert len(fp_cache) == 2 and not files.fingerprints_path().exists()


def test_an_unwritable_cache_is_no_error(fp_cache, tmp_path, monkeypatch):
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    monkeypatch.setenv("LORADEM_CACHE", str(blocker / "cache"))  # its parent is a file: nothing can be written
    from loradem.files import fingerprint_weights

    base = weights_folder(tmp_path / "base", {"model.safetensors": b"w" * 10})
    assert fingerprint_weights(base) == full_fingerprint(base)
    new_process(monkeypatch)
    assert fingerprint_weights(base) == full_fingerprint(base) and len(fp_cache) == 2
