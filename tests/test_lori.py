"""loradem.train.subspace (lora.subspace: lori): a frozen shared A, a sparse per-source B, ordinary PEFT files.

    OMP_NUM_THREADS=1 pytest tests/test_lori.py

Two sources train a few steps on the tiny Llama (module fixture); the tests read what was saved.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loradem import pipeline
from loradem.data.demo import task_rows
from loradem.errors import LorademError
from loradem.recipe import LoraSettings, MixSettings, Recipe, load_recipe
from loradem.train import mix
from loradem.train.sft import adapter_key, train_all
from loradem.train.subspace import KeepMasked, constrain, mask, projection

REPO = Path(__file__).resolve().parents[1]
SEED, DENSITY, R = 3, 0.25, 4
PREFIX = "base_model.model."


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base) -> dict[str, Path]:
    """{source: adapter folder} of two LoRI adapters (weight decay on, so it is shown to leave masked entries)."""
    tmp = tmp_path_factory.mktemp("lori")
    sources = [{"name": name, "data": write_jsonl(tmp / f"{name}.jsonl", task_rows(name, rows=16)),
                "validation": 2, "test": 2} for name in ("addition", "reverse")]
    recipe = Recipe.model_validate({
        "name": "t", "base": str(tiny_base), "adapters_dir": str(tmp / "adapters"), "seed": SEED,
        "lora": {"r": R, "alpha": 8, "subspace": "lori", "density": DENSITY},
        "train": {"max_steps": 3, "eval_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "weight_decay": 0.1},
        "sources": sources,
    })
    with pytest.MonkeyPatch.context() as mp:  # the module fixture runs before the per-test cache fixture
        mp.setenv("LORADEM_CACHE", str(tmp / "cache"))
        return train_all(pipeline.train_jobs(recipe, pipeline._splits(recipe)), tiny_base, log=lambda _: None)


def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """{module name as in the base: tensor} of the adapter's lora_A or lora_B."""
    suffix = f".{part}.weight"
    return {k.removeprefix(PREFIX).removesuffix(suffix): v
            for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if k.endswith(suffix)}


def test_every_a_is_the_seeded_projection_shared_by_all_sources(trained):
    a = {source: weights(folder, "lora_A") for source, folder in trained.items()}
    assert len(a["addition"]) == 14 and a["addition"].keys() == a["reverse"].keys()  # 7 linear layers x 2 blocks
    for module, tensor in a["addition"].items():
        assert torch.equal(tensor, projection(SEED, module, tuple(tensor.shape)))  # set before training, never moved
        assert torch.equal(tensor, a["reverse"][module])
    assert not torch.equal(projection(SEED, "model.layers.0.mlp.up_proj", (R, 32)),
                           projection(SEED + 1, "model.layers.0.mlp.up_proj", (R, 32)))
    assert not torch.equal(projection(SEED, "model.layers.0.mlp.up_proj", (R, 32)),
                           projection(SEED, "model.layers.1.mlp.up_proj", (R, 32)))


def test_each_b_trains_only_its_own_sparse_mask(trained):
    b = {source: weights(folder, "lora_B") for source, folder in trained.items()}
    shared = total = 0
    for module in b["addition"]:
        used = {}
        for source in trained:
            tensor = b[source][module]
            keep = mask(SEED, source, module, tuple(tensor.shape), DENSITY)
            assert int(keep.sum()) == round(DENSITY * tensor.numel())
            assert (tensor[~keep] == 0).all()  # exactly zero outside the mask, weight decay notwithstanding
            assert (tensor[keep] != 0).float().mean() > 0.9  # the kept entries trained
            used[source] = tensor != 0
        assert not torch.equal(used["addition"], used["reverse"])
        shared += int((used["addition"] & used["reverse"]).sum())
        total += b["addition"][module].numel()
    assert abs(shared / total - DENSITY**2) < 0.02  # independent masks share about density² of the entries


def test_the_adapter_is_plain_peft_lora_whose_logits_are_base_plus_the_deltas(trained, tiny_base):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = trained["addition"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R
    scale = config["lora_alpha"] / config["r"]
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folder).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits.double()
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits.double()

    a, b = weights(folder, "lora_A"), weights(folder, "lora_B")
    state = {k: v.double() for k, v in load_file(str(tiny_base / "model.safetensors")).items()}
    for module in a:
        state[f"{module}.weight"] += scale * b[module].double() @ a[module].double()
    by_hand = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_base), dtype=torch.float64).eval()
    by_hand.load_state_dict(state, strict=False)  # the untied model has no missing tensor; buffers stay
    assert set(state) == set(by_hand.state_dict())
    with torch.no_grad():
        want = by_hand(input_ids=ids).logits
    scale_of_logits = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale_of_logits)
    assert float((want - base_logits).abs().max()) > 100 * 1e-5 * scale_of_logits  # the deltas matter


# ---- keys, recipe ---------------------------------------------------------------

DEMO_KEYS = {"addition": "0a638c377659", "reverse": "2acc8f4e3a1b", "sort": "af58a65da9d1"}  # computed at the
DEMO_MIX_KEY = "405f0a12ef0a"  # commit before lora.subspace existed, with FAKE_BASE and mix.tokens 100000
FAKE_BASE = "f" * 64


def demo_raw() -> dict:
    return yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text(encoding="utf-8"))


def demo(raw: dict) -> Recipe:
    return Recipe.model_validate(raw, context={"root": str(REPO / "recipes")})


def keys(recipe: Recipe) -> dict[str, str]:
    return {job.source: adapter_key(job, FAKE_BASE) for job in pipeline.train_jobs(recipe, pipeline._splits(recipe))}


def mix_key(recipe: Recipe, monkeypatch) -> str:
    monkeypatch.setattr(mix, "fingerprint_weights", lambda _: FAKE_BASE)
    job = replace(pipeline.mix_job(recipe, pipeline._splits(recipe)), mix=MixSettings(tokens=100000))
    return mix.plan_mix(job, REPO, {}).key


def test_keys_are_unchanged_with_the_option_off(monkeypatch):
    recipe = demo(demo_raw())
    assert keys(recipe) == DEMO_KEYS and mix_key(recipe, monkeypatch) == DEMO_MIX_KEY
    explicit = demo({**demo_raw(), "lora": {**demo_raw()["lora"], "subspace": "none", "density": 0.1}})
    assert keys(explicit) == DEMO_KEYS and mix_key(explicit, monkeypatch) == DEMO_MIX_KEY
    assert LoraSettings().model_dump() == {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear",
                                           "use_rslora": False}
    assert LoraSettings(subspace="lori").model_dump()["density"] == 0.1  # on, both fields are in the key


def test_lori_as_a_variant_or_per_source_changes_only_its_keys(monkeypatch):
    raw = {**demo_raw(), "variants": [{"name": "lori", "lora": {"subspace": "lori", "density": 0.1}}]}
    recipe = demo(raw)
    assert keys(recipe) == DEMO_KEYS
    variant = recipe.variant("lori")
    assert variant.lora == recipe.lora.model_copy(update={"subspace": "lori"})
    lori_keys = keys(variant)
    assert all(lori_keys[s] != DEMO_KEYS[s] for s in DEMO_KEYS) and mix_key(variant, monkeypatch) != DEMO_MIX_KEY
    assert keys(variant.model_copy(update={"lora": variant.lora.model_copy(update={"density": 0.2})})) != lori_keys
    raw = demo_raw()
    raw["sources"][0]["lora"] = {"subspace": "lori"}
    one = keys(demo(raw))
    assert one["addition"] != DEMO_KEYS["addition"] and {s: one[s] for s in ("reverse", "sort")} == \
        {s: DEMO_KEYS[s] for s in ("reverse", "sort")}


@pytest.mark.parametrize("lora, expected", [
    ({"density": 0}, r"lora\.density: Input should be greater than 0"),
    ({"subspace": "lori", "density": 1.5}, r"lora\.density: Input should be less than or equal to 1"),
    ({"subspace": "other"}, r"lora\.subspace: Input should be 'none' or 'lori' \(got 'other'\)"),
])
def test_bad_values_are_refused_naming_the_field(tmp_path, lora, expected):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    for where, raw in (("", {"lora": lora}), ("variants[0].", {"variants": [{"name": "v", "lora": lora}]}),
                       ("sources[0].", {"sources": [{"name": "a", "data": "a.jsonl", "lora": lora}]})):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"base": "smollm2-135m", "sources": [{"name": "a", "data": "a.jsonl"}], **raw}))
        with pytest.raises(LorademError, match="^" + re.escape(f"{path}: {where}") + expected) as err:
            load_recipe(path)
        assert "\n" not in str(err.value)


# ---- the mask's mechanics ----------------------------------------------------------

def test_adamw_with_weight_decay_leaves_masked_entries_exactly_zero():
    torch.manual_seed(0)
    keep = mask(0, "s", "m", (6, 4), 0.5)
    for hooked in (True, False):
        b = torch.nn.Parameter(torch.zeros(6, 4))
        if hooked:
            b.register_hook(lambda grad: grad * keep)
        opt = torch.optim.AdamW([b], lr=0.1, weight_decay=0.1)
        for _ in range(20):
            opt.zero_grad()
            ((b @ torch.randn(4, 3) - torch.randn(6, 3)) ** 2).sum().backward()
            opt.step()
        assert (b[keep] != 0).all()
        assert (b[~keep] == 0).all() == hooked  # without the hook the optimizer moves them


def test_keep_masked_rezeroes_and_embeddings_are_refused(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=2, target_modules=["q_proj"]))
    masks = constrain(model, LoraSettings(r=2, subspace="lori", density=0.5), seed=0, source="s")
    assert set(masks) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        for b, _ in masks.values():
            b.fill_(1.0)
    KeepMasked(masks).on_optimizer_step(None, None, None)
    for b, keep in masks.values():
        assert torch.equal(b, keep.to(b.dtype))

    embedded = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                              LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(LorademError, match=r"lora\.subspace: 'lori' covers linear layers only; target_modules "
                                           r"includes the embedding 'model\.embed_tokens'"):
        constrain(embedded, LoraSettings(r=2, subspace="lori"), seed=0, source="s")
