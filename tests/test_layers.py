import pytest

from loradem.layers import group_of_layer, layer_group, layer_index, weight_for


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
