"""Benchmark the search's study storages with several worker processes on one machine: trials per second,
and how many trials failed, hit a lock error or ran twice.

    .venv/bin/python benchmarks/bench_storage.py                       # SQLite and journal file, 4 workers, 400 trials, 3 repeats
    .venv/bin/python benchmarks/bench_storage.py --postgres postgresql://me@/bench?host=/tmp/pg   # plus a PostgreSQL row

Each storage is opened by loradem's own study code (`loradem.merge.study`: SQLite with
BEGIN IMMEDIATE and the heartbeat, as `loradem search` opens it; SQLite without the heartbeat
for comparison; the journal file), and the workers are `run_workers` processes, as
`loradem search --workers N` starts them. Only the objective is cheap (a quadratic, plus
--trial-ms of sleep), so what is measured is the storage and Optuna's own per-trial work, the
ceiling these storages put on a search; a real trial evaluates a model for about a second or
more. As in a search, --queued points are enqueued first (warm starts), which the workers pop.

trials/s counts from the first trial's start to the last one's end (process start-up
excluded); `wall` includes it. Every run gets a fresh study (PostgreSQL: a fresh study name
in the given database).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402 - after the path above: loradem from this checkout
from optuna.trial import TrialState  # noqa: E402

from loradem.merge.study import Storage, enqueue_points, open_study, run_workers, split_trials  # noqa: E402


@dataclass(frozen=True)
class Job:
    storage: Storage
    name: str
    n_trials: int
    target: int
    seed: int
    record_dir: str
    trial_seconds: float


def worker(job: Job, log: Callable[[str], None]) -> None:
    from loradem.merge.study import stop_at

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(job.storage, job.name, optuna.samplers.RandomSampler(seed=job.seed), direction="minimize",
                       create=False)
    with open(Path(job.record_dir) / f"ran-{os.getpid()}", "a") as ran:

        def objective(trial) -> float:
            x, y = trial.suggest_float("x", 0.0, 1.0), trial.suggest_float("y", 0.0, 1.0)
            ran.write(f"{trial.number}\n")
            ran.flush()
            if job.trial_seconds:
                time.sleep(job.trial_seconds)
            return (x - 0.3) ** 2 + (y - 0.6) ** 2

        study.optimize(objective, n_trials=job.n_trials, callbacks=[stop_at(job.target)])


def one_run(storage: Storage, name: str, args, root: Path) -> dict:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(storage, name, optuna.samplers.RandomSampler(seed=0), direction="minimize")
    enqueue_points(study, [{"x": i / args.queued, "y": 1 - i / args.queued} for i in range(args.queued)])
    record = root / f"record-{name}"
    record.mkdir()
    jobs = [Job(storage, name, n, args.trials, seed=i + 1, record_dir=str(record), trial_seconds=args.trial_ms / 1000)
            for i, n in enumerate(split_trials(args.trials, args.workers))]
    errors: list[str] = []
    t0 = time.perf_counter()
    try:
        run_workers(worker, jobs, lambda s: None)
    except Exception as exc:  # noqa: BLE001 - a failed worker (a lock error, ...) is a result here
        errors.append(str(exc).splitlines()[0])
    wall = time.perf_counter() - t0
    trials = open_study(storage, name, None, direction="minimize", create=False).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    numbers = [int(n) for p in record.glob("ran-*") for n in p.read_text().split()]
    return {
        "complete": len(done),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "left_running": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        "ran_twice": len(numbers) - len(set(numbers)),
        "worker_errors": errors,
        "trials_per_second": len(done) / span if span > 0 else float("nan"),
        "wall_seconds": wall,
    }


def kinds(root: Path, postgres: Optional[str]) -> dict[str, Callable[[str], Storage]]:
    out = {
        "sqlite (BEGIN IMMEDIATE, heartbeat: what loradem opens)": lambda n: Storage.parse(f"sqlite:///{root / n}.db", root),
        "sqlite (BEGIN IMMEDIATE, no heartbeat)": lambda n: Storage("rdb", f"sqlite:///{root / n}-nohb.db", heartbeat=None, grace=None),
        "journal file (JournalFileBackend)": lambda n: Storage.parse(f"journal:{root / n}.journal", root),
    }
    if postgres:
        out["postgresql (local socket, heartbeat)"] = lambda n: Storage.parse(postgres, root)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=400, help="trials per run (default: %(default)s)")
    parser.add_argument("--queued", type=int, default=20, help="points enqueued before the workers start (default: %(default)s)")
    parser.add_argument("--trial-ms", type=float, default=0.0, help="sleep in each trial, ms (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per storage (default: %(default)s)")
    parser.add_argument("--postgres", help="also measure this PostgreSQL URL (a database the benchmark may write to)")
    args = parser.parse_args(argv)
    print(f"# {dt.date.today()}: {args.workers} workers, {args.trials} trials ({args.queued} queued), "
          f"{args.trial_ms:g} ms per trial, {args.repeats} runs each; optuna {optuna.__version__}, {os.cpu_count()} CPUs")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        root = Path(tmp)
        for k, (label, make) in enumerate(kinds(root, args.postgres).items()):
            names = [f"s{k}-{i}-{os.getpid()}" for i in range(args.repeats)]
            runs = [one_run(make(name), name, args, root) for name in names]
            rates = [r["trials_per_second"] for r in runs]
            results[label] = runs
            bad = {k: sum(r[k] for r in runs) for k in ("failed", "left_running", "ran_twice")}
            errors = [e for r in runs for e in r["worker_errors"]]
            print(f"| {label} | {statistics.median(rates):.1f} ({min(rates):.1f}–{max(rates):.1f}) | "
                  f"{statistics.median(r['wall_seconds'] for r in runs):.1f} | "
                  f"{sum(r['complete'] for r in runs)}/{args.trials * args.repeats} | {bad['failed']} | {bad['ran_twice']} | "
                  f"{bad['left_running']} | {len(errors)}{': ' + errors[0] if errors else ''} |", flush=True)
    return results


if __name__ == "__main__":
    main()
