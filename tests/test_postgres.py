"""Search workers on one study in a real PostgreSQL server (a throwaway one per session, `pg_fixtures`).

Worker processes run by `run_workers` (as `loradem search --workers N` runs them) through loradem's study
code, with a cheap objective; then `search_weights` itself with two workers on the tiny model. The killed
worker's case runs on PostgreSQL too, in test_storage_workers.py.
"""

from __future__ import annotations

import os

import optuna
import pg_fixtures
import pytest
import test_search
from test_search import VALIDATION, complete, make_job
from test_storage_workers import CheapJob, cheap_worker, check_exactly_once

from loradem.merge.search import search_weights
from loradem.merge.study import Storage, enqueue_points, open_study, run_workers, split_trials

pg_server, pg_url = pg_fixtures.pg_server, pg_fixtures.pg_url  # fixtures, found by their names here
adapters = test_search.adapters


@pytest.mark.parametrize("workers", [2, 4])
def test_worker_processes_on_one_postgres_study_run_each_trial_once(pg_url, tmp_path, workers):
    """n_trials complete trials, none lost, none run twice, every queued point once: 6 trials per worker, most of
    them queued points that the workers pop concurrently (Optuna's SELECT ... FOR UPDATE)."""
    n_trials = 6 * workers
    storage = Storage.parse(pg_url, tmp_path)
    study = open_study(storage, "s", optuna.samplers.RandomSampler(seed=0), direction="minimize")
    points = [{"x": i / n_trials, "y": 1 - i / n_trials} for i in range(n_trials - 4)]
    assert enqueue_points(study, points) == len(points)
    record = tmp_path / "record"
    record.mkdir()
    jobs = [CheapJob(storage, "s", n, n_trials, seed=i, record_dir=str(record))
            for i, n in enumerate(split_trials(n_trials, workers))]
    run_workers(cheap_worker, jobs, lambda s: None)
    ran = check_exactly_once(open_study(storage, "s", None, direction="minimize", create=False), record, n_trials, points)
    assert len(ran) == workers and os.getpid() not in ran
    assert sorted(len(numbers) for numbers in ran.values()) == [6] * workers


@pytest.mark.slow
def test_search_with_two_workers_on_postgres(tiny_base, adapters, tmp_path, pg_url):
    """`loradem search --storage postgresql://... --workers 2` on the tiny model: the study is in the server, not
    beside the run, and holds n_trials complete trials from two processes, warm starts included."""
    out = tmp_path / "run"
    result = search_weights(make_job(out, n_trials=6), tiny_base, adapters, VALIDATION, storage=pg_url, workers=2,
                            log=lambda s: None)
    assert result["study"]["storage"] == Storage.parse(pg_url, out).display and not (out / "search.db").exists()
    study = optuna.load_study(storage=pg_url, study_name=result["study"]["name"])
    trials = complete(study)
    assert len(trials) == len(study.trials) == 6 and [t.number for t in trials] == list(range(6))
    assert len({t.user_attrs["pid"] for t in trials}) == 2 and result["processes"] == 2
    params = [t.params for t in trials]
    assert params.count({"add": 0.5, "rev.words": 0.5}) == 1 and params.count({"add": 1.0, "rev.words": 1.0}) == 1
    assert result["weights"] == min(trials, key=lambda t: t.value).params
