"""python eval/tasks/loradem_demo/make_data.py  — rewrite arith.jsonl (seeded; the same file every time).

40 two-number arithmetic questions (addition, subtraction, multiplication),
each with four numeric choices: the answer and three near misses (off by one,
off by ten, a swapped or shifted digit). A small offline stand-in for the
paper's benchmarks: it asks something none of the demo sources trains on.
Rows: {"question": "What is 47 + 38?", "choices": ["85", "75", "86", "84"], "answer": 0}.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

N_ITEMS = 40
SEED = 2406  # arXiv 2406.15570


def _question(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", a + b
    if op == "-":
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        return f"What is {a} - {b}?", a - b
    a, b = rng.randint(2, 9), rng.randint(11, 29)
    return f"What is {a} * {b}?", a * b


def _near_misses(rng: random.Random, answer: int) -> list[str]:
    swapped = int(str(answer)[::-1]) if answer >= 10 else answer + 2
    pool = [answer + 1, answer - 1, answer + 10, answer - 10, swapped, answer + 2]
    pool = sorted({p for p in pool if p >= 0 and p != answer})
    return [str(p) for p in rng.sample(pool, 3)]


def make_rows(n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        question, answer = _question(rng)
        if question in seen:
            continue
        seen.add(question)
        choices = [str(answer), *_near_misses(rng, answer)]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "answer": choices.index(str(answer))})
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    out = Path(__file__).with_name("arith.jsonl")
    out.write_text(render(make_rows()), encoding="utf-8")
    print(f"wrote {out} ({N_ITEMS} rows)")
