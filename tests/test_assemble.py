"""loradem.merge.fold: the fold equals float64 references, peft's exact merge and peft's live adapters; refusals leave nothing.

    pytest tests/test_assemble.py
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import (
    assert_f32_close,
    build_tiny_gpt2,
    copy_adapter,
    edit_config,
    edit_tensors,
    lora_layers,
    make_adapter,
)

from loradem.errors import LorademError
from loradem.files import fingerprint_weights, sha256_file
from loradem.merge.fold import assemble, model_card, plan_fold, plan_shards
from loradem.vectors.checkpoint import read_base
from loradem.vectors.lora import load_adapter


def quiet(*_args) -> None:
    pass


def fold(base, adapters, out, **kw) -> Path:
    return assemble(base, adapters, out, log=quiet, **kw)


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for p in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(p))
    return tensors


def peft_delta64(layer) -> torch.Tensor:
    """peft's get_delta_weight, recomputed in float64 from the loaded layer (the oracle)."""
    if "default" in getattr(layer, "lora_embedding_A", {}):
        a, b = layer.lora_embedding_A["default"].double(), layer.lora_embedding_B["default"].double()
        return (b @ a).T * layer.scaling["default"]
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    delta = b @ a
    return (delta.T if layer.fan_in_fan_out else delta) * layer.scaling["default"]


def reference(base: Path, adapters: list[tuple[Path, float | list[float] | dict[str, float]]],
              start: dict | None = None) -> dict[str, torch.Tensor]:
    """base (or `start`) + Σ w·Δ in float64, every delta taken from peft's own loaded model.

    A list weight is one weight per layer group, written out here by hand for the 2-layer tiny
    model (a list of n >= 2 weights: layer i gets w[i], anything outside the layers the mean).
    A dict weight is one per module, by the module's name in the base model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = {k: v.double() for k, v in (start or load_file(base / "model.safetensors")).items()}
    for folder, weight in adapters:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        for name, layer in lora_layers(model).items():
            ref[f"{name}.weight"] += by_layer(name, weight) * peft_delta64(layer)
        for name, module in model.base_model.model.named_modules():
            if type(module).__name__ == "ModulesToSaveWrapper":
                copy = module.modules_to_save["default"].weight.double()
                ref[f"{name}.weight"] += by_layer(name, weight) * (copy - ref_base(base, f"{name}.weight"))
    return ref


def by_layer(module: str, weight: float | list[float] | dict[str, float]) -> float:
    if isinstance(weight, float):
        return weight
    if isinstance(weight, dict):
        return weight[module]  # a module the dict lacks is a KeyError here, not a default
    assert len(weight) >= 2, "the hand mapping below holds for 2 layers and at least 2 groups"
    match = re.search(r"\.layers\.(\d+)\.", module)
    return weight[int(match[1])] if match else sum(weight) / len(weight)


def ref_base(base: Path, name: str) -> torch.Tensor:
    return load_file(base / "model.safetensors")[name].double()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(base: Path, adapters: list[tuple[Path, float]], ids: torch.Tensor) -> torch.Tensor:
    """All adapters active at once, each LoraLayer scaled by its weight (no merge)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0][0], adapter_name="a0")
    for i, (folder, _) in enumerate(adapters[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    for layer in lora_layers(model).values():
        for i, (_, weight) in enumerate(adapters):
            layer.set_scale(f"a{i}", weight)
    return logits(model.eval(), ids)


def merged_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(folder).eval(), ids)


IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


# ---- fixtures: a mix of ranks, targets, scaling rules ----------------------

@pytest.fixture(scope="module")
def mix(tiny_base, tmp_path_factory) -> list[tuple[Path, float]]:
    root = tmp_path_factory.mktemp("mix")
    a = make_adapter(tiny_base, root / "emb", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    b = make_adapter(
        tiny_base, root / "rs", seed=2, r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
    )
    c = make_adapter(
        tiny_base, root / "pat", seed=3, r=2, lora_alpha=2, target_modules=["k_proj", "up_proj", "q_proj"],
        rank_pattern={"up_proj": 6}, alpha_pattern={r"layers\.1\..*": 9},
    )
    return [(a, 0.7), (b, -0.4), (c, 1.3)]


@pytest.fixture(scope="module")
def with_mts(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("mts") / "mts", seed=4, r=4,
                        target_modules=["o_proj"], modules_to_save=["lm_head"])


# ---- exactness ---------------------------------------------------------------

def test_weights_equal_float64_reference(tiny_base, mix, with_mts, tmp_path):
    adapters = [*mix, (with_mts, 0.25)]
    out = fold(tiny_base, adapters, tmp_path / "out")
    got, ref = read_folder(out), reference(tiny_base, adapters)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == torch.float32
        assert_f32_close(got[name], ref[name])
    changed = {n for n in ref if not torch.equal(ref[n], ref_base(tiny_base, n))}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed and len(changed) == 16
    for name in set(ref) - changed:  # untouched tensors are copied bit for bit
        assert torch.equal(got[name], load_file(tiny_base / "model.safetensors")[name])


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding of float64 into bfloat16/float16 by round-to-odd: float64 -> float32 keeping a sticky bit
    (exact), then one round-to-nearest-even (valid: float32 has more than 2 extra bits; normal range)."""
    bits = x.view(torch.int64)
    low = (1 << 29) - 1
    odd = (bits & ~low) | (((bits & low) != 0).to(torch.int64) << 29)
    return odd.view(torch.float64).to(torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_narrow_output_is_one_rounding_of_the_reference(tiny_base, mix, tmp_path, dtype):
    out = fold(tiny_base, mix, tmp_path / dtype, dtype=dtype)
    got, ref = read_folder(out), reference(tiny_base, mix)
    for name in ref:
        assert torch.equal(got[name], round_once(ref[name], getattr(torch, dtype))), name
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


@pytest.mark.parametrize("ranks", [(4, 4), (2, 8, 4)])
def test_equals_peft_cat_merge(tiny_base, tmp_path, ranks):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj"], ["v_proj", "gate_proj"]]
    folders = [make_adapter(tiny_base, tmp_path / f"c{i}", seed=10 + i, r=r, lora_alpha=2 * r + i, target_modules=targets[i])
               for i, r in enumerate(ranks)]
    weights = [0.6, -0.3, 1.1][: len(ranks)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folders[0], adapter_name="c0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"c{i}")
    model.add_weighted_adapter([f"c{i}" for i in range(len(ranks))], weights, "merged", combination_type="cat")
    model.set_adapter("merged")
    expected = model.merge_and_unload().state_dict()
    got = read_folder(fold(tiny_base, list(zip(folders, weights)), tmp_path / "out"))
    for name, tensor in got.items():
        assert_f32_close(tensor, expected[name])


def test_logits_equal_peft_with_all_adapters_active(tiny_base, mix, tmp_path):
    from transformers import AutoModelForCausalLM

    out = fold(tiny_base, mix, tmp_path / "out")
    got, expected = merged_logits(out, IDS), peft_logits(tiny_base, mix, IDS)
    assert_logits_close(got, expected)
    assert not torch.allclose(got, logits(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), IDS), atol=1e-3)


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """A merged matmul and peft's x@W + s·(x@A)@B round differently: float32 tolerance scaled by the logits."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_modules_to_save_logits_equal_peft(tiny_base, with_mts, tmp_path):
    from transformers import AutoModelForCausalLM

    out = fold(tiny_base, [(with_mts, 1.0)], tmp_path / "out")
    base_logits = logits(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), IDS)
    got, expected = merged_logits(out, IDS), peft_logits(tiny_base, [(with_mts, 1.0)], IDS)
    assert_logits_close(got, expected)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter did change the model


def test_fan_in_fan_out_conv1d(tmp_path):
    base = build_tiny_gpt2(tmp_path / "gpt2")
    adapters = [
        (make_adapter(base, tmp_path / "g1", seed=1, r=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]), 0.8),
        (make_adapter(base, tmp_path / "g2", seed=2, r=2, fan_in_fan_out=True, target_modules=["c_fc"]), -1.5),
    ]
    out = fold(base, adapters, tmp_path / "out")
    got, ref = read_folder(out), reference(base, adapters)
    for name in ref:
        assert_f32_close(got[name], ref[name])
    assert "lm_head.weight" not in got  # GPT-2's tied head stays tied
    assert_logits_close(merged_logits(out, IDS), peft_logits(base, adapters, IDS))


# ---- tied embeddings ------------------------------------------------------------

def test_tied_base_stays_tied(tiny_base_tied, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_base_tied, tmp_path / "t", r=4, target_modules=["q_proj", "down_proj"])
    out = fold(tiny_base_tied, [(adapter, 0.9)], tmp_path / "out")
    assert "lm_head.weight" not in read_folder(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expected = peft_logits(tiny_base_tied, [(adapter, 0.9)], IDS)
    assert_logits_close(logits(model.eval(), IDS), expected)


def test_tied_base_embedding_lora_unties_exactly(tiny_base_tied, tmp_path):
    """peft trained the embedding LoRA with lm_head = the unchanged tied weight: the exact fold unties the pair."""
    adapter = make_adapter(tiny_base_tied, tmp_path / "e", r=4, target_modules=["embed_tokens", "v_proj"])
    logs: list[str] = []
    out = assemble(tiny_base_tied, [(adapter, 0.5)], tmp_path / "out", log=logs.append)
    got = read_folder(out)
    base = load_file(tiny_base_tied / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(got["lm_head.weight"], base)
    assert not torch.equal(got["model.embed_tokens.weight"], base)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((out / "loradem.json").read_text())["untied"] == ["lm_head.weight"]
    assert any("untying lm_head.weight" in line for line in logs)
    expected = peft_logits(tiny_base_tied, [(adapter, 0.5)], IDS)
    assert_logits_close(merged_logits(out, IDS), expected)


# ---- sharding ----------------------------------------------------------------

def test_sharded_output_and_sharded_base(tiny_base, mix, tmp_path):
    from transformers import AutoModelForCausalLM

    whole = fold(tiny_base, mix, tmp_path / "whole")
    sharded = fold(tiny_base, mix, tmp_path / "sharded", max_shard_size_mb=0.05)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_folder(whole).values())
    got, expected = read_folder(sharded), read_folder(whole)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    torch.testing.assert_close(merged_logits(sharded, IDS), merged_logits(whole, IDS), rtol=0, atol=0)
    assert set(json.loads((sharded / "loradem.json").read_text())["shards"]) == set(files)

    direct = fold(tiny_base, mix, tmp_path / "direct", max_shard_size_mb=0.05, direct_io=True)
    for name in files:  # O_DIRECT (or its fallback) writes the same shards
        assert (direct / name).read_bytes() == (sharded / name).read_bytes(), name

    base_sharded = tmp_path / "base-sharded"
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(base_sharded, max_shard_size="40KB")
    assert (base_sharded / "model.safetensors.index.json").is_file()
    from_sharded = read_folder(fold(base_sharded, mix, tmp_path / "from-sharded", allow_name_mismatch=True))
    assert all(torch.equal(from_sharded[k], expected[k]) for k in expected)


# ---- the plan, pure ------------------------------------------------------------

def test_plan_fold_routes_terms_and_refuses_mismatches(tiny_base, mix):
    base = read_base(tiny_base)
    adapters = [(load_adapter(p), w) for p, w in mix]
    plan = plan_fold(base.tensors, adapters)
    by_name = {j.name: j for j in plan.jobs}
    assert list(by_name) == list(base.tensors)
    q0 = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert [(t.adapter, t.weight) for t in q0.terms] == [(0, 0.7), (1, -0.4), (2, 1.3)]
    assert not by_name["model.norm.weight"].terms
    zero = plan_fold(base.tensors, [(adapters[0][0], 0.0)])
    assert not any(j.terms for j in zero.jobs)

    shrunk = dict(base.tensors)
    shrunk["model.layers.1.self_attn.v_proj.weight"] = ((8, 32), torch.float32)
    with pytest.raises(LorademError, match=r"module model\.layers\.1\.self_attn\.v_proj: shape \[16, 32\] does not match the base's model\.layers\.1\.self_attn\.v_proj\.weight \[8, 32\]"):
        plan_fold(shrunk, adapters)
    del shrunk["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(LorademError, match=r"targets model\.layers\.1\.self_attn\.v_proj\.weight, which the base does not have"):
        plan_fold(shrunk, adapters)


def test_plan_fold_ties(tiny_base_tied, tmp_path):
    base = read_base(tiny_base_tied)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    plain = load_adapter(make_adapter(tiny_base_tied, tmp_path / "p", r=2, target_modules=["q_proj"]))
    head = load_adapter(make_adapter(tiny_base_tied, tmp_path / "h", r=2, target_modules=["lm_head"]))
    assert plan_fold(base.tensors, [(plain, 1.0)], tied=tied).untied == ()
    plan = plan_fold(base.tensors, [(head, 1.0)], tied=tied)
    assert plan.untied == ("lm_head.weight",)
    job = next(j for j in plan.jobs if j.name == "lm_head.weight")
    assert job.source == "model.embed_tokens.weight" and len(job.terms) == 1
    with pytest.raises(LorademError, match=r"targets lm_head\.weight, which the base does not have"):
        plan_fold(base.tensors, [(head, 1.0)])


def test_plan_shards():
    assert plan_shards([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    assert plan_shards([3, 3], 100) == [[0, 1]]


# ---- provenance ------------------------------------------------------------------

def test_provenance_and_model_card(tiny_base, mix, tmp_path):
    out = fold(tiny_base, mix, tmp_path / "out")
    record = json.loads((out / "loradem.json").read_text())
    assert record["base"]["sha256"] == fingerprint_weights(tiny_base)
    assert [a["weight"] for a in record["adapters"]] == [0.7, -0.4, 1.3]
    assert [a["sha256"] for a in record["adapters"]] == [sha256_file(p / "adapter_model.safetensors") for p, _ in mix]
    assert record["shards"] == {"model.safetensors": sha256_file(out / "model.safetensors")}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_base / name).read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "tags: [loradem, dem, lora, merge]" in card and "library_name: transformers" in card
    assert "| `rs` | -0.4 |" in card and "base_model:" not in card  # a local folder is no Hub id
    alias = model_card({**record, "base": {**record["base"], "name": "smollm2-135m"}})
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in alias


def test_base_hash_is_cached_and_rehash_reads_it_again(tiny_base, one, tmp_path, monkeypatch):
    """Each fold's provenance holds the base's full sha256 fingerprint; the second fold takes it from the cache
    file without reading the base for it, and `--rehash` reads and hashes it again."""
    import hashlib

    from loradem import files
    from loradem.cli import main

    monkeypatch.setenv("LORADEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "_FP_REHASH", False)
    monkeypatch.setattr(files, "SETTLE_NS", 0)
    hashed: list[str] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path, *a, **kw: hashed.append(Path(path).name) or real(path, *a, **kw))
    weights = tiny_base / "model.safetensors"
    full = hashlib.sha256(b"model.safetensors" + hashlib.sha256(weights.read_bytes()).hexdigest().encode()).hexdigest()

    def run(out: str, *extra: str) -> str:
        monkeypatch.setattr(files, "_FP_KNOWN", {})  # every command is a new process
        assert main(["assemble", "--base", str(tiny_base), "--adapter", f"{one}=0.5", "--out", str(tmp_path / out), *extra]) == 0
        return json.loads((tmp_path / out / "loradem.json").read_text())["base"]["sha256"]

    assert run("first") == full and hashed == ["model.safetensors"]
    assert run("second") == full and hashed == ["model.safetensors"]  # from $LORADEM_CACHE/fingerprints.json
    assert run("third", "--rehash") == full and hashed == ["model.safetensors"] * 2
    assert files.fingerprints_path().is_file()


# ---- refusals: message, and nothing written --------------------------------------

def refused(match: str, out: Path, base, adapters, **kw) -> None:
    with pytest.raises(LorademError, match=match):
        fold(base, adapters, out, **kw)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.fixture
def one(tiny_base, tmp_path) -> Path:
    return make_adapter(tiny_base, tmp_path / "one", seed=5, r=2, target_modules=["q_proj", "v_proj"])


def test_refuses_shape_mismatch_and_missing_module(tiny_base, one, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    wide = edit_tensors(copy_adapter(one, tmp_path / "wide"), lambda t: t.__setitem__(key, torch.ones(48, 2)))
    refused(r"module model\.layers\.0\.self_attn\.q_proj: shape \[48, 32\] does not match the base's .*\[32, 32\]",
            tmp_path / "out", tiny_base, [(wide, 1.0)])

    def move(t):
        for k in [k for k in t if ".layers.1." in k]:
            t[k.replace(".layers.1.", ".layers.7.")] = t.pop(k)

    moved = edit_tensors(copy_adapter(one, tmp_path / "moved"), move)
    refused(r"targets model\.layers\.7\.self_attn\.\w_proj\.weight, which the base does not have", tmp_path / "out", tiny_base, [(moved, 1.0)])


def test_refuses_adapter_for_another_base(tiny_base, tiny_base_tied, one, tmp_path):
    refused(r"made for base '.*' \(base_model_name_or_path\), not .* --allow-name-mismatch", tmp_path / "out", tiny_base_tied, [(one, 1.0)])
    fold(tiny_base_tied, [(one, 1.0)], tmp_path / "forced", allow_name_mismatch=True)

    edit_config(one, base_model_name_or_path="HuggingFaceTB/SmolLM2-360M-Instruct")
    refused(r"made for base 'HuggingFaceTB/SmolLM2-360M-Instruct'", tmp_path / "out", tiny_base, [(one, 1.0)])
    edit_config(one, base_model_name_or_path="/gone/elsewhere/base")  # trained from a copy named like this base
    fold(tiny_base, [(one, 1.0)], tmp_path / "renamed")

    (one / "loradem-train.json").write_text(json.dumps({"base_fingerprint": fingerprint_weights(tiny_base_tied)}))
    refused(r"trained on a base with fingerprint", tmp_path / "out", tiny_base, [(one, 1.0)])
    (one / "loradem-train.json").write_text(json.dumps({"base_fingerprint": fingerprint_weights(tiny_base)}))
    edit_config(one, base_model_name_or_path="HuggingFaceTB/SmolLM2-360M-Instruct")
    fold(tiny_base, [(one, 1.0)], tmp_path / "fingerprinted")  # the fingerprint wins over the name


def test_refuses_nan_factor_pickle_and_corrupt_files(tiny_base, one, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    nan = edit_tensors(copy_adapter(one, tmp_path / "nan"), lambda t: t[key].__setitem__((1, 3), float("inf")))
    refused(re.escape(key) + " contains NaN or Inf", tmp_path / "out", tiny_base, [(one, 0.5), (nan, 0.5)])

    pickled = copy_adapter(one, tmp_path / "pickled")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    refused(r"adapter_model\.bin: a pickle file can run code", tmp_path / "out", tiny_base, [(pickled, 1.0)])

    broken = copy_adapter(one, tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes((one / "adapter_model.safetensors").read_bytes()[:200])
    refused(r"broken/adapter_model\.safetensors: not a valid safetensors file", tmp_path / "out", tiny_base, [(broken, 1.0)])

    bad_base = tmp_path / "bad-base"
    shutil.copytree(tiny_base, bad_base)
    (bad_base / "model.safetensors").write_bytes((tiny_base / "model.safetensors").read_bytes()[:-64])
    refused(r"bad-base/model\.safetensors: not a valid safetensors file", tmp_path / "out", bad_base, [(one, 1.0)], allow_name_mismatch=True)


def test_refuses_changed_base_copy(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "emb", r=2, target_modules=["embed_tokens"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    edit_tensors(adapter, lambda t: t[key].__setitem__((0, 0), 3.0))
    refused(r"embed_tokens\.base_layer\.weight is peft's saved copy of the base's model\.embed_tokens\.weight but differs",
            tmp_path / "out", tiny_base, [(adapter, 1.0)])


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "0.5", True, None])
def test_refuses_bad_weights(tiny_base, one, tmp_path, weight):
    refused(r"weight for adapter .*: expected a finite number", tmp_path / "out", tiny_base, [(one, weight)])


def test_refuses_non_finite_result_and_bad_options(tiny_base, one, tmp_path):
    refused(r"the folded tensor has NaN or Inf in torch\.float16", tmp_path / "out", tiny_base, [(one, 1e7)], dtype="float16")
    refused(r"dtype: expected auto, float32, bfloat16, float16, got 'int8'", tmp_path / "out", tiny_base, [(one, 1.0)], dtype="int8")
    refused(r"expected at least one adapter", tmp_path / "out", tiny_base, [])
    with pytest.raises(LorademError, match="replaces only a model folder loradem wrote"):
        fold(tiny_base, [(one, 1.0)], tiny_base, overwrite=True)
    assert (tiny_base / "model.safetensors").is_file()


def test_existing_output_kept_unless_overwrite(tiny_base, one, tmp_path):
    out = tmp_path / "out"
    fold(tiny_base, [(one, 1.0)], out)
    (out / "keep.txt").write_text("earlier result")
    with pytest.raises(LorademError, match=r"out: already exists \(pass --overwrite to replace it\)"):
        fold(tiny_base, [(one, 0.5)], out)
    assert (out / "keep.txt").read_text() == "earlier result"
    fold(tiny_base, [(one, 0.5)], out, overwrite=True)  # a folder loradem wrote: replaced whole
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_overwrite_never_replaces_a_folder_loradem_did_not_write(tiny_base, one, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LorademError, match=r"notes: --overwrite replaces only a model folder loradem wrote \(with loradem\.json\)"):
        fold(tiny_base, [(one, 1.0)], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_never_deletes_the_inputs_it_holds(tiny_base, one, tmp_path):
    """--out a parent of the base and the adapter, marked as loradem's: refused, and every input is still there."""
    inputs = tmp_path / "inputs"
    shutil.copytree(tiny_base, inputs / "base")
    shutil.copytree(one, inputs / "ad")
    (inputs / "notes.txt").write_text("unrelated")
    (inputs / "loradem.json").write_text("{}")  # even a folder that looks like loradem's output
    before = sorted(str(p.relative_to(inputs)) for p in inputs.rglob("*"))
    with pytest.raises(LorademError, match=r"inputs: holds an input of this fold .*choose another output folder"):
        fold(inputs / "base", [(inputs / "ad", 1.0)], inputs, overwrite=True)
    assert sorted(str(p.relative_to(inputs)) for p in inputs.rglob("*")) == before


def test_more_layer_groups_than_layers_is_refused(tiny_base, one, tmp_path):
    """On a 2-layer base a third group weight would fold nothing while the record claimed it: refused."""
    with pytest.raises(LorademError, match=r"weight for adapter .*: expected one weight per layer group, 1 to 2 groups for this 2-layer model, got a list of 3"):
        fold(tiny_base, [(one, [1.0, 1.0, 5.0])], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_mid_write_leaves_nothing(tiny_base, one, tmp_path, monkeypatch):
    import loradem.merge.st_writer as mod

    calls = []
    real = mod.tensor_bytes

    def flaky(tensor):
        calls.append(tensor.shape)
        if len(calls) == 12:  # in the second shard, in the writer's thread
            raise OSError("disk full")
        return real(tensor)

    monkeypatch.setattr(mod, "tensor_bytes", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        fold(tiny_base, [(one, 1.0)], out, max_shard_size_mb=0.05)
    assert len(calls) == 12 and not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_disk_full_is_one_line_with_the_space_needed(tiny_base, one, tmp_path, monkeypatch):
    import errno

    import loradem.merge.st_writer as mod

    real, calls = mod.tensor_bytes, []

    def full(tensor):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(mod, "tensor_bytes", full)
    out = tmp_path / "out"
    with pytest.raises(LorademError, match=r"out: the disk is full \(No space left on device\); the output needs about [\d,]+ MB; nothing was written"):
        fold(tiny_base, [(one, 1.0)], out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_shard_failing_in_the_background_leaves_nothing(tiny_base, one, tmp_path, monkeypatch):
    """A shard is finished (written, hashed) in the background while the next is folded: a disk error there
    still stops the fold with its one-line message, and nothing is left."""
    import errno
    import threading

    from loradem.merge.st_writer import SafetensorsWriter

    real = SafetensorsWriter._write_bytes

    def full(self, data):
        if self.path.name.startswith("model-00002-") and threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")  # its tensors, in its writer thread
        real(self, data)

    monkeypatch.setattr(SafetensorsWriter, "_write_bytes", full)
    out = tmp_path / "out"
    with pytest.raises(LorademError, match=r"out: the disk is full \(No space left on device\)"):
        fold(tiny_base, [(one, 1.0)], out, max_shard_size_mb=0.05)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))

def test_an_output_under_a_plain_file_is_one_line(tiny_base, one, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(LorademError, match=r"afile/out: cannot write there \(.*\); choose another output folder"):
        fold(tiny_base, [(one, 1.0)], tmp_path / "afile" / "out")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_tied_pair_with_ensure_weight_tying(tiny_base_tied, tmp_path):
    """peft ties lm_head's LoRA to the embedding's (A_head = B_embᵀ, B_head = A_embᵀ): both sides get the same delta."""
    adapter = make_adapter(tiny_base_tied, tmp_path / "w", r=4, target_modules=["embed_tokens", "lm_head", "q_proj"],
                           ensure_weight_tying=True)
    out = fold(tiny_base_tied, [(adapter, 0.6)], tmp_path / "out")
    got = read_folder(out)
    torch.testing.assert_close(got["lm_head.weight"], got["model.embed_tokens.weight"], rtol=1e-6, atol=1e-7)
    assert_logits_close(merged_logits(out, IDS), peft_logits(tiny_base_tied, [(adapter, 0.6)], IDS))


def test_refuses_embedding_change_on_unknown_tied_architecture(tiny_base_tied, tmp_path):
    base = tmp_path / "custom"
    shutil.copytree(tiny_base_tied, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["HomeMadeForCausalLM"]}))
    adapter = make_adapter(tiny_base_tied, tmp_path / "e", r=2, target_modules=["embed_tokens"])
    refused(r"tie_word_embeddings is set but transformers does not say which tensors HomeMadeForCausalLM ties",
            tmp_path / "out", base, [(adapter, 1.0)], allow_name_mismatch=True)
    linear = make_adapter(tiny_base_tied, tmp_path / "l", r=2, target_modules=["q_proj"])
    fold(base, [(linear, 1.0)], tmp_path / "fine", allow_name_mismatch=True)  # linear LoRAs never touch the pair


# ---- the streamed writer inside the fold ------------------------------------------

def test_shards_are_byte_identical_to_save_file(tiny_base, mix, tmp_path):
    out = fold(tiny_base, mix, tmp_path / "out", max_shard_size_mb=0.05)
    record = json.loads((out / "loradem.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    for shard in shards:
        save_file(load_file(shard), tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert shard.read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), shard.name
        assert record["shards"][shard.name] == sha256_file(shard)  # hashed while written, equal to a re-read


# ---- per-layer-group weights -------------------------------------------------------

def test_layer_group_weights_equal_float64_reference(tiny_base, mix, with_mts, tmp_path):
    adapters = [(mix[0][0], [0.5, -1.25]), (mix[1][0], [0.3, 1.7]), (mix[2][0], 0.8), (with_mts, [2.0, -1.0])]
    out = fold(tiny_base, adapters, tmp_path / "out")
    got, ref = read_folder(out), reference(tiny_base, adapters)
    for name in ref:
        assert_f32_close(got[name], ref[name])
    # the list is not its mean: layer 0 and layer 1 really got different weights
    mean_only = reference(tiny_base, [(p, sum(w) / len(w) if isinstance(w, list) else w) for p, w in adapters])
    assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"].double(), mean_only["model.layers.0.self_attn.q_proj.weight"])
    assert_f32_close(got["lm_head.weight"], mean_only["lm_head.weight"])  # outside the layers: the mean
    record = json.loads((out / "loradem.json").read_text())
    assert [a["weight"] for a in record["adapters"]] == [[0.5, -1.25], [0.3, 1.7], 0.8, [2.0, -1.0]]
    assert "| `emb` | [0.5, -1.25] by layer group |" in (out / "README.md").read_text()


def without_layer_count(base: Path, out: Path) -> Path:
    """A copy of `base` whose config.json does not give num_hidden_layers."""
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    del config["num_hidden_layers"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_layer_group_weights_need_the_layer_count(tiny_base, one, tmp_path):
    base = without_layer_count(tiny_base, tmp_path / "nolayers")
    refused(r"per-layer-group weights need the base's num_hidden_layers", tmp_path / "out", base, [(one, [1.0, 2.0])],
            allow_name_mismatch=True)
    refused(r"expected a non-empty list of finite numbers, got \[\]", tmp_path / "out", tiny_base, [(one, [])])
    refused(r"expected a non-empty list of finite numbers, got \[1\.0, nan\]", tmp_path / "out", tiny_base, [(one, [1.0, float("nan")])])


# ---- fold_base: dequantized (QLoRA) ---------------------------------------------------

def four_bit_weights(base: Path) -> dict[str, torch.Tensor]:
    """What transformers + bitsandbytes hold for each 4-bit layer of `base` loaded as loradem trains it on a CPU."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=config, device_map={"": "cpu"})
    return {f"{n}.weight": F.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def nf4_trained(folder: Path, **record) -> Path:
    (folder / "loradem-train.json").write_text(json.dumps({"train": {"quantization": "nf4"}, "device": "cpu", **record}))
    return folder


def test_dequantized_fold_equals_the_4bit_model_plus_deltas(tiny_base, mix, tmp_path):
    import bitsandbytes.functional as F

    held = four_bit_weights(tiny_base)
    base = load_file(tiny_base / "model.safetensors")
    assert len(held) == 14 and "lm_head.weight" not in held  # transformers keeps the output layer full precision
    adapter = nf4_trained(copy_adapter(mix[1][0], tmp_path / "q"))

    zero = read_folder(fold(tiny_base, [(adapter, 0.0)], tmp_path / "zero", fold_base="dequantized"))
    for name, tensor in zero.items():  # weight 0: exactly the weights the adapter was trained against
        assert torch.equal(tensor, held.get(name, base[name])), name

    logs: list[str] = []
    out = assemble(tiny_base, [(adapter, 0.7), (mix[0][0], -0.4)], tmp_path / "out", fold_base="dequantized", log=logs.append)
    start = dict(base)
    for name in held:  # dequantize(quantize(base)), by bitsandbytes' functional API
        packed, state = F.quantize_4bit(base[name], blocksize=64, compress_statistics=True, quant_type="nf4")
        start[name] = F.dequantize_4bit(packed, state)
        assert torch.equal(start[name], held[name])
    got, ref = read_folder(out), reference(tiny_base, [(adapter, 0.7), (mix[0][0], -0.4)], start=start)
    for name in ref:
        assert_f32_close(got[name], ref[name])
    assert not any("warning" in line for line in logs)  # one trained on NF4, the other without a record: unknown
    record = json.loads((out / "loradem.json").read_text())
    assert record["fold_base"] == "dequantized"
    assert record["dequantized"]["tensors"] == 14 and record["dequantized"]["blocksize"] == 64
    assert record["dequantized"]["load_dtype"] == "float32"
    assert "fold_base: dequantized" in (out / "README.md").read_text()


def test_dequantized_casts_to_the_training_dtype_first(tiny_base, one, tmp_path):
    """A GPU run quantizes the bf16-loaded weight: the round trip happens in bfloat16."""
    import bitsandbytes.functional as F

    adapter = nf4_trained(copy_adapter(one, tmp_path / "gpu"), device="cuda:0")
    got = read_folder(fold(tiny_base, [(adapter, 0.0)], tmp_path / "out", fold_base="dequantized"))
    weight = load_file(tiny_base / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    packed, state = F.quantize_4bit(weight.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = F.dequantize_4bit(packed, state)
    assert expected.dtype == torch.bfloat16
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], expected.float())
    other = nf4_trained(copy_adapter(one, tmp_path / "cpu"))
    gpu = nf4_trained(copy_adapter(one, tmp_path / "gpu2"), device="cuda:0")
    refused(r"trained on bases loaded in different dtypes .* pass quant_dtype", tmp_path / "mixed", tiny_base,
            [(other, 0.5), (gpu, 0.5)], fold_base="dequantized")
    fold(tiny_base, [(other, 0.5), (gpu, 0.5)], tmp_path / "forced", fold_base="dequantized", quant_dtype="float32")


def test_fold_base_warnings_and_refusals(tiny_base, one, tmp_path):
    nf4 = nf4_trained(copy_adapter(one, tmp_path / "nf4"))
    logs: list[str] = []
    out = assemble(tiny_base, [(nf4, 1.0)], tmp_path / "orig", log=logs.append)
    assert any("trained on an NF4 (4-bit) base; folding onto the original weights" in line for line in logs)
    assert json.loads((out / "loradem.json").read_text())["fold_base"] == "original"
    full = copy_adapter(one, tmp_path / "full")
    (full / "loradem-train.json").write_text(json.dumps({"train": {"quantization": "none"}}))
    logs.clear()
    assemble(tiny_base, [(full, 1.0)], tmp_path / "dq", fold_base="dequantized", log=logs.append)
    assert any("trained on a full-precision base; fold_base: dequantized" in line for line in logs)
    refused(r"fold_base: expected original or dequantized, got 'nf4'", tmp_path / "out", tiny_base, [(one, 1.0)], fold_base="nf4")


# ---- one rounding ------------------------------------------------------------------

def exact_round(value: float, dtype: torch.dtype) -> float:
    """Round-to-nearest-even of a float64 into `dtype`, decided with exact rationals among the neighbours."""
    from fractions import Fraction

    start = torch.tensor([value], dtype=torch.float64).to(dtype).view(torch.int16)
    best = None
    for step in range(-2, 3):
        code = start + step  # int16 arithmetic wraps: neighbours of -0.0 are NaN codes, skipped below
        candidate = code.view(dtype)
        if not torch.isfinite(candidate).all():
            continue
        key = (abs(Fraction(candidate.double().item()) - Fraction(value)), code.item() & 1)
        best = min(best, (key, candidate.double().item())) if best else (key, candidate.double().item())
    return best[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_into_is_one_rounding(dtype):
    """Values within half a float32 ulp of a midpoint: where torch's float64 -> float32 -> narrow conversion
    rounds twice and goes wrong, round_into still rounds once (normal and subnormal float16 included)."""
    import random

    from loradem.merge.fold import round_into

    rng = random.Random(0)
    values = []
    for scale in (1.0, 1e-3, 3e-5, 1e-6, 1e-7):  # 3e-5 and below: float16 subnormals
        for _ in range(300):
            low = torch.tensor([rng.uniform(-2, 2) * scale], dtype=torch.float64).to(dtype)
            high = (low.view(torch.int16) + 1).view(dtype)
            mid = (low.double().item() + high.double().item()) / 2
            values.append(mid * (1 + rng.choice([-1, 0, 1]) * rng.uniform(0, 2**-25)))
    x = torch.tensor(values, dtype=torch.float64)
    out = torch.empty(len(values), dtype=dtype)
    round_into(out, x)
    expected = [exact_round(v, dtype) for v in values]
    assert out.double().tolist() == expected
    assert sum(a != e for a, e in zip(x.to(dtype).double().tolist(), expected)) > 100  # torch alone is wrong here


def adversarial_fold(base: Path, tmp_path: Path, b: torch.Tensor, delta: torch.Tensor, col_scale: torch.Tensor) -> tuple[Path, Path]:
    """A copy of `base` whose layer-0 q_proj is `b`, and a rank-32 adapter (scale 1) whose delta there is exactly
    `delta`: A = diag(col_scale) (powers of two), B = delta / col_scale, so every float64 sum is exact."""
    folder = tmp_path / "adv-base"
    shutil.copytree(base, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = b
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter(folder, tmp_path / "adv", r=32, lora_alpha=32, target_modules=["q_proj"])
    prefix = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    factor = (delta.double() / col_scale.double()).float()
    assert torch.equal(factor.double() * col_scale.double(), delta.double())  # B·A is the delta, exactly

    def write(t):
        t[prefix.format(0, "A")] = torch.diag(col_scale.float())
        t[prefix.format(0, "B")] = factor
        t[prefix.format(1, "B")] = torch.zeros_like(t[prefix.format(1, "B")])

    return folder, edit_tensors(adapter, write)


def adversarial_values(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """32x32 (base, delta, column scale) whose exact sums sit on, or within a float32 ulp of, midpoints of `dtype`
    (largest and smallest normals, subnormals, just under the overflow limit) or cancel to +0. Columns 16+ hold
    the values whose delta is below float32's range (scaled by 2**-60 through A)."""
    import random

    rng = random.Random(1)
    info = torch.finfo(dtype)
    max_code = int(torch.tensor(info.max, dtype=dtype).view(torch.int16))
    min_normal_code = int(torch.tensor(info.tiny, dtype=dtype).view(torch.int16))

    def mid(code: int) -> float:
        low, high = torch.tensor([code, code + 1], dtype=torch.int16).view(dtype).double().tolist()
        return (low + high) / 2

    # column scale 1 needs every delta in float32's normal range: magnitudes from 2**-80 up
    low_code = int(torch.tensor(max(info.tiny, 2.0**-80), dtype=dtype).view(torch.int16))
    big = [rng.randrange(low_code, max_code) for _ in range(16 * 32)]
    small = [rng.randrange(0, min_normal_code + 4) for _ in range(16 * 32)]  # subnormals and the first normals
    offsets = [0.0, 2.0**-30, -(2.0**-30), 2.0**-20, -(2.0**-20), 2.0**-40, -(2.0**-40)]
    b, d = torch.zeros(32, 32, dtype=torch.float64), torch.zeros(32, 32, dtype=torch.float64)
    for i in range(32):
        for j in range(32):
            code = (big if j < 16 else small)[i * 16 + j % 16]
            m = mid(code) * rng.choice([1, -1])
            b[i, j], d[i, j] = m, m * rng.choice(offsets)
    half_ulp_at_max = (info.max / (2 - info.eps)) * info.eps / 2
    b[0, 0], d[0, 0] = info.max, half_ulp_at_max * (1 - 2.0**-20)  # just under the limit: rounds to max, finite
    b[1, 0], d[1, 0] = -info.max, -half_ulp_at_max * (1 - 2.0**-20)
    b[2, 1], d[2, 1] = 0.75, -0.75  # cancels to +0
    b[3, 1], d[3, 1] = 0.0, 0.0
    scale = torch.tensor([1.0] * 16 + [2.0**-60] * 16, dtype=torch.float64)
    assert torch.equal(b.float().double(), b)  # every base value is a float32
    return b.float(), d, scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fold_rounds_adversarial_sums_once(tiny_base, tmp_path, dtype):
    """Sums on and next to the narrow dtype's midpoints, at its largest and smallest magnitudes: the fold equals
    the exact sum (float64 holds it exactly here) rounded once, to nearest-even, and +0 stays +0."""
    b, delta, scale = adversarial_values(dtype)
    base, adapter = adversarial_fold(tiny_base, tmp_path, b, delta, scale)
    out = fold(base, [(adapter, 1.0)], tmp_path / "out", dtype=str(dtype).removeprefix("torch."), allow_name_mismatch=True)
    got = read_folder(out)["model.layers.0.self_attn.q_proj.weight"]
    exact = b.double() + delta
    expected = torch.tensor([exact_round(v, dtype) for v in exact.reshape(-1).tolist()]).to(dtype).reshape(32, 32)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))  # bits: the sign of zero counts
    assert got[0, 0] == torch.finfo(dtype).max and got[1, 0] == -torch.finfo(dtype).max
    assert got[2, 1].view(torch.int16) == 0
    naive = (exact.to(dtype).view(torch.int16) != expected.view(torch.int16)).sum()
    assert naive > 50  # float64 -> float32 -> dtype would have been wrong on these


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fold_refuses_overflow_nan_and_inf_at_the_limit(tiny_base, tmp_path, dtype):
    b, delta, scale = adversarial_values(dtype)
    info = torch.finfo(dtype)
    name = str(dtype).removeprefix("torch.")
    delta[0, 0] = (info.max / (2 - info.eps)) * info.eps / 2  # max + half an ulp: the tie rounds to Inf
    base, adapter = adversarial_fold(tiny_base, tmp_path / "limit", b, delta, scale)
    refused(rf"model\.layers\.0\.self_attn\.q_proj\.weight: the folded tensor has NaN or Inf in torch\.{name}",
            tmp_path / "out", base, [(adapter, 1.0)], dtype=name, allow_name_mismatch=True)
    for bad in (float("nan"), float("inf")):
        b2 = b.clone()
        b2[5, 5] = bad
        base, adapter = adversarial_fold(tiny_base, tmp_path / f"base-{bad}", b2, adversarial_values(dtype)[1], scale)
        refused(r"the folded tensor has NaN or Inf", tmp_path / "out", base, [(adapter, 1.0)], dtype=name,
                allow_name_mismatch=True)


def test_cli_layer_weights_and_fold_base(tiny_base, one, tmp_path):
    from loradem.cli import build_parser, main

    args = build_parser().parse_args(["assemble", "--base", "b", "--adapter", "a=0.5,1.5", "--adapter", "c=2", "--out", "o"])
    assert args.adapter == [("a", [0.5, 1.5]), ("c", 2.0)] and args.fold_base is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["assemble", "--adapter", "a=0.5,x"])
    out = tmp_path / "out"
    assert main(["assemble", "--base", str(tiny_base), "--adapter", f"{one}=0.5,1.5", "--out", str(out),
                 "--fold-base", "dequantized"]) == 0
    record = json.loads((out / "loradem.json").read_text())
    assert record["adapters"][0]["weight"] == [0.5, 1.5] and record["fold_base"] == "dequantized"


def test_quantized_tensors_skip_the_output_layer_and_ties(tiny_base, tiny_base_tied):
    from loradem.merge.nf4 import quantized_tensors

    linear = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert quantized_tensors(tiny_base) == linear == quantized_tensors(tiny_base_tied)


# ---- per-module weights -------------------------------------------------------------

def weighted_modules(folder: Path) -> list[str]:
    """The modules an adapter file changes (LoRA factors and full copies; peft's base copies change nothing)."""
    out = set()
    for key in load_file(folder / "adapter_model.safetensors"):
        rest = key.removeprefix("base_model.model.")
        if ".base_layer." in rest or re.search(r"\.(lora_B\.weight|lora_embedding_B)$", rest):
            continue
        m = re.match(r"(.*)\.(lora_A\.weight|lora_embedding_A)$", rest)
        out.add(m[1] if m else rest.rpartition(".")[0])
    return sorted(out)


def by_module(folder: Path, seed: int) -> dict[str, float]:
    """A different weight for every module of an adapter, in [-1, 2]."""
    g = torch.Generator().manual_seed(seed)
    return {m: round(float(torch.rand((), generator=g)) * 3 - 1, 3) for m in weighted_modules(folder)}


def test_module_weights_equal_float64_reference(tiny_base, mix, with_mts, tmp_path):
    folders = [*(p for p, _ in mix), with_mts]
    adapters = [(p, by_module(p, seed)) for seed, p in enumerate(folders)]
    assert "model.embed_tokens" in adapters[0][1] and "lm_head" in adapters[3][1]  # an embedding LoRA, a full copy
    assert len(adapters[1][1]) == 14 and len(set(adapters[1][1].values())) > 10  # all-linear: 14 modules, spread
    out = fold(tiny_base, adapters, tmp_path / "out")
    got, ref = read_folder(out), reference(tiny_base, adapters)
    assert got.keys() == ref.keys()
    for name in ref:
        assert_f32_close(got[name], ref[name])
    # the same values on other modules (rotated by one) are another model: the mapping matters
    rotated = [(p, dict(zip(w, [*list(w.values())[1:], list(w.values())[0]]))) for p, w in adapters]
    wrong = reference(tiny_base, rotated)
    assert sum(not torch.allclose(got[n].double(), wrong[n], atol=1e-5) for n in ref) >= 14
    record = json.loads((out / "loradem.json").read_text())
    assert [a["weight"] for a in record["adapters"]] == [w for _, w in adapters]
    card = (out / "README.md").read_text()
    mean = sum(adapters[0][1].values()) / len(adapters[0][1])
    assert f"| `emb` | {mean:g} mean of {len(adapters[0][1])} per-module weights (each in loradem.json) |" in card


def test_module_weights_all_equal_are_the_float(tiny_base, mix, tmp_path):
    flat = read_folder(fold(tiny_base, mix, tmp_path / "flat"))
    per = read_folder(fold(tiny_base, [(p, dict.fromkeys(weighted_modules(p), w)) for p, w in mix], tmp_path / "per"))
    assert all(torch.equal(per[n], flat[n]) for n in flat)


def test_module_weights_need_no_layer_count(tiny_base, one, tmp_path):
    base = without_layer_count(tiny_base, tmp_path / "nolayers")
    weights = by_module(one, 7)
    got = read_folder(fold(base, [(one, weights)], tmp_path / "out", allow_name_mismatch=True))
    ref = reference(tiny_base, [(one, weights)])
    for name in ref:
        assert_f32_close(got[name], ref[name])


def test_refuses_bad_module_weights(tiny_base, one, with_mts, tmp_path):
    good = dict.fromkeys(weighted_modules(one), 0.5)
    assert sorted(good) == [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"]
    out = tmp_path / "out"
    refused(r"weight for adapter .*one: model\.layers\.0\.self_attn\.k_proj: not a LoRA module of this adapter "
            r"\(per-module weights are keyed by the module's path in the base model, e\.g\. model\.layers\.0\.self_attn\.q_proj\)$",
            out, tiny_base, [(one, {**good, "model.layers.0.self_attn.k_proj": 1.0})])
    refused(r"weight for adapter .*one: module model\.layers\.1\.self_attn\.v_proj: expected a finite number, got nan$",
            out, tiny_base, [(one, {**good, "model.layers.1.self_attn.v_proj": float("nan")})])
    refused(r"module model\.layers\.1\.self_attn\.v_proj: expected a finite number, got inf$",
            out, tiny_base, [(one, {**good, "model.layers.1.self_attn.v_proj": float("inf")})])
    refused(r"module model\.layers\.1\.self_attn\.v_proj: expected a finite number, got True$",
            out, tiny_base, [(one, {**good, "model.layers.1.self_attn.v_proj": True})])
    refused(r"weight for adapter .*one: no weight for module model\.layers\.1\.self_attn\.q_proj: "
            r"per-module weights must name every LoRA module of the adapter$",
            out, tiny_base, [(one, {k: v for k, v in good.items() if k != "model.layers.1.self_attn.q_proj"})])
    refused(r"weight for adapter .*one: expected a non-empty dict of per-module weights", out, tiny_base, [(one, {})])
    refused(r"weight for adapter .*one: 0: expected a module path \(str\)", out, tiny_base, [(one, {**good, 0: 1.0})])
    # PEFT's module names are not the base's
    refused(r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj \(and 3 more\): not a LoRA module", out, tiny_base,
            [(one, {"base_model.model." + k: v for k, v in good.items()})])
    # a full copy (modules_to_save) needs its module's weight too
    lora_only = {m: 1.0 for m in weighted_modules(with_mts) if m != "lm_head"}
    refused(r"weight for adapter .*mts: no weight for module lm_head: per-module weights must name every LoRA module",
            out, tiny_base, [(with_mts, lora_only)])


def test_o_direct_is_the_default_and_no_direct_io_opts_out(tiny_base, one, tmp_path, monkeypatch):
    from loradem.cli import main
    from loradem.merge import st_writer

    asked: list[bool] = []
    real = st_writer.open_for_writing
    monkeypatch.setattr(st_writer, "open_for_writing", lambda path, direct: asked.append(direct) or real(path, direct))
    for out, extra in (("default", ()), ("buffered", ("--no-direct-io",)), ("direct", ("--direct-io",))):
        assert main(["assemble", "--base", str(tiny_base), "--adapter", f"{one}=0.5", "--out", str(tmp_path / out), *extra]) == 0
    assert asked == [True, False, True]  # one shard each
    same = {(tmp_path / o / "model.safetensors").read_bytes() for o in ("default", "buffered", "direct")}
    assert len(same) == 1
