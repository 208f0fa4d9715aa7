"""Is this adapter for this base? Its recorded base fingerprint (loradem-train.json, else its vector.json
card) must be the base's; an adapter without one is matched by PEFT's ``base_model_name_or_path`` (a folder
with the same weights, or the same name). Also what trained it: its training record, and whether the base
was 4-bit NF4 during training.

    from loradem.vectors.same_base import check_same_base
    check_same_base(adapter, "smollm2-135m", read_base(base_dir))   # raises LorademError naming both
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from loradem.errors import LorademError
from loradem.files import fingerprint_weights, read_json
from loradem.model.base import HUB_IDS
from loradem.vectors.card import read_card
from loradem.vectors.checkpoint import BaseCheckpoint
from loradem.vectors.lora import LoadedAdapter


def recorded_base_fingerprint(adapter: LoadedAdapter) -> str | None:
    """The base fingerprint an adapter records: loradem-train.json's, else its vector.json card's."""
    train_record = adapter.path / "loradem-train.json"
    if train_record.is_file():
        record = read_json(train_record)
        recorded = record.get("base_fingerprint") if isinstance(record, dict) else None
        if recorded:
            return recorded
    if (adapter.path / "vector.json").is_file():

        return read_card(adapter.path)["base"].get("fingerprint")
    return None


def check_same_base(adapter: LoadedAdapter, spec: str, base: BaseCheckpoint) -> None:
    """Refuse an adapter whose recorded base is not this one (by fingerprint, path or name)."""
    recorded = recorded_base_fingerprint(adapter)
    if recorded:
        mine = fingerprint_weights(base.folder)
        if recorded != mine:
            raise LorademError(
                f"adapter {adapter.path}: trained on a base with fingerprint {recorded[:12]}, "
                f"this base {spec!r} is {mine[:12]} (pass --allow-name-mismatch to fold it anyway)"
            )
        return
    recorded = adapter.base_model_name_or_path
    if not recorded:
        return
    as_path = Path(recorded).expanduser()
    if as_path.is_dir():
        if as_path.resolve() == base.folder.resolve() or _same_weights(as_path, base.folder):
            return
    elif _names(recorded) & (_names(spec) | _names(str(base.folder)) | _names(base.config.get("_name_or_path"))
                             | _names(HUB_IDS.get(spec))):
        return
    raise LorademError(
        f"adapter {adapter.path}: made for base {recorded!r} (base_model_name_or_path), not {spec!r} "
        "(pass --allow-name-mismatch if they are the same model)"
    )


def _names(value: str | None) -> set[str]:
    if not value:
        return set()
    return {value.casefold(), Path(value.rstrip("/")).name.casefold()}


def _same_weights(a: Path, b: Path) -> bool:
    try:
        return fingerprint_weights(a) == fingerprint_weights(b)
    except LorademError:
        return False


def train_record(adapter: LoadedAdapter) -> dict | None:
    """What produced the adapter: loradem-train.json, else the card's train block (None if neither)."""
    path = adapter.path / "loradem-train.json"
    if path.is_file():
        record = read_json(path)
        return record if isinstance(record, dict) else None
    if (adapter.path / "vector.json").is_file():

        train = read_card(adapter.path).get("train")
        return {"train": train} if train else None
    return None


def trained_on_nf4(record: Mapping | None) -> bool | None:
    """True / False when the record says whether the base was 4-bit during training, None when unknown."""
    train = record.get("train") if isinstance(record, Mapping) else None
    if not isinstance(train, Mapping) or "quantization" not in train:
        return None
    return train["quantization"] == "nf4"
