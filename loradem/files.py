"""Safe outputs and fingerprints.

Every output folder or file is written aside (``.<name>.partial-<host>-<pid>``) and
renamed into place only when complete, so an interrupted run leaves no half
output behind and earlier results stay intact. A disk that is full or
read-only while writing is one line naming the output and what to do (`disk_error`,
a `WriteError`: exit status 2). Fingerprints are sha256 over
file contents (safetensors has no checksum of its own); a weights file's sha256 is
remembered across runs while its stat stays the same (`weights_sha256`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import threading
import time
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
    """sha256 over (name, content hash) of each file, in name order; each content hash from `weights_sha256`."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(weights_sha256(p).encode())
    return h.hexdigest()


def fingerprint_weights(folder: str | Path) -> str:
    """Fingerprint of a model or adapter folder's safetensors files (their hashes cached, see `weights_sha256`)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LorademError(f"{folder}: no .safetensors weights found")
    return fingerprint_files(files)


# ---- the fingerprint cache ------------------------------------------------------
# A base of a few GB takes seconds to hash, and every stage fingerprints it: each weights file's
# sha256 is remembered in <cache>/fingerprints.json, keyed by its resolved path and what its stat
# says (size, mtime, ctime, inode, device), so a file rewritten or replaced is hashed again. A file
# changed in the last SETTLE_NS is hashed but not remembered: file timestamps tick coarsely (a few
# ms), so a rewrite of the same size right after the hash could keep the same stat.
# `rehash_weights()` (`loradem assemble --rehash`) distrusts the file for the rest of the process.

FINGERPRINTS_FILE = "fingerprints.json"
FINGERPRINTS_VERSION = 1
MAX_FINGERPRINTS = 1000  # entries kept in the cache file; files that are gone or changed are dropped first
SETTLE_NS = 2_000_000_000
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode", "device")
_SHA256_HEX = frozenset("0123456789abcdef")
_FP_LOCK = threading.Lock()
_FP_KNOWN: dict[str, tuple[tuple[int, ...], str]] = {}  # resolved path -> (stat key, sha256), this process
_FP_REHASH = False


def rehash_weights() -> None:
    """For the rest of this process, ignore the fingerprint cache file: every weights file is read and hashed
    in full once more (and the fresh hashes replace the cached ones)."""
    global _FP_REHASH
    with _FP_LOCK:
        _FP_REHASH = True
        _FP_KNOWN.clear()


def weights_sha256(path: str | Path) -> str:
    """sha256 of one weights file, hashed once and then remembered (in this process and in the cache file)
    while the file's size, mtime, ctime, inode and device stay the same."""
    real = Path(path).resolve()
    key = _stat_key(real)
    with _FP_LOCK:
        known = _FP_KNOWN.get(str(real))
        if known is None and not _FP_REHASH:
            known = _read_fingerprints().get(str(real))
        if known is not None and known[0] == key:
            _FP_KNOWN[str(real)] = known
            return known[1]
    digest = sha256_file(real)
    if _stat_key(real) != key or time.time_ns() - max(key[1], key[2]) < SETTLE_NS:
        return digest  # written to while being read, or so recently that a rewrite could keep its stat
    with _FP_LOCK:
        _FP_KNOWN[str(real)] = (key, digest)
        _store_fingerprint(str(real), key, digest)
    return digest


def fingerprints_path() -> Path:
    from loradem.model.base import cache_root  # loradem.model.base imports this module

    return cache_root() / FINGERPRINTS_FILE


def _stat_key(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _read_fingerprints() -> dict[str, tuple[tuple[int, ...], str]]:
    """The cache file's entries; a missing, unreadable or malformed file (any entry) is empty: all or nothing."""
    try:
        data = json.loads(fingerprints_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != FINGERPRINTS_VERSION or not isinstance(data.get("files"), dict):
        return {}
    entries = {}
    for name, entry in data["files"].items():
        if not isinstance(entry, dict) or set(entry) != {*_STAT_FIELDS, "sha256"}:
            return {}
        key = tuple(entry[f] for f in _STAT_FIELDS)
        digest = entry["sha256"]
        if not all(type(v) is int for v in key) or not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            return {}
        entries[name] = (key, digest)
    return entries


def _store_fingerprint(name: str, key: tuple[int, ...], digest: str) -> None:
    """Add one entry to the cache file (written aside and renamed); entries whose file is gone or changed are
    dropped. A cache that cannot be written is no error: the next run hashes again."""
    entries = _read_fingerprints()
    entries.pop(name, None)
    for other, (other_key, _) in list(entries.items()):
        try:
            fresh = _stat_key(Path(other)) == other_key
        except OSError:
            fresh = False
        if not fresh:
            del entries[other]
    entries[name] = (key, digest)  # last: the oldest entries are the first dropped beyond the limit
    kept = list(entries.items())[-MAX_FINGERPRINTS:]
    files = {n: {**dict(zip(_STAT_FIELDS, k)), "sha256": d} for n, (k, d) in kept}
    with contextlib.suppress(OSError):  # the writers' WriteError is an OSError too; no partial file is left
        atomic_write_text(fingerprints_path(), json.dumps({"version": FINGERPRINTS_VERSION, "files": files}, indent=1) + "\n")


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


# ---- a full or read-only disk ----------------------------------------------------

ANOTHER_FOLDER = "choose another output folder"
# errno, and the words with which libraries that catch the OSError report it (safetensors: "os error 28",
# SQLite: "database or disk is full", torch: the strerror)
_DISK_WORDS = {
    errno.ENOSPC: ("no space left on device", "os error 28", "database or disk is full"),
    errno.EDQUOT: ("disk quota exceeded", "os error 122"),
    errno.EROFS: ("read-only file system", "os error 30", "readonly database"),
}
_NEARLY_FULL = 1 << 20  # bytes
_TORCH_WRITER = ("inline_container", "PytorchStreamWriter")  # torch.save's errors


class WriteError(LorademError, OSError):
    """An output that cannot be written (a full or read-only disk, a plain file in its path): a LorademError (one
    line, exit status 2) that is still the OSError it was (its `errno`), for code that tolerates failed writes."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.errno = code


def _file_system(path: Path):
    """os.statvfs of the file system holding `path` (or its nearest existing parent), or None."""
    for p in (path, *path.parents):
        try:
            return os.statvfs(p)
        except OSError:
            continue
    return None


def _disk_errno(exc: BaseException, where: Path | None) -> int | None:
    """ENOSPC, EDQUOT or EROFS when `exc`, or an exception it was raised from, says the disk is full or read-only
    (an OSError's errno, or a library's wording of it). Otherwise, from the file system at `where` (None: not a
    local path): EROFS when it is mounted read-only (SQLite says only "unable to open database file"), and ENOSPC
    for torch's file writer failing while it has no space left (torch.save reports a full disk only as a short
    write)."""
    if isinstance(exc, LorademError):
        return None
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in _DISK_WORDS:
            return e.errno
    for e in chain:
        text = str(e).lower()
        for code, words in _DISK_WORDS.items():
            if any(w in text for w in words):
                return code
    fs = _file_system(Path(where)) if where is not None else None
    if fs is None:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize  # root may use the reserved blocks
    torch_writer = isinstance(exc, RuntimeError) and any(w in str(exc) for w in _TORCH_WRITER)
    return errno.ENOSPC if torch_writer and free < _NEARLY_FULL else None


def _megabytes(n: int) -> str:
    return f"{-(-n // 1_000_000):,} MB"  # rounded up: what to free


def _kilobytes(n: int) -> str:
    return f"{-(-n // 1000):,} kB"


def disk_error(path: str | Path, exc: BaseException, *, needed_bytes: int | None = None,
               written_bytes: int | None = None, fix: str = ANOTHER_FOLDER, kept: str = "nothing was written",
               local: bool = True) -> WriteError | None:
    """The one-line error for a write to `path` that failed because the disk is full or read-only, or None when
    `exc` is something else. A full disk says how much the output needs (`needed_bytes`) or how much had been
    written when it filled (`written_bytes`), what was `kept`, and to free space; a read-only one says `fix`.
    `local=False`: `path` names no file of this machine (a database server's URL)."""
    if isinstance(exc, WriteError):
        return exc if exc.errno in _DISK_WORDS else None
    code = _disk_errno(exc, Path(path) if local else None)
    if code is None:
        return None
    reason = exc.strerror if isinstance(exc, OSError) and exc.errno == code and exc.strerror else os.strerror(code)
    if code == errno.EROFS:
        return WriteError(f"{path}: cannot write there ({reason}); {fix}", code)
    if needed_bytes:
        size = f"; the output needs about {_megabytes(needed_bytes)}"
    elif written_bytes:
        size = f" after {_kilobytes(written_bytes)} of the output"
    else:
        size = ""
    return WriteError(f"{path}: the disk is full ({reason}){size}; {kept}, free space and re-run", code)


def _cannot_write(path: Path, exc: OSError, fix: str) -> WriteError:
    """A place that cannot be written: a full or read-only disk, a plain file in the path, no permission."""
    return disk_error(path, exc, fix=fix) or WriteError(f"{path}: cannot write there ({exc.strerror or exc}); {fix}", exc.errno)


def make_dir(folder: str | Path, *, fix: str = ANOTHER_FOLDER) -> Path:
    """`mkdir -p` whose failure is one line naming the folder (see `_cannot_write`)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(folder, exc, fix) from None
    return folder


@contextlib.contextmanager
def disk_writes(path: str | Path, *, fix: str = ANOTHER_FOLDER, kept: str = "nothing was written",
                local: bool = True) -> Iterator[None]:
    """Turn a full or read-only disk inside the block, however the library reports it, into `disk_error`'s one line
    about `path`; any other exception passes unchanged."""
    try:
        yield
    except Exception as exc:  # re-raised unless it is a disk error
        error = disk_error(path, exc, fix=fix, kept=kept, local=local)
        if error is None or error is exc:
            raise
        raise error from None


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False, *, needed_bytes: int | None = None,
               fix: str = ANOTHER_FOLDER) -> Iterator[Path]:
    """Yield a scratch folder that becomes `final` only if the block finishes.

    On an exception the scratch folder is removed and `final` is untouched.
    With overwrite=True an existing `final` is replaced (the old one is moved
    away first and deleted only after the new one is in place). A place that
    cannot be written (read-only, a plain file in the path) and a disk that
    fills up, in the block too, are one-line errors (`disk_error`; `fix` says
    what to do about a place that cannot be written); `needed_bytes` says how
    much the output takes.
    """
    with _aside(Path(final), overwrite, needed_bytes, fix, folder=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(final: str | Path, overwrite: bool = False, *, needed_bytes: int | None = None,
                fix: str = ANOTHER_FOLDER) -> Iterator[Path]:
    """Yield an empty scratch file beside `final` (``.<name>.partial-<host>-<pid>``) that is renamed to `final` only
    if the block finishes; for a writer that takes a path and writes one file over a while.

        with atomic_file(run_dir / "model.gguf", overwrite=True, needed_bytes=size) as tmp:
            writer.write_to(tmp)

    On any exception, Ctrl-C included, the scratch file is removed and `final` is untouched. An existing `final` is
    replaced only with overwrite=True. Errors are `atomic_dir`'s: a full or read-only disk, in the block too, is
    `disk_error`'s one line about `final`.
    """
    with _aside(Path(final), overwrite, needed_bytes, fix, folder=False) as tmp:
        yield tmp


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _aside(final: Path, overwrite: bool, needed_bytes: int | None, fix: str, *, folder: bool) -> Iterator[Path]:
    """`atomic_dir` (folder=True) and `atomic_file`: a scratch folder or file beside `final`, renamed into place."""
    clean_partials(final.parent, final.name)  # first: it may put an interrupted replace's old folder back
    if final.exists() and not overwrite:
        raise LorademError(f"{final}: already exists (pass --overwrite to replace it)")
    tmp = _partial_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir() if folder else tmp.touch(exist_ok=False)
    except OSError as exc:
        raise _cannot_write(final, exc, fix) from None
    try:
        yield tmp
    except Exception as exc:  # re-raised unless it is a disk error
        written = None if needed_bytes else (_tree_bytes(tmp) if folder else _file_bytes(tmp))
        kept = "the partial output was removed" if written else "nothing was written"
        error = disk_error(final, exc, needed_bytes=needed_bytes, written_bytes=written, fix=fix, kept=kept)
        _remove(tmp)
        if error is None or error is exc:
            raise
        raise error from None
    except BaseException:
        _remove(tmp)
        raise
    old = None
    try:
        if folder and final.exists():  # a folder cannot be renamed over another: the old one goes aside first
            old = final.parent / f".{final.name}.old-{socket.gethostname()}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        if old is not None and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)
        _remove(tmp)
        raise _cannot_write(final, exc, fix) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def atomic_write_files(files: dict[Path, bytes], *, fix: str = ANOTHER_FOLDER) -> None:
    """Write every file aside, then rename them all into place: if one cannot be written (a full or read-only
    disk is `disk_error`'s one line), none is replaced and no partial file is left."""
    pending: list[tuple[Path, Path]] = []
    path = None
    try:
        for path, data in files.items():
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _cannot_write(path, exc, fix) from None
            pending.append((_partial_path(path), path))  # before writing: a half-written file is removed too
            pending[-1][0].write_bytes(data)
        for tmp, path in pending:
            os.replace(tmp, path)
    except Exception as exc:  # re-raised unless it is a disk error
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        error = disk_error(path, exc, needed_bytes=sum(len(d) for d in files.values()), fix=fix)
        if error is None or error is exc:
            raise
        raise error from None


def atomic_write_bytes(path: str | Path, data: bytes, *, fix: str = ANOTHER_FOLDER) -> None:
    """Write `data` aside, then rename it into place: `path` is either the old file or the whole new one."""
    atomic_write_files({Path(path): data}, fix=fix)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def yaml_problem(exc: Exception, *, column: bool = True) -> str:
    """A YAML parse error as 'line L, column C: not valid YAML (problem)'."""
    mark = getattr(exc, "problem_mark", None)
    where = (f"line {mark.line + 1}, column {mark.column + 1}: " if column else f"line {mark.line + 1}: ") if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}not valid YAML ({problem})"


def json_text(obj: Any) -> str:
    """How loradem writes a JSON file: indented, keys in their order, a newline at the end."""
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorademError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise LorademError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
