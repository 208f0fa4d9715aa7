"""loradem.vectors.similarity: norms, cosines and distances from the factors equal the dense float64 computation.

    pytest tests/test_vectors.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_assemble import peft_delta64
from test_lora import lora_layers, make_adapter, peft_model

from loradem.errors import LorademError
from loradem.vectors.similarity import (
    format_info,
    format_similarity,
    format_table,
    layer_of,
    save_heatmap,
    similarity,
    vector_info,
)


def dense_vector(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Every delta of an adapter, dense, in float64, from peft's loaded model (the oracle)."""
    from safetensors.torch import load_file

    model = peft_model(base, adapter)
    deltas = {f"{name}.weight": peft_delta64(layer) for name, layer in lora_layers(model).items()}
    base_tensors = load_file(base / "model.safetensors")
    for name, module in model.base_model.model.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            weight = f"{name}.weight"
            deltas[weight] = module.modules_to_save["default"].weight.double() - base_tensors[weight].double()
    return deltas


def flatten(vectors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    targets = sorted(set().union(*vectors))
    shapes = {t: next(v[t] for v in vectors if t in v).shape for t in targets}
    return torch.stack([
        torch.cat([v.get(t, torch.zeros(shapes[t], dtype=torch.float64)).flatten() for t in targets]) for v in vectors
    ])


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("vec")
    return [
        make_adapter(tiny_base, root / "emb", seed=1, r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        make_adapter(tiny_base, root / "rs", seed=2, r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                     alpha_pattern={"down_proj": 11}),
        make_adapter(tiny_base, root / "mts", seed=3, r=2, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]),
    ]


def test_norms_equal_dense(tiny_base, adapters):
    for folder in adapters:
        info = vector_info(folder, base=tiny_base)
        dense = dense_vector(tiny_base, folder)
        assert set(info["modules"]) == set(dense)
        for target, delta in dense.items():
            assert math.isclose(info["modules"][target], float(delta.norm()), rel_tol=1e-9)
        for layer, norm in info["layers"].items():
            expected = math.sqrt(sum(float(d.norm()) ** 2 for t, d in dense.items() if layer_of(t) == layer))
            assert math.isclose(norm, expected, rel_tol=1e-9)
        assert math.isclose(info["total_norm"], float(flatten([dense]).norm()), rel_tol=1e-9)
    assert set(vector_info(adapters[0])["layers"]) == {"0", "1", "other"}


def test_cosine_and_distance_equal_dense(tiny_base, adapters):
    names, cosine, distance = similarity([*adapters, adapters[0]], base=tiny_base)
    flat = flatten([dense_vector(tiny_base, a) for a in [*adapters, adapters[0]]])
    norms = flat.norm(dim=1)
    expected_cos = (flat @ flat.T) / torch.outer(norms, norms)
    expected_dist = torch.cdist(flat, flat)
    np.testing.assert_allclose(cosine, expected_cos.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(distance, expected_dist.numpy(), rtol=1e-7, atol=1e-9)
    assert names == [str(a) for a in [*adapters, adapters[0]]]  # a repeated folder name falls back to paths
    assert cosine[0, 3] == pytest.approx(1.0) and distance[0, 3] == pytest.approx(0.0, abs=1e-6)
    assert similarity(adapters[:2])[0] == ["emb", "rs"]


def test_full_copy_needs_the_base(adapters):
    with pytest.raises(LorademError, match=r"mts: lm_head\.weight is a full copy \(modules_to_save\); pass the base"):
        vector_info(adapters[2])


def test_zero_vector_has_no_direction(tiny_base, tmp_path, adapters):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "zero")
    _, cosine, distance = similarity([tmp_path / "zero", adapters[0]])
    assert np.isnan(cosine[0, 1]) and distance[0, 1] == pytest.approx(vector_info(adapters[0])["total_norm"])


def test_heatmap_and_tables(tmp_path):
    from matplotlib.image import imread

    names, matrix = ["a", "bb"], np.array([[1.0, 0.25], [0.25, 1.0]])
    path = save_heatmap(names, matrix, tmp_path / "plots" / "cos.png", "cosine")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).ndim == 3
    assert not list(path.parent.glob(".cos.png.partial-*"))
    table = format_table(names, matrix, title="cosine", digits=2)
    assert table.splitlines() == ["cosine", "         a    bb", "   a  1.00  0.25", "  bb  0.25  1.00"]
    text = format_info("x", {"total_norm": 2.0, "modules": {"m": 2.0}, "layers": {"0": 2.0}})
    assert text.splitlines() == ["x: ||delta|| = 2 over 1 modules", "  layer     0: 2"]
    both = format_similarity(names, matrix, 1 - matrix).splitlines()
    assert both[0] == "cosine similarity" and both[5] == "distance ||di - dj||" and both[7] == "    a  0.000  0.750"


def test_vectors_of_different_bases_are_refused_in_one_line(tiny_base, tmp_path):
    from tiny import build_tiny_llama

    wider = build_tiny_llama(tmp_path / "wider", hidden_size=48)
    ours = make_adapter(tiny_base, tmp_path / "ours", seed=1, r=2, target_modules=["q_proj"])
    theirs = make_adapter(wider, tmp_path / "theirs", seed=2, r=2, target_modules=["q_proj"])
    with pytest.raises(LorademError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: .*ours changes a \[32, 32\] tensor, "
                                           r".*theirs a \[48, 48\] one; these vectors are for different bases"):
        similarity([ours, theirs])
