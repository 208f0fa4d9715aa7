"""Layer groups: which weight of a per-layer-group search applies to which module.

    layer_group("model.layers.17.mlp.up_proj", num_layers=30, groups=4)  -> 2

Groups are consecutive, as equal as possible (the first `num_layers % groups`
groups get one layer more, like numpy.array_split). A module outside the
decoder blocks (embeddings, the final norm, lm_head) belongs to no group:
`layer_group` returns None and callers apply the source's mean weight. This
is the only place the mapping is written; the search (LoRA scales) and the
assembler (folded weights) both call it, so they cannot disagree.

A weight may also be a dict, one weight per LoRA module (LoRA Soups / CAT
style), keyed by the module's path in the base model (`canonical_module`:
``model.layers.0.self_attn.q_proj``, as `loradem.vectors.lora.LoraModule.module`
holds it). It must name every LoRA module of its adapter and nothing else
(`check_module_weights`); a missing module is an error, never the mean.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Iterable, Mapping, Sequence, Union

from loradem.errors import LorademError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
PEFT_PREFIX = "base_model.model."
# one weight; one per layer group; one per LoRA module (canonical module path -> weight)
Weight = Union[float, Sequence[float], Mapping[str, float]]


def canonical_module(peft_name: str) -> str:
    """A PEFT model's module path as the base model names it: one leading ``base_model.model.`` dropped."""
    return peft_name.removeprefix(PEFT_PREFIX)


def layer_index(module: str) -> int | None:
    """The decoder block index in a module or tensor name, or None outside the blocks."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def group_of_layer(layer: int, num_layers: int, groups: int) -> int:
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside 0..{num_layers - 1}")
    groups = min(groups, num_layers)
    size, extra = divmod(num_layers, groups)
    boundary = extra * (size + 1)
    return layer // (size + 1) if layer < boundary else extra + (layer - boundary) // size


def check_group_count(groups: int, num_layers: int, owner: str) -> None:
    """A per-layer-group weight list has 1 to num_layers entries: with more, a group gets no layer and its
    weight would be dropped while the record kept it."""
    if not 1 <= groups <= num_layers:
        raise LorademError(f"{owner}: expected one weight per layer group, 1 to {num_layers} groups for this "
                           f"{num_layers}-layer model, got a list of {groups}")


def layer_group(module: str, num_layers: int, groups: int) -> int | None:
    layer = layer_index(module)
    return None if layer is None else group_of_layer(layer, num_layers, groups)


def weight_for(module: str, weight: Weight, num_layers: int | None) -> float:
    """A source's weight for one module: a float applies everywhere; a list is one weight per layer group;
    a dict is one weight per module (canonical path; `num_layers` is not used)."""
    if isinstance(weight, (int, float)):
        return float(weight)
    if isinstance(weight, Mapping):
        if module not in weight:
            raise LorademError(f"no weight for module {module}: per-module weights must name every LoRA module of the adapter")
        return float(weight[module])
    group = layer_group(module, num_layers, len(weight))
    return sum(weight) / len(weight) if group is None else float(weight[group])


def check_module_values(weight: Mapping, owner: str, entry: Callable[[str], str]) -> None:
    """A non-empty dict of module path (str) -> finite number; `owner` starts the message, `entry(key)` names a bad entry."""
    if not weight:
        raise LorademError(f"{owner}: expected a non-empty dict of per-module weights, got {{}}")
    for key, w in weight.items():
        if not isinstance(key, str):
            raise LorademError(f"{owner}: {key!r}: expected a module path (str) as a per-module weight key")
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise LorademError(f"{entry(key)}: expected a finite number, got {w!r}")


def check_module_weights(weight: Mapping[str, float], modules: Iterable[str], owner: str) -> None:
    """Per-module weights name exactly `modules` (one adapter's LoRA modules, canonical paths).

    A key that names no module would be ignored and a missing module would have no weight, so
    both raise; `owner` starts the message (which adapter)."""
    modules = set(modules)
    unknown = sorted(set(weight) - modules)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        example = f"e.g. {min(modules)}" if modules else "it has none"
        raise LorademError(
            f"{owner}: {unknown[0]}{more}: not a LoRA module of this adapter (per-module weights are keyed by "
            f"the module's path in the base model, {example})"
        )
    missing = sorted(modules - set(weight))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LorademError(
            f"{owner}: no weight for module {missing[0]}{more}: per-module weights must name every LoRA module of the adapter"
        )
