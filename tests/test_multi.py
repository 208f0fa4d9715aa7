"""All adapters resident, weights as scales: logits equal a float64 fold of θ₀ + Σ wᵢ·sᵢ·Bᵢ·Aᵢ."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loradem.errors import LorademError
from loradem.model.soup import adapter_names, load_multi, set_weights

PROMPTS = ["What is 123 + 456? Answer:", "Reverse the word 'planet'."]


def make_adapter(base_dir: Path, out: Path, *, seed: int, r: int, targets: list[str], alpha: float = 16.0, **extra) -> Path:
    """Save a LoRA adapter with random A and B (B != 0, unlike a fresh adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(init_lora_weights=False, r=r, lora_alpha=alpha, target_modules=targets, **extra)
    get_peft_model(model, config).save_pretrained(out)
    return out


def _pattern(patterns: dict, module: str, default):
    """peft's rule: the first key whose regex matches the end of the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_weight(short: str, w, num_layers: int = 2) -> float:
    """A reference for per-layer-group weights on an evenly divisible model: block i of n is in group i*G//n;
    modules outside the blocks get the mean. A dict is per module, by base-model path (a miss is a KeyError)."""
    if isinstance(w, (int, float)):
        return float(w)
    if isinstance(w, dict):
        return float(w[short])
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", short)
    assert num_layers % len(w) == 0
    return float(w[int(m.group(1)) * len(w) // num_layers]) if m else sum(w) / len(w)


def folded_model(base_dir: Path, mix: list[tuple[Path, float | list[float] | dict[str, float]]]):
    """A plain transformers model whose weights are base + Σ w·s·B@A, summed in float64 from the files
    (w a float, one weight per layer group, or one per module)."""
    from transformers import AutoModelForCausalLM

    state = {k: v.double() for k, v in load_file(base_dir / "model.safetensors").items()}
    for folder, w in mix:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            b = tensors[f"{module}.lora_B.weight"].double()
            short = module.removeprefix("base_model.model.")
            r = a.shape[0]
            alpha = _pattern(cfg.get("alpha_pattern") or {}, short, cfg["lora_alpha"])
            s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            state[f"{short}.weight"] += module_weight(short, w) * s * (b @ a.double())
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied: lm_head is embed_tokens
    return model.eval()


def logits(model, tok) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out.append(model(input_ids=ids).logits[0])
    return torch.cat(out)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # a '.' in the source name: peft's module dicts refuse it, load_multi must map it
        "add.v2": make_adapter(tiny_base, root / "add", seed=1, r=4, alpha=8, targets=["q_proj", "v_proj"]),
        "rev": make_adapter(tiny_base, root / "rev", seed=2, r=8, alpha=4, targets=["q_proj", "down_proj"], use_rslora=True),
        "sort": make_adapter(
            tiny_base, root / "sort", seed=3, r=2, alpha=16, targets=["q_proj", "v_proj", "gate_proj"],
            rank_pattern={"v_proj": 6}, alpha_pattern={"layers.1.self_attn.q_proj": 3, "gate_proj": 5},
        ),
    }


@pytest.fixture(scope="module", params=[False, True], ids=["scales", "fold"])
def multi(tiny_base, adapters, request):
    return load_multi(tiny_base, adapters, fold=request.param)


@pytest.mark.parametrize(
    "weights",
    [
        {"add.v2": 0.0, "rev": 0.0, "sort": 0.0},
        {"add.v2": 1.0, "rev": 0.0, "sort": 0.0},
        {"add.v2": 0.0, "rev": 1.0, "sort": 0.0},
        {"add.v2": 0.0, "rev": 0.0, "sort": 1.0},
        {"add.v2": 0.7, "rev": -0.3, "sort": 1.3},
    ],
)
def test_set_weights_equals_float64_fold(tiny_base, adapters, multi, weights):
    model, tok = multi
    set_weights(model, weights)
    ref = folded_model(tiny_base, [(adapters[s], w) for s, w in weights.items()])
    torch.testing.assert_close(logits(model, tok), logits(ref, tok), rtol=1e-5, atol=2e-5)


def test_weights_matter_and_zero_is_the_base(tiny_base, multi):
    from transformers import AutoModelForCausalLM

    model, tok = multi
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    set_weights(model, {"add.v2": 0.0, "rev": 0.0, "sort": 0.0})
    assert torch.equal(logits(model, tok), logits(base, tok))
    set_weights(model, {"add.v2": 1.0, "rev": 1.0, "sort": 1.0})
    assert (logits(model, tok) - logits(base, tok)).abs().max() > 0.05  # the adapters really change the model


def test_one_hot_equals_the_adapter_alone(tiny_base, adapters, multi):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = multi
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapters["sort"]).eval()
    set_weights(model, {"add.v2": 0.0, "rev": 0.0, "sort": 1.0})
    torch.testing.assert_close(logits(model, tok), logits(alone, tok), rtol=1e-5, atol=1e-5)


def test_setting_weights_is_repeatable(multi):
    model, tok = multi
    w = {"add.v2": 0.4, "rev": 1.1, "sort": 0.2}
    set_weights(model, w)
    first = logits(model, tok)
    set_weights(model, {"add.v2": 1.5, "rev": 0.0, "sort": 0.9})
    set_weights(model, w)
    assert torch.equal(logits(model, tok), first)


def test_names_are_mapped_and_model_is_ready(multi):
    model, tok = multi
    names = adapter_names(model)
    assert list(names) == ["add.v2", "rev", "sort"]
    assert all("." not in n for n in names.values())
    assert sorted(model.base_model.active_adapters) == sorted(names.values())
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_tied_base_loads(tiny_base_tied, tmp_path):
    ad = make_adapter(tiny_base_tied, tmp_path / "a", seed=4, r=4, targets=["q_proj", "o_proj"])
    model, tok = load_multi(tiny_base_tied, {"a": ad})
    set_weights(model, {"a": 0.5})
    ref = folded_model(tiny_base_tied, [(ad, 0.5)])
    torch.testing.assert_close(logits(model, tok), logits(ref, tok), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"add.v2": 1.0, "rev": 1.0}, r"missing: \['sort'\]"),
        ({"add.v2": 1.0, "rev": 1.0, "sort": 1.0, "other": 0.0}, r"unknown: \['other'\]"),
        ({"add.v2": float("nan"), "rev": 1.0, "sort": 1.0}, r"add\.v2: expected a finite number"),
    ],
)
def test_bad_weights_are_refused(multi, weights, message):
    with pytest.raises(LorademError, match=message):
        set_weights(multi[0], weights)


def test_pickled_adapter_is_refused(tiny_base, adapters, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapters["rev"], bad)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    with pytest.raises(LorademError, match=r"adapter 'rev': expected .*adapter_model\.safetensors .*never unpickles"):
        load_multi(tiny_base, {"rev": bad})


def test_dora_adapter_is_refused(tiny_base, tmp_path):
    ad = make_adapter(tiny_base, tmp_path / "dora", seed=5, r=4, targets=["q_proj"], use_dora=True)
    with pytest.raises(LorademError, match=r"adapter 'd': .*use_dora is set; DoRA rescales"):
        load_multi(tiny_base, {"d": ad})


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_adapter_for_other_modules_is_refused(tiny_base, adapters, tmp_path):
    """PEFT silently drops keys for modules the base lacks; load_multi must not."""
    bad = tmp_path / "other"
    shutil.copytree(adapters["add.v2"], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(LorademError, match=r"adapter 'x': 4 LoRA modules in .* but 2 matched the base"):
        load_multi(tiny_base, {"x": bad})


@pytest.fixture(scope="module")
def grouped_adapters(tiny_base, tmp_path_factory):
    """Adapters for per-layer-group weights; 'a' also targets lm_head (outside the blocks: gets the mean)."""
    root = tmp_path_factory.mktemp("grouped")
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        a = make_adapter(tiny_base, root / "a", seed=6, r=4, targets=["q_proj", "down_proj", "lm_head"])
    return {"a": a, "b": make_adapter(tiny_base, root / "b", seed=7, r=2, alpha=4, targets=["v_proj", "up_proj"], use_rslora=True)}


@pytest.fixture(scope="module", params=[False, True], ids=["scales", "fold"])
def grouped(tiny_base, grouped_adapters, request):
    return grouped_adapters, load_multi(tiny_base, grouped_adapters, fold=request.param)


@pytest.mark.parametrize(
    "weights",
    [
        {"a": [0.3, 1.4], "b": [1.2, -0.4]},
        {"a": [0.0, 1.0], "b": 0.7},
        {"a": [0.9], "b": [0.0, 1.5]},
    ],
)
def test_layer_group_weights_equal_float64_fold_per_layer(tiny_base, grouped, weights):
    ads, (model, tok) = grouped
    set_weights(model, weights)
    ref = folded_model(tiny_base, [(ads[s], w) for s, w in weights.items()])
    torch.testing.assert_close(logits(model, tok), logits(ref, tok), rtol=1e-5, atol=2e-5)


def test_layer_groups_change_the_model_per_layer(grouped):
    """[w, w] is exactly w; moving one group's weight changes the output; lm_head gets the mean."""
    _, (model, tok) = grouped
    set_weights(model, {"a": 0.8, "b": 0.3})
    flat = logits(model, tok)
    set_weights(model, {"a": [0.8, 0.8], "b": [0.3, 0.3]})
    assert torch.equal(logits(model, tok), flat)
    set_weights(model, {"a": [0.8, 0.0], "b": [0.3, 0.3]})
    assert not torch.allclose(logits(model, tok), flat, atol=1e-4)
    head = next(l for name, l in zip(model.loradem_lora_modules, model.loradem_lora_layers) if name.endswith("lm_head"))
    assert head.scaling[adapter_names(model)["a"]] == pytest.approx(0.4 * 16 / 4)


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": [0.1, 0.2, 0.3], "b": 1.0}, r"weights: a: expected one weight per layer group, 1 to 2 groups for this 2-layer model, got a list of 3"),
        ({"a": [], "b": 1.0}, r"weights: a: expected one weight per layer group.*got a list of 0"),
        ({"a": [0.1, float("inf")], "b": 1.0}, r"weights: a\[1\]: expected a finite number"),
        ({"a": "0.5", "b": 1.0}, r"weights: a: expected a finite number or a list of them"),
    ],
)
def test_bad_group_weights_are_refused(grouped, weights, message):
    with pytest.raises(LorademError, match=message):
        set_weights(grouped[1][0], weights)


def test_fold_runs_the_plain_model(tiny_base, adapters):
    """fold=True: Linear layers hold W0 + Σ w·ΔW and skip the LoRA path; weight 0 restores W0 bit for bit."""
    from transformers import AutoModelForCausalLM

    model, _ = load_multi(tiny_base, adapters, fold=True)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_base).named_parameters())
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    assert q.merged and not q.lora_A[adapter_names(model)["rev"]].weight.requires_grad
    set_weights(model, {"add.v2": 0.0, "rev": 0.0, "sort": 0.0})
    assert torch.equal(q.get_base_layer().weight, base["model.layers.1.self_attn.q_proj.weight"])
    set_weights(model, {"add.v2": 0.5, "rev": 0.0, "sort": 0.0})
    expect = base["model.layers.1.self_attn.q_proj.weight"].double() + q.get_delta_weight(adapter_names(model)["add.v2"]).double()
    torch.testing.assert_close(q.get_base_layer().weight.double(), expect, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fold_leaves_tied_weights_to_scales(tiny_base_tied, tmp_path):
    """lm_head shares embed_tokens' weight on a tied base: folding it would change the input embeddings too."""
    ad = make_adapter(tiny_base_tied, tmp_path / "a", seed=8, r=4, targets=["q_proj", "lm_head"])
    folded, tok = load_multi(tiny_base_tied, {"a": ad}, fold=True)
    scaled, _ = load_multi(tiny_base_tied, {"a": ad})
    head = folded.base_model.model.lm_head
    assert not head.merged and folded.base_model.model.model.layers[0].self_attn.q_proj.merged
    for w in (0.7, 1.3):
        set_weights(folded, {"a": w})
        set_weights(scaled, {"a": w})
        torch.testing.assert_close(logits(folded, tok), logits(scaled, tok), rtol=1e-5, atol=2e-5)


# ---- per-module weights -------------------------------------------------------------

def lora_modules(folder: Path) -> list[str]:
    """An adapter's LoRA modules as the base model names them, read from its file (not from loradem)."""
    keys = load_file(folder / "adapter_model.safetensors")
    return sorted(k[len("base_model.model."): -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight"))


def per_module(adapters: dict[str, Path], seed: int) -> dict[str, dict[str, float]]:
    """A different weight for every (source, module), spread over [-1, 2] so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    return {s: {m: round(float(torch.rand((), generator=g)) * 3 - 1, 3) for m in lora_modules(f)} for s, f in adapters.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_per_module_weights_equal_float64_fold(tiny_base, adapters, multi, seed):
    model, tok = multi
    weights = per_module(adapters, seed)
    assert len(set(weights["sort"].values())) == len(weights["sort"]) == 6  # really one weight per module
    set_weights(model, weights)
    got = logits(model, tok)
    ref = folded_model(tiny_base, [(adapters[s], w) for s, w in weights.items()])
    torch.testing.assert_close(got, logits(ref, tok), rtol=1e-5, atol=2e-5)
    # the same weights on other modules (each source's values rotated by one) give another model
    rotated = {s: dict(zip(w, [*list(w.values())[1:], list(w.values())[0]])) for s, w in weights.items()}
    wrong = folded_model(tiny_base, [(adapters[s], w) for s, w in rotated.items()])
    assert (logits(wrong, tok) - got).abs().max() > 1e-3


def test_per_module_weights_all_equal_are_the_float(adapters, multi):
    model, tok = multi
    set_weights(model, {"add.v2": 0.6, "rev": -0.2, "sort": 1.1})
    flat = logits(model, tok)
    set_weights(model, {s: dict.fromkeys(lora_modules(f), w) for (s, f), w in zip(adapters.items(), (0.6, -0.2, 1.1))})
    assert torch.equal(logits(model, tok), flat)


def _bad(adapters, source: str, edit) -> dict:
    weights = {s: dict.fromkeys(lora_modules(f), 0.5) for s, f in adapters.items()}
    edit(weights[source])
    return weights


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.update({"model.layers.0.self_attn.q_prj": 1.0}),
         r"^weights: add\.v2: model\.layers\.0\.self_attn\.q_prj: not a LoRA module of this adapter"),
        # a LoRA module of the model, but of another adapter
        (lambda w: w.update({"model.layers.0.mlp.gate_proj": 1.0}),
         r"^weights: add\.v2: model\.layers\.0\.mlp\.gate_proj: not a LoRA module of this adapter"),
        # PEFT's name is not the canonical one
        (lambda w: w.update({"base_model.model." + k: w.pop(k) for k in list(w)}),
         r"^weights: add\.v2: base_model\.model\.model\.layers\.0\.self_attn\.q_proj \(and 3 more\): not a LoRA module"),
        (lambda w: w.pop("model.layers.1.self_attn.v_proj"),
         r"^weights: add\.v2: no weight for module model\.layers\.1\.self_attn\.v_proj: "
         r"per-module weights must name every LoRA module of the adapter$"),
        (lambda w: w.update({"model.layers.1.self_attn.q_proj": float("nan")}),
         r"^weights: add\.v2\['model\.layers\.1\.self_attn\.q_proj'\]: expected a finite number, got nan$"),
        (lambda w: w.update({"model.layers.1.self_attn.q_proj": True}),
         r"^weights: add\.v2\['model\.layers\.1\.self_attn\.q_proj'\]: expected a finite number, got True$"),
        (lambda w: w.update({"model.layers.1.self_attn.q_proj": "0.5"}), r"expected a finite number, got '0\.5'"),
        (lambda w: w.update({3: 0.5}), r"^weights: add\.v2: 3: expected a module path \(str\)"),
        (lambda w: w.clear(), r"^weights: add\.v2: expected a non-empty dict of per-module weights"),
    ],
    ids=["typo", "other-adapter", "peft-name", "missing", "nan", "bool", "str", "int-key", "empty"],
)
def test_bad_per_module_weights_are_refused_before_any_change(adapters, multi, edit, message):
    model, tok = multi
    set_weights(model, {"add.v2": 0.3, "rev": 0.9, "sort": -0.4})
    before = logits(model, tok)
    with pytest.raises(LorademError, match=message):
        set_weights(model, _bad(adapters, "add.v2", edit))
    assert torch.equal(logits(model, tok), before)  # checked before any scale (or folded weight) changed


# ---- one acceptance rule: what the search loads, the fold accepts ------------------------------

@pytest.mark.parametrize(
    "changes, message",
    [
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' rewrites the base weight"),
        ({"lora_bias": True}, r"lora_bias is set"),
        ({"use_dora": True}, r"use_dora is set"),
    ],
)
def test_search_refuses_what_the_fold_refuses(tiny_base, adapters, tmp_path, changes, message):
    from loradem.vectors.lora import load_adapter

    bad = tmp_path / "bad"
    shutil.copytree(adapters["rev"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(LorademError, match=message):
        load_adapter(bad)
    with pytest.raises(LorademError, match=rf"adapter 'rev': .*{message}"):
        load_multi(tiny_base, {"rev": bad})


def test_full_module_copies_are_refused_before_a_recipe_uses_them(tiny_base, tmp_path):
    """modules_to_save folds with `loradem assemble --adapter`, but the search cannot weight it: refused at import and load."""
    from loradem.vectors.card import import_vector
    from loradem.vectors.lora import load_adapter

    ad = make_adapter(tiny_base, tmp_path / "mts", seed=3, r=2, targets=["q_proj"], modules_to_save=["lm_head"])
    assert load_adapter(ad).full  # the fold accepts it
    with pytest.raises(LorademError, match=r"adapter 'm': .*modules_to_save is set; .*cannot weight"):
        load_multi(tiny_base, {"m": ad})
    with pytest.raises(LorademError, match=r"modules_to_save is set; .*loradem assemble --adapter"):
        import_vector(ad, tmp_path / "adapters", base_dir=tiny_base, source="m", allow_no_card=True)
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
