"""Vector cards: the small shareable record beside an adapter, and importing ready vectors.

    loradem vectors import PATH_OR_HUB_ID --base smollm2-135m     # -> adapters/<source>-<sha12>/
    loradem vectors info adapters/math-1a2b3c4d5e6f               # prints the card, then the norms

    from loradem.vectors.card import read_card, check_card, import_vector
    card = read_card("adapters/math-1a2b3c4d5e6f")                 # vector.json, validated
    check_card(folder, base_dir)                                   # same base, untouched weights, or LorademError
    folder = import_vector("org/math-vector", "adapters", base_dir=base_dir)
    write_readme("adapters/math-1a2b3c4d5e6f")                     # its README.md, the adapter's Hugging Face card

A finished adapter folder (``loradem train``) carries ``vector.json``::

    {"loradem_vector": 1, "source": ..., "base": {"name": ..., "fingerprint": <sha256 of the base's weights>},
     "data": {"fingerprint": ..., "rows": {"train": n, "validation": n, "test": n}, "format": ...},
     "train": {...}, "lora": {...}, "metrics": {"best_val_loss", "best_step", "steps", "train_tokens"},
     "adapter_sha256": <sha256 of adapter_model.safetensors>, "loradem_version": ...}

Contract: `check_card` refuses a vector whose card names another base (by the
fingerprint of its weights, not by name) or whose weights file no longer has
the card's sha256 (corrupted or edited); shapes are checked by the fold.
`import_vector` copies adapter_model.safetensors, and adapter_config.json and
vector.json with the base named portably (`portable_files`: no path of the
sender's machine), into ``<adapters_dir>/<source>-<sha12>/`` only after those
checks, written aside and renamed; importing the same weights again returns the
folder already there; ``loradem-import.json`` records where it came from
(the hub id, or the folder relative to `adapters_dir`). A folder without a
card is refused unless
``allow_no_card=True``, which writes a card holding what can be known (the
LoRA settings, the weights' sha256, the base *name* from adapter_config.json;
no base fingerprint, data or metrics) and marks it ``"generated": true``.

``base.alias`` (optional) is the short name the base was trained under
(``smollm2-135m``), where ``base.name`` is its hub id. `write_readme` renders
the card and adapter_config.json as README.md: Hugging Face front matter
(``base_model`` when the base has a hub id, ``library_name: peft``, tags,
``pipeline_tag``) and, in words, what the card records and how to load it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping

from loradem import __version__
from loradem.errors import LorademError
from loradem.files import atomic_dir, fingerprint_weights, read_json, sha256_file
from loradem.model.base import (
    BASE_ALIASES,
    EMBEDDED,
    EMBEDDED_ORIGIN,
    HUB_IDS,
    portable_name,
)
from loradem.model.lora_config import check_weighable
from loradem.vectors.lora import load_adapter

CARD_FILE = "vector.json"
IMPORT_RECORD = "loradem-import.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
README_FILE = "README.md"
SHARED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)  # what import reads
ADAPTER_TAGS = ("loradem", "dem", "lora", "distribution-vector")
CARD_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the recipe's source-name rule
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Log = Callable[[str], None]


# ---- reading and checking ---------------------------------------------------

def read_card(folder: str | Path) -> dict:
    """The folder's vector.json, with its fields checked; raises `LorademError` naming the field."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise LorademError(f"{path}: not found (a shared vector carries a vector.json card)")
    card = read_json(path)
    if not isinstance(card, dict):
        raise LorademError(f"{path}: expected a JSON object, got {type(card).__name__}")
    if card.get("loradem_vector") != CARD_VERSION:
        raise LorademError(f"{path}: loradem_vector: expected {CARD_VERSION}, got {card.get('loradem_vector')!r}")
    _field(path, card, "source", str)
    if not _SAFE_NAME.match(card["source"]):
        raise LorademError(f"{path}: source: expected a safe folder name, got {card['source']!r}")
    base = _field(path, card, "base", dict)
    for key in ("name", "fingerprint"):
        if base.get(key) is not None and not isinstance(base.get(key), str):
            raise LorademError(f"{path}: base.{key}: expected a string or null, got {base.get(key)!r}")
    if base.get("fingerprint") is not None and not _SHA256.match(base["fingerprint"]):
        raise LorademError(f"{path}: base.fingerprint: expected 64 hex digits, got {base['fingerprint']!r}")
    sha = _field(path, card, "adapter_sha256", str)
    if not _SHA256.match(sha):
        raise LorademError(f"{path}: adapter_sha256: expected 64 hex digits, got {sha!r}")
    for key in ("data", "train", "lora", "metrics"):
        if card.get(key) is not None and not isinstance(card[key], dict):
            raise LorademError(f"{path}: {key}: expected an object or null, got {type(card[key]).__name__}")
    return card


def _field(path: Path, card: Mapping, key: str, kind: type):
    if key not in card:
        raise LorademError(f"{path}: {key}: required field is missing")
    if not isinstance(card[key], kind):
        raise LorademError(f"{path}: {key}: expected {'an object' if kind is dict else 'a string'}, got {card[key]!r}")
    return card[key]


def check_card(folder: str | Path, base_dir: str | Path) -> dict:
    """Refuse the vector in `folder` unless its weights match its card and its card's base is `base_dir`."""
    folder = Path(folder)
    card = read_card(folder)
    check_weights(folder, card)
    recorded = card["base"].get("fingerprint")
    if recorded is not None:
        mine = fingerprint_weights(base_dir)
        if recorded != mine:
            raise LorademError(
                f"{folder / CARD_FILE}: trained on base {card['base'].get('name')!r} with weights {recorded[:12]}, "
                f"but base {str(base_dir)!r} has weights {mine[:12]}; a vector is only meaningful on its own base"
            )
    return card


def check_weights(folder: Path, card: Mapping) -> None:
    """Refuse weights that are missing or no longer have the card's sha256."""
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise LorademError(f"{weights}: not found (a shared vector's weights are safetensors)")
    actual = sha256_file(weights)
    if actual != card["adapter_sha256"]:
        raise LorademError(
            f"{weights}: sha256 {actual[:12]} differs from the card's adapter_sha256 {card['adapter_sha256'][:12]} "
            "(the weights were corrupted or edited after the card was written)"
        )


def format_card(card: Mapping) -> str:
    """A few lines for the terminal: source, base, data, settings, metrics."""
    base, data, lora, metrics = card["base"], card.get("data") or {}, card.get("lora") or {}, card.get("metrics") or {}
    fp = (base.get("fingerprint") or "unknown")[:12]
    lines = [f"card: source {card['source']!r}, base {base.get('name') or '?'} (weights {fp})"
             + (" [generated on import: no training record]" if card.get("generated") else "")]
    if data:
        rows = data.get("rows") or {}
        lines.append(f"  data: {data.get('format', '?')}, rows train {rows.get('train', '?')} / validation "
                     f"{rows.get('validation', '?')} / test {rows.get('test', '?')}")
    if card.get("anchor"):
        a = card["anchor"]
        lines.append(f"  anchored: + {a.get('rows', '?')} anchor rows ({a.get('prompts', '?')} prompts, "
                     f"fraction {a.get('fraction', '?')}): trained to leave other inputs alone")
    if lora:
        lines.append("  lora: " + ", ".join(f"{k}={lora[k]}" for k in ("r", "alpha", "use_rslora", "target_modules") if k in lora))
    if metrics:
        lines.append("  metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    lines.append(f"  weights sha256 {card['adapter_sha256'][:12]}, loradem {card.get('loradem_version', '?')}")
    return "\n".join(lines)


# ---- the README card -----------------------------------------------------------

def portable_base(name: str | None) -> str | None:
    """A base name that means the same on another machine: an alias becomes its hub id, a path its folder's
    name (or the hub id it is a copy of); a hub id or a bare name stays."""
    if not name:
        return name
    if name in HUB_IDS or Path(name).is_absolute() or name.startswith(("~", ".")):
        return portable_name(name)
    return name


def portable_files(card: Mapping, config: Mapping) -> tuple[dict, dict]:
    """The card and PEFT's adapter config as they travel: the base named portably in both (the card's name, else
    the config's), the short name it was trained under kept as ``base.alias``; nothing else changes."""
    base = dict(card["base"])
    if base.get("alias") is None and base.get("name") in BASE_ALIASES:
        base["alias"] = base["name"]
    base["name"] = portable_base(base.get("name")) or portable_base(config.get("base_model_name_or_path"))
    return {**card, "base": base}, {**config, "base_model_name_or_path": base["name"]}


def base_alias(card: Mapping) -> str | None:
    """The short name loradem knows the card's base by (``smollm2-135m``), if any."""
    base = card["base"]
    alias = base.get("alias") or base.get("name")
    return alias if alias in BASE_ALIASES else None


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def _settings(values: Mapping | None, keys: tuple[str, ...] | None = None) -> str:
    if not values:
        return "unknown (no training record)"
    shown = [k for k in (keys or values) if k in values and values[k] is not None]
    return ", ".join(f"{k} {_value(values[k])}" for k in shown)


def _value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def adapter_readme(card: Mapping, config: Mapping) -> str:
    """README.md of an adapter folder: Hugging Face front matter, then what its card records and how to load it."""
    base_name = portable_base(card["base"].get("name")) or portable_base(config.get("base_model_name_or_path")) or "unknown"
    alias = base_alias(card)
    hub = _is_hub_id(base_name)
    meta = (f"base_model: {json.dumps(base_name)}\n" if hub else "") + (
        "library_name: peft\n"
        f"tags: [{', '.join(ADAPTER_TAGS)}]\n"
        "pipeline_tag: text-generation\n"
    )
    source, fingerprint = card["source"], card["base"].get("fingerprint")
    if alias == EMBEDDED:
        base_text = f"`{base_name}` as loradem's embedded base `{alias}`: {EMBEDDED_ORIGIN}."
    elif hub:
        base_text = f"`{base_name}` (a model hub id)."
    else:
        base_text = f"`{base_name}`, a local model folder (not a hub id): get the same weights from whoever trained it."
    base_text += (f" Its weights' sha256 fingerprint (over the base's safetensors) is `{fingerprint}`; "
                  "`loradem vectors import` refuses this vector on a base whose weights differ."
                  if fingerprint else " Its weights' fingerprint is unknown (the card was generated on import).")
    data = card.get("data") or {}
    rows = data.get("rows") or {}
    if data:
        data_lines = [
            (f"- format: `{data.get('format', '?')}`; rows: {rows.get('train', '?')} train, {rows.get('validation', '?')} "
             f"validation (chose the kept checkpoint), {rows.get('test', '?')} test (held out: never trained or searched on)"),
            f"- data fingerprint (sha256 of the data and its split): `{data.get('fingerprint', '?')}`",
        ]
    else:
        data_lines = ["- unknown (no training record)"]
    if card.get("anchor"):
        a = card["anchor"]
        data_lines.append(f"- anchored: + {a.get('rows', '?')} anchor rows (generic prompts answered by the base itself, "
                          f"fraction {a.get('fraction', '?')}), so the vector learns to leave other inputs alone")
    lora = card.get("lora") or {}
    targets = config.get("target_modules")
    targets = sorted(targets) if isinstance(targets, (list, tuple, set)) else targets
    lora_line = _settings(lora, ("r", "alpha", "dropout", "use_rslora")) if lora else "unknown"
    lora_line += f"; target modules: {_value(targets) if targets else '?'}"
    metrics = card.get("metrics") or {}
    if metrics:
        loss = metrics.get("best_val_loss")
        tokens = metrics.get("train_tokens")
        metric_line = (f"best validation loss {loss:.4f} at step {metrics.get('best_step', '?')} of {metrics.get('steps', '?')} "
                       f"(that checkpoint is these weights); {f'{tokens:,}' if isinstance(tokens, int) else '?'} training tokens"
                       if isinstance(loss, (int, float)) else _settings(metrics))
    else:
        metric_line = "unknown (no training record)"
    train_line = _settings(card.get("train"), ("learning_rate", "max_steps", "epochs", "batch_size", "grad_accum",
                                                "max_length", "lr_scheduler", "quantization", "completion_only_loss"))
    load_base = base_name if hub else f"path/to/{base_name}"
    import_base = alias or (base_name if hub else f"path/to/{base_name}")
    caveat = ("\nThis loads the hub's original weights, which differ slightly from the de-quantized ones the vector was "
              "trained on (see Base); `--base smollm2-135m` below uses those.\n" if alias == EMBEDDED else "")
    return f"""---
{meta}---

# `{source}`: a distribution vector for {base_name}

A LoRA adapter trained by loradem on one data source, `{source}`. Its delta ΔW = s·BA is that source's
*distribution vector* ([DEM, arXiv 2406.15570](https://arxiv.org/abs/2406.15570)): it is meant to be
weighted and added to the base together with other sources' vectors, and it also works alone as a
PEFT adapter.

## Base

{base_text}

## Training data

{chr(10).join(data_lines)}

## Settings and metrics

- LoRA: {lora_line}
- training: {train_line}
- result: {metric_line}
- trained with loradem {card.get('loradem_version', '?')}{' (card generated on import: no training record)' if card.get('generated') else ''}

## Files

| file | what |
|---|---|
| `{WEIGHTS_FILE}` | the LoRA weights, sha256 `{card['adapter_sha256']}` |
| `{CONFIG_FILE}` | PEFT's configuration |
| `{CARD_FILE}` | loradem's card: base fingerprint, data, settings, metrics, the weights' sha256 |

## Use

With PEFT, on the base model object:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_base}")
model = PeftModel.from_pretrained(base, "PATH_OR_REPO_ID")  # this folder, or the hub repo holding it
```
{caveat}
With loradem (checks the base's weights and this file's sha256, then copies it into `adapters/`,
where a recipe source with `vector: PATH_OR_REPO_ID` uses it):

```sh
loradem vectors import PATH_OR_REPO_ID --base {import_base}
```
"""


def write_readme(folder: str | Path) -> Path:
    """Write README.md into an adapter folder from its vector.json and adapter_config.json; returns its path."""
    folder = Path(folder)
    text = adapter_readme(read_card(folder), read_json(folder / CONFIG_FILE))
    path = folder / README_FILE
    path.write_text(text, encoding="utf-8")
    return path


# ---- importing ---------------------------------------------------------------

def import_vector(
    src: str | Path,
    adapters_dir: str | Path,
    *,
    base_dir: str | Path,
    source: str | None = None,
    allow_no_card: bool = False,
    log: Log = print,
) -> Path:
    """Check a shared vector (a folder or a hub id) and copy it into `adapters_dir`; returns its folder there.

    `source` names the folder (default: the card's source). Idempotent: the same weights under the
    same name are imported once.
    """
    adapters_dir = Path(adapters_dir)
    if source is not None and not _SAFE_NAME.match(source):
        raise LorademError(f"source: expected a safe folder name, got {source!r}")
    text = str(src)
    local = Path(text).expanduser()
    if local.is_dir():
        # a folder is recorded relative to the adapters folder (no absolute path of this machine in adapters/),
        # starting with "." so it never reads as a hub id
        origin = os.path.relpath(local.resolve(), adapters_dir.resolve())
        folder, origin = local, origin if origin.startswith(".") else os.path.join(".", origin)
    elif _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        found = _imported_from(text, adapters_dir, source, base_dir)
        if found is not None:
            return found
        folder, origin = _download(text), text
    else:
        raise LorademError(f"vector {text!r}: expected an adapter folder or a hub id 'org/name', not found")
    return _import_folder(folder, origin, adapters_dir, Path(base_dir), source, allow_no_card, log, label=text)


def _import_folder(folder: Path, origin: str, adapters_dir: Path, base_dir: Path, source: str | None,
                   allow_no_card: bool, log: Log, *, label: str) -> Path:

    if not (folder / WEIGHTS_FILE).is_file():
        hint = " (adapter_model.bin is a pickle; shared vectors must be safetensors)" if (folder / "adapter_model.bin").exists() else ""
        raise LorademError(f"{folder}: expected {WEIGHTS_FILE}{hint}")
    load_adapter(folder)  # a plain additive LoRA with a valid config and header, or one line why not
    check_weighable(read_json(folder / "adapter_config.json"), folder / "adapter_config.json")  # a recipe will weight it
    if (folder / CARD_FILE).is_file():
        card, generated = check_card(folder, base_dir), False
    elif allow_no_card:
        card, generated = generated_card(folder, source), True
    else:
        raise LorademError(
            f"{folder}: no {CARD_FILE} card (base, data and training unknown); pass allow_no_card "
            "(--allow-no-card) to import it with a card of what can be known"
        )
    name = source or card["source"]
    final = adapters_dir / f"{name}-{card['adapter_sha256'][:12]}"
    if final.resolve() == folder.resolve() or _is_imported(final, card["adapter_sha256"]):
        if final.resolve() != folder.resolve():
            check_card(final, base_dir)
        log(f"vector {label}: already imported as {final}")
        return final
    # the card and PEFT's config name the base portably here too (the sender's may name a path of its machine)
    card_out, config_out = portable_files(card, read_json(folder / CONFIG_FILE))
    with atomic_dir(final, overwrite=final.exists()) as tmp:
        shutil.copyfile(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config_out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(json.dumps(card_out, indent=2) + "\n", encoding="utf-8")
        check_card(tmp, base_dir)  # the copies, not just the originals
        record = {"origin": origin, "source": name, "card": "generated" if generated else "shipped",
                  "imported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"vector {label}: imported as {final}" + (" (card generated: no base fingerprint to check)" if generated else ""))
    return final


def generated_card(folder: Path, source: str | None) -> dict:
    """A card for a folder that came without one: the LoRA settings and the weights' hash, nothing invented."""
    config = read_json(folder / CONFIG_FILE)
    name = source or folder.name
    if not _SAFE_NAME.match(name):
        raise LorademError(f"{folder}: its name is not a safe source name; pass source (--source NAME)")
    lora = {"r": config.get("r"), "alpha": config.get("lora_alpha"), "use_rslora": bool(config.get("use_rslora")),
            "target_modules": config.get("target_modules")}
    if isinstance(lora["target_modules"], (set, tuple)):
        lora["target_modules"] = sorted(lora["target_modules"])
    return {
        "loradem_vector": CARD_VERSION,
        "source": name,
        "base": {"name": config.get("base_model_name_or_path"), "fingerprint": None},
        "data": None, "train": None, "lora": lora, "metrics": None,
        "adapter_sha256": sha256_file(folder / WEIGHTS_FILE),
        "loradem_version": __version__,
        "generated": True,
    }


def _is_imported(final: Path, sha: str) -> bool:
    if not all((final / f).is_file() for f in (*SHARED_FILES, IMPORT_RECORD)):
        return False
    try:
        return read_card(final)["adapter_sha256"] == sha
    except LorademError:
        return False


def _imported_from(hub_id: str, adapters_dir: Path, source: str | None, base_dir: str | Path) -> Path | None:
    """An earlier import of `hub_id` (so a recipe run does not download it again)."""
    if not adapters_dir.is_dir():
        return None
    for record_path in sorted(adapters_dir.glob(f"{source or '*'}-*/{IMPORT_RECORD}")):
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        folder = record_path.parent
        if record.get("origin") == hub_id and _is_imported(folder, read_card(folder)["adapter_sha256"]):
            check_card(folder, base_dir)
            return folder
    return None


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=list(SHARED_FILES)))
    except Exception as exc:  # noqa: BLE001 - any hub failure is one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorademError(f"vector {hub_id!r}: could not fetch from the model hub ({first}); use a local folder") from None
