import pytest

from loradem.errors import LorademError
from loradem.model.layers import (
    canonical_module,
    check_module_weights,
    group_of_layer,
    layer_group,
    layer_index,
    weight_for,
)


def test_groups_are_consecutive_and_balanced_like_array_split():
    import numpy as np

    for num_layers, groups in [(30, 4), (2, 4), (7, 3), (12, 12), (5, 1)]:
        expected = {}
        for g, chunk in enumerate(np.array_split(np.arange(num_layers), min(groups, num_layers))):
            for layer in chunk:
                expected[int(layer)] = g
        assert {i: group_of_layer(i, num_layers, groups) for i in range(num_layers)} == expected


def test_module_names():
    assert layer_index("base_model.model.model.layers.17.mlp.up_proj") == 17
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_group("model.layers.29.self_attn.q_proj.weight", 30, 4) == 3
    assert layer_group("lm_head.weight", 30, 4) is None
    with pytest.raises(ValueError, match="outside"):
        group_of_layer(30, 30, 4)


def test_weight_for():
    assert weight_for("model.layers.0.mlp.up_proj", 0.5, 30) == 0.5
    w = [0.0, 1.0, 2.0, 3.0]
    assert weight_for("model.layers.0.mlp.up_proj", w, 30) == 0.0
    assert weight_for("model.layers.29.mlp.up_proj", w, 30) == 3.0
    assert weight_for("lm_head", w, 30) == 1.5


def test_canonical_module_drops_one_peft_prefix():
    assert canonical_module("base_model.model.model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert canonical_module("base_model.model.lm_head") == "lm_head"
    assert canonical_module("model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"  # already canonical
    # only once, and only as a prefix
    assert canonical_module("base_model.model.base_model.model.x") == "base_model.model.x"
    assert canonical_module("encoder.base_model.model.x") == "encoder.base_model.model.x"


def test_weight_for_per_module():
    w = {"model.layers.0.mlp.up_proj": 0.25, "model.layers.1.mlp.up_proj": -1.5, "lm_head": 2}
    assert weight_for("model.layers.0.mlp.up_proj", w, 30) == 0.25
    assert weight_for("model.layers.1.mlp.up_proj", w, None) == -1.5
    assert weight_for("lm_head", w, 30) == 2.0 and isinstance(weight_for("lm_head", w, 30), float)
    with pytest.raises(LorademError, match=r"^no weight for module model\.layers\.0\.self_attn\.q_proj: "
                       r"per-module weights must name every LoRA module of the adapter$"):
        weight_for("model.layers.0.self_attn.q_proj", w, 30)  # never the mean


def test_check_module_weights():
    modules = ["model.layers.0.q_proj", "model.layers.1.q_proj"]
    check_module_weights({"model.layers.0.q_proj": 1.0, "model.layers.1.q_proj": 0.0}, modules, "weights: a")
    with pytest.raises(LorademError, match=r"^weights: a: model\.layers\.0\.q_prj: not a LoRA module of this adapter .*"
                       r"e\.g\. model\.layers\.0\.q_proj\)$"):
        check_module_weights({"model.layers.0.q_prj": 1.0, "model.layers.1.q_proj": 0.0}, modules, "weights: a")
    with pytest.raises(LorademError, match=r"^weights: a: no weight for module model\.layers\.1\.q_proj: "
                       r"per-module weights must name every LoRA module of the adapter$"):
        check_module_weights({"model.layers.0.q_proj": 1.0}, modules, "weights: a")
