"""loradem.vectors.lora: adapters read as exact deltas, checked against peft's own layers; refusals.

    pytest tests/test_lora.py
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loradem.errors import LorademError
from loradem.vectors.lora import load_adapter, pattern_key, scaling

# ---- shared factories (also used by test_assemble.py and test_vectors.py) ----


def make_adapter(base: Path, out: Path, seed: int = 0, b_scale: float = 1.0, **lora) -> Path:
    """Save a random PEFT LoRA adapter (init_lora_weights=False, so B != 0) for `base` to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale)
            elif "modules_to_save" in name:  # a trained copy differs from the base
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


def build_tiny_gpt2(folder: Path) -> Path:
    """A tiny GPT-2 (Conv1D layers store weights as [in, out]: LoRA needs fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    config = GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def assert_f32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding: 1e-6 relative, and 1e-6 of the tensor's largest magnitude absolute."""
    expected = expected.to(actual.dtype)
    atol = 1e-6 * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol)


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def edit_tensors(folder: Path, fn) -> Path:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


# ---- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module")
def patterned(tiny_base, tmp_path_factory) -> Path:
    """rank_pattern + alpha_pattern (overlapping regexes: first match wins), plus an embedding LoRA."""
    return make_adapter(
        tiny_base, tmp_path_factory.mktemp("lora") / "patterned", seed=1, r=4, lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "down_proj": 6},
        alpha_pattern={r"layers\.0\..*": 3, "q_proj": 5, "embed_tokens": 7},
    )


@pytest.fixture(scope="module")
def rslora(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("lora") / "rs", seed=2, r=8, lora_alpha=4,
                        use_rslora=True, target_modules=["k_proj", "o_proj"])


# ---- the scaling rule and the deltas, against peft's instantiated layers -----

def test_pattern_key_mirrors_peft():
    from peft.utils.other import get_pattern_key

    patterns = [r"layers\.1\.self_attn\.q_proj", "q_proj", r"layers\.\d+\.mlp\..*", "proj", "self_attn.v_proj"]
    keys = [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.xq_proj", "lm_head", "q_proj",
    ]
    for key in keys:
        assert pattern_key(patterns, key) == get_pattern_key(patterns, key), key


@pytest.mark.parametrize("which", ["patterned", "rslora"])
def test_scale_and_delta_equal_peft(which, request, tiny_base):
    folder = request.getfixturevalue(which)
    adapter = load_adapter(folder)
    layers = lora_layers(peft_model(tiny_base, folder))
    assert {m.module for m in adapter.lora.values()} == set(layers)
    for m in adapter.lora.values():
        layer = layers[m.module]
        assert m.scale == layer.scaling["default"], m.module
        assert m.rank == layer.r["default"]
        expected = layer.get_delta_weight("default").double()
        assert_f32_close(adapter.delta(m), expected)
        assert m.shape == tuple(layer.get_base_layer().weight.shape)
    kinds = {m.kind for m in adapter.lora.values()}
    assert kinds == ({"linear", "embedding"} if which == "patterned" else {"linear"})


def test_patterns_pick_first_match(patterned):
    lora = load_adapter(patterned).lora
    q0, q1 = lora["model.layers.0.self_attn.q_proj.weight"], lora["model.layers.1.self_attn.q_proj.weight"]
    assert (q0.rank, q0.scale) == (4, 3 / 4)  # alpha 'layers\.0\..*' listed before 'q_proj'
    assert (q1.rank, q1.scale) == (2, 5 / 2)  # rank_pattern for layer 1's q_proj, alpha 'q_proj'
    assert lora["model.layers.1.mlp.down_proj.weight"].scale == 8 / 6
    assert lora["model.embed_tokens.weight"].scale == 7 / 4


def test_rslora_scale(rslora):
    assert {m.scale for m in load_adapter(rslora).lora.values()} == {4 / math.sqrt(8)}


def test_scaling_refuses_rank_disagreeing_with_config():
    with pytest.raises(ValueError, match=r"q_proj: lora_A has rank 4 but the config says r=8"):
        scaling({"r": 8, "lora_alpha": 16}, "model.layers.0.self_attn.q_proj", 4)


def test_fan_in_fan_out_delta_equals_peft(tmp_path):
    base = build_tiny_gpt2(tmp_path / "gpt2")
    folder = make_adapter(base, tmp_path / "fifo", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"])
    adapter = load_adapter(folder)
    layers = lora_layers(peft_model(base, folder))
    assert len(adapter.lora) == len(layers) == 6
    for m in adapter.lora.values():
        assert m.fan_in_fan_out
        assert_f32_close(adapter.delta(m), layers[m.module].get_delta_weight("default").double())


def test_modules_to_save_and_base_copies(tiny_base, tmp_path):
    folder = make_adapter(tiny_base, tmp_path / "mts", target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    adapter = load_adapter(folder)
    assert adapter.full["lm_head.weight"].base_copy is False  # a trained replacement
    assert adapter.full["model.embed_tokens.weight"].base_copy is True  # peft's save_embedding_layers copy
    assert "model.embed_tokens.weight" in adapter.lora


# ---- refusals ------------------------------------------------------------------

@pytest.fixture
def plain(tiny_base, tmp_path) -> Path:
    return make_adapter(tiny_base, tmp_path / "plain", r=2, target_modules=["q_proj"])


def test_pickle_refused_unless_trusted(plain, tmp_path):
    folder = copy_adapter(plain, tmp_path / "pickled")
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(LorademError, match=r"adapter_model\.bin: a pickle file can run code .* trust_pickle"):
        load_adapter(folder)
    trusted, reference = load_adapter(folder, trust_pickle=True), load_adapter(plain)
    assert trusted.lora.keys() == reference.lora.keys()
    for target, m in reference.lora.items():
        assert torch.equal(trusted.delta(trusted.lora[target]), reference.delta(m))


def test_truncated_safetensors_refused(plain):
    path = plain / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LorademError, match=r"adapter_model\.safetensors: not a valid safetensors file"):
        load_adapter(plain)


def test_missing_and_malformed_config(plain):
    cfg = plain / "adapter_config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-5])
    with pytest.raises(LorademError, match=r"adapter_config\.json: line \d+: not valid JSON"):
        load_adapter(plain)
    cfg.unlink()
    with pytest.raises(LorademError, match=r"adapter_config\.json: not found"):
        load_adapter(plain)


def test_missing_folder_and_weights(tmp_path, plain):
    with pytest.raises(LorademError, match="expected an adapter folder, not found"):
        load_adapter(tmp_path / "nope")
    (plain / "adapter_model.safetensors").unlink()
    with pytest.raises(LorademError, match=r"expected adapter_model\.safetensors"):
        load_adapter(plain)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, r"use_dora is set; DoRA rescales"),
        ({"trainable_token_indices": [1, 2]}, r"trainable_token_indices is set; trainable tokens"),
        ({"lora_bias": True}, r"lora_bias is set"),
        ({"peft_type": "LOHA"}, r"peft_type is 'LOHA'; loradem folds LoRA adapters only"),
        ({"alora_invocation_tokens": [5]}, r"aLoRA applies only after"),
        ({"bias": "all"}, r"bias='all'"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' rewrites the base weight"),
        ({"lora_alpha": "eight"}, r"lora_alpha: expected a number"),
        ({"r": 8}, r"lora_A has rank 2 but the config says r=8"),
    ],
)
def test_config_refusals(plain, changes, message):
    edit_config(plain, **changes)
    with pytest.raises(LorademError, match=message):
        load_adapter(plain)


def test_real_dora_and_loha_adapters_refused(tiny_base, tmp_path):
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    make_adapter(tiny_base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(LorademError, match="use_dora is set"):
        load_adapter(tmp_path / "dora")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoHaConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "loha")
    with pytest.raises(LorademError, match="peft_type is 'LOHA'"):
        load_adapter(tmp_path / "loha")


def test_nan_factor_refused_naming_file_and_tensor(plain):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(plain, lambda t: t[key].__setitem__((0, 0), float("nan")))
    adapter = load_adapter(plain)  # lazy: the header is fine
    with pytest.raises(LorademError, match=r"adapter_model\.safetensors: tensor " + re.escape(key) + " contains NaN or Inf"):
        adapter.check_finite()


def test_unpaired_and_unknown_keys_refused(plain):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(plain, lambda t: t.pop(key))
    with pytest.raises(LorademError, match=r"q_proj: expected lora_A\.weight and lora_B\.weight, missing lora_B\.weight"):
        load_adapter(plain)
    edit_tensors(plain, lambda t: t.__setitem__("model.layers.0.q_proj.lora_B.weight", torch.zeros(2, 2)))
    with pytest.raises(LorademError, match=r"expected a PEFT key starting with 'base_model\.model\.'"):
        load_adapter(plain)


def test_magnitude_vector_refused_even_without_config_flag(plain):
    edit_tensors(plain, lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(32)))
    with pytest.raises(LorademError, match="not a plain LoRA factor"):
        load_adapter(plain)
