"""Safe outputs and fingerprints.

Every output folder or file is written aside (``.<name>.partial-<host>-<pid>``) and
renamed into place only when complete, so an interrupted run leaves no half
output behind and earlier results stay intact. Fingerprints are sha256 over
file contents (safetensors has no checksum of its own).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from loradem.errors import LorademError


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over (name, content hash) of each file, in name order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def fingerprint_weights(folder: str | Path) -> str:
    """Fingerprint of a model or adapter folder's safetensors files, cached in memory per (path, size, mtime)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LorademError(f"{folder}: no .safetensors weights found")
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _FP_CACHE:
        _FP_CACHE[key] = fingerprint_files(files)
    return _FP_CACHE[key]


_FP_CACHE: dict[tuple, str] = {}


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short hash of a JSON-able object (sorted keys), for content-addressed folder names."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _partial_path(final: Path) -> Path:
    return final.parent / f".{final.name}.partial-{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OSError:
        return False
    return True


def _is_leftover(partial: Path, name: str, kind: str = "partial") -> bool:
    """Whether `partial` (``.<name>.<kind>-<host>-<pid>``, or ``-<pid>`` from before hosts were named) was left
    by a process that is gone: one of this host's, not running any more, or this very process. A live writer's
    partial, and any other host's (its pid means nothing here), is left alone."""
    tag = partial.name[len(f".{name}.{kind}-"):]
    host, _, pid = tag.rpartition("-")
    if not pid.isdigit() or (host and host != socket.gethostname()):
        return False
    return int(pid) == os.getpid() or not _pid_alive(int(pid))


def clean_partials(parent: Path, name: str) -> None:
    """Remove leftovers of interrupted writes of `name` in `parent` (never a live writer's; see `_is_leftover`).

    A replaced folder is moved to ``.<name>.old-<host>-<pid>`` just before the new one is renamed into place;
    a writer killed between the two renames leaves no `name` at all, so its old folder is put back (the
    earlier result survives), and otherwise it is deleted.
    """
    if not parent.is_dir():
        return
    for p in parent.glob(f".{name}.partial-*"):
        if _is_leftover(p, name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in parent.glob(f".{name}.old-*"):
        if _is_leftover(p, name, "old"):
            if not (parent / name).exists():
                os.replace(p, parent / name)
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False, *, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a scratch folder that becomes `final` only if the block finishes.

    On an exception the scratch folder is removed and `final` is untouched.
    With overwrite=True an existing `final` is replaced (the old one is moved
    away first and deleted only after the new one is in place). A place that
    cannot be written (read-only, a plain file in the path) and a disk that
    fills up are one-line errors; `needed_bytes` says how much the output takes.
    """
    final = Path(final)
    clean_partials(final.parent, final.name)  # first: it may put an interrupted replace's old folder back
    if final.exists() and not overwrite:
        raise LorademError(f"{final}: already exists (pass --overwrite to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial_path(final)
        tmp.mkdir()
    except OSError as exc:
        raise LorademError(f"{final}: cannot write there ({exc.strerror or exc}); choose another output folder") from None
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            need = f"; the output needs about {needed_bytes / 1e6:,.0f} MB" if needed_bytes else ""
            raise LorademError(f"{final}: the disk is full ({exc.strerror}){need}; nothing was written, free space and re-run") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{socket.gethostname()}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` aside, then rename it into place: `path` is either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def yaml_problem(exc: Exception, *, column: bool = True) -> str:
    """A YAML parse error as 'line L, column C: not valid YAML (problem)'."""
    mark = getattr(exc, "problem_mark", None)
    where = (f"line {mark.line + 1}, column {mark.column + 1}: " if column else f"line {mark.line + 1}: ") if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}not valid YAML ({problem})"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorademError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise LorademError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
