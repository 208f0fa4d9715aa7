"""loradem.merge.st_writer: the streamed file is byte-identical to safetensors' own writer; misuse and failures leave nothing.

    pytest tests/test_st_writer.py
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loradem.merge import st_writer
from loradem.merge.st_writer import DTYPE_CODES, DirectFile, SafetensorsWriter, TensorSpec, file_order, save_streamed


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "model.layers.10.mlp.up_proj.weight": torch.randn(7, 5, generator=g, dtype=torch.float32),
        "model.layers.2.mlp.up_proj.weight": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(13, 3, generator=g).to(torch.float16),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "i16": torch.tensor([-300, 4], dtype=torch.int16),
        "i32": torch.tensor([[1], [2]], dtype=torch.int32),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "ünïcode.name": torch.ones(2, 2),
        "a": torch.ones(1),  # sorts before the longer names of its dtype
        "strided": torch.randn(6, 4, generator=g).T,  # not contiguous
    }
    return t


def test_byte_identical_to_save_file(tmp_path):
    tensors = mixed_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    digest = save_streamed(tensors, tmp_path / "mine.safetensors")  # packs a strided tensor itself
    ref, mine = (tmp_path / "ref.safetensors").read_bytes(), (tmp_path / "mine.safetensors").read_bytes()
    assert mine == ref
    assert digest == hashlib.sha256(ref).hexdigest()
    with safe_open(tmp_path / "mine.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(raw(got), raw(t)), name


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", sorted(DTYPE_CODES, key=str))
def test_every_dtype_alone_and_against_the_others(tmp_path, dtype):
    base = torch.arange(6).reshape(2, 3)
    t = base.to(torch.float32).to(dtype) if dtype.is_floating_point or dtype.is_complex else (base % 2 == 0 if dtype == torch.bool else base.to(dtype))
    tensors = {"x": t, "y": torch.ones(2), "z": torch.ones(3, dtype=torch.int64), "w": torch.ones(1, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    save_streamed(tensors, tmp_path / "mine.safetensors")
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_empty_file_and_no_metadata(tmp_path):
    save_file({}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    save_streamed({}, tmp_path / "mine.safetensors")
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    save_file({"a": torch.ones(3)}, tmp_path / "ref2.safetensors")
    save_streamed({"a": torch.ones(3)}, tmp_path / "mine2.safetensors", metadata=None)
    assert (tmp_path / "mine2.safetensors").read_bytes() == (tmp_path / "ref2.safetensors").read_bytes()


def test_order_follows_safetensors():
    specs = [TensorSpec("b", torch.float32, (1,)), TensorSpec("a", torch.bfloat16, (1,)),
             TensorSpec("c", torch.int64, (1,)), TensorSpec("a2", torch.float32, (1,))]
    assert [s.name for s in file_order(specs)] == ["c", "a2", "b", "a"]
    with pytest.raises(ValueError, match="tensor a is declared twice"):
        file_order([*specs, TensorSpec("a", torch.float32, (2,))])


@pytest.mark.parametrize("threaded", [True, False])
def test_misuse_raises_and_leaves_nothing(tmp_path, threaded):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"earlier")
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match=r"expected tensor a next \(safetensors order\), got b"):
        with SafetensorsWriter(path, specs, threaded=threaded) as w:
            w.write("b", torch.ones(3))
    with pytest.raises(ValueError, match=r"tensor a is torch\.float16 \[2\], declared torch\.float32 \[2\]"):
        with SafetensorsWriter(path, specs, threaded=threaded) as w:
            w.write("a", torch.ones(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"1 declared tensor\(s\) not written, first b"):
        with SafetensorsWriter(path, specs, threaded=threaded) as w:
            w.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, specs, threaded=threaded) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"earlier"
    assert not list(tmp_path.glob(".m.safetensors.partial-*"))


def test_write_error_in_the_thread_reaches_the_caller(tmp_path, monkeypatch):
    calls = []
    real = SafetensorsWriter._write_bytes

    def failing(self, data):
        calls.append(len(data))
        if len(calls) == 2:  # the header is written in the caller's thread, the tensors in the writer's
            raise OSError("disk full")
        real(self, data)

    path = tmp_path / "f.safetensors"
    specs = [TensorSpec(n, torch.float32, (4,)) for n in "abcd"]
    monkeypatch.setattr(SafetensorsWriter, "_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        with SafetensorsWriter(path, specs) as w:
            for s in w.order:
                w.write(s.name, torch.ones(4))
    assert len(calls) == 2  # nothing written after the failure
    assert not path.exists() and not list(tmp_path.glob(".f.safetensors.partial-*"))


def test_bytes_in_flight_stay_within_the_budget(tmp_path, monkeypatch):
    import time

    seen = []
    real = SafetensorsWriter._write_bytes

    def slow(self, data):
        seen.append(self.budget.used)
        time.sleep(0.002)  # a slow disk: the caller must wait instead of piling up tensors
        real(self, data)

    monkeypatch.setattr(SafetensorsWriter, "_write_bytes", slow)
    tensors = {f"t{i:02d}": torch.full((100,), float(i)) for i in range(30)}  # 400 bytes each
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "b.safetensors", specs, max_inflight_bytes=1000) as w:
        for s in w.order:
            w.write(s.name, tensors[s.name])
            seen.append(w.budget.used)
    assert max(seen) == 800  # two tensors of 400 bytes at most, and it did pipeline
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writers_sharing_a_budget_stay_within_it_together(tmp_path, monkeypatch):
    """A file closing in another thread while the next one fills: their bytes in flight count against one cap."""
    import threading
    import time

    from loradem.merge.st_writer import InflightBudget

    seen = []
    real = SafetensorsWriter._write_bytes

    def slow(self, data):
        seen.append(self.budget.used)
        time.sleep(0.002)
        real(self, data)

    monkeypatch.setattr(SafetensorsWriter, "_write_bytes", slow)
    budget = InflightBudget(1000)
    files = {name: {f"{name}{i:02d}": torch.full((100,), float(i)) for i in range(15)} for name in ("first", "second")}
    writers = {}
    for name, tensors in files.items():
        specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        writers[name] = w = SafetensorsWriter(tmp_path / f"{name}.safetensors", specs, budget=budget)
        for s in w.order:
            w.write(s.name, tensors[s.name])
            seen.append(budget.used)
        if name == "first":
            closing = threading.Thread(target=w.close)
            closing.start()  # still writing its last tensors while the second file fills
    writers["second"].close()
    closing.join()
    assert max(seen) <= 1000 and budget.used == 0
    for name, tensors in files.items():
        save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert (tmp_path / f"{name}.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
        assert writers[name].sha256 == hashlib.sha256((tmp_path / "ref.safetensors").read_bytes()).hexdigest()


# ---- O_DIRECT ------------------------------------------------------------------

def takes_o_direct(folder) -> bool:
    """Whether this file system accepts O_DIRECT (CI's temporary folder may be a tmpfs that refuses it)."""
    probe = folder / ".probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        return False
    probe.unlink()
    return True


def write_all(path, tensors, **kwargs) -> SafetensorsWriter:
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, specs, **kwargs) as w:
        for spec in w.order:
            w.write(spec.name, tensors[spec.name])
    return w


@pytest.mark.parametrize("threaded", [True, False])
def test_direct_writes_the_same_bytes(tmp_path, monkeypatch, threaded):
    # a staging buffer of two blocks: tensors cross it, fill it exactly and end mid-block
    monkeypatch.setattr(st_writer, "DIRECT_STAGING", 2 * st_writer.DIRECT_ALIGN)
    g = torch.Generator().manual_seed(1)
    tensors = {**mixed_tensors(), "big": torch.randn(3001, generator=g), "exact": torch.randn(2048, generator=g)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    w = write_all(tmp_path / "mine.safetensors", tensors, direct=True, threaded=threaded)
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert len(ref) % st_writer.DIRECT_ALIGN  # the tail is padded, then truncated away
    assert (tmp_path / "mine.safetensors").read_bytes() == ref
    assert w.sha256 == hashlib.sha256(ref).hexdigest()
    assert w.direct == takes_o_direct(tmp_path)


def test_direct_file_alone(tmp_path):
    data = bytes(range(256)) * 50  # 12800 bytes: three blocks and a partial one
    f = DirectFile(tmp_path / "d", staging=st_writer.DIRECT_ALIGN) if takes_o_direct(tmp_path) else None
    if f is None:
        pytest.skip("this file system refuses O_DIRECT")
    for start in range(0, len(data), 1000):
        assert f.write(data[start : start + 1000]) == len(data[start : start + 1000])
    f.close()
    f.close()  # idempotent, as for a file object
    assert (tmp_path / "d").read_bytes() == data
    with pytest.raises(ValueError, match="staging: expected a multiple of 4096 bytes, got 1000"):
        DirectFile(tmp_path / "e", staging=1000)


def test_refused_o_direct_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    tensors = mixed_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    w = write_all(tmp_path / "mine.safetensors", tensors, direct=True)
    assert not w.direct
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_direct_failure_leaves_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"earlier")
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))]
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, specs, direct=True) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"earlier"
    assert not list(tmp_path.glob(".m.safetensors.partial-*"))


def test_a_refused_direct_write_drops_o_direct_and_keeps_the_bytes(tmp_path, monkeypatch):
    import fcntl

    if not takes_o_direct(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open")
    real_write, refused = os.write, []

    def picky(fd, data):  # a file system that opens with O_DIRECT but refuses O_DIRECT writes
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(st_writer, "DIRECT_STAGING", st_writer.DIRECT_ALIGN)
    monkeypatch.setattr(os, "write", picky)
    tensors = {**mixed_tensors(), "big": torch.randn(5000, generator=torch.Generator().manual_seed(2))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    w = write_all(tmp_path / "mine.safetensors", tensors, direct=True)
    assert len(refused) == 1 and not w.direct
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
