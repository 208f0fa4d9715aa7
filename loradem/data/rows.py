"""Data: read one source's rows, check every row, split them the same way every time.

    from loradem.data.rows import load_splits
    splits = load_splits(recipe.source("addition"), seed=recipe.seed)
    splits.train[0]   # {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}

Reads .jsonl (line by line, so a bad line is named), .json (a list of row
objects, or JSON lines), .csv, .parquet, or a `datasets` hub id. Every row is
checked against the source's format ("auto": the first row's keys decide) and
normalized to exactly these keys:

- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                     (at least one user message; the last message is the assistant's answer)
- prompt_completion: {"prompt": str, "completion": str}
- text:              {"text": str}

A row that does not fit raises `LorademError` naming the file and the row
(1-based line number for JSONL, 1-based data row otherwise). TRL itself looks
at the first row only, crashes on mixed files and raises a bare StopIteration
on empty ones; this check replaces that.

Splits: a seeded shuffle that depends only on (seed, source name), then test
rows (from `test_data` if given), validation rows, and the rest for training.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from loradem.errors import LorademError, first_line
from loradem.model.render import Row
from loradem.recipe import DATA_SUFFIXES, Source

FORMATS = ("messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
EXPECTED = {
    "messages": 'a "messages" row (list of {role, content} ending with an assistant message)',
    "prompt_completion": 'a "prompt_completion" row (non-empty string "prompt" and "completion")',
    "text": 'a "text" row (non-empty string "text")',
}



@dataclass(frozen=True)
class Splits:
    source: str
    format: str
    train: list[Row]
    validation: list[Row]
    test: list[Row]
    fingerprint: str


# ---- public API ---------------------------------------------------------

def load_splits(source: Source, seed: int) -> Splits:
    """Read, check and split one source; the same inputs always give the same splits."""
    rows, fmt = read_rows(source.data, source.format, hub_split=source.hub_split)
    order = list(range(len(rows)))
    random.Random(f"{seed}:{source.name}").shuffle(order)
    shuffled = [rows[i] for i in order]
    where = f"source {source.name!r}"
    if source.test_data is not None:
        test, _ = read_rows(source.test_data, fmt, hub_split="test")
    else:
        n_test = split_size(source.test, len(shuffled), f"{where}: test")
        test, shuffled = shuffled[:n_test], shuffled[n_test:]
    n_val = split_size(source.validation, len(rows), f"{where}: validation")
    validation, train = shuffled[:n_val], shuffled[n_val:]
    if not train:
        raise LorademError(
            f"{where}: no training rows left ({len(rows)} rows, {len(test)} test, {len(validation)} validation); "
            "lower `test` / `validation` or add rows"
        )
    if source.chat_template:
        if fmt == "text":
            raise LorademError(f"{where}: chat_template: true needs prompt/completion or messages rows; a text row has no turns")
        if fmt == "prompt_completion":
            train, validation, test = ([as_chat(r) for r in part] for part in (train, validation, test))
            fmt = "messages"
    return Splits(source.name, fmt, train, validation, test, data_fingerprint(source, seed, fmt))


def sample(rows: list[Row], n: int, *, seed: int, stage: str, source: str) -> list[Row]:
    """A seeded sample of `n` of `rows` (all of them, reordered, when fewer), the same for the same (seed, stage,
    source) whatever else the recipe holds: the warm-up, RegMean and learned weights each draw their own."""
    return random.Random(f"{seed}:{stage}:{source}").sample(rows, min(n, len(rows)))


def as_chat(row: Row) -> Row:
    """A prompt/completion row as one user turn and one assistant turn, for the base's chat template."""
    return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}


def split_size(value: int | float, n: int, where: str) -> int:
    """Rows for a split: an int is a count, a float a fraction of `n` (at least one row when > 0)."""
    if isinstance(value, float):
        return max(1, round(value * n))
    if value > n:
        raise LorademError(f"{where}: asks for {value} rows, but the data has only {n}")
    return value


def data_fingerprint(source: Source, seed: int, fmt: str) -> str:
    """sha256 over the data (and test data) bytes and every parameter that shapes the splits."""
    h = hashlib.sha256()
    for data in (source.data, source.test_data):
        h.update(_content_id(data, source.hub_split).encode() + b"\0")
    params = {"name": source.name, "seed": seed, "format": fmt, "validation": source.validation,
              "test": source.test, "hub_split": source.hub_split}
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()


# ---- reading ------------------------------------------------------------

def read_rows(data: str, fmt: str = "auto", hub_split: str = "train") -> tuple[list[Row], str]:
    """All rows of a file or hub dataset, checked and normalized; returns (rows, format)."""
    label = display_name(data)
    rows: list[Row] = []
    for number, raw in _raw_rows(data, hub_split):
        if fmt == "auto":
            fmt = detect_format(raw, label, number)
        rows.append(normalize_row(raw, fmt, label, number))
    if not rows:
        raise LorademError(f"{label}: no rows")
    return rows, fmt


def detect_format(raw: Any, label: str, number: int) -> str:
    keys = sorted(raw) if isinstance(raw, dict) else []
    if "messages" in keys:
        return "messages"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise LorademError(
        f"{label}: row {number}: cannot detect the format: expected a row with key \"messages\", "
        f"\"prompt\" + \"completion\", or \"text\", got {_shape(raw)}"
    )


def normalize_row(raw: Any, fmt: str, label: str, number: int) -> Row:
    """The row with exactly its format's keys; raises naming the row if it does not fit."""
    problem = _row_problem(raw, fmt)
    if problem:
        raise LorademError(f"{label}: row {number}: expected {EXPECTED[fmt]}, {problem}")
    if fmt == "messages":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in raw["messages"]]}
    if fmt == "prompt_completion":
        return {"prompt": raw["prompt"], "completion": raw["completion"]}
    return {"text": raw["text"]}


def _row_problem(raw: Any, fmt: str) -> str | None:
    if not isinstance(raw, dict):
        return f"got {_shape(raw)}"
    if fmt == "messages":
        return _messages_problem(raw)
    keys = ("prompt", "completion") if fmt == "prompt_completion" else ("text",)
    for key in keys:
        if key not in raw:
            return f"got keys {sorted(raw)}"
        if not isinstance(raw[key], str):
            return f'"{key}" is {type(raw[key]).__name__}, not a string'
        if not raw[key].strip():
            return f'"{key}" is empty'
    return None


def _messages_problem(raw: dict) -> str | None:
    messages = raw.get("messages")
    if "messages" not in raw:
        return f"got keys {sorted(raw)}"
    if not isinstance(messages, list) or not messages:
        return f'"messages" is {_shape(messages)}'
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            return f"message {i} is {_shape(m)}"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"message {i} ({m['role']}) has empty or non-string content"
    if messages[-1]["role"] != "assistant":
        return f"the last message is from {messages[-1]['role']!r}, not the assistant's answer"
    if not any(m["role"] == "user" for m in messages):
        return "no user message"
    return None


def _shape(value: Any) -> str:
    if isinstance(value, dict):
        return f"keys {sorted(value)}"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def _raw_rows(data: str, hub_split: str) -> Iterator[tuple[int, Any]]:
    path = Path(data)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES and not path.is_file():
        yield from _hub_rows(data, hub_split)
    elif not path.is_file():
        raise LorademError(f"{display_name(data)}: data file not found")
    elif suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise LorademError(f"{display_name(data)}: expected a {'/'.join(DATA_SUFFIXES)} file")


def _jsonl_rows(path: Path, lines: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    if lines is None:
        lines = _read_text(path).splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorademError(f"{display_name(path)}: line {number}: not valid JSON ({exc.msg})") from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        yield from _jsonl_rows(path, text.splitlines())  # JSON lines saved as .json
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LorademError(f"{display_name(path)}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    yield from enumerate(rows, start=1)


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(_read_text(path).splitlines())
    for number, row in enumerate(reader, start=1):
        if isinstance(row.get("messages"), str):
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as exc:
                raise LorademError(
                    f"{display_name(path)}: row {number}: the \"messages\" cell is not valid JSON ({exc.msg})"
                ) from None
        yield number, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is one line naming the file
        raise LorademError(f"{display_name(path)}: not a readable parquet file ({first_line(exc)})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _hub_rows(data: str, hub_split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets

        dataset = datasets.load_dataset(data, split=hub_split)
    except Exception as exc:  # noqa: BLE001 - any hub failure is one clear line
        raise LorademError(
            f"{data}: could not load the hub dataset (split {hub_split!r}): {first_line(exc)}"
        ) from None
    yield from enumerate(dataset, start=1)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LorademError(f"{display_name(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _content_id(data: str | None, hub_split: str) -> str:
    if data is None:
        return "-"
    path = Path(data)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    import datasets  # a hub id: the datasets library fingerprints the loaded split

    try:
        return f"hub:{data}:{hub_split}:{datasets.load_dataset(data, split=hub_split)._fingerprint}"
    except Exception as exc:  # noqa: BLE001
        raise LorademError(f"{data}: could not load the hub dataset (split {hub_split!r}): {first_line(exc)}") from None


def display_name(data: str | Path) -> str:
    """A path relative to the working directory when it is under it, else as given."""
    path = Path(data)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(data)

