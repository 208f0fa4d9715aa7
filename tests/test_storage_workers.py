"""Search workers on one study, through loradem's study code (merge/study.py) with a cheap objective: a worker
killed mid-trial (SIGKILL) on SQLite and PostgreSQL, the journal storage's forms, several processes on one
SQLite or journal study.

The workers are real spawned processes run by `run_workers`, as `loradem search --workers N` runs them; only
the objective is cheap (a quadratic instead of a model's validation loss).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import optuna
import pg_fixtures
import pytest
import sqlalchemy
from optuna.trial import TrialState

from loradem.errors import LorademError
from loradem.merge.study import Storage, enqueue_points, finished_count, open_study, run_workers, split_trials, stop_at

pg_server, pg_url = pg_fixtures.pg_server, pg_fixtures.pg_url  # fixtures, found by their names here
WARM = {"x": 0.25, "y": 0.75}


@dataclass(frozen=True)
class CheapJob:
    """One worker: run up to n_trials of the study until it has `target` finished ones; write each trial number it
    runs to <record_dir>/ran-<pid>; on a trial with the parameters `block_on`, write started-<number> and wait
    until killed."""

    storage: Storage
    name: str
    n_trials: int
    target: int
    seed: int
    record_dir: str
    block_on: Optional[dict] = None


def cheap_worker(job: CheapJob, log: Callable[[str], None]) -> None:
    sampler = optuna.samplers.RandomSampler(seed=job.seed)
    study = open_study(job.storage, job.name, sampler, direction="minimize", create=False)
    record = Path(job.record_dir)

    def objective(trial) -> float:
        x, y = trial.suggest_float("x", 0.0, 1.0), trial.suggest_float("y", 0.0, 1.0)
        with open(record / f"ran-{os.getpid()}", "a") as f:
            f.write(f"{trial.number}\n")
        if trial.params == job.block_on:
            (record / f"started-{trial.number}").write_text(str(os.getpid()))
            threading.Event().wait()  # until SIGKILL
        return (x - 0.3) ** 2 + (y - 0.6) ** 2

    study.optimize(objective, n_trials=job.n_trials, callbacks=[stop_at(job.target)])


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120.0):
    """Poll until condition() is truthy and return it; the deadline only keeps a broken run from hanging."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
    return value


def ran_by_process(record_dir: Path) -> dict[int, list[int]]:
    """{pid: trial numbers it ran, in order} from the workers' ran-<pid> files."""
    return {int(p.name.split("-")[1]): [int(n) for n in p.read_text().split()] for p in record_dir.glob("ran-*")}


def check_exactly_once(study, record_dir: Path, n_trials: int, points: list[dict]) -> dict[int, list[int]]:
    """n_trials complete trials and nothing else; each one run by exactly one process; each queued point once."""
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))
    ran = ran_by_process(record_dir)
    everything = sorted(n for numbers in ran.values() for n in numbers)
    assert everything == list(range(n_trials))  # no trial lost, none run twice
    params = [t.params for t in trials]
    assert all(params.count(p) == 1 for p in points)
    return ran


@pytest.fixture(params=["sqlite", "postgresql"])
def rdb_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


def heartbeat_rows(url: str, trial_id: int) -> int:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT count(*) FROM trial_heartbeats WHERE trial_id = :t"),
                                {"t": trial_id}).scalar_one()
    finally:
        engine.dispose()


def test_a_killed_workers_trial_is_failed_and_retried_with_its_warm_start_point(rdb_url, tmp_path):
    """kill -9 mid-trial: the trial is RUNNING with a heartbeat that stops; the next worker fails it once the
    heartbeat is older than the grace period and runs its parameters again, so the study still ends with
    n_trials complete trials, the warm-start point among them."""
    import multiprocessing as mp

    storage = Storage("rdb", rdb_url, heartbeat=1, grace=1)
    study = open_study(storage, "s", optuna.samplers.RandomSampler(seed=0), direction="minimize")
    assert enqueue_points(study, [WARM]) == 1
    record = tmp_path / "record"
    record.mkdir()
    dying = CheapJob(storage, "s", n_trials=4, target=4, seed=1, record_dir=str(record), block_on=WARM)
    proc = mp.get_context("spawn").Process(target=cheap_worker, args=(dying, print))
    proc.start()
    try:
        started = wait_for(lambda: next(record.glob("started-*"), None), "the worker to start the warm-start trial")
        killed = study.get_trials(deepcopy=False)[int(started.name.split("-")[1])]
        assert killed.state == TrialState.RUNNING and killed.params == WARM
        wait_for(lambda: heartbeat_rows(rdb_url, killed._trial_id), "its first heartbeat")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    assert study.get_trials(deepcopy=False)[killed.number].state == TrialState.RUNNING  # nobody told the storage
    # the dead trial becomes stale once its last heartbeat is older than the grace period
    backend = storage.open()
    wait_for(lambda: killed._trial_id in backend._get_stale_trial_ids(study._study_id), "the heartbeat to go stale")
    assert enqueue_points(study, [WARM]) == 0  # a re-run does not queue the point again: the retry will run it

    run_workers(cheap_worker, [CheapJob(storage, "s", n_trials=4, target=4, seed=2, record_dir=str(record))], lambda s: None)
    trials = open_study(storage, "s", None, direction="minimize", create=False).get_trials(deepcopy=False)
    assert trials[killed.number].state == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len(trials) == 5  # n_trials complete, plus the failed one
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == WARM
    assert [t.params for t in complete].count(WARM) == 1


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_four_processes_on_one_file_study_run_each_trial_once(kind, tmp_path):
    """The storages for many workers on one machine without a server, with most trials queued: 4 processes,
    24 trials, 20 of them queued points popped concurrently."""
    target = str(tmp_path / "study.db") if kind == "sqlite" else f"journal:{tmp_path / 'study.journal'}"
    storage = Storage.parse(f"sqlite:///{target}" if kind == "sqlite" else target, tmp_path)
    assert storage.kind == ("rdb" if kind == "sqlite" else "journal")
    study = open_study(storage, "s", optuna.samplers.RandomSampler(seed=0), direction="minimize")
    points = [{"x": i / 20, "y": 1 - i / 20} for i in range(20)]
    enqueue_points(study, points)
    record = tmp_path / "record"
    record.mkdir()
    jobs = [CheapJob(storage, "s", n, 24, seed=i, record_dir=str(record)) for i, n in enumerate(split_trials(24, 4))]
    run_workers(cheap_worker, jobs, lambda s: None)
    ran = check_exactly_once(open_study(storage, "s", None, direction="minimize", create=False), record, 24, points)
    assert sorted(len(numbers) for numbers in ran.values()) == [6, 6, 6, 6]


def test_journal_forms(tmp_path):
    assert Storage.parse("journal:study.journal", tmp_path) == Storage("journal", str(Path("study.journal").resolve()))
    assert Storage.parse(f"journal:{tmp_path}/s", tmp_path).target == str(tmp_path / "s")
    assert Storage.parse("runs/x/study.log", tmp_path) == Storage("journal", str(Path("runs/x/study.log").resolve()))
    with pytest.raises(LorademError, match=r"search.storage: expected an RDB URL \(.*\), journal:PATH or a journal file "
                                           r"path ending in \.log, got 'journal:'"):
        Storage.parse("journal:", tmp_path)
    assert finished_count(open_study(Storage.parse(f"journal:{tmp_path}/s", tmp_path), "j", None, direction="minimize")) == 0
