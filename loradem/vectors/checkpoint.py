"""The base checkpoint, indexed without loading it: which tensor is in which safetensors file, with its
shape and dtype, and which tensors the architecture ties.

    from loradem.vectors.checkpoint import read_base, tied_pairs
    base = read_base(Path("runs/demo/model"))      # BaseCheckpoint(folder, config, files, tensors)
    tied_pairs(base)                                # {"lm_head.weight": "model.embed_tokens.weight"} when tied

Sharded folders are read through ``model.safetensors.index.json``; a tensor in two files, a missing
shard, an unsupported dtype or a file safetensors cannot open is refused naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from loradem.errors import LorademError, first_line
from loradem.files import read_json
from loradem.vectors.lora import LoadedAdapter

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BaseCheckpoint:
    folder: Path
    config: dict
    files: dict[str, Path]  # tensor name -> safetensors file
    tensors: dict[str, tuple[Shape, torch.dtype]]  # in checkpoint order


def read_base(folder: Path) -> BaseCheckpoint:
    """Index a base folder's safetensors (sharded via model.safetensors.index.json or a single file)."""
    from safetensors import safe_open

    config = read_json(folder / "config.json")
    files: dict[str, Path] = {}
    tensors: dict[str, tuple[Shape, torch.dtype]] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key in files:
                        raise LorademError(f"{path}: tensor {key} is also in {files[key].name}")
                    sl = f.get_slice(key)
                    dtype = ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise LorademError(f"{path}: tensor {key}: unsupported dtype {sl.get_dtype()}")
                    files[key], tensors[key] = path, (tuple(sl.get_shape()), dtype)
        except LorademError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise LorademError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None
    return BaseCheckpoint(folder, config, files, tensors)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LorademError(f"{index}: expected a non-empty weight_map")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                raise LorademError(f"{index}: shard {name} is listed but missing")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise LorademError(f"{folder}: expected model.safetensors or model.safetensors.index.json")


def tied_pairs(base: BaseCheckpoint) -> dict[str, str]:
    """Tensors the architecture ties that the checkpoint stores once: {lm_head.weight: model.embed_tokens.weight}."""
    import transformers

    pairs: dict[str, str] = {}
    for arch in base.config.get("architectures") or []:
        keys = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None)
        if isinstance(keys, dict):
            pairs.update({t: s for t, s in keys.items() if t not in base.tensors and s in base.tensors})
    return pairs


def may_touch_ties(adapters: Sequence[LoadedAdapter], base: BaseCheckpoint) -> bool:
    """Whether an adapter could change a tied pair, so the tie map is needed (importing it costs ~2 s, ~100 MB).

    transformers ties an absent tensor to an input embedding (nn.Embedding, which peft wraps as an
    Embedding LoRA), so only embedding LoRAs, full tensors or targets absent from the checkpoint can.
    """
    if base.config.get("tie_word_embeddings") is False:
        return False
    return any(
        m.kind == "embedding" or m.target not in base.tensors for a in adapters for m in a.lora.values()
    ) or any(a.full for a in adapters)

