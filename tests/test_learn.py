"""Learned per-module weights (LoRA Soups' CAT): what is fit, what is kept, what is written, and that it folds exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_pipeline
import torch
import yaml
from test_multi import make_adapter
from test_pipeline import _read_all

import loradem.merge.learn
from loradem.errors import LorademError
from loradem.merge.learn import LearnJob, attach_weights, learn_weights, module_weights
from loradem.model.generate import mean_loss
from loradem.model.render import encode_for_loss
from loradem.model.soup import load_multi, set_weights
from loradem.pipeline import learned_weights
from loradem.recipe import LearnSettings, Recipe

SOURCES = ["add", "rev"]
tiny_recipe = test_pipeline.tiny_recipe  # a fixture, found by its name here


def _rows(kind: str, n: int) -> list[dict]:
    if kind == "add":
        return [{"prompt": f"What is {a} + {a + 3}? Answer: ", "completion": str(2 * a + 3)} for a in range(n)]
    words = ["planet", "hello", "world", "lora", "merge", "vector", "tiny", "model", "search", "learn"]
    return [{"messages": [{"role": "user", "content": f"Reverse the word '{w}'."}, {"role": "assistant", "content": w[::-1]}]}
            for w in (words * 3)[:n]]


TRAIN = {"add": _rows("add", 24), "rev": _rows("rev", 24)}
VALIDATION = {"add": _rows("add", 4), "rev": _rows("rev", 4)}


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("learn-adapters")
    return {
        "add": make_adapter(tiny_base, root / "add", seed=21, r=4, targets=["q_proj", "v_proj", "down_proj"]),
        "rev": make_adapter(tiny_base, root / "rev", seed=22, r=2, targets=["o_proj", "up_proj", "v_proj"], use_rslora=True),
    }


def make_job(out: Path, *, importance=None, **learn) -> LearnJob:
    """A fit of plain settings (no recipe): 8 training rows per source, 6 steps, validation every 3."""
    settings = LearnSettings(**{"enabled": True, "steps": 6, "batch_size": 4, "rows_per_source": 8, "eval_every": 3,
                                "learning_rate": 0.2, **learn})
    return LearnJob(name="t", settings=settings, importance={s: (importance or {}).get(s, 1.0) for s in SOURCES},
                    out_dir=out, seed=0, max_length=64, validation_rows=4, eval_batch_size=4)


def test_learned_weights_lower_validation_loss_and_reproduce_it(tiny_base, adapters, tmp_path, monkeypatch):
    """The stage from Python with plain settings and rows: weights that fold to the recorded validation loss."""
    import contextlib

    bars: list[list] = []

    class Bar:
        def update(self, k=1):
            bars[-1][1] += k

    def fake_progress(total, desc, *, unit="it"):
        bars.append([(total, desc, unit), 0])
        return contextlib.nullcontext(Bar())

    monkeypatch.setattr(loradem.merge.learn, "progress", fake_progress)
    job = make_job(tmp_path / "learn")
    lines: list[str] = []
    result = learn_weights(job, tiny_base, adapters, TRAIN, VALIDATION, log=lines.append)
    assert bars == [[(6, "learn", "step"), 6]]  # one bar, one step per optimizer step

    # every LoRA module of each adapter has a weight, and they moved away from the start
    assert set(result["module_weights"]["add"]) == {f"model.layers.{i}.{m}" for i in (0, 1)
                                                    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert set(result["module_weights"]["rev"]) == {f"model.layers.{i}.{m}" for i in (0, 1)
                                                    for m in ("self_attn.o_proj", "mlp.up_proj", "self_attn.v_proj")}
    assert result["n_parameters"] == 12
    assert result["objective"] <= result["initial_objective"]
    if result["best_step"] > 0:
        assert any(abs(w - 0.5) > 1e-4 for ws in result["module_weights"].values() for w in ws.values())
    assert [h["step"] for h in result["history"]] == list(range(7))
    assert [h["step"] for h in result["history"] if "val_loss" in h] == [0, 3, 6]
    assert result["learn_tokens"] == sum(len(ids) for batch in _batches_of(job, tiny_base) for ids in batch)

    # the written weights, folded exactly, give the recorded validation loss (the module mapping is right)
    model, tok = load_multi(tiny_base, adapters, fold=True)
    set_weights(model, result["module_weights"])
    losses = {s: mean_loss(model, encode_for_loss(VALIDATION[s], tok, 64)) for s in SOURCES}
    assert sum(losses.values()) / 2 == pytest.approx(result["objective"], rel=1e-5)
    on_disk = json.loads((tmp_path / "learn" / "weights.json").read_text())
    assert on_disk["module_weights"] == result["module_weights"]
    assert (tmp_path / "learn" / "learn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "learn").glob("*.partial*"))

    # the same inputs again: reused, nothing refit
    def refuse(*a, **k):
        raise AssertionError("refit")

    lines.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("loradem.model.soup.load_multi", refuse)
        assert learn_weights(job, tiny_base, adapters, TRAIN, VALIDATION, log=lines.append) == on_disk
    assert lines and lines[0].startswith("learn: reusing")


def _batches_of(job: LearnJob, base: Path) -> list[list[list[int]]]:
    """The token ids of the batches learn_weights steps through (the same seeded sample and order)."""
    from loradem.model.soup import load_tokenizer

    tok = load_tokenizer(base)
    fit = loradem.merge.learn.fit_rows(job, TRAIN)
    encoded = [row for s in SOURCES for row in encode_for_loss(fit[s], tok, job.max_length)]
    return [[ids for ids, _ in batch] for batch in loradem.merge.learn._batches(encoded, job.settings.batch_size, job.settings.steps, job.seed)]


def test_gradient_reaches_every_weight_and_layer_granularity_shares(tiny_base, adapters):
    model, tok = load_multi(tiny_base, adapters)
    params = attach_weights(model, SOURCES, "module", 0.5)
    assert all(not p.requires_grad for p in model.parameters())  # base and LoRA factors frozen
    batch = encode_for_loss(_rows("add", 2) + _rows("rev", 2), tok, 64)
    from loradem.model.generate import collate_right

    ids, mask, labels = collate_right(batch, "cpu")
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) and p.grad != 0 for p in params.values())

    model, _ = load_multi(tiny_base, adapters)
    shared = attach_weights(model, SOURCES, "layer", 0.5)
    assert sorted(shared) == sorted((f"layers.{i}", s) for i in (0, 1) for s in SOURCES)
    with torch.no_grad():
        shared[("layers.1", "add")].mul_(3.0)
    weights = module_weights(model, shared, SOURCES, "layer")
    assert [round(w, 6) for m, w in sorted(weights["add"].items())] == [0.5] * 3 + [1.5] * 3  # layers.0.*, then layers.1.*
    assert [round(w, 6) for w in weights["rev"].values()] == [0.5] * 6


def test_learning_keeps_the_start_when_every_step_is_worse(tiny_base, adapters, tmp_path, monkeypatch):
    """Validation loss decides: a run whose checks all come out worse than step 0 keeps the initial weights."""
    calls = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(loradem.merge.learn, "_val_loss", lambda *a, **k: (next(calls), {s: 0.0 for s in SOURCES}))
    result = learn_weights(make_job(tmp_path / "learn", init=0.7), tiny_base, adapters, TRAIN, VALIDATION, log=lambda s: None)
    assert result["best_step"] == 0 and result["objective"] == 1.0
    assert {round(w, 6) for ws in result["module_weights"].values() for w in ws.values()} == {0.7}


def test_errors_name_what_is_wrong(tiny_base, adapters, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    recipe = {"name": "t", "base": str(tiny_base), "output_dir": str(tmp_path / "run"), "learn": {"enabled": True},
              "sources": [{"name": s, "data": str(data)} for s in SOURCES]}
    with pytest.raises(Exception, match="assemble.weights: 'learned' needs learn.enabled: true"):
        Recipe.model_validate({**recipe, "learn": {"enabled": False}, "assemble": {"weights": "learned"}})
    with pytest.raises(LorademError, match=r"learn/weights.json: no learned weights; run `loradem learn <recipe>`"):
        learned_weights(Recipe.model_validate(recipe))
    job = make_job(tmp_path / "learn")
    with pytest.raises(LorademError, match=r"learn: no adapter for source\(s\) rev"):
        learn_weights(job, tiny_base, {"add": adapters["add"]}, TRAIN, VALIDATION, log=lambda s: None)
    with pytest.raises(LorademError, match="learn: source 'rev': no training rows"):
        learn_weights(job, tiny_base, adapters, {**TRAIN, "rev": []}, VALIDATION, log=lambda s: None)
    with pytest.raises(LorademError, match="learn: source 'rev': no validation rows"):
        learn_weights(job, tiny_base, adapters, TRAIN, {"add": VALIDATION["add"]}, log=lambda s: None)
    assert not (tmp_path / "learn").exists()


@pytest.mark.slow
def test_run_with_learned_weights_assembles_them_exactly(tiny_recipe, tiny_base):
    from loradem.cli import main

    data = yaml.safe_load(tiny_recipe.read_text())
    data["learn"] = {"enabled": True, "steps": 4, "batch_size": 4, "rows_per_source": 8, "eval_every": 2}
    data["assemble"] = {"weights": "learned"}
    tiny_recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_recipe), "--baseline", "mix"]) == 0
    run = Path("runs/tiny")
    report = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows)[-2:] == ["dem", "dem-learned"] and "mix" in rows
    learned = json.loads((run / "learn" / "weights.json").read_text())
    assert rows["dem-learned"]["cost"]["train_tokens"] == rows["dem"]["cost"]["train_tokens"] + learned["learn_tokens"]
    assert rows["dem-learned"]["cost"]["learn_seconds"] == round(learned["learn_seconds"], 1)
    # the cost ratio is taken against the model the run assembled: the learned one
    mix = report["mix"]
    assert mix["dem_row"] == "dem-learned"
    assert mix["cost_ratio_mix_to_dem"]["train_tokens"] == round(rows["mix"]["cost"]["train_tokens"] / rows["dem-learned"]["cost"]["train_tokens"], 4)
    md = (run / "report.md").read_text()
    assert "Learned per-module weights" in md and "Data mixing vs DEM (`dem-learned`, the assembled model)" in md
    assert "`dem-learned` shows each source's mean over its per-module weights" in md and "tiny.yaml --baseline mix\n" in md

    # the model folder holds base + sum over modules of w[source][module] * s * B A, in float64
    adapters = {k: run / v["path"] for k, v in json.loads((run / "adapters.json").read_text()).items()}  # relative to the file
    base, merged = _read_all(tiny_base), _read_all(run / "model")
    expected = {k: v.double() for k, v in base.items()}
    for source, folder in adapters.items():
        cfg = json.loads((folder / "adapter_config.json").read_text())
        factors = _read_all(folder)
        for key in (k for k in factors if ".lora_A." in k):
            a, b = factors[key].double(), factors[key.replace(".lora_A.", ".lora_B.")].double()
            scale = cfg["lora_alpha"] / (a.shape[0] ** 0.5 if cfg.get("use_rslora") else a.shape[0])
            module = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", "")
            expected[module + ".weight"] += learned["module_weights"][source][module] * scale * (b @ a)
    for k, v in merged.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_source_of_importance_zero_is_not_fit_on(tiny_base, adapters, tmp_path):
    job = make_job(tmp_path / "learn", importance={"rev": 0.0})
    result = learn_weights(job, tiny_base, adapters, TRAIN, VALIDATION, log=lambda s: None)
    from loradem.model.soup import load_tokenizer

    fit = loradem.merge.learn.fit_rows(job, TRAIN)
    only_add = encode_for_loss(fit["add"], load_tokenizer(tiny_base), 64)
    batches = loradem.merge.learn._batches(only_add, job.settings.batch_size, job.settings.steps, job.seed)
    assert result["learn_tokens"] == sum(len(ids) for batch in batches for ids, _ in batch)
    assert set(result["per_source"]) == {"add"} and set(result["module_weights"]) == {"add", "rev"}


def test_identity_is_stable(tmp_path):
    """A finished fit is reused when this hash matches: a change of its value refits every run made before it
    (this is the hash the recipe-based learn_weights gave for the same inputs)."""
    for name in ("base", "add", "rev"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
    rows = {
        "add": [{"prompt": f"What is {a} + {b}? Answer: ", "completion": str(a + b)} for a, b in [(123, 456), (42, 7), (19, 3)]],
        "rev.words": [{"messages": [{"role": "user", "content": f"Reverse the word '{w}'."}, {"role": "assistant", "content": w[::-1]}]}
                      for w in ["planet", "hello", "world"]],
    }
    settings = LearnSettings(enabled=True, steps=6, batch_size=4, rows_per_source=2, eval_every=3, learning_rate=0.2)
    job = LearnJob(name="t", settings=settings, importance={"add": 3.0, "rev.words": 1.0}, out_dir=tmp_path / "learn", seed=3,
                   max_length=64, validation_rows=2, eval_batch_size=2)
    fit = loradem.merge.learn.fit_rows(job, rows)
    assert fit == {"add": [rows["add"][0], rows["add"][2]], "rev.words": rows["rev.words"][:2]}
    val = {s: r[:2] for s, r in rows.items()}
    adapters = {"add": tmp_path / "add", "rev.words": tmp_path / "rev"}
    assert loradem.merge.learn._identity(job, tmp_path / "base", adapters, fit, val) == "4dd21e9ab561"
