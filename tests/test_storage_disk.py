"""A disk that is full (ENOSPC) or read-only (EROFS) while loradem writes: training checkpoints, the search's study
and results, learned weights, the report, an assembled model. Each is one line naming the output and what to do
(a `WriteError`, which the CLI prints with exit status 2), no partial file or folder is left, and earlier results
stay as they were.

Most tests make the low-level write at that point raise what a full or read-only disk raises there (root
ignores file modes, so a chmod would not fail); where this machine lets root mount a tmpfs, the assembly and
training tests also run on a real full or read-only one.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import test_search
from test_report import METRICS, make_rows
from test_search import VALIDATION, make_job
from test_train import addition_source, job, make_recipe, recipe_dict

from loradem.errors import LorademError
from loradem.evaluate.report import write_report
from loradem.files import WriteError, atomic_write_files, disk_error
from loradem.merge.search import search_weights
from loradem.recipe import Recipe
from loradem.train.sft import train_source

adapters = test_search.adapters  # a fixture, found by its name here
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EROFS = OSError(errno.EROFS, "Read-only file system")


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden partials included) and its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_writes(monkeypatch, name_part: str, error: OSError) -> list[str]:
    """Make Path.write_bytes raise `error` for a path whose name contains `name_part` (after writing half of it,
    as a filling disk does); returns the names it refused."""
    real, refused = Path.write_bytes, []

    def write_bytes(self, data):
        if name_part in self.name:
            refused.append(self.name)
            real(self, data[: len(data) // 2])
            raise error
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return refused


# ---- the helper ------------------------------------------------------------------------------------

def test_a_set_of_files_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"old {name}")
    before = digests(tmp_path)
    refused = fail_writes(monkeypatch, "c.txt", ENOSPC)
    with pytest.raises(WriteError) as err:
        atomic_write_files({tmp_path / f"{n}.txt": b"new" * 1000 for n in "abc"})
    assert refused == [f".c.txt.partial-{refused[0].split('partial-')[1]}"]
    assert str(err.value) == (f"{tmp_path / 'c.txt'}: the disk is full (No space left on device); the output needs about 1 MB; "
                              "nothing was written, free space and re-run")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, LorademError) and isinstance(err.value, OSError)
    assert digests(tmp_path) == before  # a and b were written aside and removed again: none replaced, no partial

    fail_writes(monkeypatch, "a.txt", EROFS)
    with pytest.raises(WriteError, match=r"/a.txt: cannot write there \(Read-only file system\); choose another output folder$"):
        atomic_write_files({tmp_path / f"{n}.txt": b"new" for n in "abc"})
    assert digests(tmp_path) == before


@pytest.mark.parametrize("exc, code", [
    (ENOSPC, errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (EROFS, errno.EROFS),
    # what the libraries raise, as measured on a full and a read-only tmpfs
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),  # safetensors
    (RuntimeError('Error while serializing: I/O error: Read-only file system (os error 30) at path "/x/.tmp2Gxxh5"'), errno.EROFS),
    (RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system"), errno.EROFS),  # torch
    (sqlite3.OperationalError("database or disk is full"), errno.ENOSPC),
    (sqlite3.OperationalError("attempt to write a readonly database"), errno.EROFS),
    # not the disk: passed on unchanged
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), None),  # this disk has room
    (OSError(errno.EIO, "Input/output error"), None),
    (OSError("disk full"), None),
    (LorademError("x: not found"), None),
])
def test_what_counts_as_a_full_or_read_only_disk(tmp_path, exc, code):
    error = disk_error(tmp_path / "out", exc)
    assert (error.errno if error is not None else None) == code


def test_an_error_raised_from_a_full_disk_counts(tmp_path):
    try:
        try:
            raise ENOSPC
        except OSError as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as exc:
        assert disk_error(tmp_path, exc).errno == errno.ENOSPC


# ---- the report ------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, message", [
    (ENOSPC, r"the disk is full \(No space left on device\); the output needs about 1 MB; nothing was written, free space and re-run"),
    (EROFS, r"cannot write there \(Read-only file system\); choose another output folder"),
])
def test_a_full_or_read_only_disk_leaves_the_earlier_report_whole(tmp_path, monkeypatch, error, message):
    out = tmp_path / "out"
    write_report(out, "demo", METRICS, make_rows(["579", "49", "x", "1000"]))
    before = digests(out)
    fail_writes(monkeypatch, "cost_vs_score.png", error)  # the third of the four files
    with pytest.raises(LorademError, match=rf"^{out / 'cost_vs_score.png'}: {message}$"):
        write_report(out, "demo", METRICS, make_rows(["579", "49", "22", "1000"]))
    assert digests(out) == before and len(before) == 4


# ---- the search and learned weights --------------------------------------------------------------

@pytest.mark.parametrize("error", [ENOSPC, EROFS])
def test_search_results_on_a_full_or_read_only_disk(tiny_base, adapters, tmp_path, monkeypatch, error):
    out = tmp_path / "run"
    search_weights(make_job(out, n_trials=2), tiny_base, adapters, VALIDATION, log=lambda s: None)
    before = {k: v for k, v in digests(out).items() if k != "search.db"}
    fail_writes(monkeypatch, "weights.json", error)
    word = "the disk is full" if error is ENOSPC else "cannot write there"
    with pytest.raises(WriteError, match=rf"^{out / 'weights.json'}: {word} "):
        search_weights(make_job(out, n_trials=3), tiny_base, adapters, VALIDATION, log=lambda s: None)
    after = {k: v for k, v in digests(out).items() if k != "search.db"}
    assert after.keys() == before.keys() and after["weights.json"] == before["weights.json"]  # no partial; the old result


def test_a_full_study_database_is_one_line_and_keeps_the_finished_trials(tiny_base, adapters, tmp_path, monkeypatch):
    """SQLite's own "database or disk is full" (its page limit set to the pages the study has, so the next trial's
    rows find no room), in the trial loop."""
    from sqlalchemy import event

    from loradem.merge.study import Storage, load_recorded_study

    out = tmp_path / "run"
    first = search_weights(make_job(out, n_trials=2), tiny_base, adapters, VALIDATION, log=lambda s: None)
    weights = (out / "weights.json").read_bytes()
    with sqlite3.connect(out / "search.db") as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    real_open = Storage.open

    def full_open(self):
        storage = real_open(self)
        event.listen(storage.engine, "connect", lambda dbapi, _: dbapi.execute(f"PRAGMA max_page_count = {pages}"))
        storage.engine.dispose()
        return storage

    monkeypatch.setattr(Storage, "open", full_open)
    with pytest.raises(WriteError, match=rf"^{out / 'search.db'}: the disk is full \(No space left on device\); finished "
                                        r"trials are kept in the study, free space and re-run$"):
        search_weights(make_job(out, n_trials=40), tiny_base, adapters, VALIDATION, log=lambda s: None)
    monkeypatch.undo()
    study = load_recorded_study(out / "weights.json")
    assert study.study_name == first["study"]["name"]
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2  # the earlier trials are still there
    assert (out / "weights.json").read_bytes() == weights
    assert not list(out.glob(".*partial*"))


def test_a_read_only_search_folder_is_one_line(tiny_base, adapters, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name == "run":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(WriteError, match=rf"^{tmp_path / 'run'}: cannot write there \(Read-only file system\); choose another output folder$"):
        search_weights(make_job(tmp_path / "run", n_trials=2), tiny_base, adapters, VALIDATION, log=lambda s: None)


@pytest.mark.parametrize("error, file", [(ENOSPC, "weights.json"), (EROFS, "learn.png")])
def test_learned_weights_on_a_full_or_read_only_disk(tiny_base, tmp_path, monkeypatch, error, file):
    from test_learn import TRAIN
    from test_learn import VALIDATION as LEARN_VALIDATION
    from test_learn import make_job as learn_job
    from test_multi import make_adapter

    from loradem.merge.learn import learn_weights

    adapters = {"add": make_adapter(tiny_base, tmp_path / "add", seed=21, r=4, targets=["q_proj", "v_proj"]),
                "rev": make_adapter(tiny_base, tmp_path / "rev", seed=22, r=2, targets=["o_proj", "up_proj"])}
    out = tmp_path / "learn"
    learn_weights(learn_job(out, steps=3, eval_every=3), tiny_base, adapters, TRAIN, LEARN_VALIDATION, log=lambda s: None)
    weights = (out / "weights.json").read_bytes()
    fail_writes(monkeypatch, file, error)
    word = "the disk is full" if error is ENOSPC else "cannot write there"
    with pytest.raises(WriteError, match=rf"^{out / file}: {word} "):
        learn_weights(learn_job(out, steps=6), tiny_base, adapters, TRAIN, LEARN_VALIDATION, log=lambda s: None)
    assert (out / "weights.json").read_bytes() == weights and sorted(p.name for p in out.iterdir()) == ["learn.png", "weights.json"]


# ---- training checkpoints ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("error", [
    ENOSPC,
    EROFS,
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # what safetensors raises
])
def test_a_full_or_read_only_disk_at_a_checkpoint(tmp_path, tiny_base, monkeypatch, error):
    """The adapter's checkpoint (PEFT's safetensors save, inside the Trainer) fails while a finished adapter of the
    same key exists (--force): one line, no partial folder, the finished adapter untouched."""
    import peft.peft_model

    source = job(make_recipe(tmp_path, tiny_base, [addition_source(tmp_path)]))
    folder = train_source(source, tiny_base, log=lambda _: None)
    adapters_dir = folder.parent
    before = digests(adapters_dir)
    calls = []

    def save(tensors, filename, *a, **k):
        calls.append(filename)
        raise error

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    word = r"cannot write there \(Read-only file system\); set the recipe's adapters_dir to a writable folder" \
        if error is EROFS else r"the disk is full \(No space left on device\)( after [\d,]+ kB of the output; the partial output was removed|; nothing was written), free space and re-run$"
    with pytest.raises(WriteError, match=rf"^{folder}: {word}"):
        train_source(source, tiny_base, force=True, log=lambda _: None)
    assert "/checkpoints/checkpoint-1/" in calls[0]
    assert digests(adapters_dir) == before


# ---- real mounts ---------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a new tmpfs folder (unmounted at the end); skips where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True,
                                  check=False)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root in a container that allows it): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    gc.collect()  # a failed torch.save leaves its file open until its writer (held by the traceback) is collected
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)  # still busy: detach now, freed at the last close


def cli(capsys, *argv: str) -> tuple[int, str]:
    """The exit status and the error line (the progress bar shares stderr, redrawn with carriage returns)."""
    from loradem.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("loradem: error:") == 1
    return code, err.rstrip("\n").split("\n")[-1].split("\r")[-1]


@pytest.fixture(scope="module")
def one_adapter(tiny_base, tmp_path_factory) -> Path:
    from test_multi import make_adapter

    return make_adapter(tiny_base, tmp_path_factory.mktemp("disk") / "a", seed=3, r=4, targets=["q_proj", "v_proj"])


def test_assemble_into_a_real_read_only_folder(tiny_base, one_adapter, tmpfs, capsys):
    ro = tmpfs("ro", "ro,size=1m")
    code, err = cli(capsys, "assemble", "--base", str(tiny_base), "--adapter", f"{one_adapter}=0.5", "--out", str(ro / "model"))
    assert code == 2
    assert err == f"loradem: error: {ro / 'model'}: cannot write there (Read-only file system); choose another output folder"
    assert list(ro.iterdir()) == []


def test_assemble_onto_a_real_full_disk(tiny_base, one_adapter, tmpfs, capsys):
    full = tmpfs("full", "size=64k")
    (full / "earlier.txt").write_text("kept")
    code, err = cli(capsys, "assemble", "--base", str(tiny_base), "--adapter", f"{one_adapter}=0.5", "--out", str(full / "model"))
    assert code == 2
    assert err.startswith(f"loradem: error: {full / 'model'}: the disk is full (No space left on device); the output needs about ")
    assert err.endswith(" MB; nothing was written, free space and re-run")
    assert [p.name for p in full.iterdir()] == ["earlier.txt"] and (full / "earlier.txt").read_text() == "kept"


@pytest.mark.slow
@pytest.mark.parametrize("size", ["48k", "64k", "72k", "96k"])
def test_training_onto_a_real_full_disk(tmp_path, tiny_base, tmpfs, size):
    """The adapters folder on a tmpfs too small for the checkpoints, at sizes where (measured 2026-12-02) the
    limit is hit by a JSON write (OSError), the tokenizer's save (tokenizers' Exception "os error 28"), the
    Trainer's torch.save (a RuntimeError about a short write) and PEFT's safetensors save: one line saying how
    far it got, and nothing is left on that disk."""
    full = tmpfs("adapters", f"size={size}")
    source = job(Recipe.model_validate({**recipe_dict(tmp_path, tiny_base, [addition_source(tmp_path)]), "adapters_dir": str(full)}))
    with pytest.raises(WriteError, match=rf"^{full}/addition-\w+: the disk is full \(No space left on device\) after [\d,]+ kB "
                                        r"of the output; the partial output was removed, free space and re-run$"):
        train_source(source, tiny_base, log=lambda _: None)
    assert list(full.iterdir()) == []


def test_a_report_onto_a_real_read_only_disk(tmp_path, tmpfs):
    out = tmpfs("out", "size=1m")
    write_report(out, "demo", METRICS, make_rows(["579", "49", "x", "1000"]))
    before = digests(out)
    subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    with pytest.raises(WriteError, match=rf"^{out}/report.json: cannot write there \(Read-only file system\)"):
        write_report(out, "demo", METRICS, make_rows(["579", "49", "22", "1000"]))
    assert digests(out) == before
    assert json.loads((out / "report.json").read_text())["recipe"] == "demo"


def test_cli_turns_an_unwrapped_read_only_or_full_disk_into_one_line(monkeypatch, capsys):
    """A write no stage wraps (e.g. creating runs/<name> on a read-only file system) still ends in one line, exit 2;
    any other OSError is a bug and keeps its traceback."""
    from loradem import cli

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", "runs/demo")

    monkeypatch.setattr(cli, "_dispatch", read_only)
    assert cli.main(["check", "recipes/demo.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loradem: error: runs/demo: cannot write there (Read-only file system)")

    def missing(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    monkeypatch.setattr(cli, "_dispatch", missing)
    with pytest.raises(FileNotFoundError):
        cli.main(["check", "recipes/demo.yaml"])
