"""Read a PEFT LoRA adapter folder as exact additive deltas, one per base tensor.

    from loradem.vectors.lora import load_adapter
    adapter = load_adapter("adapters/math")          # adapter_config.json + adapter_model.safetensors
    for m in adapter.lora.values():                  # one LoraModule per base tensor it modifies
        L, R = adapter.lowrank(m)                    # float64; ΔW = m.scale · L @ R, in the base tensor's layout

Contract:
- Tensors are read lazily through ``safetensors.safe_open``, one at a time,
  and every tensor read is checked for NaN/Inf. A pickle ``adapter_model.bin``
  is refused unless ``trust_pickle=True`` (then ``torch.load(weights_only=True)``).
- The scaling rule lives in one function, `scaling`: r comes from the lora_A
  tensor's shape (and must agree with ``r`` / ``rank_pattern``), alpha from
  ``alpha_pattern`` (regex keys, first match wins, exactly as peft 0.21.2's
  ``get_pattern_key``) else ``lora_alpha``; s = alpha/r, or alpha/sqrt(r) with
  ``use_rslora``.
- Orientation follows peft's ``get_delta_weight``: Linear ΔW = transpose(B@A,
  fan_in_fan_out)·s, Embedding ΔW = (B@A)ᵀ·s (keys ``lora_embedding_A/B``).
- Plain full tensors in the adapter (``modules_to_save``) are full
  replacements: their delta is (copy − base). Keys ``<module>.base_layer.<p>``
  are peft's copy of the *unchanged* base tensor (``save_embedding_layers``);
  they contribute nothing and the assembler checks they equal the base.
- Anything that is not a plain additive delta is refused with one line: DoRA,
  trainable tokens, lora_bias, bias training, aLoRA and other LoRA variants,
  base-modifying initialisations (PiSSA, OLoRA, CorDA, LoftQ, MiCA),
  ``target_parameters``, ``layer_replication``, convolution LoRA, non-LoRA
  ``peft_type``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch

from loradem.errors import LorademError, first_line
from loradem.files import read_json, sha256_file
from loradem.model.lora_config import check_config

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# init_lora_weights values that leave the base untouched (others rewrite the base weight at init)

@dataclass(frozen=True)
class LoraModule:
    """One low-rank delta: ΔW[target] = scale · L @ R (L, R from `LoadedAdapter.lowrank`)."""

    module: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    target: str  # base tensor it modifies, e.g. model.layers.0.self_attn.q_proj.weight
    kind: Literal["linear", "embedding"]
    a_key: str
    b_key: str
    rank: int
    scale: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]  # shape of ΔW, which must equal the base tensor's


@dataclass(frozen=True)
class FullTensor:
    """A full tensor stored in the adapter: a replacement (modules_to_save) or peft's copy of the base."""

    target: str
    key: str
    shape: tuple[int, ...]
    base_copy: bool  # True for `<module>.base_layer.<param>`: must equal the base, contributes nothing


# ---- the scaling rule (the only place it is written) --------------------

def pattern_key(patterns: Iterable[str], key: str) -> str:
    """peft 0.21.2 `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", key), else key."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The LoRA scale of `module` whose lora_A has `rank` rows: alpha/r, or alpha/sqrt(r) with use_rslora.

    r is the tensor's; it must equal the configured rank (``rank_pattern`` else ``r``), as peft
    would refuse to load it otherwise. alpha is ``alpha_pattern``'s first match else ``lora_alpha``.
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    configured = rank_pattern.get(pattern_key(rank_pattern, module), config.get("r"))
    if configured is not None and configured != rank:
        raise ValueError(f"{module}: lora_A has rank {rank} but the config says r={configured}")
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), config.get("lora_alpha"))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{module}: expected a finite number for lora_alpha, got {alpha!r}")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ---- tensor sources -------------------------------------------------------

class _Safetensors:
    """Lazy reader: shapes from the header, one tensor read at a time."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path, self._handle = path, None
        try:
            with safe_open(path, framework="pt") as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise LorademError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._handle is None:  # one open file (pread: no mapping held in memory), parsed once
            self._handle = safe_open(self.path, framework="pt", backend="pread")
        return self._handle.get_tensor(key)


class _Pickle:
    """An `adapter_model.bin`, loaded only on request and only with weights_only=True."""

    def __init__(self, path: Path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise LorademError(f"{path}: could not be read as a weights-only torch file ({first_line(exc)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LorademError(f"{path}: expected a dict of tensors")
        self.path, self._state = path, state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._state[key]



# ---- the adapter ----------------------------------------------------------

@dataclass
class LoadedAdapter:
    """An adapter folder, indexed by the base tensor each entry modifies; tensors are read on demand."""

    path: Path
    weights_file: Path
    config: dict
    lora: dict[str, LoraModule]  # by target tensor name
    full: dict[str, FullTensor]  # by target tensor name
    _source: Any

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    def sha256(self) -> str:
        return sha256_file(self.weights_file)

    def tensor(self, key: str) -> torch.Tensor:
        """One stored tensor, refused if it holds NaN or Inf."""
        t = self._source.read(key)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LorademError(f"{self.weights_file}: tensor {key} contains NaN or Inf")
        return t

    def lowrank(self, m: LoraModule, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with ΔW = m.scale · L @ R in the base tensor's layout."""
        a = self.tensor(m.a_key).to(dtype)
        b = self.tensor(m.b_key).to(dtype)
        if m.kind == "embedding" or m.fan_in_fan_out:
            return a.T, b.T  # (B@A)ᵀ = Aᵀ Bᵀ
        return b, a

    def delta(self, m: LoraModule, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ΔW of one module (for tests and small modules; the assembler stays low-rank)."""
        left, right = self.lowrank(m, dtype)
        return (left @ right) * m.scale

    def check_finite(self) -> None:
        """Read every low-rank factor once; raises on the first NaN/Inf (full tensors are checked when read)."""
        for m in self.lora.values():
            self.tensor(m.a_key)
            self.tensor(m.b_key)


def load_adapter(path: str | Path, *, trust_pickle: bool = False) -> LoadedAdapter:
    """Index a PEFT LoRA adapter folder; raises `LorademError` on anything it cannot fold exactly."""
    path = Path(path)
    if not path.is_dir():
        raise LorademError(f"adapter {str(path)!r}: expected an adapter folder, not found")
    config = _read_config(path / CONFIG_FILE)
    source = _open_weights(path, trust_pickle)
    where = source.path
    lora, full = _index(source.shapes, config, where)
    if not lora and not full:
        raise LorademError(f"{where}: no LoRA tensors found")
    return LoadedAdapter(path=path, weights_file=where, config=config, lora=lora, full=full, _source=source)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise LorademError(f"{path}: not found (expected a PEFT adapter folder)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise LorademError(f"{path}: expected a JSON object")
    check_config(config, path)
    return config


def _open_weights(path: Path, trust_pickle: bool):
    st, pkl = path / SAFETENSORS_FILE, path / PICKLE_FILE
    if st.is_file():
        return _Safetensors(st)
    if pkl.is_file():
        if not trust_pickle:
            raise LorademError(
                f"{pkl}: a pickle file can run code when loaded; convert the adapter to safetensors "
                "or pass trust_pickle (--trust-pickle) to load it with torch.load(weights_only=True)"
            )
        return _Pickle(pkl)
    raise LorademError(f"{path}: expected {SAFETENSORS_FILE} (no adapter weights found)")


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def _index(shapes: Mapping[str, tuple], config: Mapping[str, Any], where: Path) -> tuple[dict, dict]:
    """Group stored keys into LoRA modules and full tensors, keyed by the base tensor they modify."""
    pairs: dict[str, dict[str, str]] = {}
    full: dict[str, FullTensor] = {}
    for key in shapes:
        if not key.startswith(KEY_PREFIX):
            raise LorademError(f"{where}: tensor {key}: expected a PEFT key starting with {KEY_PREFIX!r}")
        rest = key[len(KEY_PREFIX):]
        match = _LORA_KEY.match(rest)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = key
            continue
        if "lora_" in rest or "trainable_tokens" in rest:
            raise LorademError(f"{where}: tensor {key}: not a plain LoRA factor (only lora_A/lora_B are folded)")
        base_copy = ".base_layer." in rest
        target = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rest)  # <module>.modules_to_save.<adapter>.<param>
        target = target.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        if target in full:
            raise LorademError(f"{where}: tensor {key}: a second full copy of {target}")
        full[target] = FullTensor(target=target, key=key, shape=tuple(shapes[key]), base_copy=base_copy)
    lora = {}
    for module, parts in pairs.items():
        m = _module(module, parts, shapes, config, where)
        if m.target in lora:
            raise LorademError(f"{where}: two LoRA modules modify {m.target}")
        if m.target in full and not full[m.target].base_copy:
            raise LorademError(f"{where}: {m.target} has both a LoRA and a full copy")
        lora[m.target] = m
    return lora, full


def _module(module: str, parts: dict[str, str], shapes: Mapping[str, tuple], config, where: Path) -> LoraModule:
    kind = "embedding" if any(p.startswith("lora_embedding") for p in parts) else "linear"
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
    if set(parts) != {a_name, b_name}:
        missing = {a_name, b_name} - set(parts)
        raise LorademError(f"{where}: {module}: expected {a_name} and {b_name}, missing {', '.join(sorted(missing)) or 'none'}")
    a_shape, b_shape = tuple(shapes[parts[a_name]]), tuple(shapes[parts[b_name]])
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise LorademError(
            f"{where}: {module}: lora_A {list(a_shape)} / lora_B {list(b_shape)} are not matrices "
            "(convolution LoRA is not supported)"
        )
    if a_shape[0] != b_shape[1]:
        raise LorademError(f"{where}: {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} disagree on the rank")
    rank = a_shape[0]
    try:
        scale = scaling(config, module, rank)
    except ValueError as exc:
        raise LorademError(f"{where.parent / CONFIG_FILE}: {exc}") from None
    fifo = bool(config.get("fan_in_fan_out")) and kind == "linear"
    shape = (a_shape[1], b_shape[0]) if (kind == "embedding" or fifo) else (b_shape[0], a_shape[1])
    return LoraModule(
        module=module, target=f"{module}.weight", kind=kind, a_key=parts[a_name], b_key=parts[b_name],
        rank=rank, scale=scale, fan_in_fan_out=fifo, shape=shape,
    )

