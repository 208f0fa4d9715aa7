"""Distribution vectors as objects: norms and pairwise similarities of adapters' deltas, from the factors.

    from loradem.vectors.similarity import vector_info, similarity, save_heatmap, format_info, format_similarity
    info = vector_info("adapters/math")                       # ‖ΔW‖_F per module, per layer, total_norm
    print(format_info("adapters/math", info))
    names, cos, dist = similarity(["adapters/math", "adapters/code"])
    print(format_similarity(names, cos, dist))
    save_heatmap(names, cos, "runs/demo/cosine.png", "cosine similarity of distribution vectors")

Contract: the vector of an adapter is all its per-tensor deltas ΔW = s·B·A
concatenated (modules absent from an adapter are zeros). Nothing dense is
built for a LoRA module: ‖sBA‖² = s²·tr((BᵀB)(AAᵀ)) and ⟨s₁B₁A₁, s₂B₂A₂⟩ =
s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)), in float64, one target tensor at a time. Full
copies (``modules_to_save``) are vectors (copy − base) and need the base;
peft's unchanged base copies contribute nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from loradem.errors import LorademError
from loradem.model.base import resolve_base
from loradem.plots import figure, labelled_cells, save_png, styled
from loradem.vectors.checkpoint import read_base, tied_pairs
from loradem.vectors.lora import LoadedAdapter, load_adapter

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LowRank:
    left: torch.Tensor  # ΔW = scale · left @ right
    right: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Dense:
    delta: torch.Tensor


Term = LowRank | Dense


def inner(x: Term, y: Term) -> float:
    """Frobenius inner product ⟨x, y⟩ of two deltas of the same tensor, without densifying a low-rank one."""
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        # tr((LxRx)ᵀ LyRy) = Σ (LxᵀLy) ⊙ (RxRyᵀ)
        return x.scale * y.scale * float(((x.left.T @ y.left) * (x.right @ y.right.T)).sum())
    if isinstance(x, Dense) and isinstance(y, Dense):
        return float((x.delta * y.delta).sum())
    low, dense = (x, y) if isinstance(x, LowRank) else (y, x)
    return low.scale * float((low.left * (dense.delta @ low.right.T)).sum())


class _Base:
    """Base tensors for full-copy deltas, read on demand (ties honoured)."""

    def __init__(self, spec: str | Path | None):
        self.spec, self._checkpoint, self._tied = spec, None, {}

    def tensor(self, target: str, adapter: LoadedAdapter) -> torch.Tensor:
        if self.spec is None:
            raise LorademError(
                f"adapter {adapter.path}: {target} is a full copy (modules_to_save); pass the base (--base) to measure it"
            )
        from safetensors import safe_open


        if self._checkpoint is None:
            self._checkpoint = read_base(resolve_base(str(self.spec)))
            self._tied = tied_pairs(self._checkpoint)
        name = self._tied.get(target, target)
        if name not in self._checkpoint.files:
            raise LorademError(f"adapter {adapter.path}: targets {target}, which the base does not have")
        with safe_open(self._checkpoint.files[name], framework="pt") as f:
            return f.get_tensor(name)


def _term(adapter: LoadedAdapter, target: str, base: _Base) -> Term | None:
    if target in adapter.lora:
        m = adapter.lora[target]
        left, right = adapter.lowrank(m)
        return LowRank(left, right, m.scale)
    full = adapter.full.get(target)
    if full is None or full.base_copy:
        return None
    copy = adapter.tensor(full.key).to(torch.float64)
    original = base.tensor(target, adapter).to(torch.float64)
    if copy.shape != original.shape:
        raise LorademError(f"adapter {adapter.path}: {full.key} {list(copy.shape)} does not match the base's {list(original.shape)}")
    return Dense(copy - original)


def _targets(adapters: Sequence[LoadedAdapter]) -> list[str]:
    names = {t for a in adapters for t in a.lora} | {t for a in adapters for t, f in a.full.items() if not f.base_copy}
    return sorted(names, key=_natural)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def layer_of(target: str) -> str:
    """'3' for model.layers.3.*, 'other' for embeddings, lm_head and anything outside the decoder layers."""
    match = _LAYER.search(f".{target}")
    return match[1] if match else "other"


def vector_info(path: str | Path, *, base: str | Path | None = None, trust_pickle: bool = False) -> dict:
    """Frobenius norms of one adapter's delta: per module (target tensor), per layer, and in total."""
    adapter = load_adapter(path, trust_pickle=trust_pickle)
    reader = _Base(base)
    modules: dict[str, float] = {}
    for target in _targets([adapter]):
        term = _term(adapter, target, reader)
        modules[target] = math.sqrt(max(0.0, inner(term, term)))
    layers: dict[str, float] = {}
    for target, norm in modules.items():
        layers[layer_of(target)] = layers.get(layer_of(target), 0.0) + norm**2
    layers = {k: math.sqrt(v) for k, v in sorted(layers.items(), key=lambda kv: _natural(kv[0]))}
    return {
        "adapter": str(path),
        "modules": modules,
        "layers": layers,
        "total_norm": math.sqrt(sum(n**2 for n in modules.values())),
    }


def similarity(
    paths: Sequence[str | Path], *, base: str | Path | None = None, trust_pickle: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, cosine matrix, distance matrix ‖Δᵢ − Δⱼ‖) over the adapters' full deltas."""
    if not paths:
        raise LorademError("similarity: expected at least one adapter")
    adapters = [load_adapter(p, trust_pickle=trust_pickle) for p in paths]
    _check_same_shapes(adapters)
    reader = _Base(base)
    n = len(adapters)
    gram = np.zeros((n, n))
    for target in _targets(adapters):
        terms = [(i, _term(a, target, reader)) for i, a in enumerate(adapters)]
        terms = [(i, t) for i, t in terms if t is not None]
        for x, (i, tx) in enumerate(terms):
            for j, ty in terms[x:]:
                value = inner(tx, ty)
                gram[i, j] += value
                if i != j:
                    gram[j, i] += value
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = gram / np.outer(norms, norms)  # NaN where a vector is zero: no direction
    distance = np.sqrt(np.clip(np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2 * gram, 0.0, None))
    np.fill_diagonal(distance, 0.0)
    return display_names(paths), cosine, distance


def _check_same_shapes(adapters: Sequence[LoadedAdapter]) -> None:
    """Vectors can only be compared on one base: a tensor two adapters change must have one shape in both."""
    seen: dict[str, tuple[tuple[int, ...], Path]] = {}
    for a in adapters:
        shapes = {m.target: m.shape for m in a.lora.values()} | {t: f.shape for t, f in a.full.items()}
        for target, shape in shapes.items():
            first = seen.setdefault(target, (tuple(shape), a.path))
            if first[0] != tuple(shape):
                raise LorademError(f"{target}: {first[1]} changes a {list(first[0])} tensor, {a.path} a {list(shape)} one; "
                                   "these vectors are for different bases and cannot be compared")


def display_names(paths: Sequence[str | Path]) -> list[str]:
    """Folder names, or full paths where two folders share a name."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def format_table(names: Sequence[str], matrix: np.ndarray, *, title: str = "", digits: int = 3) -> str:
    """A plain-text square table for the terminal."""
    cells = [[f"{v:.{digits}f}" for v in row] for row in np.asarray(matrix, dtype=float)]
    width = max([len(n) for n in names] + [len(c) for row in cells for c in row])
    lines = [title] if title else []
    lines.append(" " * width + "  " + "  ".join(n.rjust(width) for n in names))
    lines += [name.rjust(width) + "  " + "  ".join(c.rjust(width) for c in row) for name, row in zip(names, cells)]
    return "\n".join(lines)


def format_info(path: str | Path, info: dict, *, digits: int = 4) -> str:
    """One `vector_info` result for the terminal: the total, then the norm of each layer."""
    lines = [f"{path}: ||delta|| = {info['total_norm']:.{digits}g} over {len(info['modules'])} modules"]
    lines += [f"  layer {layer:>5}: {norm:.{digits}g}" for layer, norm in info["layers"].items()]
    return "\n".join(lines)


def format_similarity(names: Sequence[str], cosine: np.ndarray, distance: np.ndarray) -> str:
    """Both `similarity` matrices for the terminal."""
    return format_table(names, cosine, title="cosine similarity") + "\n\n" + format_table(names, distance, title="distance ||di - dj||")


@styled
def save_heatmap(names: Sequence[str], matrix: np.ndarray, path: str | Path, title: str) -> Path:
    """Write an annotated heatmap PNG in loradem's plot style; the file appears only when complete."""
    values = np.asarray(matrix, dtype=float)
    size = 1.2 + 0.9 * len(names)
    fig = figure(size + 1.5, size)
    ax = fig.add_subplot()
    image = labelled_cells(ax, values, "{:.2f}".format, fontsize=9, cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_title(title)
    path = Path(path)
    save_png(fig, path)
    return path
