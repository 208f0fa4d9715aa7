"""The weight search: a real objective, warm start, known optima, resume after an interruption, outputs."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import loradem.evaluate
import loradem.search
from loradem.errors import LorademError
from loradem.evaluate import encode_for_loss, mean_loss
from loradem.multi import adapter_names, load_multi, set_weights
from loradem.recipe import Recipe
from loradem.search import search_weights
from test_multi import make_adapter

SOURCES = ["add", "rev.words"]
VALIDATION = {
    "add": [{"prompt": f"What is {a} + {b}? Answer: ", "completion": str(a + b)} for a, b in [(123, 456), (42, 7), (19, 3)]],
    "rev.words": [{"messages": [{"role": "user", "content": f"Reverse the word '{w}'."},
                                {"role": "assistant", "content": w[::-1]}]} for w in ["planet", "hello", "world"]],
}


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search-adapters")
    return {
        "add": make_adapter(tiny_base, root / "add", seed=11, r=4, targets=["q_proj", "v_proj"]),
        "rev.words": make_adapter(tiny_base, root / "rev", seed=12, r=8, targets=["o_proj", "up_proj"], use_rslora=True),
    }


def make_recipe(tmp_path: Path, base: Path, **search) -> Recipe:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    return Recipe.model_validate({
        "name": "t", "base": str(base), "seed": 0, "train": {"max_length": 64},
        "sources": [{"name": s, "data": str(data)} for s in SOURCES],
        "search": {"max_rows_per_source": 2, "batch_size": 2, **search},
    })


def load_study(result: dict):
    return optuna.load_study(storage=result["study"]["storage"], study_name=result["study"]["name"])


def complete(study) -> list:
    return sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scale_weights(model) -> dict[str, float]:
    """Read each source's weight back from the model's LoRA layers (scaling / (α/r or α/√r))."""
    out = {}
    for source, name in adapter_names(model).items():
        layer = next(l for l in model.loradem_lora_layers if name in l.scaling)
        unit = layer.lora_alpha[name] / (layer.r[name] ** 0.5 if layer.use_rslora[name] else layer.r[name])
        out[source] = layer.scaling[name] / unit
    return out


def quadratic_loss(target: dict[str, float]):
    """A stand-in for mean_loss with a known optimum, driven by the weights set on the model."""
    def fake(model, encoded, *, batch_size=16, log=None):
        w = scale_weights(model)
        return 1.0 + sum((w[s] - target[s]) ** 2 for s in target)
    return fake


def test_objective_is_the_real_validation_loss(tiny_base, adapters, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    result = search_weights(make_recipe(tmp_path, tiny_base, n_trials=3, sampler="random"), tiny_base, adapters,
                            VALIDATION, out, log=lines.append)
    trials = complete(load_study(result))
    assert len(trials) == 3
    # warm start: uniform, then the plain sum
    assert trials[0].params == {"add": 0.5, "rev.words": 0.5}
    assert trials[1].params == {"add": 1.0, "rev.words": 1.0}
    # the recorded objective is the mean of per-source losses on the first max_rows_per_source rows
    model, tok = load_multi(tiny_base, adapters)
    for t in trials:
        set_weights(model, t.params)
        losses = {s: mean_loss(model, encode_for_loss(VALIDATION[s][:2], tok, 64)) for s in SOURCES}
        assert t.value == pytest.approx(sum(losses.values()) / 2, rel=1e-5)
        assert t.user_attrs["losses"] == pytest.approx(losses, rel=1e-5)
    assert len({t.value for t in trials}) == 3  # the weights change the loss
    # outputs agree with the study
    best = min(trials, key=lambda t: t.value)
    saved = json.loads((out / "weights.json").read_text())
    assert saved == result
    assert saved["weights"] == best.params and saved["objective"] == best.value and saved["n_trials"] == 3
    assert saved["sampler"] == "random" and saved["study"]["storage"] == f"sqlite:///{(out / 'search.db').resolve()}"
    durations = [t.duration.total_seconds() for t in trials]
    assert saved["search_seconds"] == pytest.approx(sum(durations))
    assert 0 < saved["eval_fraction"] <= 1
    rows = read_csv(out / "trials.csv")
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    for r, t in zip(rows, trials):
        assert float(r["w:add"]) == t.params["add"] and float(r["w:rev.words"]) == t.params["rev.words"]
        assert float(r["objective"]) == t.value
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(line.startswith("trial ") for line in lines) == 3


def test_resume_continues_the_study(tiny_base, adapters, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = search_weights(make_recipe(tmp_path, tiny_base, n_trials=3), tiny_base, adapters, VALIDATION, out, log=lambda s: None)
    before = [(t.number, t.params, t.value) for t in complete(load_study(first))]
    lines: list[str] = []
    second = search_weights(make_recipe(tmp_path, tiny_base, n_trials=6), tiny_base, adapters, VALIDATION, out, log=lines.append)
    assert second["study"] == first["study"]
    after = complete(load_study(second))
    assert len(after) == 6 and len(load_study(second).trials) == 6
    assert [(t.number, t.params, t.value) for t in after[:3]] == before
    warm = [{"add": 0.5, "rev.words": 0.5}, {"add": 1.0, "rev.words": 1.0}]
    assert all(t.params not in warm for t in after[2:])  # the warm start is not queued again
    assert "3 trials done, 3 to run" in lines[0]
    assert second["n_trials"] == 6 and len(read_csv(out / "trials.csv")) == 6
    # finished: a re-run reloads nothing and rewrites the same result
    monkeypatch.setattr("loradem.multi.load_multi", lambda *a, **k: pytest.fail("reloaded the model"))
    assert search_weights(make_recipe(tmp_path, tiny_base, n_trials=6), tiny_base, adapters, VALIDATION, out, log=lambda s: None) == second


def test_crash_midway_then_resume(tiny_base, adapters, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}

    def crashing(model, encoded, *, batch_size=16, log=None):
        calls["n"] += 1
        if calls["n"] == 7:  # the 4th trial's first source
            raise RuntimeError("power cut")
        return mean_loss(model, encoded, batch_size=batch_size)

    monkeypatch.setattr(loradem.evaluate, "mean_loss", crashing)
    recipe = make_recipe(tmp_path, tiny_base, n_trials=5)
    with pytest.raises(RuntimeError, match="power cut"):
        search_weights(recipe, tiny_base, adapters, VALIDATION, out, log=lambda s: None)
    assert not (out / "weights.json").exists() and not (out / "trials.csv").exists()
    monkeypatch.setattr(loradem.evaluate, "mean_loss", mean_loss)
    study = optuna.load_study(storage=loradem.search.storage_url(out), study_name=optuna.get_all_study_names(
        loradem.search.storage_url(out))[0])
    before = [(t.number, t.params, t.value) for t in complete(study)]
    assert len(before) == 3 and [t.state for t in study.trials].count(TrialState.FAIL) == 1
    result = search_weights(recipe, tiny_base, adapters, VALIDATION, out, log=lambda s: None)
    trials = complete(load_study(result))
    assert len(trials) == 5 and [(t.number, t.params, t.value) for t in trials[:3]] == before


def test_grid_finds_the_known_optimum_exactly(tiny_base, adapters, tmp_path, monkeypatch):
    target = {"add": 0.5, "rev.words": 1.0}
    monkeypatch.setattr(loradem.evaluate, "mean_loss", quadratic_loss(target))
    recipe = make_recipe(tmp_path, tiny_base, n_trials=100, sampler="grid", low=0.0, high=1.5, grid_points=4)
    result = search_weights(recipe, tiny_base, adapters, VALIDATION, tmp_path / "run", log=lambda s: None)
    assert result["weights"] == target and result["objective"] == pytest.approx(1.0)
    # 2 warm-start points + every one of the 4×4 grid points, then the study stops
    trials = complete(load_study(result))
    assert result["n_trials"] == len(trials) == 18
    grid = {(a, b) for a in (0.0, 0.5, 1.0, 1.5) for b in (0.0, 0.5, 1.0, 1.5)}
    assert {(t.params["add"], t.params["rev.words"]) for t in trials[2:]} == grid


def test_tpe_finds_the_known_optimum(tiny_base, adapters, tmp_path, monkeypatch):
    target = {"add": 0.3, "rev.words": 1.2}
    monkeypatch.setattr(loradem.evaluate, "mean_loss", quadratic_loss(target))
    recipe = make_recipe(tmp_path, tiny_base, n_trials=25, sampler="tpe")
    result = search_weights(recipe, tiny_base, adapters, VALIDATION, tmp_path / "run", log=lambda s: None)
    assert result["weights"] == pytest.approx(target, abs=0.15)
    assert result["objective"] <= 1.0 + 0.5 ** 2 + 0.2 ** 2  # better than both warm-start points


@pytest.mark.parametrize("sampler, module", [("gp", "scipy"), ("cmaes", "cmaes")])
def test_sampler_dependency(tiny_base, adapters, tmp_path, sampler, module):
    recipe = make_recipe(tmp_path, tiny_base, n_trials=3, sampler=sampler)
    if importlib.util.find_spec(module) is not None:
        assert search_weights(recipe, tiny_base, adapters, VALIDATION, tmp_path / "run", log=lambda s: None)["n_trials"] == 3
        return
    with pytest.raises(LorademError, match=rf"search.sampler: '{sampler}' needs the {module} package; run `pip install {module}`"):
        search_weights(recipe, tiny_base, adapters, VALIDATION, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run" / "search.db").exists()


def test_missing_validation_is_refused(tiny_base, adapters, tmp_path):
    recipe = make_recipe(tmp_path, tiny_base, n_trials=3)
    with pytest.raises(LorademError, match=r"search: validation: expected one entry per recipe source .*missing: \['rev.words'\]"):
        search_weights(recipe, tiny_base, adapters, {"add": VALIDATION["add"]}, tmp_path / "run", log=lambda s: None)
    with pytest.raises(LorademError, match=r"source 'add': no validation rows"):
        search_weights(recipe, tiny_base, adapters, {**VALIDATION, "add": []}, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_changed_validation_is_a_new_study(tiny_base, adapters, tmp_path):
    out = tmp_path / "run"
    first = search_weights(make_recipe(tmp_path, tiny_base, n_trials=2), tiny_base, adapters, VALIDATION, out, log=lambda s: None)
    changed = {**VALIDATION, "add": VALIDATION["add"][::-1]}
    second = search_weights(make_recipe(tmp_path, tiny_base, n_trials=2), tiny_base, adapters, changed, out, log=lambda s: None)
    assert first["study"]["name"] != second["study"]["name"]
    assert second["n_trials"] == 2 and len(complete(load_study(first))) == 2
