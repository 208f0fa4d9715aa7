"""Anchored training: teach each distribution vector to leave inputs outside its source alone.

    from loradem.data.anchors import anchor_rows, with_anchors
    anchors, info = anchor_rows(settings, base_dir, adapters_dir)   # generic prompts answered by the base itself
    rows = with_anchors(splits.train, anchors, settings.fraction, seed=0, source="sort")

(`settings` is an `AnchorSettings`, the recipe's ``anchor:`` block.)

Why: an adapter trained only on its own source changes the model everywhere. On
the demo, the plain sum of the three adapters answers sort prompts in the
reverse adapter's format (it reverses the list). Data mixing never has this
problem: its single adapter sees every source and learns which format goes
with which prompt. DEM cannot show one source's adapter the other sources'
data (adding a source later would retrain all of them), but it can show every
adapter the same *generic* prompts answered by the base model itself. Trained
on those rows too, a vector learns "change nothing here", and the sum of
vectors interferes less (docs/stages.md, "Anchored training"; the measured
effect is in benchmarks/RESULTS.md).

Anchor rows: ``anchor.data`` is ``builtin`` (`builtin_prompts`, everyday
questions generated from templates; none asks to add, sort, reverse or
capitalize) or a file of ``messages`` / ``prompt_completion`` rows, whose
answers are ignored. Each prompt is answered by the base with greedy decoding;
replies that do not end (eos) within ``max_new_tokens`` are dropped. The rows
are cached per (base weights, prompts, max_new_tokens) in
``<adapters_dir>/.anchors/<key>.jsonl`` beside ``<key>.json`` (the count and
the generation's seconds), so sources trained later reuse them.

Each source then trains on its own rows plus ``fraction / (1 - fraction)``
times as many anchor rows (a seeded sample, repeating rows when there are too
few), shuffled together: ``fraction`` is the anchor share of the training set.
Steps and batch size are unchanged, so the training compute barely changes.
The mixing baseline trains without anchors (it sees every source).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from loradem.data.demo import WORDS
from loradem.data.rows import read_rows
from loradem.errors import LorademError
from loradem.files import atomic_write_json, atomic_write_text, fingerprint_weights, read_json, sha256_file, stable_hash
from loradem.progress import progress
from loradem.recipe import AnchorSettings

Row = dict[str, Any]
Log = Callable[[str], Any]
GENERATION_BATCH = 50  # prompts the base answers at once
TAG = "loradem_anchor"  # the row key that marks anchor rows for the KL anchor loss (train/loss.py)

_COUNTRIES = ("France", "Spain", "Italy", "Japan", "Egypt", "Canada", "Brazil", "Kenya", "Norway", "Peru",
              "India", "China", "Mexico", "Greece", "Chile", "Poland")
_ANIMALS = ("dog", "cat", "horse", "spider", "bird", "cow", "ant", "duck", "goat", "frog", "sheep", "bee")
_ADJECTIVES = ("hot", "tall", "happy", "fast", "strong", "bright", "early", "heavy", "soft", "loud", "empty", "rich")
_JOBS = ("doctor", "teacher", "farmer", "pilot", "baker", "painter", "nurse", "judge", "chef", "driver")
_HABITATS = ("ocean", "desert", "forest", "jungle", "arctic", "river")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TOPICS = ("the sea", "winter", "a garden", "music", "a city", "the moon", "rain", "books", "coffee", "a forest")


def _templates(rng: random.Random) -> list[Callable[[], str]]:
    return [
        lambda: f"What is the capital of {rng.choice(_COUNTRIES)}?",
        lambda: f"Give one word that rhymes with '{rng.choice(WORDS)}'.",
        lambda: f"Write one short sentence about {rng.choice(_TOPICS)}.",
        lambda: f"Is {rng.randint(1, 999)} an even number? Answer yes or no.",
        lambda: f"How many legs does a {rng.choice(_ANIMALS)} have?",
        lambda: f"What is the opposite of '{rng.choice(_ADJECTIVES)}'?",
        lambda: f"Name an animal that lives in the {rng.choice(_HABITATS)}.",
        lambda: f"What does a {rng.choice(_JOBS)} do? Answer in one sentence.",
        lambda: f"Which is bigger, {rng.randint(1, 99)} or {rng.randint(1, 99)}?",
        lambda: f"What is {rng.randint(2, 9)} times {rng.randint(2, 9)}?",
        lambda: f"Define the word '{rng.choice(WORDS)}' in a few words.",
        lambda: f"What day comes after {rng.choice(_DAYS)}?",
        lambda: f"Give a synonym for '{rng.choice(_ADJECTIVES)}'.",
        lambda: f"Use the word '{rng.choice(WORDS)}' in a sentence.",
        lambda: f"How many letters are in the word '{rng.choice(WORDS)}'?",
        lambda: f"What is the first letter of '{rng.choice(WORDS)}'?",
    ]


def builtin_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct everyday questions from 16 templates, the same for the same (n, seed)."""
    rng = random.Random(f"{seed}:anchor")
    templates = _templates(rng)
    seen: dict[str, None] = {}
    for _ in range(100 * n):
        if len(seen) == n:
            break
        seen.setdefault(rng.choice(templates)(), None)
    if len(seen) < n:
        raise LorademError(f"anchor.prompts: the builtin templates give only {len(seen)} distinct prompts, not {n}")
    return list(seen)


def _file_prompts(path: str) -> list[list[dict]]:
    rows, fmt = read_rows(path)
    if fmt == "messages":
        return [r["messages"][:-1] for r in rows]
    if fmt == "prompt_completion":
        return [[{"role": "user", "content": r["prompt"]}] for r in rows]
    raise LorademError(f"anchor.data: {path}: expected messages or prompt/completion rows (only their prompts are "
                       f"used), got {fmt!r} rows")


def prompts_for(settings: AnchorSettings) -> list[list[dict]]:
    """The anchor prompts as chat messages (each a list of turns ending before the answer)."""
    if settings.data == "builtin":
        return [[{"role": "user", "content": p}] for p in builtin_prompts(settings.prompts)]
    return _file_prompts(settings.data)


def identity(settings: AnchorSettings) -> dict:
    """What decides the anchor rows besides the base: part of every anchored adapter's key."""
    source = "builtin" if settings.data == "builtin" else sha256_file(settings.data)
    return {"prompts": source, "n": settings.prompts if settings.data == "builtin" else None,
            "fraction": settings.fraction, "max_new_tokens": settings.max_new_tokens,
            **({"loss": settings.loss} if settings.loss != "sft" else {})}  # sft-anchored adapters keep their keys


def anchor_rows(settings: AnchorSettings, base_dir: Path, adapters_dir: Path, *, log: Log = print,
                generate: bool = True, wait_seconds: float = 7200.0) -> tuple[list[Row], dict]:
    """The anchor rows (messages: prompt + the base's own greedy reply) and their record, from the cache in
    ``<adapters_dir>/.anchors/`` or generated now; the record's ``spent_seconds`` is the generation time paid
    by this call (0 when cached).

    With ``generate=False`` (a non-zero rank of a data-parallel job) the replies are never generated here:
    the call waits up to `wait_seconds` for the process that does (rank 0) to write the cache."""
    ident = identity(settings)
    key = stable_hash({"base": fingerprint_weights(base_dir), "prompts": ident["prompts"], "n": ident["n"],
                       "max_new_tokens": settings.max_new_tokens})
    folder = Path(adapters_dir) / ".anchors"
    rows_path, record_path = folder / f"{key}.jsonl", folder / f"{key}.json"
    deadline = time.monotonic() + wait_seconds
    while not generate and not record_path.is_file():  # the record is written last
        if time.monotonic() >= deadline:
            raise LorademError(f"anchor: waited {wait_seconds:.0f} s for rank 0 to write the base's anchor replies "
                               f"({record_path}); did it fail?")
        time.sleep(min(2.0, wait_seconds))
    if rows_path.is_file() and record_path.is_file():
        rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines()]
        return rows, {**read_json(record_path), "spent_seconds": 0.0}
    prompts = prompts_for(settings)
    log(f"anchor: answering {len(prompts)} generic prompts with the base itself (greedy, "
        f"at most {settings.max_new_tokens} new tokens; cached in {rows_path})")
    # torch comes with these (about 2 s): imported only when the base has to answer, because `loradem check`
    # imports this module to check the anchor settings
    from loradem.model.generate import generate_replies
    from loradem.model.soup import load_base, load_tokenizer

    model, tokenizer = load_base(base_dir), load_tokenizer(base_dir)
    start = time.perf_counter()
    replies = []
    with progress(len(prompts), "anchor replies", unit="prompt") as bar:
        for first in range(0, len(prompts), GENERATION_BATCH):  # one generation batch per call, for the bar
            batch = prompts[first:first + GENERATION_BATCH]
            replies += generate_replies(model, tokenizer, batch, max_new_tokens=settings.max_new_tokens,
                                        batch_size=GENERATION_BATCH, log=None)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    rows = [{"messages": [*p, {"role": "assistant", "content": text}]}
            for p, (text, ended) in zip(prompts, replies) if ended and text.strip()]
    if not rows:
        raise LorademError(f"anchor: the base ended none of its {len(prompts)} replies within "
                           f"anchor.max_new_tokens={settings.max_new_tokens}; raise it")
    record = {"key": key, "prompts": len(prompts), "rows": len(rows), "dropped": len(prompts) - len(rows),
              "max_new_tokens": settings.max_new_tokens, "generation_seconds": round(seconds, 3)}
    atomic_write_text(rows_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(record_path, record)  # written last: the pair counts as cached only when both exist
    log(f"anchor: kept {len(rows)} of {len(prompts)} replies ({record['dropped']} did not end), {seconds:.0f} s")
    return rows, {**record, "spent_seconds": record["generation_seconds"]}


def generation_seconds(train_record: dict) -> float:
    """The seconds an anchored training's record says the base spent answering the anchor prompts (0 when it read
    them from the cache, or trained without anchors): part of that training's cost."""
    anchored = train_record.get("anchor")
    return float(anchored.get("generation_seconds") or 0.0) if isinstance(anchored, dict) else 0.0


def anchor_count(n_train: int, fraction: float) -> int:
    """Anchor rows added to `n_train` source rows so that they are `fraction` of the whole."""
    return int(round(n_train * fraction / (1.0 - fraction)))


def with_anchors(train: list[Row], anchors: list[Row], fraction: float, *, seed: int, source: str,
                 tag: str | None = None) -> list[Row]:
    """`train` plus `anchor_count` anchor rows (seeded sample, repeats only when needed), shuffled together.

    With `tag`, every row gets that key: True on the anchor rows, False on the source's (the KL anchor loss
    tells them apart by it); the order is the same as without."""
    if not anchors:
        raise LorademError("anchor: no anchor rows to add")
    rng = random.Random(f"{seed}:{source}:anchor")
    n = anchor_count(len(train), fraction)
    picked: list[Row] = []
    while len(picked) < n:
        picked.extend(rng.sample(anchors, min(len(anchors), n - len(picked))))
    if tag is not None:
        train, picked = [{**r, tag: False} for r in train], [{**r, tag: True} for r in picked]
    rows = [*train, *picked]
    rng.shuffle(rows)
    return rows
