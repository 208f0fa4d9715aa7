"""What an assembled model folder says about itself: loradem.json (provenance) and README.md (model card).

    record = provenance(spec, checkpoint, adapters, weights, dtype, plan, shard_hashes, base_sha256)
    (folder / "README.md").write_text(model_card(record))
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

from loradem import __version__
from loradem.model.base import HUB_IDS


def provenance(
    spec: str, base, adapters: Sequence, weights: Sequence,
    dtype: str | None, plan, shard_hashes: Mapping[str, str], base_sha256: str,
    adapter_sha256: Sequence[str] | None = None,
) -> dict:
    """The loradem.json record: inputs with their sha256, weights, dtype, and each output shard's sha256."""
    return {
        "loradem_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": {"name": spec, "path": str(base.folder.resolve()), "sha256": base_sha256},
        "adapters": [
            {
                "path": str(a.path.resolve()),
                "weights_file": a.weights_file.name,
                "sha256": sha,
                "weight": w if isinstance(w, float) else dict(w) if isinstance(w, Mapping) else list(w),
                "base_model_name_or_path": a.base_model_name_or_path,
            }
            for a, w, sha in zip(adapters, weights, adapter_sha256 or [a.sha256() for a in adapters])
        ],
        "dtype": dtype or "auto",
        "untied": list(plan.untied),
        "tensors_changed": sum(1 for j in plan.jobs if j.terms),
        "shards": dict(shard_hashes),
    }


def _weight_text(weight) -> str:
    if isinstance(weight, (int, float)):
        return f"{weight:g}"
    if isinstance(weight, Mapping):  # one weight per LoRA module: too many for a table cell
        values = list(weight.values())
        return f"{sum(values) / len(values):g} mean of {len(values)} per-module weights (each in loradem.json)"
    return "[" + ", ".join(f"{w:g}" for w in weight) + "] by layer group"


def model_card(record: Mapping) -> str:
    """README.md with Hugging Face YAML metadata and the table of adapters and weights."""
    base_name = HUB_IDS.get(record["base"]["name"], record["base"]["name"])
    # the Hub's base_model must be a repo id; a local folder is named in the text only
    meta = f"base_model: {json.dumps(base_name)}\n" if re.fullmatch(r"[\w.-]+/[\w.-]+", base_name) else ""
    dtype = "the base's dtype" if record["dtype"] == "auto" else record["dtype"]
    rows = "\n".join(
        f"| `{Path(a['path']).name}` | {_weight_text(a['weight'])} | `{a['sha256'][:12]}` | {a['base_model_name_or_path'] or '-'} |"
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
    return f"""---
{meta}tags: [loradem, dem, lora, merge]
library_name: transformers
---

# Distribution Edited Model

Assembled by loradem {record['loradem_version']} as θ = θ₀ + Σ wᵢ·ΔWᵢ
([DEM, arXiv 2406.15570](https://arxiv.org/abs/2406.15570)): each adapter's
LoRA delta sᵢ·BᵢAᵢ was added to the base `{base_name}` with weight wᵢ,
exactly (float64 accumulation, one rounding to {dtype}).

| adapter | weight | sha256 | trained on |
|---|---|---|---|
{rows}
{untied}{dequantized}
Provenance (inputs' and shards' sha256): `loradem.json`.
"""
