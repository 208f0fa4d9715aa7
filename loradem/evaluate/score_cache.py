"""Scores kept across runs: a measure of a model is not taken again by a later run that takes it the same way.

    cache = ScoreCache.for_plan(cache_root() / "scores", common, parts)   # what decides the measures, below
    model = cache.model(identity, [base_dir, adapter_dir])               # None: not cacheable (a folder is missing)
    found = cache.load(cache.key(model, "test:addition"))                # the entry, or None (never stored, unreadable)
    cache.store(cache.key(model, "test:addition"), {"value": 0.8, "predictions": [...], "seconds": 12.0})

One entry per model and measure: each source's test rows (``test:<source>``), each held-out task
(``held_out:<task>``), ``retention`` and ``lm_eval``. So a run that adds a held-out task, or changes the
retention prompts, takes only that measure again, and a source added to a recipe is scored alone on the models
that do not change (the base, the earlier adapters).

A key hashes the model, what every measure shares and what decides that measure alone. The model is the row's
identity (`compare.model_identity`: base, used adapters, weights) plus the sha256 fingerprint of every weights
folder it reads (`files.fingerprint_weights`, cached by file stat), so a retrained adapter or a rewritten base is
scored again even under the same path. Every measure shares the generation settings (eval settings other than
the held-out tasks, retention and lm-eval blocks), the token limit, the source of loradem's evaluation and model
code, the versions of torch, transformers and lm-eval, and torch's thread count (a float reduction split
differently can flip a greedy token); a measure adds its own rows and metric (the retention prompts, token budget
and base; the lm-eval tasks, their files and limit). Entries are small JSON files, written aside and renamed into
place; an unreadable one is a miss, taken again and overwritten. `loradem run/eval --rescore` skips the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional, Sequence

import loradem
from loradem.errors import LorademError
from loradem.files import atomic_write_json, fingerprint_weights, stable_hash

FORMAT = 2  # one entry per model and measure
# What scoring runs: a change to any of these files changes every key (the measures, generation, rendering,
# the fold and the model loading).
CODE_FILES = ("evaluate/compare.py", "evaluate/heldout.py", "evaluate/retention.py", "evaluate/harness.py",
              "model/generate.py", "model/render.py", "model/soup.py", "model/base.py", "model/layers.py",
              "model/lora_config.py")
ENTRY_KEYS = ("value", "predictions", "seconds")


def code_fingerprint() -> str:
    root = Path(loradem.__file__).parent
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def rows_fingerprint(rows: Sequence[Any]) -> str:
    return stable_hash(list(rows), length=64)


def folder_fingerprint(folder: Path) -> str:
    """Every file of a folder (an lm-eval task folder): names and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ScoreCache:
    folder: Path
    common: str  # the hash of what every measure shares (code, versions, threads, generation settings)
    parts: dict[str, str]  # each measure's name -> the hash of what decides it alone

    @classmethod
    def for_plan(cls, folder: Path, common: dict, parts: dict[str, Any]) -> "ScoreCache":
        import torch

        described = {**common, "code": code_fingerprint(), "format": FORMAT,
                     "versions": {"loradem": loradem.__version__, **{p: _version(p) for p in ("torch", "transformers", "lm_eval")}},
                     "threads": torch.get_num_threads()}
        return cls(Path(folder), stable_hash(described, length=64),
                   {name: stable_hash(part, length=64) for name, part in parts.items()})

    def model(self, identity: str, folders: Sequence[Path]) -> Optional[str]:
        """The model's half of its keys: `identity` reading `folders`, by their weights' fingerprints; None when a
        folder has no weights to fingerprint (the model is then scored and not kept)."""
        try:
            weights = [fingerprint_weights(f) for f in folders]
        except LorademError:
            return None
        return stable_hash({"model": identity, "weights": weights}, length=64)

    def key(self, model: str, part: str) -> str:
        """The entry's name for measure `part` (one of `parts`) of `model` (`ScoreCache.model`)."""
        return stable_hash({"model": model, "evaluation": self.common, "part": part, "measure": self.parts[part]},
                           length=32)

    def load(self, key: str) -> Optional[dict]:
        path = self.folder / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # never stored, or unreadable: taken again (and overwritten)
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or "value" not in entry:
            return None
        return entry

    def store(self, key: str, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / f"{key}.json", {"format": FORMAT, **{k: entry[k] for k in ENTRY_KEYS if k in entry}})
