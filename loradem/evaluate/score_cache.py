"""Scores kept across runs: a model scored once is not scored again by a later run that evaluates it the same way.

    cache = ScoreCache.for_plan(cache_root() / "scores", evaluation)   # evaluation: what decides a score, below
    key = cache.key(identity, [base_dir, adapter_dir])                  # None: not cacheable (a folder is missing)
    found = cache.load(key)                                             # the entry, or None (never stored, unreadable)
    cache.store(key, {"test": {...}, "predictions": {...}, ...})

A key hashes the model and the evaluation. The model is the row's identity (`compare.model_identity`: base,
used adapters, weights) plus the sha256 fingerprint of every weights folder it reads (`files.fingerprint_weights`,
cached by file stat), so a retrained adapter or a rewritten base is scored again even under the same path. The
evaluation is everything else a score depends on: each source's metric and test rows, the held-out tasks' rows,
the eval settings, the token limit, the retention prompts, the lm-eval tasks' files, the source of loradem's
evaluation and model code, the versions of torch, transformers and lm-eval, and torch's thread count (a float
reduction split differently can flip a greedy token). Entries are small JSON files, written aside and renamed
into place; an unreadable one is a miss, scored again and overwritten. `loradem run/eval --rescore` skips
the cache.
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

FORMAT = 1
# What scoring runs: a change to any of these files changes every key (the measures, generation, rendering,
# the fold and the model loading).
CODE_FILES = ("evaluate/compare.py", "evaluate/heldout.py", "evaluate/retention.py", "evaluate/harness.py",
              "model/generate.py", "model/render.py", "model/soup.py", "model/base.py", "model/layers.py",
              "model/lora_config.py")
ENTRY_KEYS = ("test", "predictions", "held_out", "held_out_predictions", "retention", "benchmarks", "seconds")


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
    evaluation: str  # the hash of everything but the model that decides a score

    @classmethod
    def for_plan(cls, folder: Path, evaluation: dict) -> "ScoreCache":
        import torch

        described = {**evaluation, "code": code_fingerprint(), "format": FORMAT,
                     "versions": {"loradem": loradem.__version__, **{p: _version(p) for p in ("torch", "transformers", "lm_eval")}},
                     "threads": torch.get_num_threads()}
        return cls(Path(folder), stable_hash(described, length=64))

    def key(self, identity: str, folders: Sequence[Path]) -> Optional[str]:
        """The entry's name for the model `identity` reading `folders`; None when a folder has no weights to
        fingerprint (the row is then scored and not kept)."""
        try:
            weights = [fingerprint_weights(f) for f in folders]
        except LorademError:
            return None
        return stable_hash({"model": identity, "weights": weights, "evaluation": self.evaluation}, length=32)

    def load(self, key: str) -> Optional[dict]:
        path = self.folder / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # never stored, or unreadable: scored again (and overwritten)
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or not isinstance(entry.get("test"), dict):
            return None
        return entry

    def store(self, key: str, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / f"{key}.json", {"format": FORMAT, **{k: entry[k] for k in ENTRY_KEYS if k in entry}})
