"""What an assembled model folder says about itself: loradem.json (provenance) and README.md (model card).

    record = provenance(spec, checkpoint, adapters, weights, dtype, plan, shard_hashes, base_sha256)
    (folder / "README.md").write_text(model_card(record))
    add_scores(folder, report, "dem")        # after `loradem eval`: the card again, with the run's test scores

Contract: nothing in either file is a path of the machine that built the
model. The base is named portably (`loradem.model.base.portable_name`: hub
id, alias, or folder name) with the sha256 fingerprint of its weights, its
license where loradem knows it (`LICENSES`, by hub id) and, for the embedded
base, how its weights were made; each adapter by its folder name, source
(from its vector.json card) and the sha256 of its weights. The card's front
matter is the Hugging Face model card metadata: ``base_model`` and
``base_model_relation: merge`` when the base has a hub id, ``license`` when
known (otherwise the text says it is unknown and to check the base's),
``pipeline_tag``, ``library_name`` and ``tags``.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

from loradem import __version__
from loradem.errors import LorademError
from loradem.files import atomic_write_text, read_json
from loradem.model.base import (
    BASE_ALIASES,
    EMBEDDED,
    EMBEDDED_ORIGIN,
    LICENSES,
    is_embedded,
    portable_name,
)
from loradem.vectors.card import CARD_FILE as VECTOR_CARD
from loradem.vectors.card import portable_base, read_card

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PROVENANCE_FILE = "loradem.json"
CARD_FILE = "README.md"


def provenance(
    spec: str, base, adapters: Sequence, weights: Sequence,
    dtype: str | None, plan, shard_hashes: Mapping[str, str], base_sha256: str,
    adapter_sha256: Sequence[str] | None = None,
) -> dict:
    """The loradem.json record: inputs named portably with their sha256, weights, dtype, and each output shard's sha256."""
    return {
        "loradem_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": base_record(spec, base.folder, base_sha256),
        "adapters": [
            {
                "name": a.path.name,
                "source": _card_source(a.path),
                "weights_file": a.weights_file.name,
                "sha256": sha,
                "weight": w if isinstance(w, float) else dict(w) if isinstance(w, Mapping) else list(w),
                "base_model_name_or_path": portable_base(a.base_model_name_or_path),
            }
            for a, w, sha in zip(adapters, weights, adapter_sha256 or [a.sha256() for a in adapters])
        ],
        "dtype": dtype or "auto",
        "untied": list(plan.untied),
        "tensors_changed": sum(1 for j in plan.jobs if j.terms),
        "shards": dict(shard_hashes),
    }


def base_record(spec: str, folder: Path, sha256: str) -> dict:
    """The base as another machine can find it: portable name, alias, hub id, weights' sha256, license, origin."""
    name = portable_name(str(spec))
    alias = spec if spec in BASE_ALIASES else EMBEDDED if is_embedded(Path(folder)) else None
    hub_id = name if _HUB_ID.fullmatch(name) else None
    record = {"name": name, "alias": alias, "hub_id": hub_id, "sha256": sha256, "license": LICENSES.get(hub_id)}
    if alias == EMBEDDED:
        record["origin"] = EMBEDDED_ORIGIN
    return record


def _card_source(folder: Path) -> str | None:
    """The source an adapter's vector.json card names, if it has a valid one."""
    if not (folder / VECTOR_CARD).is_file():
        return None
    try:
        return read_card(folder)["source"]
    except LorademError:
        return None


def _weight_text(weight) -> str:
    if isinstance(weight, (int, float)):
        return f"{weight:g}"
    if isinstance(weight, Mapping):  # one weight per LoRA module: too many for a table cell
        values = list(weight.values())
        return f"{sum(values) / len(values):g} mean of {len(values)} per-module weights (each in loradem.json)"
    return "[" + ", ".join(f"{w:g}" for w in weight) + "] by layer group"


def _base_lines(base: Mapping, name: str) -> list[str]:
    alias = base.get("alias") or (base["name"] if base["name"] in BASE_ALIASES else None)
    if alias == EMBEDDED:
        what = f"`{name}`, as loradem's embedded base `{alias}`: {base.get('origin') or EMBEDDED_ORIGIN}."
    elif _HUB_ID.fullmatch(name):
        what = f"`{name}` (a model hub id)."
    else:
        what = f"`{name}`, a local model folder (not a hub id)."
    sha = base.get("sha256")
    return [what + (f" sha256 fingerprint of its weights: `{sha}`." if sha else "")]


def _warm_lines(warm: Mapping | None, record: Mapping) -> list[str]:
    """How a warmed base was made from the base (none when the adapters trained on the base itself)."""
    if not warm:
        return []
    adapter, folded = warm["adapter"], record["base"]
    return ["", (f"Shared warm-up: the adapters were trained on, and folded into, a warmed base (`{folded['name']}`, "
                 f"sha256 fingerprint `{folded.get('sha256')}`): this base with the warm-up adapter `{adapter['name']}` "
                 f"(sha256 `{adapter['sha256'][:12]}`, trained {warm.get('steps')} steps on a sample of the sources' "
                 "training rows) folded in first at weight 1, exactly (float64, one rounding). "
                 "The warm-up is recorded in `loradem.json` (`warm_up`).")]


def _license_lines(license_id: str | None, name: str) -> list[str]:
    if license_id:
        return [(f"`{license_id}`, inherited from the base `{name}`. The data the adapters were trained on may "
                 "carry terms of its own.")]
    return [(f"Unknown: loradem does not know the license of the base `{name}`. Check the base's license (and "
             "the terms of the data the adapters were trained on) before you use or share this model.")]


def _score_lines(report: Mapping, row: str) -> list[str]:
    """The run's own rows (not its variants') on the held-out test rows, this model's row marked."""
    from loradem.evaluate.report import METRIC_LABEL, average_metric, format_value

    metrics = report.get("metric") or {}
    rows = [r for r in report.get("rows") or [] if ":" not in r["name"] or r["name"].startswith("adapter:")]
    if not metrics or not any(r["name"] == row for r in rows):
        return []
    test_rows = report.get("test_rows") or {}
    counts = ", ".join(f"{s} {test_rows[s]}" for s in metrics if s in test_rows)
    avg = average_metric(metrics)
    lines = ["", "## Scores", "",
             (f"From the run's `report.json` (recipe `{report.get('recipe', '?')}`): each source's held-out test rows "
              f"({counts or 'counts in report.json'}), never trained or searched on. Exact match is in %, loss is the "
              "mean cross-entropy per answer token (lower is better). The other rows are what this model is compared with."), "",
             "| model | " + " | ".join(f"{s} ({METRIC_LABEL.get(m, m)})" for s, m in metrics.items()) + " | average |",
             "|---|" + "---:|" * (len(metrics) + 1)]
    for r in rows:
        label = f"**`{r['name']}` (this model)**" if r["name"] == row else f"`{r['name']}`"
        cells = [format_value(r["per_source"].get(s), m) for s, m in metrics.items()]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {format_value(r.get('average'), avg)} |")
    return lines


def model_card(record: Mapping, report: Mapping | None = None, row: str | None = None) -> str:
    """README.md with Hugging Face YAML metadata, the sources and weights, the base and its license; with a
    `report` (report.json of the run that assembled it), the test scores, `row` being this model's."""
    warm = record.get("warm_up")
    # a warmed base is the original base with the warm-up adapter folded in: the card's base is the original
    base = warm["base"] if warm else record["base"]
    base_name = portable_base(base["name"])  # a record of an older loradem may name an alias or a path
    hub = bool(_HUB_ID.fullmatch(base_name))
    license_id = base.get("license") or (LICENSES.get(base_name) if hub else None)
    # the Hub's base_model must be a repo id; a local folder is named in the text only
    meta = (f"base_model: {json.dumps(base_name)}\nbase_model_relation: merge\n" if hub else "") + (
        f"license: {license_id}\n" if license_id else "")
    dtype = "the base's dtype" if record["dtype"] == "auto" else record["dtype"]
    rows = "\n".join(
        f"| `{a.get('name') or Path(a.get('path', '?')).name}` | {_weight_text(a['weight'])} | `{a['sha256'][:12]}` | "
        f"{a.get('source') or '-'} | {portable_base(a.get('base_model_name_or_path')) or '-'} |"
        for a in record["adapters"]
    )
    untied = (
        f"\nThe tied tensor(s) {', '.join(record['untied'])} were written separately because an adapter changes "
        "one side of the pair (`tie_word_embeddings: false`).\n" if record["untied"] else ""
    )
    dequantized = (
        f"\nThe deltas were added to the NF4 round trip of the base's {record['dequantized']['tensors']} 4-bit "
        "layers (`fold_base: dequantized`), the weights the adapters were trained against.\n"
        if record.get("dequantized") else ""
    )
    onto = " (warmed by a shared adapter first: see Base)" if warm else ""
    scores = _score_lines(report, row) if report is not None and row else []
    body = "\n".join(["## Base", "", *_base_lines(base, base_name), *_warm_lines(warm, record), "", "## License", "",
                      *_license_lines(license_id, base_name), *scores])
    return f"""---
{meta}pipeline_tag: text-generation
library_name: transformers
tags: [loradem, dem, lora, merge]
---

# Distribution Edited Model

Assembled by loradem {record['loradem_version']} as θ = θ₀ + Σ wᵢ·ΔWᵢ
([DEM, arXiv 2406.15570](https://arxiv.org/abs/2406.15570)): each adapter's
LoRA delta sᵢ·BᵢAᵢ was added to the base `{base_name}`{onto} with weight wᵢ,
exactly (float64 accumulation, one rounding to {dtype}).

## Sources

| adapter | weight | sha256 | source | trained on |
|---|---|---|---|---|
{rows}
{untied}{dequantized}
{body}

Provenance (the inputs' and the shards' sha256): `loradem.json`.
"""


def add_scores(model_dir: str | Path, report: Mapping, row: str) -> Path:
    """Rewrite `model_dir`'s README.md from its loradem.json with the test scores of `report` (`row`: this
    model's row); the weights and loradem.json are untouched. Returns the card's path."""
    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    atomic_write_text(path, model_card(read_json(model_dir / PROVENANCE_FILE), report, row))
    return path
