"""Write a safetensors file one tensor at a time: peak memory is the tensors in flight, never the file.

    from loradem.merge.st_writer import SafetensorsWriter, TensorSpec
    specs = [TensorSpec("w", torch.bfloat16, (4096, 4096)), TensorSpec("b", torch.float32, (4096,))]
    with SafetensorsWriter("model.safetensors", specs) as writer:
        for spec in writer.order:                 # the file's order (safetensors': dtype, then name)
            writer.write(spec.name, make(spec))   # each tensor's bytes go to disk now
    writer.sha256                                 # of the whole file, hashed from the bytes as written

Contract:
- Byte-identical to ``safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})``
  (safetensors 0.8): an 8-byte little-endian header length, the JSON header
  (``__metadata__`` first, then every tensor's dtype, shape and data_offsets in
  data order, compact separators) padded with spaces to a multiple of 8, then
  the data, ordered by dtype (widest first, safetensors' enum order) and then
  by name. The header is known up front from the specs, so each tensor is
  written as soon as it exists; tests compare both writers byte for byte.
- Tensors must arrive in `order` with the declared dtype and shape; anything
  else raises before a byte of it is written.
- Written aside (``.<name>.partial-<pid>``) and renamed when every tensor is
  in; an exception, or leaving the ``with`` block early, removes the partial
  file and leaves any earlier file at `path` intact.
- ``threaded=True`` (the default) writes in one background thread and hashes
  in another, so the caller computes the next tensor while the previous ones
  go to disk and through sha256. Tensors handed over and not yet through both
  stay alive; the caller waits while they exceed ``max_inflight_bytes``
  (256 MB; one tensor is always let through, whatever its size). Writers given
  one `InflightBudget` share that cap, so one file can finish (``close`` in
  another thread) while the next one is being filled.
- ``direct=True`` writes with O_DIRECT (`DirectFile`): the bytes go from an
  aligned staging buffer to the disk without passing through the page cache.
  The file is the same byte for byte. Where the file system refuses O_DIRECT
  the writer falls back to ordinary writes (``writer.direct`` says which ran).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

# safetensors' Dtype enum, in declaration order; a file's data is sorted by it, widest last -> first
DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {code: i for i, code in enumerate(DTYPE_ORDER)}
DEFAULT_METADATA = {"format": "pt"}
QUEUE_DEPTH = 3  # tensors waiting for each background thread (measured: 1 -> 3 saves ~0.5 s of 6 on 1.9 GB)
MAX_INFLIGHT_BYTES = 256 * 1024 * 1024  # tensor bytes handed to the threads and not yet written and hashed
DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of the logical block size (4096 covers 512 too)
DIRECT_STAGING = 8 * 1024 * 1024  # bytes gathered before each O_DIRECT write


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor of the file will be: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def code(self) -> str:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {self.name}: dtype {self.dtype} has no safetensors code")
        return DTYPE_CODES[self.dtype]


def file_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The order safetensors lays tensors out in: dtype (enum order, descending), then name."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"tensor {dup} is declared twice")
    return sorted(specs, key=lambda s: (-_RANK[s.code], s.name.encode("utf-8")))


def header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = DEFAULT_METADATA) -> bytes:
    """The 8-byte length prefix and the padded JSON header for tensors already in `file_order`."""
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for s in specs:
        entries[s.name] = {"dtype": s.code, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's data as raw little-endian bytes (a view, no copy when `t` is contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


class InflightBudget:
    """Tensor bytes handed to writers' threads and not yet through them, capped at `limit` across every
    writer given this budget (one tensor is always let through, whatever its size)."""

    def __init__(self, limit: int = MAX_INFLIGHT_BYTES):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def take(self, n: int, failed: Callable[[], bool]) -> None:
        """Wait until `n` more bytes fit (or `failed()`), then count them."""
        with self._cond:
            while self.used and self.used + n > self.limit and not failed():
                self._cond.wait(0.05)
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class DirectFile:
    """A write-only file opened with O_DIRECT: ``write`` gathers bytes into a page-aligned staging buffer
    and writes it whole, so every write is aligned; ``close`` writes the tail padded to the alignment and
    truncates the file to its true length.

    Why: a folded model is written once and read back later (if at all), and on some machines (VMs whose
    memory the host reclaims) filling the page cache costs more CPU than the fold. `open` raises OSError
    (EINVAL) where the file system refuses O_DIRECT; callers fall back to a buffered file.
    """

    def __init__(self, path: str | Path, staging: int | None = None):
        if not hasattr(os, "O_DIRECT"):
            raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform", str(path))
        self.path = Path(path)
        staging = staging or DIRECT_STAGING
        if staging % DIRECT_ALIGN:
            raise ValueError(f"staging: expected a multiple of {DIRECT_ALIGN} bytes, got {staging}")
        self._buf = mmap.mmap(-1, staging)  # anonymous mappings are page-aligned
        self._view = memoryview(self._buf)
        self._used = 0
        self._size = 0
        self.closed = False
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self.direct = True  # False once a refused write made it fall back to the page cache

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        done, n = 0, len(data)
        while done < n:
            take = min(n - done, len(self._buf) - self._used)
            self._view[self._used : self._used + take] = data[done : done + take]
            self._used += take
            done += take
            if self._used == len(self._buf):
                self._flush(self._used)
        self._size += n
        return n

    def _flush(self, length: int) -> None:
        """Write the first `length` bytes of the staging buffer (a multiple of DIRECT_ALIGN)."""
        written = 0
        while written < length:
            try:
                written += os.write(self._fd, self._view[written:length])
            except OSError as exc:
                # some file systems open with O_DIRECT but refuse the writes (or want a larger alignment):
                # Linux lets the flag be dropped on the open file, and the same bytes go through the page cache
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
        self._used = 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._used:
                tail = self._used
                padded = -(-tail // DIRECT_ALIGN) * DIRECT_ALIGN
                self._view[tail:padded] = bytes(padded - tail)
                self._flush(padded)
                os.ftruncate(self._fd, self._size)  # drop the padding
        finally:
            os.close(self._fd)
            self._view.release()
            self._buf.close()


def open_for_writing(path: Path, direct: bool):
    """(file, whether it is O_DIRECT): `DirectFile` when asked and the file system takes it, else buffered."""
    if direct:
        try:
            return DirectFile(path), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return open(path, "wb"), False


class _Stage:
    """One background thread applying `fn` to each item of a queue, in order, then `done(item)`; it
    remembers its first error and skips `fn` for the rest."""

    def __init__(self, fn, name: str, done):
        self.fn, self.done, self.error = fn, done, None
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.fn(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = exc
            self.done(item)
            del item

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


class SafetensorsWriter:
    """Stream tensors into one safetensors file; see the module docstring for the contract."""

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str] | None = DEFAULT_METADATA,
        *,
        threaded: bool = True,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        budget: InflightBudget | None = None,
        direct: bool = False,
    ):
        if sys.byteorder != "little":
            raise RuntimeError("loradem's safetensors writer needs a little-endian machine")
        self.path = Path(path)
        self.order: list[TensorSpec] = file_order(specs)
        head = memoryview(header(self.order, metadata))
        self.size = len(head) + sum(s.nbytes for s in self.order)
        self._next = 0
        self._hash = hashlib.sha256()
        self._digest: str | None = None
        self._partial = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        # writing and hashing take about as long as folding: each in its own thread, in file order;
        # the caller waits while more than the budget's bytes are handed over and not yet through both
        self.budget = budget or InflightBudget(max_inflight_bytes)
        self._left: dict[int, int] = {}  # id(data) -> stages not yet done with it
        self._left_lock = threading.Lock()
        self._file, self.direct = open_for_writing(self._partial, direct)
        self._write_bytes(head)
        self._hash.update(head)
        self._stages = [_Stage(self._write_bytes, f"write {self.path.name}", self._through),
                        _Stage(self._hash.update, f"hash {self.path.name}", self._through)] if threaded else []

    # ---- writing -----------------------------------------------------------

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of `order`; the caller must not modify `tensor` afterwards."""
        self._raise_from_threads()
        if self._next >= len(self.order):
            raise ValueError(f"{self.path.name}: tensor {name} is one more than the {len(self.order)} declared")
        spec = self.order[self._next]
        if name != spec.name:
            raise ValueError(f"{self.path.name}: expected tensor {spec.name} next (safetensors order), got {name}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path.name}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                f"declared {spec.dtype} {list(spec.shape)}"
            )
        data = tensor_bytes(tensor)  # a view: keeps the tensor alive until both threads are done with it
        self._next += 1
        if not self._stages:
            self._write_bytes(data)
            self._hash.update(data)
            return
        self.budget.take(len(data), self._failed)
        with self._left_lock:
            self._left[id(data)] = len(self._stages)
        for stage in self._stages:
            stage.queue.put(data)
        self._raise_from_threads()

    def close(self) -> Path:
        """Finish: every declared tensor must have been written; the file appears at `path`."""
        self._stop_threads()
        self._raise_from_threads()
        if self._next != len(self.order):
            missing = self.order[self._next].name
            raise ValueError(f"{self.path.name}: {len(self.order) - self._next} declared tensor(s) not written, first {missing}")
        self._file.close()
        self.direct = self.direct and getattr(self._file, "direct", False)
        os.replace(self._partial, self.path)
        self._digest = self._hash.hexdigest()
        return self.path

    def abort(self) -> None:
        """Drop the partial file (earlier files at `path` stay)."""
        self._stop_threads()
        if not self._file.closed:
            self._file.close()
        self._partial.unlink(missing_ok=True)

    @property
    def sha256(self) -> str:
        if self._digest is None:
            raise RuntimeError(f"{self.path.name}: sha256 is known once the file is closed")
        return self._digest

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    # ---- internals -----------------------------------------------------------

    def _write_bytes(self, data: memoryview) -> None:
        self._file.write(data)

    def _through(self, data: memoryview) -> None:
        """Called by each stage when done with `data`; the last one returns its bytes to the budget."""
        with self._left_lock:
            self._left[id(data)] -= 1
            last = not self._left[id(data)]
            if last:
                del self._left[id(data)]
        if last:
            self.budget.give(len(data))

    def _failed(self) -> bool:
        return any(stage.error is not None for stage in self._stages)

    def _stop_threads(self) -> None:
        for stage in self._stages:
            stage.stop()

    def _raise_from_threads(self) -> None:
        for stage in self._stages:
            if stage.error is not None:
                self._stop_threads()  # a failed stage skips what is still queued
                error, stage.error = stage.error, None
                raise error


def save_streamed(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = DEFAULT_METADATA) -> str:
    """Write a dict of tensors like ``save_file`` does, through the streaming writer; returns the file's sha256."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for spec in writer.order:
            writer.write(spec.name, tensors[spec.name])
    return writer.sha256
