"""loradem.data.rows: format detection, one-line row errors, seeded splits, fingerprints, exact-match helpers."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from loradem.data.rows import load_splits, read_rows, sample
from loradem.errors import LorademError
from loradem.model.render import eval_pair, normalize_answer
from loradem.recipe import Source


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def source(path: Path, **kw) -> Source:
    return Source(name=kw.pop("name", "src"), data=str(path), **kw)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---- formats ------------------------------------------------------------

def test_detects_each_format_and_keeps_only_its_keys(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{**chat("q", "a"), "id": 1}])
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4", "source": "x"}])
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello", "meta": {}}])
    assert read_rows(str(m)) == ([chat("q", "a")], "messages")
    assert read_rows(str(p)) == ([{"prompt": "2+2=", "completion": "4"}], "prompt_completion")
    assert read_rows(str(t)) == ([{"text": "hello"}], "text")
    # extra keys inside messages are dropped too
    extra = {"messages": [{"role": "user", "content": "q", "name": "u"}, {"role": "assistant", "content": "a"}]}
    assert read_rows(str(write_jsonl(tmp_path / "e.jsonl", [extra])))[0] == [chat("q", "a")]


def test_json_csv_and_parquet_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [chat(f"q{i}", f"a{i}") for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["messages"])
        w.writeheader()
        w.writerows({"messages": json.dumps(r["messages"])} for r in rows)
    for name in ("d.json", "d.parquet", "d.csv"):
        assert read_rows(str(tmp_path / name)) == (rows, "messages"), name
    with open(tmp_path / "pc.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerow({"prompt": "2+2=", "completion": "4"})
    assert read_rows(str(tmp_path / "pc.csv")) == ([{"prompt": "2+2=", "completion": "4"}], "prompt_completion")


# ---- errors -------------------------------------------------------------

def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n\n" + '{"messages": [oops\n')
    with pytest.raises(LorademError, match=r"bad\.jsonl: line 3: not valid JSON \(Expecting value\)") as e:
        read_rows(str(path))
    one_line_error(e)


def test_mixed_file_names_the_first_row_that_does_not_fit(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(16)] + [{"prompt": "x"}]
    path = write_jsonl(tmp_path / "addition.jsonl", rows)
    expected = ('addition.jsonl: row 17: expected a "messages" row (list of {role, content} ending with an '
                "assistant message), got keys ['prompt']")
    with pytest.raises(LorademError, match=re.escape(expected)) as e:
        read_rows(str(path))
    assert one_line_error(e).endswith(expected)


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "the last message is from 'user', not the assistant's answer"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "message 2 has role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "message 2 (assistant) has empty"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}, "non-string content"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "no user message"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "message 1 is keys ['role']"),
        ({"messages": []}, '"messages" is an empty list'),
        ({"messages": "hi"}, '"messages" is a str'),
        (["not", "an", "object"], "got a list of 3"),
    ],
)
def test_every_bad_messages_row_is_rejected(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "m.jsonl", [chat("q", "a"), row])
    with pytest.raises(LorademError, match=r"m\.jsonl: row 2: expected a \"messages\" row .*" + re.escape(problem)):
        read_rows(str(path))


@pytest.mark.parametrize(
    "fmt, row, problem",
    [
        ("prompt_completion", {"prompt": "p"}, "got keys ['prompt']"),
        ("prompt_completion", {"prompt": "p", "completion": ""}, '"completion" is empty'),
        ("prompt_completion", {"prompt": 3, "completion": "c"}, '"prompt" is int, not a string'),
        ("text", {"text": None}, '"text" is NoneType, not a string'),
        ("text", {"prompt": "p", "completion": "c"}, "got keys ['completion', 'prompt']"),
    ],
)
def test_declared_format_is_checked_on_every_row(tmp_path, fmt, row, problem):
    good = {"prompt": "p", "completion": "c"} if fmt == "prompt_completion" else {"text": "t"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, row])
    with pytest.raises(LorademError, match=rf'd\.jsonl: row 3: expected a "{fmt}" row .*' + re.escape(problem)):
        read_rows(str(path), fmt)


def test_declared_format_applies_from_the_first_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    with pytest.raises(LorademError, match=r'd\.jsonl: row 1: expected a "text" row'):
        load_splits(source(path, format="text"), seed=0)


def test_undetectable_first_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(LorademError, match=r"d\.jsonl: row 1: cannot detect the format.*got keys \['answer', 'question'\]"):
        read_rows(str(path))


def test_empty_files_have_no_rows(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "empty.json").write_text("[]")
    for name in ("empty.jsonl", "blank.jsonl", "empty.json"):
        with pytest.raises(LorademError, match=rf"{re.escape(name)}: no rows$"):
            load_splits(source(tmp_path / name), seed=0)


def test_json_file_with_a_bad_element_names_its_index(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([chat("q", "a"), {"text": "x"}]))
    with pytest.raises(LorademError, match=r"d\.json: row 2: expected a \"messages\" row"):
        read_rows(str(tmp_path / "d.json"))


def test_unreachable_hub_dataset_is_one_line():
    with pytest.raises(LorademError, match=r"^no-such-org/no-such-data: could not load the hub dataset \(split 'train'\)") as e:
        read_rows("no-such-org/no-such-data")
    one_line_error(e)


def test_splits_that_leave_no_training_rows_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", "a") for i in range(4)])
    with pytest.raises(LorademError, match=r"source 'src': no training rows left \(4 rows, 2 test, 2 validation\)"):
        load_splits(source(path, test=2, validation=2), seed=0)
    with pytest.raises(LorademError, match=r"source 'src': validation: asks for 9 rows, but the data has only 4"):
        load_splits(source(path, test=0, validation=9), seed=0)


# ---- splits -------------------------------------------------------------

def rows_for(n: int, tag: str = "") -> list[dict]:
    return [chat(f"{tag}q{i}", f"a{i}") for i in range(n)]


def test_splits_are_a_seeded_partition(tmp_path):
    rows = rows_for(50)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    s = load_splits(source(path, test=0.1, validation=3), seed=0)
    assert (len(s.test), len(s.validation), len(s.train)) == (5, 3, 42)
    assert s.format == "messages" and s.source == "src"
    assert sorted(map(json.dumps, s.train + s.validation + s.test)) == sorted(map(json.dumps, rows))
    assert s.train != rows[8:]  # shuffled, not file order
    again = load_splits(source(path, test=0.1, validation=3), seed=0)
    assert again == s
    other_seed = load_splits(source(path, test=0.1, validation=3), seed=1)
    assert other_seed.test != s.test and other_seed.fingerprint != s.fingerprint
    renamed = load_splits(source(path, name="other", test=0.1, validation=3), seed=0)
    assert renamed.test != s.test  # the shuffle depends on the source's name


def test_small_fraction_gives_at_least_one_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_for(20))
    s = load_splits(source(path, test=0.01, validation=0.01), seed=0)
    assert (len(s.test), len(s.validation), len(s.train)) == (1, 1, 18)
    none = load_splits(source(path, test=0, validation=0), seed=0)
    assert (len(none.test), len(none.validation), len(none.train)) == (0, 0, 20)


def test_a_source_splits_do_not_depend_on_other_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows_for(30, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rows_for(30, "b"))
    before = load_splits(source(a, name="a"), seed=0)
    load_splits(source(b, name="b"), seed=0)
    write_jsonl(b, rows_for(300, "b"))  # another source grows
    load_splits(source(b, name="b"), seed=0)
    assert load_splits(source(a, name="a"), seed=0) == before


def test_test_data_file_replaces_carved_test_rows(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(20))
    test = write_jsonl(tmp_path / "t.jsonl", rows_for(4, "t"))
    s = load_splits(source(data, test_data=str(test), test=0.5, validation=2), seed=0)
    assert s.test == rows_for(4, "t")  # the file's rows, in file order; `test` is ignored
    assert (len(s.validation), len(s.train)) == (2, 18)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(LorademError, match=r'bad\.jsonl: row 1: expected a "messages" row'):
        load_splits(source(data, test_data=str(bad)), seed=0)


def test_fingerprint_follows_data_bytes_and_split_parameters(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_for(20))
    base = load_splits(source(path), seed=0).fingerprint
    copy = write_jsonl(tmp_path / "copy.jsonl", rows_for(20))
    assert load_splits(source(copy), seed=0).fingerprint == base  # content, not location
    assert load_splits(source(path, validation=3), seed=0).fingerprint != base
    assert load_splits(source(path), seed=7).fingerprint != base
    write_jsonl(path, rows_for(21))
    assert load_splits(source(path), seed=0).fingerprint != base


# ---- exact-match helpers -----------------------------------------------

def test_eval_pair():
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    assert eval_pair(row) == (row["messages"][:2], "a")
    assert eval_pair({"prompt": "2+2=", "completion": "4"}) == ("2+2=", "4")
    with pytest.raises(LorademError, match=r'exact match needs a prompt and an answer, but a "text" row has neither'):
        eval_pair({"text": "hello"})


def test_normalize_answer():
    assert normalize_answer("  3,  7,\n19\t42 ") == "3, 7, 19 42"
    assert normalize_answer("GREEN Apple") == "GREEN Apple"  # case-sensitive
    assert normalize_answer("\n") == ""


def test_chat_template_renders_prompt_completion_rows_as_turns(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(20)))
    plain = load_splits(source(path, validation=2, test=2), seed=0)
    chat = load_splits(source(path, validation=2, test=2, chat_template=True), seed=0)
    assert plain.format == "prompt_completion" and chat.format == "messages"
    for a, b in zip(plain.train + plain.validation + plain.test, chat.train + chat.validation + chat.test):
        assert b == {"messages": [{"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["completion"]}]}
    assert chat.fingerprint != plain.fingerprint  # an adapter trained one way is never reused for the other


def test_chat_template_refuses_text_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    with pytest.raises(LorademError, match=r"source 'src': chat_template: true needs prompt/completion or messages rows"):
        load_splits(source(path, chat_template=True), seed=0)


def test_stage_samples_are_seeded_per_stage_and_source_and_never_repeat_a_row():
    rows = [{"text": str(i)} for i in range(50)]
    draw = sample(rows, 10, seed=3, stage="regmean", source="a")
    assert draw == sample(list(rows), 10, seed=3, stage="regmean", source="a")  # the same draw every time
    assert len({r["text"] for r in draw}) == 10 and all(r in rows for r in draw)
    assert draw != sample(rows, 10, seed=3, stage="learn", source="a")  # each stage and source draws its own
    assert draw != sample(rows, 10, seed=3, stage="regmean", source="b")
    assert draw != sample(rows, 10, seed=4, stage="regmean", source="a")
    # fewer rows than asked: all of them, each once
    assert sorted(r["text"] for r in sample(rows[:4], 10, seed=3, stage="warmup", source="a")) == ["0", "1", "2", "3"]
