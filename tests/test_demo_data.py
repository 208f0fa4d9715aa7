"""loradem.data.demo: the committed demo files are exactly the generator's output, and every answer is right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loradem.data.demo import TASKS, WORDS, main, task_rows
from loradem.data.rows import read_rows

COMMITTED = Path(__file__).resolve().parent.parent / "recipes" / "data" / "demo"


def test_committed_files_equal_a_fresh_generation(tmp_path):
    assert main(["--out", str(tmp_path)]) == 0
    for task in TASKS:
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (COMMITTED / f"{task}.jsonl").read_bytes(), task
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(f"{t}.jsonl" for t in TASKS), "heldout"])  # no leftovers


def check_answer(task: str, question: str, answer: str) -> None:
    if task == "addition":
        a, b = map(int, re.fullmatch(r"\D*(\d{3})\D+(\d{3})\D*", question).groups())
        assert answer == str(a + b)
    elif task == "reverse":
        words = question.split(":", 1)[1].split()
        assert 3 <= len(words) <= 5 and len(set(words)) == len(words) and all(w in WORDS for w in words)
        assert answer == " ".join(words[::-1])
    elif task == "sort":
        numbers = [int(n) for n in question.split(":")[1].split(",")]
        assert len(numbers) == 4 and all(1 <= n <= 99 for n in numbers)
        assert answer == ", ".join(map(str, sorted(numbers)))
    elif task == "uppercase":
        phrase = question.split(":", 1)[1].strip()
        assert 2 <= len(phrase.split()) <= 3 and all(w in WORDS for w in phrase.split())
        assert answer == phrase.upper()


@pytest.mark.parametrize("task", list(TASKS))
def test_every_committed_answer_is_correct(task):
    rows, fmt = read_rows(str(COMMITTED / f"{task}.jsonl"))
    assert fmt == "messages" and len(rows) == 1000
    templates = set()
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        check_answer(task, user["content"], assistant["content"])
        templates.add(re.sub(r"\d+", "N", re.sub(r"'[a-z]+'", "W", user["content"].split(":")[0])))
    assert 2 <= len(templates) <= 3, templates  # varied phrasing, not one string


def test_seeds_and_tasks_are_independent():
    assert task_rows("addition", seed=0, rows=50) == task_rows("addition", seed=0, rows=50)
    assert task_rows("addition", seed=1, rows=50) != task_rows("addition", seed=0, rows=50)
    assert task_rows("sort", seed=0, rows=10) == task_rows("sort", seed=0, rows=1000)[:10]
    assert len(set(WORDS)) == len(WORDS) >= 300
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 8 for w in WORDS)


def test_rows_flag(tmp_path):
    assert main(["--out", str(tmp_path), "--rows", "3", "--seed", "5"]) == 0
    lines = (tmp_path / "reverse.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == task_rows("reverse", seed=5, rows=3)
