"""A generated suite of exact-match tasks: seeded rows, written as messages JSONL files.

    from loradem.data.suite import Suite
    SUITE = Suite("demo", {"addition": addition, ...}, {"subtract": subtract, ...}, "recipes/data/demo")
    SUITE.rows("addition", seed=0, rows=1000)     # [{"messages": [user, assistant]}, ...]
    SUITE.write("recipes/data/demo")               # <task>.jsonl per source, heldout/<task>.jsonl per held-out task
    SUITE.main(argv)                               # the `python -m loradem.data.<suite>` command line

A task is a function from a `random.Random` to an endless iterator of (question, answer) pairs.
Each task draws from its own `random.Random(f"{seed}:{task}")` (a held-out task from
`random.Random(f"{seed}:heldout:{task}")`), so files are byte-for-byte reproducible, independent of
each other, and a longer run extends a shorter one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loradem.files import atomic_write_files

Pairs = Iterator[tuple[str, str]]
Task = Callable[[random.Random], Pairs]
HELD_OUT_DIR = "heldout"  # beside the sources' files


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: dict[str, Task]  # the sources
    held_out: dict[str, Task]  # what no source trains on
    default_out: str  # where the committed files live, relative to the repo

    def rows(self, task: str, seed: int = 0, rows: int = 1000) -> list[dict]:
        """`rows` messages rows of one task (a source's or, by its name, a held-out one)."""
        if task in self.tasks:
            pairs = self.tasks[task](random.Random(f"{seed}:{task}"))
        else:
            pairs = self.held_out[task](random.Random(f"{seed}:heldout:{task}"))
        return [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in itertools.islice(pairs, rows)
        ]

    def write(self, out: str | Path, seed: int = 0, rows: int = 1000, held_out_rows: int = 60, log=print) -> list[Path]:
        """One <task>.jsonl per source task into `out`, one per held-out task into `out`/heldout/: every file is
        generated first, then all are written aside and renamed, so a task that cannot be generated (or a full
        disk) leaves the earlier set whole: source and held-out files always come from one generation."""
        jobs = [*((t, rows, Path(out)) for t in self.tasks), *((t, held_out_rows, Path(out) / HELD_OUT_DIR) for t in self.held_out)]
        files = {folder / f"{task}.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows(task, seed, n))
                 for task, n, folder in jobs}
        atomic_write_files({path: text.encode("utf-8") for path, text in files.items()})
        for (_, n, _), path in zip(jobs, files):
            log(f"wrote {path} ({n} rows)")
        return list(files)

    def main(self, argv: list[str] | None = None, description: str = "") -> int:
        parser = argparse.ArgumentParser(prog=f"python -m loradem.data.{self.name}", description=description)
        parser.add_argument("--out", default=self.default_out, help=f"output folder (default: {self.default_out})")
        parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
        parser.add_argument("--rows", type=int, default=1000, help="rows per source task (default: 1000)")
        parser.add_argument("--held-out-rows", type=int, default=60, help="rows per held-out task (default: 60)")
        args = parser.parse_args(argv)
        if args.rows < 1 or args.held_out_rows < 1:
            parser.error("--rows and --held-out-rows must be at least 1")
        self.write(args.out, args.seed, args.rows, args.held_out_rows)
        return 0
