"""Sharing a vector: export the files a receiver needs, or push them to the Hugging Face model hub.

    loradem vectors export adapters/addition-1a2b3c4d5e6f --out shared/addition
    loradem vectors export addition --recipe recipes/demo.yaml --out shared/addition
    loradem vectors push adapters/addition-1a2b3c4d5e6f me/addition-vector

    from loradem.vectors.share import export_vector, push_vector
    export_vector("adapters/addition-1a2b3c4d5e6f", "shared/addition")
    push_vector("adapters/addition-1a2b3c4d5e6f", "me/addition-vector")

Contract: an export folder holds exactly ``EXPORT_FILES`` (adapter_config.json,
adapter_model.safetensors, vector.json, README.md) and nothing of the machine
that wrote it: the base is named by hub id, alias or folder name (never a
path) in adapter_config.json, vector.json and README.md, and the texts are
checked for this machine's home, cache, working folder and the input's path
before anything is written. The input must carry a vector.json card whose
sha256 its weights still have (a folder without one: import it with
``--allow-no-card`` first). The output is written aside and renamed into
place; an existing one is replaced only with ``overwrite`` and only if it is
an earlier export (nothing but export files); an output that is, is inside,
or holds the input is refused. `push_vector` exports into a temporary folder
and uploads exactly those files with ``huggingface_hub`` (``create_repo``,
then ``upload_folder``); `loradem vectors import ORG/NAME` downloads them
back with ``snapshot_download``. Any hub failure is one line naming the repo.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loradem.errors import LorademError, first_line
from loradem.files import atomic_dir, read_json
from loradem.model.base import cache_root
from loradem.model.lora_config import check_weighable
from loradem.vectors.card import (
    CARD_FILE,
    CONFIG_FILE,
    README_FILE,
    WEIGHTS_FILE,
    adapter_readme,
    check_weights,
    portable_files,
    read_card,
)
from loradem.vectors.lora import load_adapter

EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, README_FILE)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Log = Callable[[str], None]


def export_vector(folder: str | Path, out: str | Path, *, overwrite: bool = False, log: Log = print) -> Path:
    """Write `folder`'s vector to `out` as exactly `EXPORT_FILES`, with nothing machine-specific; returns `out`."""
    folder, out = Path(folder), Path(out)
    _check_output(folder, out, overwrite)
    texts = shared_texts(folder)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shutil.copyfile(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        check_weights(tmp, read_card(tmp))  # the copy, not just the original
    log(f"vector {folder}: exported to {out} ({', '.join(EXPORT_FILES)})")
    return out


def shared_texts(folder: Path) -> dict[str, str]:
    """adapter_config.json, vector.json and README.md as a receiver gets them: the base named portably."""
    if not folder.is_dir():
        raise LorademError(f"vector {str(folder)!r}: expected an adapter folder, not found")
    if not (folder / CARD_FILE).is_file():
        raise LorademError(f"{folder}: no {CARD_FILE} card to share (base, data and training unknown); "
                           "import it with `loradem vectors import --allow-no-card` first, then export the import")
    load_adapter(folder)  # a plain additive LoRA in safetensors with a valid config, or one line why not
    config = read_json(folder / CONFIG_FILE)
    check_weighable(config, folder / CONFIG_FILE)  # what the receiver's import would refuse, refused here
    card = read_card(folder)
    check_weights(folder, card)
    card, config = portable_files(card, config)
    texts = {
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n",
        CARD_FILE: json.dumps(card, indent=2) + "\n",
        README_FILE: adapter_readme(card, config),
    }
    for name, text in texts.items():
        for path in _machine_paths(folder):
            # a path, not the same characters inside a longer word or URL ("arxiv.org/abs/...")
            if re.search(rf"(?<![\w.:/~-]){re.escape(path)}(?![\w.-])", text):
                raise LorademError(f"{folder / name}: holds {path!r}, a path of this machine; "
                                   "a shared vector must not (edit the field that names it)")
    return texts


def _machine_paths(folder: Path) -> list[str]:
    """Absolute paths of this machine a shared text must not name (the bare root says nothing)."""
    paths = {str(Path.home()), str(cache_root().expanduser().resolve()), str(Path.cwd()), str(folder.resolve()),
             str(folder.resolve().parent)}
    return sorted(p for p in paths if len(Path(p).parts) > 1)


def _check_output(folder: Path, out: Path, overwrite: bool) -> None:
    src, dst = folder.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise LorademError(f"{out}: {'is' if dst == src else 'is inside'} the adapter folder being exported ({folder}); "
                           "choose an output folder outside it")
    if dst in src.parents:
        raise LorademError(f"{out}: holds the adapter folder being exported ({folder}); choose another output folder")
    if not out.exists():
        return
    if not overwrite:
        raise LorademError(f"{out}: already exists (pass --overwrite to replace it)")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    if entries is None or CARD_FILE not in entries or not set(entries) <= set(EXPORT_FILES):
        raise LorademError(f"{out}: --overwrite replaces only an earlier export (nothing but {', '.join(EXPORT_FILES)}); "
                           "this is not one, so choose another output folder")


def push_vector(folder: str | Path, repo_id: str, *, private: bool = False, log: Log = print) -> str:
    """Export `folder` to a temporary folder and upload exactly its files to the model hub repo `repo_id`
    (created if missing; your Hugging Face login or HF_TOKEN authorizes it); returns `repo_id`."""
    if not _REPO_ID.match(repo_id) or repo_id.startswith((".", "/", "~")):
        raise LorademError(f"repo id {repo_id!r}: expected 'org/name' (or 'user/name')")
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="loradem-push-") as scratch:
        staged = export_vector(folder, Path(scratch) / "vector", log=lambda _: None)
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=staged, allow_patterns=list(EXPORT_FILES),
                              commit_message=f"loradem: distribution vector {read_card(staged)['source']}")
        except Exception as exc:  # noqa: BLE001 - any hub failure (network, login, permissions) is one clear line
            raise LorademError(f"vector push to {repo_id!r}: the model hub refused or could not be reached "
                               f"({first_line(exc)})") from None
    log(f"vector {folder}: pushed to https://huggingface.co/{repo_id} ({', '.join(EXPORT_FILES)})")
    return repo_id
