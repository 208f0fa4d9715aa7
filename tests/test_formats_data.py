"""loradem.data.formats and recipes/formats.yaml: the committed files are exactly the generator's output, every
answer is right and short enough for exact match, and the recipe passes `loradem check`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loradem.data.formats import (
    ARITH_TEMPLATES,
    CHAT_TEMPLATES,
    CITIES,
    COLORS,
    FRUITS,
    HELD_OUT,
    HELD_OUT_DIR,
    JOBS,
    JSON_TEMPLATES,
    LABEL_TEMPLATES,
    NAMES,
    OBJECTS,
    PETS,
    SUITE,
    TASKS,
    TOPICS,
    main,
)
from loradem.data.rows import read_rows
from loradem.errors import LorademError
from loradem.model.render import normalize_answer
from loradem.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "recipes" / "data" / "formats"
RECIPE = REPO / "recipes" / "formats.yaml"


def test_committed_files_equal_a_fresh_generation(tmp_path):
    assert main(["--out", str(tmp_path)]) == 0
    for task in TASKS:
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (COMMITTED / f"{task}.jsonl").read_bytes(), task
    for task in HELD_OUT:
        assert (tmp_path / HELD_OUT_DIR / f"{task}.jsonl").read_bytes() == (COMMITTED / HELD_OUT_DIR / f"{task}.jsonl").read_bytes(), task
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(f"{t}.jsonl" for t in TASKS), HELD_OUT_DIR])
    assert sorted(p.name for p in (tmp_path / HELD_OUT_DIR).iterdir()) == sorted(f"{t}.jsonl" for t in HELD_OUT)
    assert sorted(p.name for p in COMMITTED.iterdir()) == sorted(p.name for p in tmp_path.iterdir())  # nothing stale committed


def _topic(sentence: str) -> str:
    """The topic whose subject and predicate lists the sentence is made of (exactly one)."""
    found = [t for t, (subjects, predicates) in TOPICS.items()
             if any(sentence.startswith(s + " ") for s in subjects) and any(f" {p}" in sentence for p in predicates)]
    assert len(found) == 1, sentence
    return found[0]


CHAT_FACTS = (  # the chat templates' statements, as patterns
    r"(?P<n>\w+) has an? (?P<c1>\w+) (?P<o1>\w+) and an? (?P<c2>\w+) (?P<o2>\w+)",
    r"(?P<n>\w+)'s (?P<o1>\w+) is (?P<c1>\w+) and the (?P<o2>\w+) is (?P<c2>\w+)",
    r"There is an? (?P<c1>\w+) (?P<o1>\w+) and an? (?P<c2>\w+) (?P<o2>\w+) at (?P<n>\w+)'s house",
)


def check_answer(task: str, question: str, answer: str) -> None:
    if task == "chat":
        m = next(filter(None, (re.fullmatch(t + r"\. (?:What|Which) color is the (?P<q>\w+)\?", question) for t in CHAT_FACTS)))
        colors = {m["o1"]: m["c1"], m["o2"]: m["c2"]}
        assert m["n"] in NAMES and set(colors) <= set(OBJECTS) and set(colors.values()) <= set(COLORS)
        assert len(set(colors)) == len(set(colors.values())) == 2
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", question)  # "an orange", "a red"
        assert answer == colors[m["q"]].capitalize() + "."
    elif task == "json":
        m = re.fullmatch(r'(?:What is "(\w+)" in (\{.*\})\?|Extract "(\w+)" from this JSON: (\{.*\})|(\{.*\})\nGive the value of "(\w+)"\.)', question)
        g = [x for x in m.groups() if x is not None]
        key, record = (g[0], json.loads(g[1])) if not g[0].startswith("{") else (g[1], json.loads(g[0]))
        assert len(record) == 3 and key in record
        pools = {"name": NAMES, "city": CITIES, "job": JOBS, "pet": PETS}
        assert all(v in pools[k] if k in pools else isinstance(v, int) for k, v in record.items())
        assert answer == str(record[key])
    elif task in ("arith", "json-arith"):
        assert len(re.findall(r"\b(?:plus|minus)\b", question)) == 1, question  # exactly one operation
        if task == "json-arith":
            m = re.fullmatch(r"(\{.*\}) (\w+) (plus|minus) (\w+) equals", question)
            record = json.loads(m.group(1))
            assert len(record) == 3 and set(record) <= set(FRUITS) and m.group(2) != m.group(4)
            a, op, b = record[m.group(2)], m.group(3), record[m.group(4)]
            assert all(10 <= v <= 49 for v in record.values())
        else:
            m = next(filter(None, (re.fullmatch(t.format(a=r"(\d+)", op="(plus|minus)", b=r"(\d+)").replace(".", r"\."), question)
                                   for t in ARITH_TEMPLATES)))
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert 10 <= a <= 49 and 10 <= b <= 49
        assert answer == str(a + b if op == "plus" else a - b) and int(answer) >= 0
    elif task == "label":
        assert answer == _topic(question.split(": ", 1)[-1].split("? ", 1)[-1])
    elif task == "json-label":
        key, record = re.fullmatch(r'What is the topic of "(\w+)" in (\{.*\})\?', question).groups()
        record = json.loads(record)
        assert list(record) == ["note", "title", "text"] and answer == _topic(record[key])
        assert len({_topic(text) for text in record.values()}) == 3  # a topic of the record is right 1 time in 3
    elif task == "chat-arith":
        name, a, fruit, b, fruit2, name2 = re.fullmatch(r"(\w+) has (\d+) (\w+) and gets (\d+) more\. How many (\w+) does (\w+) have\?", question).groups()
        assert (name, fruit) == (name2, fruit2) and name in NAMES and fruit in FRUITS
        assert 10 <= int(a) <= 49 and 10 <= int(b) <= 49
        assert answer == f"{int(a) + int(b)}."
    elif task == "chat-label":
        name, sentence = re.fullmatch(r'(\w+) said: "(.*)" What is that about\?', question).groups()
        assert name in NAMES and answer == _topic(sentence).capitalize() + "."
    elif task == "chat-json":
        name, record, asked = re.fullmatch(r"Here are (\w+)'s things: (\{.*\})\. What color is the (\w+)\?", question).groups()
        record = json.loads(record)
        assert name in NAMES and len(record) == 3 and set(record) <= set(OBJECTS) and asked in record
        assert len(set(record.values())) == 3 and set(record.values()) <= set(COLORS)  # the key decides the answer
        assert answer == record[asked].capitalize() + "."


@pytest.mark.parametrize("task", [*TASKS, *HELD_OUT])
def test_every_committed_answer_is_correct_and_exact_match_scorable(task):
    path = COMMITTED / (f"{task}.jsonl" if task in TASKS else f"{HELD_OUT_DIR}/{task}.jsonl")
    rows, fmt = read_rows(str(path))
    assert fmt == "messages" and len(rows) == (1000 if task in TASKS else 60)
    templates, answers = set(), set()
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        check_answer(task, user["content"], assistant["content"])
        # one short token run, unchanged by the scorer's normalization: a greedy reply can equal it exactly
        assert normalize_answer(assistant["content"]) == assistant["content"] and " " not in assistant["content"]
        # short prompts, as training cost grows with tokens; json-label (scored, never trained) holds three texts
        assert len(assistant["content"]) <= 10 and len(user["content"]) <= (240 if task == "json-label" else 140)
        templates.add(re.sub(r"\{.*\}", "J", re.sub(r"\d+", "N", user["content"]))[:10])
        answers.add(assistant["content"])
    assert len(answers) >= 4  # not one constant reply
    if task in TASKS:
        assert len(templates) >= 3, templates  # varied phrasing, not one string


def _prompts(task: str) -> list[str]:
    path = COMMITTED / (f"{task}.jsonl" if task in TASKS else f"{HELD_OUT_DIR}/{task}.jsonl")
    return [row["messages"][0]["content"] for row in read_rows(str(path))[0]]


@pytest.mark.parametrize("task", [*TASKS, *HELD_OUT])
def test_no_file_repeats_a_prompt(task):
    """A repeated prompt can land in a source's test split and its training rows at once."""
    prompts = _prompts(task)
    assert len(set(prompts)) == len(prompts)


def test_label_never_repeats_a_sentence():
    """One sentence under two templates is a test row the adapter has trained on in other words."""
    sentences = [re.sub(r"^(Topic: |Label the topic in one word: |Which topic is this\? )", "", p) for p in _prompts("label")]
    assert len(set(sentences)) == len(sentences) == 1000


def test_held_out_prompts_are_no_source_prompt_and_open_with_no_source_template():
    """A held-out task in a source's own template is answered by that source's adapter alone."""
    sources = {p for task in TASKS for p in _prompts(task)}
    openings = {t.split("{")[0] for t in (*CHAT_TEMPLATES, *JSON_TEMPLATES, *ARITH_TEMPLATES, *LABEL_TEMPLATES)} - {""}
    assert {"Topic: ", "Calculate ", "Work out ", 'What is "'} <= openings
    for task in HELD_OUT:
        for prompt in _prompts(task):
            assert prompt not in sources, (task, prompt)
            assert not any(prompt.startswith(o) for o in openings), (task, prompt)
    assert not any(p.startswith("Topic") for p in _prompts("json-label"))


def test_a_task_that_runs_out_of_distinct_prompts_raises():
    with pytest.raises(LorademError, match=r"^formats: task 'label' drew 10000 repeats in a row after 2304 distinct rows; ask for fewer rows"):
        SUITE.rows("label", seed=0, rows=2305)


def test_a_failed_generation_leaves_the_earlier_files_whole(tmp_path):
    assert main(["--out", str(tmp_path), "--rows", "3", "--held-out-rows", "2"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.jsonl")}
    with pytest.raises(LorademError, match=r"task 'label' drew 10000 repeats in a row"):
        SUITE.write(tmp_path, seed=1, rows=2305, log=lambda _: None)  # chat, json and arith generate, label cannot
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.jsonl")} == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".jsonl") == []


def test_seeds_and_tasks_are_independent():
    assert SUITE.rows("json", seed=0, rows=50) == SUITE.rows("json", seed=0, rows=50)
    assert SUITE.rows("json", seed=1, rows=50) != SUITE.rows("json", seed=0, rows=50)
    assert SUITE.rows("label", seed=0, rows=10) == SUITE.rows("label", seed=0, rows=1000)[:10]
    assert SUITE.rows("json-arith", seed=0, rows=5) != SUITE.rows("arith", seed=0, rows=5)


def test_rows_flag(tmp_path):
    assert main(["--out", str(tmp_path), "--rows", "3", "--held-out-rows", "2", "--seed", "5"]) == 0
    lines = (tmp_path / "chat.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == SUITE.rows("chat", seed=5, rows=3)
    assert len((tmp_path / HELD_OUT_DIR / "chat-arith.jsonl").read_text().splitlines()) == 2


def test_recipe_uses_every_file_and_passes_check(capsys):
    from loradem.cli import main as cli

    recipe = load_recipe(RECIPE)
    assert [s.name for s in recipe.sources] == list(TASKS)
    assert [Path(s.data) for s in recipe.sources] == [COMMITTED / f"{t}.jsonl" for t in TASKS]
    assert [(t.name, Path(t.data)) for t in recipe.eval.held_out] == [(t, COMMITTED / HELD_OUT_DIR / f"{t}.jsonl") for t in HELD_OUT]
    assert recipe.regmean.enabled and recipe.learn.enabled and recipe.eval.retention.enabled and not recipe.variants
    capsys.readouterr()
    assert cli(["check", str(RECIPE), "--baseline", "mix"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok") and ("held-out tasks: json-arith (60 rows), json-label (60 rows), chat-arith (60 rows), "
                                             "chat-label (60 rows), chat-json (60 rows)") in out
