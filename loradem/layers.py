"""Layer groups: which weight of a per-layer-group search applies to which module.

    layer_group("model.layers.17.mlp.up_proj", num_layers=30, groups=4)  -> 2

Groups are consecutive, as equal as possible (the first `num_layers % groups`
groups get one layer more, like numpy.array_split). A module outside the
decoder blocks (embeddings, the final norm, lm_head) belongs to no group:
`layer_group` returns None and callers apply the source's mean weight. This
is the only place the mapping is written; the search (LoRA scales) and the
assembler (folded weights) both call it, so they cannot disagree.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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


def layer_group(module: str, num_layers: int, groups: int) -> int | None:
    layer = layer_index(module)
    return None if layer is None else group_of_layer(layer, num_layers, groups)


def weight_for(module: str, weight: float | list[float], num_layers: int) -> float:
    """A source's weight for one module: a float applies everywhere; a list is one weight per layer group."""
    if isinstance(weight, (int, float)):
        return float(weight)
    group = layer_group(module, num_layers, len(weight))
    return sum(weight) / len(weight) if group is None else float(weight[group])
