"""One base, every adapter resident: the model a weight search evaluates.

    model, tok = load_multi(base_dir, {"add": Path("adapters/add"), "rev": Path("adapters/rev")})
    set_weights(model, {"add": 0.7, "rev": 1.2})    # now computes θ₀ + Σ wᵢ·ΔWᵢ

Every adapter is loaded once into one PEFT model and all are active at once;
the forward pass sums their deltas. A weight is the adapter's scale factor:
`LoraLayer.set_scale(name, w)` sets the layer's scaling to w·α/r (w·α/√r with
rsLoRA), from the layer's own r and α, which PEFT resolved from
`rank_pattern` / `alpha_pattern` when it built the layer. So the model equals
θ₀ + Σ wᵢ·sᵢ·Bᵢ·Aᵢ without merging anything, weight 0 switches an adapter off,
and a search trial costs one forward pass, never a reload or a merge.

With ``fold=True`` (what the search uses) each plain Linear LoRA layer is
folded instead: its base weight becomes W₀ + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, recomputed from a
kept copy of W₀ in one `addmm` over the concatenated factors (exact per call,
no drift across trials), and PEFT is told the adapters are merged, so the
forward pass is the plain model's. Measured on SmolLM2-135M with three rank-8
all-linear adapters (1 thread): evaluation with unmerged adapters took 24%
longer than with the deltas folded. The price is a copy of every folded weight
(kept on the CPU when the model is on a GPU). Other LoRA layers (embeddings,
tied weights, quantized bases) keep using scales.

A weight may also be a list, one weight per layer group
(`loradem.model.layers.weight_for`: consecutive decoder blocks in `len(list)` groups;
modules outside the blocks get the list's mean), or a dict, one weight per
LoRA module keyed by the module's path in the base model
(``model.layers.0.self_attn.q_proj``; `loradem.model.layers.canonical_module` drops
PEFT's ``base_model.model.``), naming exactly the modules that carry that
adapter. Either way a search sets per-module scales the same way the
assembler folds them.

Source names may contain '.', which PEFT's module dicts refuse; adapters are
registered as ``s<index>_<name with non-identifier characters as '_'>``, and
the mapping lives on the model (`adapter_names(model)`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from loradem.errors import LorademError
from loradem.files import read_json
from loradem.model.base import check_base_folder
from loradem.model.layers import (
    Weight,
    canonical_module,
    check_group_count,
    check_module_values,
    check_module_weights,
    weight_for,
)
from loradem.model.lora_config import check_weighable

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAMES_ATTR = "loradem_adapters"
LAYERS_ATTR = "loradem_lora_layers"
MODULES_ATTR = "loradem_lora_modules"
_NUM_LAYERS_ATTR = "loradem_num_layers"
_FOLD_ATTR = "loradem_folded"


def peft_adapter_name(index: int, source: str) -> str:
    """A name PEFT accepts for source number `index` (no '.', never inside the 'lora_' prefix)."""
    return f"s{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", source)


def check_adapter_folder(source: str, folder: Path) -> dict:
    """Read and check an adapter folder's config; returns it. Safetensors weights only, LoRA only, additive only."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise LorademError(f"adapter {source!r}: {config_path} not found (expected a PEFT adapter folder)")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        found = ", ".join(p.name for p in folder.glob("adapter_model.*")) or "nothing"
        raise LorademError(f"adapter {source!r}: expected {folder / ADAPTER_WEIGHTS} (found {found}; loradem never unpickles)")
    try:  # the one acceptance rule of every weighted vector, the assembler's plus what a trial must scale
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise LorademError(f"{config_path}: expected a JSON object")
        check_weighable(config, config_path)
    except LorademError as exc:
        raise LorademError(f"adapter {source!r}: {exc}") from None
    return config


def _lora_modules_in_file(path: Path) -> set[str]:
    """Module paths that carry a LoRA A factor in an adapter's safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    out = set()
    for key in keys:
        m = re.match(r"^(.*)\.(lora_A|lora_embedding_A)(\.weight)?$", key)
        if m:
            out.add(m.group(1))
    return out


def _lora_layers(model) -> dict[str, object]:
    """Module path -> LoRA layer, for every LoRA layer of the model."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _check_all_loaded(source: str, name: str, folder: Path, layers: dict[str, object]) -> None:
    """PEFT drops adapter keys for modules the base lacks without a word; refuse that."""
    in_file = _lora_modules_in_file(folder / ADAPTER_WEIGHTS)
    in_model = {path for path, layer in layers.items() if name in layer.lora_A or name in layer.lora_embedding_A}
    if not in_file:
        raise LorademError(f"adapter {source!r}: {folder / ADAPTER_WEIGHTS} holds no LoRA factors")
    dropped, unset = sorted(in_file - in_model), sorted(in_model - in_file)
    if dropped or unset:
        example = (dropped or unset)[0]
        raise LorademError(
            f"adapter {source!r}: {len(in_file)} LoRA modules in {folder / ADAPTER_WEIGHTS} but "
            f"{len(in_file & in_model)} matched the base's targeted modules (e.g. {example!r} "
            f"{'is not in the base' if dropped else 'has no weights in the file'}; an adapter trained for another model?)"
        )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(base_dir: Path, *, device: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """The base as a transformers causal LM (safetensors only), refusing a checkpoint with missing weights."""
    from transformers import AutoModelForCausalLM


    base_dir = Path(base_dir)
    check_base_folder(base_dir)
    model, info = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, use_safetensors=True, output_loading_info=True
    )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise LorademError(f"base {str(base_dir)!r}: weights missing from the checkpoint: {', '.join(missing[:3])}"
                           + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    return model.to(device or default_device()).eval()


def load_tokenizer(base_dir: Path):
    """The base's tokenizer, left-padded for batched generation; pad = eos when the base has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise LorademError(f"base {str(base_dir)!r}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_multi(
    base_dir: Path, adapters: dict[str, Path], *, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
    fold: bool = False,
):
    """Load the base once and every adapter into it, all active, all at weight 1; returns (PeftModel, tokenizer).

    fold=True: `set_weights` folds the weighted deltas into plain Linear layers' weights (see the module docstring)."""
    from peft import PeftModel

    if not adapters:
        raise LorademError("load_multi: expected at least one adapter")
    for source, folder in adapters.items():
        check_adapter_folder(source, Path(folder))
    names = {source: peft_adapter_name(i, source) for i, source in enumerate(adapters)}
    model = load_base(base_dir, device=device, dtype=dtype)
    for i, (source, folder) in enumerate(adapters.items()):
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=names[source], is_trainable=False)
            else:
                model.load_adapter(str(folder), adapter_name=names[source], is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LorademError(f"adapter {source!r}: {folder}: PEFT could not load it ({first[:300]})") from None
    model.base_model.set_adapter(list(names.values()), inference_mode=True)
    model.eval()
    layers = _lora_layers(model)
    for source, folder in adapters.items():
        _check_all_loaded(source, names[source], Path(folder), layers)
    setattr(model, _NAMES_ATTR, names)
    setattr(model, LAYERS_ATTR, list(layers.values()))
    setattr(model, MODULES_ATTR, list(layers))
    setattr(model, _NUM_LAYERS_ATTR, num_hidden_layers(model.config))
    setattr(model, _FOLD_ATTR, _foldable(model, layers, names) if fold else {})
    if fold:
        set_weights(model, {s: 1.0 for s in names})  # the same model as without fold: every adapter at weight 1
    return model, load_tokenizer(base_dir)


class _Folded:
    """One Linear LoRA layer folded into its base weight: W = W₀ + B_cat·diag(wᵢ·sᵢ per rank) @ A_cat."""

    def __init__(self, layer, names: list[str]):
        self.layer = layer
        self.names = names  # PEFT adapter names present in this layer, in concatenation order
        weight = layer.get_base_layer().weight
        keep = "cpu" if weight.device.type == "cuda" else weight.device
        self.w0 = weight.detach().to(keep, copy=True)
        if keep == "cpu" and weight.device.type == "cuda":
            self.w0 = self.w0.pin_memory()
        self.a_cat = torch.cat([layer.lora_A[n].weight.detach() for n in names]).to(weight.dtype)
        self.b = [layer.lora_B[n].weight.detach().to(weight.dtype) for n in names]

    def apply(self, scale: dict[str, float]) -> None:
        """scale: PEFT adapter name -> the layer's full scaling (w·α/r); writes the base weight in place."""
        weight = self.layer.get_base_layer().weight
        b_cat = torch.cat([b * scale[n] for n, b in zip(self.names, self.b)], dim=1)
        with torch.no_grad():
            if self.layer.fan_in_fan_out:  # (in, out) weights, e.g. GPT-2's Conv1D
                weight.copy_(self.w0, non_blocking=True).addmm_(self.a_cat.t(), b_cat.t())
            elif self.w0.device == weight.device:
                torch.addmm(self.w0, b_cat, self.a_cat, out=weight.data)
            else:
                weight.copy_(self.w0, non_blocking=True).addmm_(b_cat, self.a_cat)
        self.layer.merged_adapters = list(self.names)  # PEFT's forward then runs the base layer only


def _foldable(model, layers: dict[str, object], names: dict[str, str]) -> dict[int, _Folded]:
    """id(layer) -> _Folded for the plain, unshared Linear LoRA layers of a loaded multi-adapter model."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    out = {}
    for layer in layers.values():
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if (
            type(layer) is not LoraLinear or not isinstance(base, torch.nn.Linear) or weight is None
            or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or seen.get(weight.data_ptr(), 0) > 1
            or getattr(layer, "lora_variant", {})
        ):
            continue
        present = [n for n in names.values() if n in layer.lora_A]
        if present:
            out[id(layer)] = _Folded(layer, present)
    return out


def num_hidden_layers(config) -> int:
    """Decoder blocks of a transformers config (the text model's, for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise LorademError(f"base config ({type(config).__name__}): expected num_hidden_layers > 0, got {n!r}")
    return n


def adapter_names(model) -> dict[str, str]:
    """source name -> PEFT adapter name, for a model built by `load_multi`."""
    names = getattr(model, _NAMES_ATTR, None)
    if names is None:
        raise LorademError("set_weights: expected a model built by loradem.model.soup.load_multi")
    return names


def _check_weight(source: str, w, num_layers: int) -> None:
    """A finite number, a list of them (one per layer group) or a non-empty dict module path -> finite number."""
    if isinstance(w, Mapping):
        check_module_values(w, f"weights: {source}", lambda key: f"weights: {source}[{key!r}]")
    elif isinstance(w, (list, tuple)):
        check_group_count(len(w), num_layers, f"weights: {source}")
        for i, x in enumerate(w):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise LorademError(f"weights: {source}[{i}]: expected a finite number, got {x!r}")
    elif isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise LorademError(
            f"weights: {source}: expected a finite number or a list of them (one per layer group) "
            f"or a dict of them (one per LoRA module), got {w!r}"
        )


def set_weights(model, weights: dict[str, Weight]) -> None:
    """Make `model` compute θ₀ + Σ wᵢ·ΔWᵢ (ΔWᵢ = sᵢ·Bᵢ·Aᵢ); weight 0 turns an adapter off. Mutates the model's LoRA scales.

    A weight is a number (every module), a list of one weight per layer group, or a dict of one weight
    per LoRA module (canonical module path, exactly the modules carrying that adapter), applied per
    LoRA layer by `loradem.model.layers.weight_for` (modules outside the decoder blocks get a list's mean).
    Everything is checked before any scale changes.
    """

    names = adapter_names(model)
    unknown = sorted(set(weights) - set(names))
    missing = sorted(set(names) - set(weights))
    if unknown or missing:
        raise LorademError(
            f"weights: expected exactly the sources {sorted(names)}"
            + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else "")
        )
    num_layers = getattr(model, _NUM_LAYERS_ATTR)
    for source, w in weights.items():
        _check_weight(source, w, num_layers)
    plain = {s: _plain(w) for s, w in weights.items()}
    modules = [canonical_module(m) for m in getattr(model, MODULES_ATTR)]
    layers = getattr(model, LAYERS_ATTR)
    for source, w in plain.items():
        if isinstance(w, dict):  # a typo'd or missing module must not pass silently
            carrying = [m for m, layer in zip(modules, layers) if names[source] in layer.scaling]
            check_module_weights(w, carrying, f"weights: {source}")
    folded = getattr(model, _FOLD_ATTR, {})
    for module, layer in zip(modules, layers):
        for source, w in plain.items():
            if names[source] in layer.scaling:  # PEFT ignores set_scale for an adapter the layer lacks
                layer.set_scale(names[source], w if isinstance(w, float) else weight_for(module, w, num_layers))
        if id(layer) in folded:
            folded[id(layer)].apply(layer.scaling)


def _plain(w) -> float | list[float] | dict[str, float]:
    """A checked weight as plain Python floats (one, a list, or a dict by module path)."""
    if isinstance(w, Mapping):
        return {k: float(x) for k, x in w.items()}
    if isinstance(w, (list, tuple)):
        return [float(x) for x in w]
    return float(w)
