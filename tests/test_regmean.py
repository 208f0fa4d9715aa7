"""RegMean on LoRA deltas: the low-rank result is the dense least-squares merge, written as an adapter that folds exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import test_pipeline
import torch
import yaml
from safetensors.torch import load_file
from test_multi import logits, make_adapter
from test_pipeline import _read_all

import loradem.merge.regmean
from loradem.data.rows import sample
from loradem.errors import LorademError
from loradem.merge.fold import assemble
from loradem.merge.regmean import ANCHOR, RegMeanJob, collect_statistics, read_factors, regmean_merge, sample_rows
from loradem.model.render import encode_for_loss
from loradem.model.soup import load_multi, load_tokenizer, set_weights
from loradem.recipe import RegMeanSettings

SOURCES = ["add", "rev", "sort"]
RANKS = {"add": 4, "rev": 2, "sort": 3}
tiny_recipe = test_pipeline.tiny_recipe  # a fixture, found by its name here
MAX_LENGTH = 64


def _rows(kind: str, n: int) -> list[dict]:
    if kind == "add":
        return [{"prompt": f"What is {a} + {7 * a + 3}? Answer: ", "completion": str(8 * a + 3)} for a in range(n)]
    if kind == "sort":
        return [{"prompt": f"Sort these numbers: {a}, {9 - a % 9}, {a * 3 % 11}.", "completion": "sorted"} for a in range(n)]
    words = ["planet", "hello", "world", "lora", "merge", "vector", "tiny", "model", "search", "learn"]
    return [{"messages": [{"role": "user", "content": f"Reverse the word '{w}'."}, {"role": "assistant", "content": w[::-1]}]}
            for w in (words * 3)[:n]]


TRAIN = {s: _rows(s, 12) for s in SOURCES}
# generic prompts with replies, as loradem.data.anchors makes them (the base's own replies in a run)
ANCHORS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
           for q, a in [("What is the capital of Peru?", "Lima."), ("Name an animal that lives in the ocean.", "A whale."),
                        ("What day comes after Monday?", "Tuesday."), ("Give a synonym for 'fast'.", "Quick."),
                        ("How many legs does a spider have?", "Eight."), ("What is 3 times 4?", "12"),
                        ("Write one short sentence about rain.", "Rain fell softly on the roof."),
                        ("Is 14 an even number? Answer yes or no.", "Yes."), ("What is the opposite of 'hot'?", "Cold."),
                        ("What is the first letter of 'planet'?", "P")]]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Three adapters with different ranks, scales and targets: v_proj carries all three, down_proj only 'add'."""
    root = tmp_path_factory.mktemp("regmean-adapters")
    return {
        "add": make_adapter(tiny_base, root / "add", seed=31, r=4, targets=["q_proj", "v_proj", "down_proj"]),
        "rev": make_adapter(tiny_base, root / "rev", seed=32, r=2, targets=["o_proj", "up_proj", "v_proj"], use_rslora=True),
        "sort": make_adapter(tiny_base, root / "sort", seed=33, r=3, alpha=6, targets=["v_proj", "gate_proj", "q_proj"]),
    }


def make_job(out: Path, *, batch_size: int = 1, **settings) -> RegMeanJob:
    return RegMeanJob(name="t", settings=RegMeanSettings(**{"enabled": True, "rows_per_source": 8, "alpha": 0.9, **settings}), out_dir=out,
                      seed=0, max_length=MAX_LENGTH, batch_size=batch_size)


# ---- independent references ---------------------------------------------------------

def dense_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module -> s·B@A in float64, read from the files (scale from lora_alpha / r, or / sqrt(r) with rsLoRA)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r = a.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
            out[module] = s * (tensors[key.replace("lora_A", "lora_B")].double() @ a.double())
    return out


def accumulate(gram: torch.Tensor):
    """A forward pre-hook adding one row's XᵀX to `gram` (returns None: the layer's input is left as it is)."""
    def hook(module, args):
        x = args[0][0].double()  # one row: (tokens, in)
        gram.add_(x.T @ x)
    return hook


def reference_grams(base_dir: Path, adapters: dict[str, Path], rows: dict[str, list[dict]], modules: list[str],
                    own: bool) -> dict[str, dict[str, torch.Tensor]]:
    """source -> module -> XᵀX / n, each row alone (no padding), from plain transformers (+ PEFT's unmerged
    adapter for 'own')."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base_dir)
    out = {}
    for s, folder in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        if own:
            model = PeftModel.from_pretrained(model, str(folder)).eval()
            inner = model.base_model.model
        else:
            inner = model
        out[s] = row_grams(model, inner, modules, rows[s], tok)
    return out


def row_grams(model, inner, modules: list[str], rows: list[dict], tok) -> dict[str, torch.Tensor]:
    """module -> XᵀX / n over `rows`, each row alone through `model`, hooked on `inner`'s modules."""
    width = {m: inner.get_submodule(m).in_features for m in modules}
    grams = {m: torch.zeros(width[m], width[m], dtype=torch.float64) for m in modules}
    hooks = [inner.get_submodule(m).register_forward_pre_hook(accumulate(grams[m])) for m in modules]
    tokens = 0
    with torch.no_grad():
        for ids, _ in encode_for_loss(rows, tok, MAX_LENGTH):
            model(input_ids=torch.tensor([ids]))
            tokens += len(ids)
    for h in hooks:
        h.remove()
    return {m: g / tokens for m, g in grams.items()}


def reference_merge(deltas: dict[str, dict[str, torch.Tensor]], grams: dict[str, dict[str, torch.Tensor]], alpha: float,
                    module: str) -> torch.Tensor:
    """ΔW* = ((Σᵢ Gᵢ)⁻¹ Σᵢ Gᵢ ΔWᵢᵀ)ᵀ with every Gᵢ's off-diagonals scaled by alpha, dense and direct (ΔWᵢ = 0 where
    source i has no LoRA)."""
    def scaled(g):
        return g * alpha + torch.diag(g.diagonal()) * (1 - alpha)

    lhs = sum(scaled(grams[s][module]) for s in grams)
    rhs = sum(scaled(grams[s][module]) @ deltas[s][module].T for s in grams if module in deltas[s])
    return torch.linalg.solve(lhs, rhs).T


def merged_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """The written adapter's dense deltas, as loradem's reader (and so its assembler) scales them."""
    from loradem.vectors.lora import load_adapter

    adapter = load_adapter(folder)
    return {m.module: adapter.delta(m) for m in adapter.lora.values()}


# ---- (a), (b), (c): the result is the dense merge ------------------------------------------

@pytest.mark.parametrize("activations", ["base", "own"])
def test_low_rank_result_equals_dense_least_squares(tiny_base, adapters, tmp_path, activations):
    job = make_job(tmp_path / "rm", alpha=0.9, activations=activations)
    record = regmean_merge(job, tiny_base, adapters, TRAIN, log=lambda m: None)
    got = merged_deltas(tmp_path / "rm")
    deltas = {s: dense_deltas(adapters[s]) for s in SOURCES}
    modules = sorted({m for d in deltas.values() for m in d})
    assert sorted(got) == modules and record["modules"] == len(modules)
    rows = sample_rows(job, SOURCES, TRAIN)
    grams = reference_grams(tiny_base, adapters, rows, modules, own=activations == "own")
    assert record["tokens"] == {s: sum(len(ids) for ids, _ in encode_for_loss(rows[s], load_tokenizer(tiny_base), MAX_LENGTH))
                                for s in SOURCES}
    # 'base': the same float32 forward, so float64 tolerance; 'own': PEFT's unmerged forward rounds differently
    tol = 1e-9 if activations == "base" else 1e-4
    for m in modules:
        want = reference_merge(deltas, grams, 0.9, m)
        torch.testing.assert_close(got[m], want, rtol=tol, atol=tol * want.abs().max().item(), msg=m)
    # one low-rank block per source with a LoRA on the module: rank Σrᵢ, stored in float64
    stored = load_file(tmp_path / "rm" / "adapter_model.safetensors")
    for m in modules:
        a = stored[f"base_model.model.{m}.lora_A.weight"]
        assert a.dtype == torch.float64 and a.shape[0] == sum(RANKS[s] for s in SOURCES if m in deltas[s]), m
    cfg = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg.get("use_rslora")


def test_base_and_own_activations_give_different_merges(tiny_base, adapters, tmp_path):
    """The 'own' tolerance above is far below the difference the choice of activations makes."""
    base = merged_deltas(_merged(tiny_base, adapters, tmp_path / "b", activations="base"))
    own = merged_deltas(_merged(tiny_base, adapters, tmp_path / "o", activations="own"))
    m = "model.layers.1.self_attn.v_proj"
    assert (base[m] - own[m]).abs().max() > 1e-2 * base[m].abs().max()


@pytest.mark.parametrize("activations", ["base", "own"])
def test_generic_rows_join_the_dense_least_squares_with_a_zero_delta(tiny_base, adapters, tmp_path, activations):
    """ΔW*ᵀ = (Σᵢ Gᵢ + λ·G₀)⁻¹ Σᵢ Gᵢ ΔWᵢᵀ, G₀ from the anchor rows through the base (no adapter, also with 'own')."""
    from transformers import AutoModelForCausalLM

    job = make_job(tmp_path / "rm", alpha=0.9, activations=activations, anchor=1.5)
    record = regmean_merge(job, tiny_base, adapters, TRAIN, anchors=ANCHORS, anchor_seconds=2.0, log=lambda m: None)
    assert record["anchor"] == {"weight": 1.5, "rows": 8, "generation_seconds": 2.0}  # rows_per_source 8 of 10
    assert record["regmean_seconds"] == pytest.approx(record["gram_seconds"] + record["solve_seconds"] + 2.0, abs=2e-3)
    got = merged_deltas(tmp_path / "rm")
    deltas = {s: dense_deltas(adapters[s]) for s in SOURCES}
    modules = sorted({m for d in deltas.values() for m in d})
    grams = reference_grams(tiny_base, adapters, sample_rows(job, SOURCES, TRAIN), modules, own=activations == "own")
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    generic = row_grams(base, base, modules, sample(ANCHORS, 8, seed=0, stage="regmean", source=ANCHOR),
                        load_tokenizer(tiny_base))
    grams[ANCHOR], deltas[ANCHOR] = {m: 1.5 * g for m, g in generic.items()}, {}
    without = merged_deltas(_merged(tiny_base, adapters, tmp_path / "plain", alpha=0.9, activations=activations))
    tol = 1e-9 if activations == "base" else 1e-4
    for m in modules:
        want = reference_merge(deltas, grams, 0.9, m)
        torch.testing.assert_close(got[m], want, rtol=tol, atol=tol * want.abs().max().item(), msg=m)
        # the penalty the generic rows add, tr(ΔW·G₀·ΔWᵀ) (G₀ as alpha scales it; unscaled, ‖X₀ΔWᵀ‖²/n₀), is lower
        # than the plain merge's: with λ > 0 in the least squares it can only go down
        g0 = generic[m] * 0.9 + torch.diag(generic[m].diagonal()) * 0.1
        assert torch.trace(got[m] @ g0 @ got[m].T) < torch.trace(without[m] @ g0 @ without[m].T), m


def test_generic_rows_with_merged_activations_equal_the_blockwise_reference(tiny_base, adapters, tmp_path):
    job = make_job(tmp_path / "rm", alpha=0.9, activations="merged", batch_size=4, anchor=0.5)
    regmean_merge(job, tiny_base, adapters, TRAIN, anchors=ANCHORS, log=lambda m: None)
    got = merged_deltas(tmp_path / "rm")
    rows = {**sample_rows(job, SOURCES, TRAIN), ANCHOR: sample(ANCHORS, 8, seed=0, stage="regmean", source=ANCHOR)}
    want = reference_blockwise(tiny_base, adapters, rows, 0.9, anchor=0.5)
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5 * want[m].abs().max().item(), msg=m)


def test_generic_rows_change_the_identity_only_when_weighed(tiny_base, adapters, tmp_path):
    plain = regmean_merge(make_job(tmp_path / "rm", alpha=0.9), tiny_base, adapters, TRAIN, log=lambda m: None)
    lines: list[str] = []
    # anchor 0 is the merge without generic rows: the same identity, so it is reused (and so is every earlier result)
    again = regmean_merge(make_job(tmp_path / "rm", alpha=0.9, anchor=0.0), tiny_base, adapters, TRAIN, anchors=ANCHORS,
                          log=lines.append)
    assert again == plain and lines[0].startswith("regmean: reusing") and "anchor" not in plain
    with pytest.raises(LorademError, match=r"^regmean\.anchor: no anchor rows to take the generic Gram matrix from$"):
        regmean_merge(make_job(tmp_path / "none", alpha=0.9, anchor=1.0), tiny_base, adapters, TRAIN, log=lambda m: None)
    assert not (tmp_path / "none").exists()
    weighed = regmean_merge(make_job(tmp_path / "rm", alpha=0.9, anchor=1.0), tiny_base, adapters, TRAIN, anchors=ANCHORS,
                            log=lambda m: None)
    assert weighed["identity"] != plain["identity"] and weighed["tokens"][ANCHOR] > 0


def _merged(base_dir, adapters, out, **settings) -> Path:
    regmean_merge(make_job(out, **settings), base_dir, adapters, TRAIN, log=lambda m: None)
    return out


def test_alpha_zero_is_the_diagonal_weighted_average(tiny_base, adapters, tmp_path):
    got = merged_deltas(_merged(tiny_base, adapters, tmp_path / "rm", alpha=0.0))
    deltas = {s: dense_deltas(adapters[s]) for s in SOURCES}
    job = make_job(tmp_path / "unused")
    rows = sample_rows(job, SOURCES, TRAIN)
    grams = reference_grams(tiny_base, adapters, rows, sorted(got), own=False)
    for m, merged in got.items():
        # column k of ΔW* is Σᵢ E_i[x_k²]·ΔWᵢ[:, k] / Σᵢ E_i[x_k²]: no solve, no cross terms
        d = {s: grams[s][m].diagonal() for s in SOURCES}
        want = sum(d[s] * deltas[s][m] for s in SOURCES if m in deltas[s]) / sum(d.values())
        torch.testing.assert_close(merged, want, rtol=1e-10, atol=1e-12, msg=m)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_one_source_gives_its_own_delta(tiny_base, adapters, tmp_path, alpha):
    got = merged_deltas(_merged(tiny_base, {"rev": adapters["rev"]}, tmp_path / "rm", alpha=alpha))
    want = dense_deltas(adapters["rev"])
    assert sorted(got) == sorted(want)
    for m in want:
        # float64 error times the Gram's condition number (about 2e7 on the tiny model's o_proj inputs)
        torch.testing.assert_close(got[m], want[m], rtol=1e-8, atol=1e-8 * want[m].abs().max().item(), msg=m)


# ---- (d): an ordinary adapter, folded exactly -------------------------------------------

def test_assembled_model_equals_base_plus_regmean_adapter_in_peft(tiny_base, adapters, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    folder = _merged(tiny_base, adapters, tmp_path / "rm", alpha=0.9)
    tok = load_tokenizer(tiny_base)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(folder)).eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(merged_deltas(folder))
    assert all(layer.scaling["default"] == 1.0 for layer in layers.values())  # lora_alpha = r, per layer
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 9 and layers["model.layers.0.mlp.up_proj"].r["default"] == 2

    assemble(tiny_base, [(folder, 1.0)], tmp_path / "model", log=lambda m: None)
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    want = logits(peft_model, tok)
    torch.testing.assert_close(logits(folded, tok), want, rtol=1e-5, atol=1e-5)
    assert (logits(folded, tok) - logits(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), tok)).abs().max() > 1e-3

    # and the in-memory model the evaluation scores it on
    soup, _ = load_multi(tiny_base, {"regmean": folder}, fold=True)
    set_weights(soup, {"regmean": 1.0})
    torch.testing.assert_close(logits(soup, tok), want, rtol=1e-5, atol=1e-5)


# ---- (e): padding is excluded ---------------------------------------------------------------

def test_padded_batches_give_the_same_statistics_as_single_rows(tiny_base, adapters):
    rows = {s: TRAIN[s][:6] for s in SOURCES}
    tok = load_tokenizer(tiny_base)
    lengths = {len(ids) for s in SOURCES for ids, _ in encode_for_loss(rows[s], tok, MAX_LENGTH)}
    assert len(lengths) > 3  # rows of several lengths: batches of 6 are padded
    factors = read_factors(adapters)
    for activations in ("base", "own"):
        one = collect_statistics(tiny_base, adapters, rows, activations=activations, max_length=MAX_LENGTH, batch_size=1,
                                 factors=factors, log=lambda m: None)
        padded = collect_statistics(tiny_base, adapters, rows, activations=activations, max_length=MAX_LENGTH, batch_size=6,
                                    factors=factors, log=lambda m: None)
        assert one.tokens == padded.tokens
        for m in factors:
            torch.testing.assert_close(padded.gram[m], one.gram[m], rtol=1e-5, atol=1e-7, msg=m)
            for s in factors[m]:
                torch.testing.assert_close(padded.gram_a[m][s], one.gram_a[m][s], rtol=1e-5, atol=1e-7, msg=m)
                torch.testing.assert_close(padded.diag[m][s], one.diag[m][s], rtol=1e-5, atol=1e-7, msg=m)


# ---- files, reuse and refusals ----------------------------------------------------------------

def test_result_is_reused_and_replaced_when_settings_change(tiny_base, adapters, tmp_path, monkeypatch):
    job = make_job(tmp_path / "rm", alpha=0.9)
    first = regmean_merge(job, tiny_base, adapters, TRAIN, log=lambda m: None)
    assert json.loads((tmp_path / "rm" / "regmean.json").read_text()) == first
    assert first["ranks"] == [2, 3, 4, 7, 9] and first["ridged_modules"] == []
    assert first["regmean_seconds"] == pytest.approx(first["gram_seconds"] + first["solve_seconds"], abs=2e-3)

    def refuse(*a, **k):
        raise AssertionError("recollected")

    lines: list[str] = []
    with monkeypatch.context() as mp:
        mp.setattr(loradem.merge.regmean, "collect_statistics", refuse)
        assert regmean_merge(job, tiny_base, adapters, TRAIN, log=lines.append) == first
    assert lines[0].startswith("regmean: reusing")
    second = regmean_merge(make_job(tmp_path / "rm", alpha=0.5), tiny_base, adapters, TRAIN, log=lambda m: None)
    assert second["identity"] != first["identity"] and second["settings"]["alpha"] == 0.5
    assert not list(tmp_path.glob(".rm*"))  # written aside, renamed into place: nothing left beside it


def test_refusals_name_the_adapter_and_leave_nothing(tiny_base, adapters, tmp_path):
    emb = make_adapter(tiny_base, tmp_path / "emb", seed=41, r=2, targets=["embed_tokens", "q_proj"])
    with pytest.raises(LorademError, match=r"regmean: adapter .*emb: model.embed_tokens is an embedding LoRA; RegMean merges "
                                           r"Linear layers only"):
        regmean_merge(make_job(tmp_path / "rm"), tiny_base, {"add": adapters["add"], "emb": emb}, {**TRAIN, "emb": TRAIN["add"]})
    full = make_adapter(tiny_base, tmp_path / "full", seed=42, r=2, targets=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(LorademError, match=r"regmean: adapter .*full: .*lm_head.* is a full module copy \(modules_to_save\)"):
        regmean_merge(make_job(tmp_path / "rm"), tiny_base, {"full": full}, {"full": TRAIN["add"]})
    with pytest.raises(LorademError, match="regmean: source 'rev': no training rows"):
        regmean_merge(make_job(tmp_path / "rm"), tiny_base, adapters, {**TRAIN, "rev": []})
    with pytest.raises(Exception, match="assemble.weights: 'regmean' needs regmean.enabled: true"):
        from loradem.recipe import Recipe

        data = tmp_path / "rows.jsonl"
        data.write_text('{"prompt": "a", "completion": "b"}\n')
        Recipe.model_validate({"name": "t", "base": str(tiny_base), "sources": [{"name": "a", "data": str(data)}],
                               "assemble": {"weights": "regmean"}})
    assert not (tmp_path / "rm").exists() and not list(tmp_path.glob(".rm*"))


def test_a_singular_gram_is_solved_with_a_ridge_and_said(tiny_base, adapters, tmp_path):
    """Plain least squares (alpha 1) on fewer tokens than input features: every Gram is singular."""
    lines: list[str] = []
    rows = {"add": [{"prompt": "What is 1 + 2? ", "completion": "3"}]}
    record = regmean_merge(make_job(tmp_path / "rm", alpha=1.0), tiny_base, {"add": adapters["add"]}, rows, log=lines.append)
    assert sum(record["tokens"].values()) < 32 and len(record["ridged_modules"]) == record["modules"]
    assert any("singular Gram matrix" in line and "ridge" in line for line in lines)
    for m, delta in merged_deltas(tmp_path / "rm").items():
        assert torch.isfinite(delta).all(), m


def test_alpha_candidates_keep_the_lowest_validation_loss_and_equal_that_single_merge(tiny_base, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    from loradem.model.generate import mean_loss

    validation = {s: _rows(s, 5) for s in SOURCES}
    record = regmean_merge(make_job(tmp_path / "auto", alpha=[0.0, 0.5, 0.9]), tiny_base, adapters, TRAIN,
                           validation=validation, log=lambda _: None)
    losses = record["validation_loss_by_alpha"]
    assert set(losses) == {"0", "0.5", "0.9"} and record["settings"]["alpha"] == [0.0, 0.5, 0.9]
    assert record["alpha"] == min((0.0, 0.5, 0.9), key=lambda a: losses[f"{a:g}"])
    assert record["regmean_seconds"] >= record["gram_seconds"] + record["choose_seconds"] - 1e-3

    tok = load_tokenizer(tiny_base)
    for alpha in (0.0, 0.5, 0.9):
        single = tmp_path / f"single-{alpha}"
        regmean_merge(make_job(single, alpha=alpha), tiny_base, adapters, TRAIN, log=lambda _: None)
        # each candidate's loss is that merge's, folded by the assembler and read back as a plain model
        assemble(tiny_base, [(single, 1.0)], tmp_path / f"model-{alpha}")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"model-{alpha}").eval()
        with torch.no_grad():
            expected = sum(mean_loss(model, encode_for_loss(r, tok, MAX_LENGTH)) for r in validation.values()) / 3
        assert losses[f"{alpha:g}"] == pytest.approx(expected, rel=1e-5), alpha
        if alpha == record["alpha"]:  # the kept adapter is that single merge, tensor for tensor
            kept, alone = load_file(tmp_path / "auto" / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
            assert kept.keys() == alone.keys() and all(torch.equal(kept[k], alone[k]) for k in kept)


def test_alpha_candidates_without_validation_rows_are_refused(tiny_base, adapters, tmp_path):
    with pytest.raises(LorademError, match=r"^regmean.alpha: the candidates \[0.5, 0.9\] \(a list, as the default is\) are "
                                           r"chosen between on validation rows, and no source has any; give one alpha, e.g. 0.99$"):
        regmean_merge(make_job(tmp_path / "auto", alpha=[0.5, 0.9]), tiny_base, adapters, TRAIN,
                      validation={s: [] for s in SOURCES}, log=lambda _: None)
    assert not (tmp_path / "auto").exists()


def test_the_default_alpha_is_the_candidates_measured_on_both_suites():
    assert RegMeanSettings(enabled=True).alpha == [0.9, 0.99]


@pytest.mark.parametrize("alpha, problem", [([0.5, 0.5], "expected distinct alphas"), ([0.5, 1.5], "less than or equal to 1"),
                                            ([], "at least 1 item")])
def test_bad_alpha_lists_are_refused_by_the_schema(alpha, problem):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=problem):
        RegMeanSettings(enabled=True, alpha=alpha)


# ---- the pipeline: assembled and reported -----------------------------------------------------

@pytest.mark.slow
def test_run_with_regmean_assembles_it_and_reports_it(tiny_recipe, tiny_base, capsys, monkeypatch):
    from loradem.cli import main

    data = yaml.safe_load(tiny_recipe.read_text())
    data["regmean"] = {"enabled": True, "rows_per_source": 8, "alpha": 0.9}
    data["assemble"] = {"weights": "regmean"}
    tiny_recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_recipe)]) == 0
    run = Path("runs/tiny")
    report = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows)[-2:] == ["dem", "dem-regmean"]
    record = json.loads((run / "regmean" / "regmean.json").read_text())
    assert rows["dem-regmean"]["cost"]["regmean_seconds"] == round(record["regmean_seconds"], 1)
    assert rows["dem-regmean"]["cost"]["train_tokens"] == rows["dem"]["cost"]["train_tokens"]
    assert report["regmean"]["settings"]["alpha"] == 0.9 and "identity" not in report["regmean"]

    # the model folder holds base + the RegMean adapter's delta, in float64
    base, merged = _read_all(tiny_base), _read_all(run / "model")
    expected = {k: v.double() for k, v in base.items()}
    for m, delta in merged_deltas(run / "regmean").items():
        expected[m + ".weight"] += delta
    for k, v in merged.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert "`dem-regmean`" in (run / "report.md").read_text()

    # the stage alone, from the command line: up to date, so nothing is rewritten
    written = (run / "regmean" / "regmean.json").stat().st_mtime_ns
    assert main(["regmean", str(tiny_recipe)]) == 0
    assert (run / "regmean" / "regmean.json").stat().st_mtime_ns == written
    # with generic rows: the base answers the anchor prompts once (charged to the merge; the tiny base never ends a
    # reply, so its replies are given), then the cache serves them
    import loradem.model.generate

    calls = []
    monkeypatch.setattr(loradem.model.generate, "generate_replies",
                        lambda model, tok, prompts, **k: calls.append(len(prompts)) or [("Fine.", True)] * len(prompts))
    data["regmean"]["anchor"], data["anchor"] = 1.0, {"prompts": 12, "max_new_tokens": 8}
    tiny_recipe.write_text(yaml.safe_dump(data))
    assert main(["regmean", str(tiny_recipe)]) == 0
    anchored = json.loads((run / "regmean" / "regmean.json").read_text())
    replies = [json.loads(f.read_text()) for f in Path("adapters/.anchors").glob("*.json")]
    assert len(replies) == 1 and anchored["anchor"]["rows"] == min(8, replies[0]["rows"])
    # the replies were generated in this call (calls == [12] below); the fake generator is instant, so its
    # seconds may round to 0 on a fast machine: the record must equal the replies file, not exceed a time
    assert anchored["anchor"]["generation_seconds"] == replies[0]["generation_seconds"] >= 0
    assert anchored["identity"] != record["identity"] and anchored["tokens"]["(anchor)"] > 0 and calls == [12]
    data["regmean"]["enabled"], data["assemble"] = False, {"weights": "search"}
    tiny_recipe.write_text(yaml.safe_dump(data))
    assert main(["regmean", str(tiny_recipe)]) == 2
    assert "regmean.enabled is false" in capsys.readouterr().err


@pytest.mark.slow
def test_a_variant_merges_its_own_adapters_by_regmean_and_gets_its_row(tiny_recipe, tiny_base, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradem.cli import main
    from loradem.data.rows import load_splits
    from loradem.model.generate import evaluate_source
    from loradem.recipe import load_recipe

    data = yaml.safe_load(tiny_recipe.read_text())
    data["regmean"] = {"enabled": True, "rows_per_source": 8, "alpha": 0.9}
    data["variants"] = [{"name": "diag", "regmean": {"alpha": 0.0}}]  # the same adapters, the diagonal-only merge
    tiny_recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_recipe)]) == 0
    report = json.loads(Path("runs/tiny/report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows)[-1] == "diag:dem-regmean" and "dem-regmean" in rows
    folder = Path("runs/tiny/variants/diag/regmean")
    record = json.loads((folder / "regmean.json").read_text())
    assert record["settings"]["alpha"] == 0.0 and report["variants"]["diag"]["regmean"]["settings"]["alpha"] == 0.0
    assert json.loads(Path("runs/tiny/regmean/regmean.json").read_text())["settings"]["alpha"] == 0.9
    assert rows["diag:dem-regmean"]["cost"]["regmean_seconds"] == round(record["regmean_seconds"], 1)
    # its adapters are the recipe's: those rows are the same models, taken over without scoring them again
    out = capsys.readouterr().out
    for row in ("adapter:addition", "adapter:sort", "uniform", "sum"):
        assert f"diag:{row}" in out and re.search(rf"diag:{row} +the same model as {row}: its scores", out), row
        assert report["predictions"][f"diag:{row}"] == report["predictions"][row]
        assert rows[f"diag:{row}"]["per_source"] == rows[row]["per_source"]
    assert "the same model as dem-regmean" not in out  # alpha 0 is another merge: scored
    # and its search is the recipe's finished study (the same adapters and search settings), not a second one
    assert re.search(r"search diag\].*: 4 trials done, 0 to run", out), out
    assert rows["diag:dem"]["weights"] == rows["dem"]["weights"]

    # the row answers like PEFT's base + the variant's RegMean adapter
    recipe = load_recipe(str(tiny_recipe))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(folder)).eval()
    tokenizer = load_tokenizer(tiny_base)
    for source in recipe.sources:
        with torch.no_grad():
            expected = evaluate_source(model, tokenizer, load_splits(source, recipe.seed).test, "exact_match",
                                       recipe.eval, 64, log=lambda m: None)
        assert report["predictions"]["diag:dem-regmean"][source.name] == expected["predictions"], source.name

    # the stage alone merges both again (up to date: nothing rewritten)
    written = (folder / "regmean.json").stat().st_mtime_ns
    assert main(["regmean", str(tiny_recipe)]) == 0
    assert (folder / "regmean.json").stat().st_mtime_ns == written


# ---- activations: merged (RegMean++: each block's inputs from the merge so far) ---------------

def reference_blockwise(base_dir: Path, adapters: dict[str, Path], rows: dict[str, list[dict]], alpha: float,
                        anchor: float = 0.0) -> dict[str, torch.Tensor]:
    """The dense merge, block by block with whole-model forward passes of plain transformers (each row alone):
    block l's Gram matrices are taken with blocks 0…l−1 already holding their merged weights, folded as the
    assembler folds them (float64 sum, rounded once to float32). With `anchor`, rows[ANCHOR]'s Gram joins the sum
    at that weight with a zero delta."""
    from transformers import AutoModelForCausalLM

    deltas = {s: dense_deltas(adapters[s]) for s in adapters}
    modules = sorted({m for d in deltas.values() for m in d})
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tok = load_tokenizer(base_dir)
    out = {}
    for block in range(model.config.num_hidden_layers):
        here = [m for m in modules if m.startswith(f"model.layers.{block}.")]
        grams = {s: row_grams(model, model, here, rows[s], tok) for s in adapters}
        if anchor:
            grams[ANCHOR] = {m: anchor * g for m, g in row_grams(model, model, here, rows[ANCHOR], tok).items()}
            deltas[ANCHOR] = {}
        for m in here:
            out[m] = reference_merge(deltas, grams, alpha, m)
            weight = model.get_submodule(m).weight
            with torch.no_grad():
                weight.copy_((weight.double() + out[m]).float())
    return out


def test_merged_activations_equal_the_blockwise_dense_reference(tiny_base, adapters, tmp_path):
    job = make_job(tmp_path / "rm", alpha=0.9, activations="merged", batch_size=4)
    record = regmean_merge(job, tiny_base, adapters, TRAIN, log=lambda m: None)
    got = merged_deltas(tmp_path / "rm")
    want = reference_blockwise(tiny_base, adapters, sample_rows(job, SOURCES, TRAIN), 0.9)
    assert sorted(got) == sorted(want) and record["settings"]["activations"] == "merged"
    # padded batches against rows alone, and a float32 weight that may round one ulp apart: 1e-5, not float64's 1e-9
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5 * want[m].abs().max().item(), msg=m)
    # block 0 sees the embeddings either way; a later block sees the merged block 0, not the base's
    base = merged_deltas(_merged(tiny_base, adapters, tmp_path / "b", activations="base", alpha=0.9, batch_size=4))
    first = [m for m in want if m.startswith("model.layers.0.")]
    later = [m for m in want if not m.startswith("model.layers.0.")]
    assert first and later
    for m in first:
        torch.testing.assert_close(got[m], base[m], rtol=1e-9, atol=1e-9 * base[m].abs().max().item(), msg=m)
    assert max(float((got[m] - base[m]).abs().max() / base[m].abs().max()) for m in later) > 1e-3


def test_merged_activations_choose_among_alphas_each_its_own_pass(tiny_base, adapters, tmp_path):
    validation = {s: _rows(s, 5) for s in SOURCES}
    record = regmean_merge(make_job(tmp_path / "auto", alpha=[0.5, 0.9], activations="merged"), tiny_base, adapters,
                           TRAIN, validation=validation, log=lambda _: None)
    assert set(record["validation_loss_by_alpha"]) == {"0.5", "0.9"}
    single = _merged(tiny_base, adapters, tmp_path / "single", alpha=record["alpha"], activations="merged")
    kept, alone = load_file(tmp_path / "auto" / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert kept.keys() == alone.keys() and all(torch.equal(kept[k], alone[k]) for k in kept)


def test_merged_activations_refuse_a_lora_outside_the_blocks(tiny_base, tmp_path):
    head = make_adapter(tiny_base, tmp_path / "head", seed=5, r=2, targets=["lm_head", "q_proj"])
    with pytest.raises(LorademError, match=r"regmean.activations 'merged': LoRA module lm_head is outside the decoder "
                                           r"blocks; use activations 'base'"):
        regmean_merge(make_job(tmp_path / "rm", activations="merged"), tiny_base, {"add": head}, TRAIN, log=lambda _: None)
    assert not (tmp_path / "rm").exists()
