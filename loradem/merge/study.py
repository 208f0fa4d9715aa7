"""The Optuna study behind `loradem search`: where it lives, who runs its trials, what it learned.

    storage = Storage.parse(None, out_dir)                     # sqlite:///<out_dir>/search.db
    storage = Storage.parse("postgresql://u:pw@db/loradem", out_dir, field="--storage")
    storage = Storage.parse("runs/shared/search.log", out_dir) # a JournalStorage file
    storage = Storage.parse("journal:/scratch/study", out_dir) # the same, any file name
    study = open_study(storage, name, sampler, direction="minimize", pruner=None)
    run_workers(job_fn, jobs, log)                             # one spawned process per job
    study = load_recorded_study("runs/demo/search/weights.json")  # the study a search ran, wherever the run moved

Storage: an RDB URL (anything SQLAlchemy and Optuna accept: sqlite:///,
postgresql://, mysql://) or a journal file (a path ending in ``.log``, or
``journal:PATH``) for Optuna's `JournalStorage(JournalFileBackend(path))` (an
append-only file with a file lock, fine on a shared file system). Passwords are
hidden whenever the URL is printed or written.

weights.json records where its study lives (`Storage.record`): a study file inside
the run folder (the folder holding ``search/``; the default ``search/search.db``)
as ``{"file": PATH, "format": "sqlite" | "journal"}``, PATH relative to
weights.json's folder, so a moved or copied run still finds it; any other
storage as ``{"storage": URL}`` (a journal as ``journal:PATH``) as given, its
password hidden. `load_recorded_study` opens either.

Dead workers: on RDB storages every running trial records a heartbeat every
`HEARTBEAT_SECONDS` (Optuna's RDBStorage heartbeat). Before each trial a worker
fails the trials whose heartbeat is more than `GRACE_SECONDS` old (their process
was killed, or its machine lost) and queues each again with the same
parameters (RetryHeartbeatStaleTrialCallback), so a warm-start point is not
lost; a trial is retried at most `MAX_RETRIES` times. Journal storages have no
heartbeat: a killed worker's trial stays RUNNING there.

Parallel trials: the study is created, and warm starts are queued, once, by
the process that starts the workers (Optuna 5 crashes when several processes
create one new SQLite study at once); each worker then loads the study and the
model itself. Separate `loradem search` processes (other machines) pointed at
one storage each top the study up to its target; creation races between them
are retried.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url

from loradem.errors import LorademError
from loradem.files import disk_error, disk_writes, read_json

FINISHED = ("COMPLETE", "PRUNED")  # trial states that count towards n_trials
MIN_IMPORTANCE_TRIALS = 10
_CREATE_ATTEMPTS = 4
# A live worker whose heartbeat misses the grace period has its trial failed under it (and then crashes when
# it reports the result), so the grace period is six beats: a busy CPU or a slow database never gets there.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
MAX_RETRIES = 3
JOURNAL_PREFIX = "journal:"
STORAGE_FIX = "pass a writable --storage (or set the recipe's output_dir to a writable folder)"
STORAGE_KEPT = "finished trials are kept in the study"


# ---- storage -----------------------------------------------------------------

@dataclass(frozen=True)
class Storage:
    kind: str  # "rdb" | "journal"
    target: str  # the URL, or the journal file's absolute path
    heartbeat: Optional[int] = HEARTBEAT_SECONDS  # RDB only: seconds between a running trial's heartbeats (None: none)
    grace: Optional[int] = GRACE_SECONDS  # RDB only: a running trial whose last heartbeat is older is failed and retried

    @classmethod
    def parse(cls, spec: Optional[str], out_dir: Path, *, field: str = "search.storage") -> "Storage":
        if spec is None:
            return cls("rdb", f"sqlite:///{(Path(out_dir) / 'search.db').resolve()}")
        spec = spec.strip()
        if spec.startswith(JOURNAL_PREFIX) and spec[len(JOURNAL_PREFIX):].strip():
            return cls("journal", str(Path(spec[len(JOURNAL_PREFIX):].strip()).expanduser().resolve()))
        if spec.endswith(".log"):
            return cls("journal", str(Path(spec).expanduser().resolve()))
        if "://" in spec:
            if _in_memory_sqlite(spec):
                raise LorademError(f"{field}: {spec!r} is an in-memory SQLite database, which worker processes and later "
                                   "runs cannot open; give a file (sqlite:///path/search.db) or a journal file (.log)")
            return cls("rdb", spec)
        raise LorademError(
            f"{field}: expected an RDB URL (sqlite:///path.db, postgresql://user@host/db, ...), journal:PATH "
            f"or a journal file path ending in .log, got {spec!r}"
        )

    @property
    def local_path(self) -> Optional[Path]:
        """The file this storage writes on this machine (the SQLite database or the journal), or None (a server)."""
        if self.kind == "journal":
            return Path(self.target)
        try:
            url = make_url(self.target)
        except Exception:  # noqa: BLE001 - an unparsable URL fails in open()
            return None
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            return Path(url.database)
        return None

    def record(self, folder: Path) -> dict:
        """How weights.json in `folder` names this storage: a study file inside the run folder (`folder`'s parent)
        moves with the run, so it is named relative to `folder`; anything else as given, its password hidden."""
        path = self.local_path  # None: a server, or a URL that never parses
        here = Path(folder).resolve()
        # a SQLite URL's options (?timeout=...) would be lost in a file name
        plain = path is not None and (self.kind == "journal" or not make_url(self.target).query)
        if plain and path.resolve().is_relative_to(here.parent):
            return {"file": os.path.relpath(path.resolve(), here), "format": "journal" if self.kind == "journal" else "sqlite"}
        return {"storage": JOURNAL_PREFIX + self.target if self.kind == "journal" else self.display}

    @classmethod
    def recorded(cls, study: dict, folder: Path) -> Storage:
        """The storage that weights.json in `folder` records in its `study` (`record`'s inverse)."""
        if isinstance(study.get("file"), str):
            path = (Path(folder) / study["file"]).resolve()
            return cls("journal", str(path)) if study.get("format") == "journal" else cls("rdb", f"sqlite:///{path}")
        spec = study.get("storage")
        if not isinstance(spec, str):
            raise LorademError(f"{Path(folder) / 'weights.json'}: study: expected a 'file' or a 'storage', got {study!r}")
        if "://" not in spec and not spec.startswith(JOURNAL_PREFIX):
            spec = JOURNAL_PREFIX + spec  # a journal recorded by its bare path
        return cls.parse(spec, Path(folder), field="study.storage")

    def writes(self):
        """A context in which the storage's disk being full or read-only is one line (`loradem.files.disk_error`)."""
        return disk_writes(self.local_path or self.display, fix=STORAGE_FIX, kept=STORAGE_KEPT,
                           local=self.local_path is not None)

    @property
    def display(self) -> str:
        """The URL with any password hidden, or the journal path: what logs and weights.json show."""
        if self.kind == "journal":
            return self.target
        try:
            return make_url(self.target).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - an unparsable URL fails in open(); never print its password
            return self.target.split("://", 1)[0] + "://***"

    def open(self):
        """The Optuna storage object (a fresh one per process)."""
        if self.kind == "journal":
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(self.target))
        sqlite = self.target.startswith("sqlite")
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                self.target,
                # SQLite: workers wait for the file lock instead of failing
                engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                heartbeat_interval=self.heartbeat,
                grace_period=self.grace,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
            )
        if sqlite:
            _serialize_sqlite(storage.engine)
        return storage


def _in_memory_sqlite(url: str) -> bool:
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - an unparsable URL fails in open(), with its own message
        return False
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE (SQLAlchemy's documented pysqlite recipe).

    Optuna pops an enqueued trial with SELECT ... FOR UPDATE, then sets it RUNNING; SQLite ignores
    FOR UPDATE and pysqlite opens the transaction only at the UPDATE, so two processes could both
    read WAITING and both run the same trial. With BEGIN IMMEDIATE the read and the write hold the
    file's write lock together; the second process then reads RUNNING and takes the next trial. PostgreSQL and MySQL honour
    FOR UPDATE, and the journal file storage pops under its own file lock.
    """
    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite: let SQLAlchemy's "begin" below open transactions

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections RDBStorage opened while creating tables predate the listeners


def _open_error(storage: Storage, exc: BaseException) -> LorademError:
    disk = disk_error(storage.local_path or storage.display, exc, fix=STORAGE_FIX, kept=STORAGE_KEPT,
                      local=storage.local_path is not None)
    if disk is not None:
        return disk
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LorademError(f"search.storage: cannot open {storage.display}: {text[:300]}")


def open_study(storage: Storage, name: str, sampler, *, direction: str, pruner=None, create: bool = True):
    """Create the study (or load it: an interrupted search resumes); retried when another process creates it at the same moment."""
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            backend = storage.open()
            if not create:
                return optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
            return optuna.create_study(
                storage=backend, study_name=name, sampler=sampler, pruner=pruner, direction=direction, load_if_exists=True
            )
        except LorademError:
            raise
        except ValueError as exc:  # an existing study with another direction
            raise LorademError(f"search.storage: study {name!r} in {storage.display}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - drivers raise their own types (ImportError, OperationalError, ...)
            if "already exists" in str(exc).lower() and attempt < _CREATE_ATTEMPTS - 1:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise _open_error(storage, exc) from None
    raise AssertionError("unreachable")


def load_recorded_study(weights_json: str | Path, *, storage: str | None = None):
    """The Optuna study behind a search's weights.json, wherever its run folder has moved since (a study file in the
    run is named relative to weights.json). `storage`: the URL to open instead of the recorded one, e.g. a
    server's with its password (weights.json records it hidden)."""
    path = Path(weights_json)
    record = read_json(path)
    study = record.get("study") if isinstance(record, dict) else None
    if not isinstance(study, dict) or not isinstance(study.get("name"), str):
        raise LorademError(f"{path}: study: expected the search's study record (its name and storage), got {study!r}")
    store = Storage.parse(storage, path.parent, field="storage") if storage else Storage.recorded(study, path.parent)
    if store.local_path is not None and not store.local_path.is_file():
        raise LorademError(f"{path}: study: {store.local_path} not found (the study file moves with its run folder)")
    try:
        return optuna.load_study(study_name=study["name"], storage=store.open())
    except KeyError:
        raise LorademError(f"{path}: study: no study {study['name']!r} in {store.display}") from None
    except Exception as exc:  # noqa: BLE001 - drivers raise their own types
        raise _open_error(store, exc) from None


# ---- trials ------------------------------------------------------------------

def trials_in(study, *states: str) -> list:
    return sorted(study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in states)), key=lambda t: t.number)


def finished_count(study) -> int:
    return len(trials_in(study, *FINISHED))


def enqueue_points(study, points: list[dict[str, float]]) -> int:
    """Queue each point the study has not finished, queued or started; returns how many were queued.

    A running trial counts as started (another machine may be evaluating it); when its process was killed,
    a worker fails it once its heartbeat is stale and queues its point again (RDB storages, see above).
    """
    seen = [t.params for t in trials_in(study, "COMPLETE", "PRUNED")]
    seen += [t.system_attrs.get("fixed_params", t.params) for t in trials_in(study, "WAITING", "RUNNING")]
    queued = 0
    for point in points:
        if point not in seen:
            study.enqueue_trial(point)
            seen.append(point)
            queued += 1
    return queued


def stop_at(target: int) -> Callable:
    """A callback that stops a worker once the study has `target` finished trials (other workers included)."""
    return MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED))


def split_trials(remaining: int, workers: int) -> list[int]:
    """Trials per worker, as equal as possible, summing to `remaining` (workers with 0 are not started)."""
    size, extra = divmod(remaining, workers)
    return [n for n in (size + (i < extra) for i in range(workers)) if n > 0]


# ---- worker processes ------------------------------------------------------------

def _child(job_fn: Callable, job: Any, queue) -> None:
    def log(msg: str) -> None:
        queue.put(("log", msg))

    try:
        job_fn(job, log)
        queue.put(("done", None))
    except LorademError as exc:
        queue.put(("bad-input", str(exc)))
    except KeyboardInterrupt:
        queue.put(("interrupted", None))
    except BaseException as exc:  # noqa: BLE001 - the traceback goes to stderr here; the parent raises
        traceback.print_exc()
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        queue.put(("error", f"worker process {os.getpid()} failed: {last}"))


def run_workers(job_fn: Callable[[Any, Callable[[str], None]], None], jobs: list, log: Callable[[str], None], *,
                on_wait: Optional[Callable[[], None]] = None, wait_seconds: float = 2.0) -> None:
    """Run job_fn(job, log) in one spawned process per job; relay their log lines; raise when one failed
    (its LorademError as is; anything else as a RuntimeError, after the worker printed its traceback).
    `on_wait` is called about every `wait_seconds` while they run (the search's progress bar polls the study).

    `job_fn` must be a module-level function and each job picklable (spawn starts fresh interpreters:
    no forked torch state). Ctrl-C interrupts every worker (each marks its running trial failed).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(job_fn, job, q), name=f"loradem-search-{i}") for i, job in enumerate(jobs)]
    errors: list[str] = []
    bad_input: list[str] = []
    interrupted = False

    def handle(msg: tuple) -> None:
        nonlocal interrupted
        kind, text = msg
        if kind == "log":
            log(text)
        elif kind == "error":
            errors.append(text)
        elif kind == "bad-input":
            bad_input.append(text)
        elif kind == "interrupted":
            interrupted = True

    try:
        for p in procs:
            p.start()
        waited = time.monotonic()
        while any(p.is_alive() for p in procs):
            try:
                handle(q.get(timeout=0.2))
            except queue_mod.Empty:
                pass
            if on_wait is not None and time.monotonic() - waited >= wait_seconds:
                on_wait()
                waited = time.monotonic()
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    finally:
        while True:
            try:
                handle(q.get(timeout=0.1))
            except (queue_mod.Empty, OSError, ValueError):
                break
    if interrupted:
        raise KeyboardInterrupt
    if bad_input:
        raise LorademError(bad_input[0])
    crashed = errors or [f"worker process {p.pid} exited with status {p.exitcode}" for p in procs if p.exitcode not in (0, None)]
    if crashed:
        more = f" (and {len(crashed) - 1} more)" if len(crashed) > 1 else ""
        raise RuntimeError(f"search: {crashed[0]}{more}; finished trials are in the study, re-run to resume")


# ---- what the study learned ----------------------------------------------------------

def importance_evaluator():
    """PED-ANOVA (numpy only; fANOVA and mean-decrease-impurity need scikit-learn): it compares the parameter
    distribution of the best 10% of trials with all of them."""
    return optuna.importance.PedAnovaImportanceEvaluator()


def param_importances(study, params: list[str], log: Callable[[str], None]) -> Optional[dict]:
    """Optuna's parameter importances over the completed trials (`importance_evaluator`), or None (with a log line)
    when they mean nothing."""
    n = len(trials_in(study, "COMPLETE"))
    if len(params) < 2:
        log("search: parameter importances skipped (one parameter)")
        return None
    if n < MIN_IMPORTANCE_TRIALS:
        log(f"search: parameter importances skipped ({n} completed trials, need {MIN_IMPORTANCE_TRIALS})")
        return None
    evaluator = importance_evaluator()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, evaluator=evaluator, params=params)
    except Exception as exc:  # noqa: BLE001 - importances are a by-product; the search result stands
        log(f"search: parameter importances skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return None
    return {"evaluator": type(evaluator).__name__, "n_trials": n, "values": {p: float(v) for p, v in values.items()}}
