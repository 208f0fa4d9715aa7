"""The weight search: real objectives, warm starts, known optima, resume, workers and storages, pruning, importances, overhead."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_multi import make_adapter

import loradem.merge.search
import loradem.model.generate
from loradem.errors import LorademError
from loradem.merge.search import SearchJob, search_weights
from loradem.merge.study import Storage, load_recorded_study
from loradem.model.generate import mean_loss
from loradem.model.render import encode_for_loss
from loradem.model.soup import adapter_names, load_multi, set_weights
from loradem.recipe import SearchSettings

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


def make_job(out: Path, *, sources=SOURCES, importance=None, max_new_tokens=None, **search) -> SearchJob:
    """A search of plain settings (no recipe): 2 rows per source, 64 tokens each."""
    return SearchJob(name="t", settings=SearchSettings(**{"max_rows_per_source": 2, "batch_size": 2, **search}),
                     importance={s: (importance or {}).get(s, 1.0) for s in sources}, out_dir=out, seed=0, max_length=64,
                     max_new_tokens=max_new_tokens)


def load_study(result: dict, out: Path):
    """The study a search result names, its storage resolved as recorded, against the result's folder `out`
    (an earlier result's study too, after a later search in that folder rewrote weights.json)."""
    return optuna.load_study(study_name=result["study"]["name"], storage=Storage.recorded(result["study"], out).open())


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


class RecordedBar:
    """Stands in for loradem.progress.progress: records the bar's total and updates."""

    def __init__(self):
        self.bars: list[dict] = []

    def __call__(self, total, desc, *, unit="it"):
        import contextlib

        bar = {"total": total, "desc": desc, "unit": unit, "n": 0}
        self.bars.append(bar)

        class Bar:
            @property
            def n(self):
                return bar["n"]

            def update(self, k=1):
                bar["n"] += k

        return contextlib.nullcontext(Bar())


def test_objective_is_the_real_validation_loss(tiny_base, adapters, tmp_path, monkeypatch):
    """The stage from Python with plain settings and paths: the recorded objective is the real validation loss."""
    import matplotlib
    import matplotlib.pyplot as plt

    out = tmp_path / "run"
    lines: list[str] = []
    bars = RecordedBar()
    monkeypatch.setattr(loradem.merge.search, "progress", bars)
    style = dict(matplotlib.rcParams)
    job = SearchJob(name="t", settings=SearchSettings(n_trials=3, sampler="random", max_rows_per_source=2, batch_size=2),
                    importance={"add": 1.0, "rev.words": 1.0}, out_dir=out, seed=0, max_length=64)
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lines.append)
    assert bars.bars == [{"total": 3, "desc": "search", "unit": "trial", "n": 3}]  # one bar, one step per trial
    assert plt.get_fignums() == [] and dict(matplotlib.rcParams) == style  # Optuna's pyplot plot leaves nothing behind
    trials = complete(load_study(result, out))
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
        assert t.user_attrs["per_source"] == pytest.approx(losses, rel=1e-5)
    assert len({t.value for t in trials}) == 3  # the weights change the loss
    # outputs agree with the study
    best = min(trials, key=lambda t: t.value)
    saved = json.loads((out / "weights.json").read_text())
    assert saved == result
    assert saved["weights"] == best.params and saved["objective"] == best.value and saved["n_trials"] == 3
    assert saved["sampler"] == "random" and saved["study"] == {"name": saved["study"]["name"], "file": "search.db", "format": "sqlite"}
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
    first = search_weights(make_job(out, n_trials=3), tiny_base, adapters, VALIDATION, log=lambda s: None)
    before = [(t.number, t.params, t.value) for t in complete(load_study(first, out))]
    lines: list[str] = []
    second = search_weights(make_job(out, n_trials=6), tiny_base, adapters, VALIDATION, log=lines.append)
    assert second["study"] == first["study"]
    after = complete(load_study(second, out))
    assert len(after) == 6 and len(load_study(second, out).trials) == 6
    assert [(t.number, t.params, t.value) for t in after[:3]] == before
    warm = [{"add": 0.5, "rev.words": 0.5}, {"add": 1.0, "rev.words": 1.0}]
    assert all(t.params not in warm for t in after[2:])  # the warm start is not queued again
    assert "3 trials done, 3 to run" in lines[0]
    assert second["n_trials"] == 6 and len(read_csv(out / "trials.csv")) == 6
    # finished: a re-run reloads nothing and rewrites the same result
    monkeypatch.setattr("loradem.model.soup.load_multi", lambda *a, **k: pytest.fail("reloaded the model"))
    assert search_weights(make_job(out, n_trials=6), tiny_base, adapters, VALIDATION, log=lambda s: None) == second


def test_crash_midway_then_resume(tiny_base, adapters, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}

    def crashing(model, encoded, *, batch_size=16, log=None):
        calls["n"] += 1
        if calls["n"] == 7:  # the 4th trial's first source
            raise RuntimeError("power cut")
        return mean_loss(model, encoded, batch_size=batch_size)

    monkeypatch.setattr(loradem.model.generate, "mean_loss", crashing)
    job = make_job(out, n_trials=5)
    with pytest.raises(RuntimeError, match="power cut"):
        search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    assert not (out / "weights.json").exists() and not (out / "trials.csv").exists()
    monkeypatch.setattr(loradem.model.generate, "mean_loss", mean_loss)
    url = Storage.parse(None, out).target
    study = optuna.load_study(storage=url, study_name=optuna.get_all_study_names(url)[0])
    before = [(t.number, t.params, t.value) for t in complete(study)]
    assert len(before) == 3 and [t.state for t in study.trials].count(TrialState.FAIL) == 1
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    trials = complete(load_study(result, out))
    assert len(trials) == 5 and [(t.number, t.params, t.value) for t in trials[:3]] == before


def test_grid_finds_the_known_optimum_exactly(tiny_base, adapters, tmp_path, monkeypatch):
    target = {"add": 0.5, "rev.words": 1.0}
    monkeypatch.setattr(loradem.model.generate, "mean_loss", quadratic_loss(target))
    job = make_job(tmp_path / "run", n_trials=100, sampler="grid", low=0.0, high=1.5, grid_points=4)
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    assert result["weights"] == target and result["objective"] == pytest.approx(1.0)
    # 2 warm-start points + every one of the 4×4 grid points, then the study stops
    trials = complete(load_study(result, job.out_dir))
    assert result["n_trials"] == len(trials) == 18
    grid = {(a, b) for a in (0.0, 0.5, 1.0, 1.5) for b in (0.0, 0.5, 1.0, 1.5)}
    assert {(t.params["add"], t.params["rev.words"]) for t in trials[2:]} == grid


def test_tpe_finds_the_known_optimum(tiny_base, adapters, tmp_path, monkeypatch):
    target = {"add": 0.3, "rev.words": 1.2}
    monkeypatch.setattr(loradem.model.generate, "mean_loss", quadratic_loss(target))
    job = make_job(tmp_path / "run", n_trials=25, sampler="tpe")
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    assert result["weights"] == pytest.approx(target, abs=0.15)
    assert result["objective"] <= 1.0 + 0.5 ** 2 + 0.2 ** 2  # better than both warm-start points


@pytest.mark.parametrize("sampler, module", [("gp", "scipy"), ("cmaes", "cmaes")])
def test_sampler_dependency(tiny_base, adapters, tmp_path, sampler, module):
    job = make_job(tmp_path / "run", n_trials=3, sampler=sampler)
    if importlib.util.find_spec(module) is not None:
        assert search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)["n_trials"] == 3
        return
    with pytest.raises(LorademError, match=rf"search.sampler: '{sampler}' needs the {module} package; run `pip install {module}`"):
        search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    assert not (tmp_path / "run" / "search.db").exists()


def test_missing_validation_is_refused(tiny_base, adapters, tmp_path):
    job = make_job(tmp_path / "run", n_trials=3)
    with pytest.raises(LorademError, match=r"search: validation: expected one entry per source .*missing: \['rev.words'\]"):
        search_weights(job, tiny_base, adapters, {"add": VALIDATION["add"]}, log=lambda s: None)
    with pytest.raises(LorademError, match=r"search: adapters: expected one entry per source .*not a source: \['other'\]"):
        search_weights(job, tiny_base, {**adapters, "other": adapters["add"]}, VALIDATION, log=lambda s: None)
    with pytest.raises(LorademError, match=r"source 'add': no validation rows"):
        search_weights(job, tiny_base, adapters, {**VALIDATION, "add": []}, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_study_identity_is_stable(tmp_path):
    """The study's name hashes what defines the objective: a change of this value renames every study, so runs made
    before it no longer resume (these hashes are the ones the recipe-based search gave for the same inputs)."""
    from loradem.files import stable_hash
    from loradem.merge.search import study_identity

    for name in ("base", "add", "rev"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
    adapters = {"add": tmp_path / "add", "rev.words": tmp_path / "rev"}
    used = {s: rows[:2] for s, rows in VALIDATION.items()}
    for objective, expect in (("val_loss", "8c7b4712fe76"), ("exact_match", "4c4d6e95ad9e")):
        settings = SearchSettings(max_rows_per_source=2, batch_size=2, n_trials=3, objective=objective)
        job = SearchJob(name="t", settings=settings, importance={"add": 3.0, "rev.words": 1.0}, out_dir=tmp_path / "run",
                        seed=3, max_length=64, max_new_tokens=4)
        assert stable_hash(study_identity(job, tmp_path / "base", adapters, used)) == expect, objective


def test_changed_validation_is_a_new_study(tiny_base, adapters, tmp_path):
    out = tmp_path / "run"
    first = search_weights(make_job(out, n_trials=2), tiny_base, adapters, VALIDATION, log=lambda s: None)
    changed = {**VALIDATION, "add": VALIDATION["add"][::-1]}
    second = search_weights(make_job(out, n_trials=2), tiny_base, adapters, changed, log=lambda s: None)
    assert first["study"]["name"] != second["study"]["name"]
    assert second["n_trials"] == 2 and len(complete(load_study(first, out))) == 2


# ---- objectives ---------------------------------------------------------------------

def test_importance_weights_the_mean(tiny_base, adapters, tmp_path):
    job = make_job(tmp_path / "run", importance={"add": 3.0, "rev.words": 1.0}, n_trials=2, sampler="random")
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    for t in complete(load_study(result, job.out_dir)):
        v = t.user_attrs["per_source"]
        assert t.value == pytest.approx((3 * v["add"] + v["rev.words"]) / 4, rel=1e-12)
    assert result["importance"] == {"add": 3.0, "rev.words": 1.0} and result["objective_name"] == "val_loss"
    # importance 0: the source is not evaluated at all
    job = make_job(tmp_path / "run0", importance={"add": 0.0}, n_trials=2, sampler="random")
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    assert all(set(t.user_attrs["per_source"]) == {"rev.words"} for t in complete(load_study(result, job.out_dir)))
    with pytest.raises(LorademError, match=r"sources\[\]\.importance: expected at least one source with importance > 0"):
        search_weights(make_job(tmp_path / "none", importance={"add": 0.0, "rev.words": 0.0}), tiny_base, adapters,
                       VALIDATION, log=lambda s: None)
    assert not (tmp_path / "none").exists()


def test_exact_match_objective_is_maximized(tiny_base, adapters, tmp_path):
    """References are the model's own greedy answers at the plain sum, so that point scores 1.0 and wins."""
    from loradem.model.generate import exact_match, generate_answers

    model, tok = load_multi(tiny_base, adapters)
    set_weights(model, {"add": 1.0, "rev.words": 1.0})
    prompts = {"add": [r["prompt"] for r in VALIDATION["add"][:2]],
               "rev.words": [r["messages"][:-1] for r in VALIDATION["rev.words"][:2]]}
    own = {s: generate_answers(model, tok, p, max_new_tokens=4, log=None) for s, p in prompts.items()}
    rows = {"add": [{"prompt": p, "completion": a} for p, a in zip(prompts["add"], own["add"])],
            "rev.words": [{"messages": [*m, {"role": "assistant", "content": a}]} for m, a in zip(prompts["rev.words"], own["rev.words"])]}
    job = make_job(tmp_path / "run", importance={"add": 2.0}, max_new_tokens=4, objective="exact_match", n_trials=3, sampler="random")
    result = search_weights(job, tiny_base, adapters, rows, log=lambda s: None)
    trials = complete(load_study(result, job.out_dir))
    assert load_study(result, job.out_dir).direction == optuna.study.StudyDirection.MAXIMIZE
    for t in trials:  # every recorded value is the real greedy exact match, importance-weighted
        set_weights(model, t.params)
        em = {s: exact_match(generate_answers(model, tok, prompts[s], max_new_tokens=4, log=None), own[s]) for s in SOURCES}
        assert t.user_attrs["per_source"] == em
        assert t.value == pytest.approx((2 * em["add"] + em["rev.words"]) / 3)
    assert trials[1].params == {"add": 1.0, "rev.words": 1.0} and trials[1].value == 1.0
    assert result["objective"] == 1.0 and result["direction"] == "maximize" and result["per_source"] == {"add": 1.0, "rev.words": 1.0}
    assert result["best_trial"] == min(t.number for t in trials if t.value == 1.0)
    header = read_csv(tmp_path / "run" / "trials.csv")[0]
    assert "exact_match:add" in header and "exact_match:rev.words" in header


def test_exact_match_needs_prompts(tiny_base, adapters, tmp_path):
    rows = {**VALIDATION, "add": [{"text": "just text"}]}
    job = make_job(tmp_path / "run", objective="exact_match", max_new_tokens=4)
    with pytest.raises(LorademError, match=r"search.objective: exact_match: source 'add': exact match needs a prompt"):
        search_weights(job, tiny_base, adapters, rows, log=lambda s: None)
    with pytest.raises(LorademError, match=r"the exact_match objective needs max_new_tokens"):
        make_job(tmp_path / "run", objective="exact_match")
    assert not (tmp_path / "run").exists()


# ---- search space: layer groups, global scale ---------------------------------------------

def test_layer_groups_and_global_scale(tiny_base, adapters, tmp_path):
    job = make_job(tmp_path / "run", granularity="layer-groups", layer_groups=4, global_scale=True, n_trials=3, sampler="random")
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    trials = complete(load_study(result, job.out_dir))
    # 4 groups asked, the tiny model has 2 blocks: 2 groups per source, plus the shared scale
    assert set(trials[-1].params) == {"add@g0", "add@g1", "rev.words@g0", "rev.words@g1", "@global_scale"}
    assert trials[0].params == {"add@g0": 0.5, "add@g1": 0.5, "rev.words@g0": 0.5, "rev.words@g1": 0.5, "@global_scale": 1.0}
    best = next(t for t in trials if t.number == result["best_trial"])
    g = best.params["@global_scale"]
    expect = {s: [best.params[f"{s}@g0"] * g, best.params[f"{s}@g1"] * g] for s in SOURCES}
    assert result["layer_weights"] == expect and result["layer_groups"] == 2 and result["global_scale"] == g
    assert result["weights"] == {s: pytest.approx(sum(w) / 2) for s, w in expect.items()}
    # the recorded objective is the loss of exactly those per-layer weights
    model, tok = load_multi(tiny_base, adapters)
    set_weights(model, result["layer_weights"])
    losses = {s: mean_loss(model, encode_for_loss(VALIDATION[s][:2], tok, 64)) for s in SOURCES}
    assert result["objective"] == pytest.approx(sum(losses.values()) / 2, rel=1e-5)
    assert "w:add@g1" in read_csv(tmp_path / "run" / "trials.csv")[0]


# ---- warm starts --------------------------------------------------------------------------

def test_warm_start_after_adding_a_source(tiny_base, adapters, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    first = search_weights(make_job(out, sources=["add"], n_trials=3), tiny_base, {"add": adapters["add"]},
                           {"add": VALIDATION["add"]}, log=lines.append)
    assert "search: parameter importances skipped (one parameter)" in lines
    prev = first["weights"]["add"]
    lines.clear()
    second = search_weights(make_job(out, n_trials=7), tiny_base, adapters, VALIDATION, log=lines.append)
    assert second["study"]["name"] != first["study"]["name"] and second["warm_start"] == "weights.json"
    assert any("sources changed" in line for line in lines)
    trials = complete(load_study(second, out))
    assert trials[0].params == {"add": prev, "rev.words": 0.0}  # the previous best, new source off
    expect = [{"add": prev, "rev.words": v} for v in (0.0, 0.25, 0.5, 1.0)]  # then the new source turned up
    expect += [p for p in ({"add": 0.5, "rev.words": 0.5}, {"add": 1.0, "rev.words": 1.0}) if p not in expect]  # uniform, sum
    assert [t.params for t in trials[: len(expect)]] == expect
    # the previous study is untouched
    assert len(complete(load_study(first, out))) == 3


def test_warm_start_from_a_file(tiny_base, adapters, tmp_path):
    prev = tmp_path / "elsewhere" / "weights.json"
    prev.parent.mkdir()
    prev.write_text(json.dumps({"weights": {"add": 0.9, "gone": 1.0}, "layer_weights": {"add": [0.8, 1.0]}}))
    job = make_job(tmp_path / "run", n_trials=2, warm_start=str(prev), sampler="random")
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    trials = complete(load_study(result, job.out_dir))
    assert trials[0].params == {"add": pytest.approx(0.9), "rev.words": 0.0}  # source granularity: the groups' mean
    assert result["warm_start"] == "../elsewhere/weights.json"  # relative to weights.json's folder
    job = make_job(tmp_path / "run2", n_trials=2, warm_start=str(prev), granularity="layer-groups", layer_groups=2)
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    assert complete(load_study(result, job.out_dir))[0].params == {"add@g0": 0.8, "add@g1": 1.0, "rev.words@g0": 0.0, "rev.words@g1": 0.0}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"search.warm_start: .*missing.json: not found"),
        ("{not json", r"missing.json: line 1: not valid JSON"),
        ('{"weights": {"add": "high"}}', r"missing.json: weights.add: expected a finite number"),
        ('{"weights": {"add": 1}, "layer_weights": {"add": []}}', r"layer_weights.add: expected a non-empty list"),
    ],
)
def test_bad_warm_start_is_refused(tiny_base, adapters, tmp_path, content, message):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LorademError, match=message):
        search_weights(make_job(tmp_path / "run", warm_start=str(path)), tiny_base, adapters, VALIDATION, log=lambda s: None)
    assert not (tmp_path / "run").exists()


# ---- storage, workers, other machines -------------------------------------------------------

def test_journal_storage_shared_by_two_machines(tiny_base, adapters, tmp_path):
    """Another machine (another run folder) on the same journal file tops the same study up to its n_trials."""
    journal = tmp_path / "common" / "study.log"
    a = search_weights(make_job(tmp_path / "a", n_trials=3, storage="sqlite:///ignored.db"), tiny_base, adapters,
                       VALIDATION, storage=str(journal), log=lambda s: None)
    assert journal.is_file() and not (tmp_path / "a" / "search.db").exists() and not Path("ignored.db").exists()
    assert a["study"] == {"name": a["study"]["name"], "file": "../common/study.log", "format": "journal"}  # beside the run
    lines: list[str] = []
    b = search_weights(make_job(tmp_path / "b", n_trials=5, storage=str(journal)), tiny_base, adapters,
                       VALIDATION, log=lines.append)
    assert b["study"] == a["study"] and "3 trials done, 2 to run" in lines[0]
    study = optuna.load_study(study_name=a["study"]["name"],
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))))
    assert len(complete(study)) == len(study.trials) == 5 and b["n_trials"] == 5


def test_a_moved_run_still_opens_its_study(tiny_base, adapters, tmp_path):
    """weights.json names a study file inside its run folder relative to itself, so load_recorded_study opens it
    after the folder moved (SQLite and a journal); a storage outside the run is recorded as given, password hidden."""
    runs = tmp_path / "runs"
    sqlite = search_weights(make_job(runs / "a" / "search", n_trials=2), tiny_base, adapters, VALIDATION, log=lambda s: None)
    journal = search_weights(make_job(runs / "b" / "search", n_trials=2), tiny_base, adapters, VALIDATION,
                             storage=f"journal:{runs / 'b' / 'study.journal'}", log=lambda s: None)
    assert sqlite["study"] == {"name": sqlite["study"]["name"], "file": "search.db", "format": "sqlite"}
    assert journal["study"] == {"name": journal["study"]["name"], "file": "../study.journal", "format": "journal"}
    before = {r: [(t.number, t.params, t.value) for t in complete(load_recorded_study(runs / r / "search" / "weights.json"))]
              for r in ("a", "b")}
    moved = tmp_path / "moved"
    runs.rename(moved)
    for r in ("a", "b"):
        study = load_recorded_study(moved / r / "search" / "weights.json")
        assert [(t.number, t.params, t.value) for t in complete(study)] == before[r] and len(before[r]) == 2
    # Optuna's own loader, given the file
    plain = optuna.load_study(study_name=sqlite["study"]["name"], storage=f"sqlite:///{moved / 'a' / 'search' / 'search.db'}")
    assert [t.params for t in complete(plain)] == [p for _, p, _ in before["a"]]
    (moved / "a" / "search" / "search.db").unlink()
    with pytest.raises(LorademError, match=rf"^{moved / 'a' / 'search' / 'weights.json'}: study: "
                                           rf"{moved / 'a' / 'search' / 'search.db'} not found"):
        load_recorded_study(moved / "a" / "search" / "weights.json")
    assert not (moved / "a" / "search" / "search.db").exists()  # not created empty

    outside = f"sqlite:///{tmp_path / 'common.db'}"
    shared = search_weights(make_job(moved / "c" / "search", n_trials=2), tiny_base, adapters, VALIDATION,
                            storage=outside, log=lambda s: None)
    assert shared["study"] == {"name": shared["study"]["name"], "storage": outside}
    assert len(complete(load_recorded_study(moved / "c" / "search" / "weights.json"))) == 2
    server = Storage.parse("postgresql://user:secret@db.example/loradem", tmp_path)
    assert server.record(tmp_path) == {"storage": "postgresql://user:***@db.example/loradem"}


def test_bad_storage_is_refused(tiny_base, adapters, tmp_path):
    job = make_job(tmp_path / "run")
    with pytest.raises(LorademError, match=r"--storage: expected an RDB URL .* or a journal file path ending in .log, got 'study.db'"):
        search_weights(job, tiny_base, adapters, VALIDATION, storage="study.db", log=lambda s: None)
    assert not (tmp_path / "run").exists()
    with pytest.raises(LorademError, match=r"search.storage: cannot open postgresql://user:\*\*\*@db.invalid/x: ") as err:
        search_weights(job, tiny_base, adapters, VALIDATION, storage="postgresql://user:secret@db.invalid/x", log=lambda s: None)
    assert "secret" not in str(err.value)
    with pytest.raises(LorademError, match=r"--workers: expected a whole number >= 1, got 0"):
        search_weights(job, tiny_base, adapters, VALIDATION, workers=0, log=lambda s: None)


def test_cli_search_flags():
    from loradem.cli import build_parser

    args = build_parser().parse_args(["search", "r.yaml", "--storage", "postgresql://u@h/db", "--workers", "3"])
    assert (args.storage, args.workers) == ("postgresql://u@h/db", 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "r.yaml", "--workers", "0"])


def _pop_all(url: str, queue) -> None:
    study = optuna.load_study(study_name="q", storage=Storage("rdb", url).open())
    popped = []
    while (trial_id := study._pop_waiting_trial_id()) is not None:
        popped.append(trial_id)
    queue.put(popped)


def test_processes_popping_one_sqlite_queue_never_take_the_same_trial(tmp_path):
    """Optuna's pop (SELECT FOR UPDATE, then set RUNNING) is not atomic on plain SQLite: without BEGIN IMMEDIATE,
    4 processes popping 80 queued trials took ~90-98 (the same trial twice). Each queued trial must go to one process."""
    import multiprocessing as mp

    url = f"sqlite:///{tmp_path / 'q.db'}"
    study = optuna.create_study(study_name="q", storage=Storage("rdb", url).open())
    for i in range(60):
        study.enqueue_trial({"x": float(i)})
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pop_all, args=(url, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    popped = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    everything = sorted(sum(popped, []))
    assert everything == sorted(t._trial_id for t in study.get_trials()) and len(everything) == 60


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study(tiny_base, adapters, tmp_path, monkeypatch):
    import os

    lines: list[str] = []
    bars = RecordedBar()
    monkeypatch.setattr(loradem.merge.search, "progress", bars)
    result = search_weights(make_job(tmp_path / "run", n_trials=6), tiny_base, adapters, VALIDATION, workers=2, log=lines.append)
    study = load_study(result, tmp_path / "run")
    trials = complete(study)
    numbers = [t.number for t in study.trials]
    assert len(trials) == len(study.trials) == 6 and sorted(numbers) == list(range(6))  # n_trials in total, no duplicates
    pids = [t.user_attrs["pid"] for t in trials]
    assert len(set(pids)) == 2 and os.getpid() not in pids and sorted(pids.count(p) for p in set(pids)) == [3, 3]
    assert sorted({t.user_attrs["worker"] for t in trials}) == [0, 1]
    assert {"add": 0.5, "rev.words": 0.5} in [t.params for t in trials] and {"add": 1.0, "rev.words": 1.0} in [t.params for t in trials]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # the workers did not evaluate the same point twice
    assert result["n_trials"] == 6 and result["processes"] == 2
    assert bars.bars == [{"total": 6, "desc": "search", "unit": "trial", "n": 6}]  # the parent's bar polled the study
    assert any(line.startswith("[worker 0] trial ") for line in lines) and any(line.startswith("[worker 1] trial ") for line in lines)
    # the values are real: the same losses a single process computes
    model, tok = load_multi(tiny_base, adapters)
    t = trials[-1]
    set_weights(model, t.params)
    assert t.value == pytest.approx(sum(mean_loss(model, encode_for_loss(VALIDATION[s][:2], tok, 64)) for s in SOURCES) / 2, rel=1e-5)


# ---- pruning and importances --------------------------------------------------------------

def per_source_quadratic(tok, targets: dict[str, float], scale: dict[str, float]):
    """mean_loss stand-in: the source is recognized by its rows' first token; loss = 1 + scale·(w - target)²."""
    first = {encode_for_loss(VALIDATION[s][:1], tok, 64)[0][0][0]: s for s in SOURCES}
    calls: list[str] = []

    def fake(model, encoded, *, batch_size=16, log=None):
        s = first[encoded[0][0][0]]
        calls.append(s)
        return 1.0 + scale[s] * (scale_weights(model)[s] - targets[s]) ** 2

    return fake, calls


def test_pruning_stops_hopeless_trials(tiny_base, adapters, tmp_path, monkeypatch):
    from loradem.model.soup import load_tokenizer

    fake, calls = per_source_quadratic(load_tokenizer(tiny_base), {"add": 0.3, "rev.words": 1.0}, {"add": 5.0, "rev.words": 0.1})
    monkeypatch.setattr(loradem.model.generate, "mean_loss", fake)
    job = make_job(tmp_path / "run", n_trials=16, sampler="random", pruning=True)
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    study = load_study(result, job.out_dir)
    done, pruned = complete(study), sorted(study.get_trials(states=(TrialState.PRUNED,)), key=lambda t: t.number)
    assert pruned and len(done) + len(pruned) == len(study.trials) == 16
    assert len(calls) == 2 * len(done) + len(pruned)  # a pruned trial evaluated its first source only
    for t in pruned:
        # MedianPruner: after 5 completed trials, a step-0 value worse than the median of earlier completed trials' step 0
        earlier = sorted(c.intermediate_values[0] for c in done if c.number < t.number)
        assert len(earlier) >= 5 and t.intermediate_values[0] > (earlier[(len(earlier) - 1) // 2] + earlier[len(earlier) // 2]) / 2
        assert list(t.intermediate_values) == [0] and set(t.user_attrs["per_source"]) == {"add"}
    assert result["best_trial"] in {t.number for t in done} and result["n_pruned"] == len(pruned) and result["n_trials"] == len(done)
    rows = read_csv(tmp_path / "run" / "trials.csv")
    assert [r["state"] for r in rows].count("PRUNED") == len(pruned)
    assert (tmp_path / "run" / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["val_loss:rev.words"] == "" for r in rows if r["state"] == "PRUNED")


def test_importances(tiny_base, adapters, tmp_path, monkeypatch):
    from loradem.model.soup import load_tokenizer

    fake, _ = per_source_quadratic(load_tokenizer(tiny_base), {"add": 0.3, "rev.words": 1.0}, {"add": 5.0, "rev.words": 0.0})
    monkeypatch.setattr(loradem.model.generate, "mean_loss", fake)
    job = make_job(tmp_path / "run", n_trials=20, sampler="random")
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    imp = result["importances"]
    expect = optuna.importance.get_param_importances(
        load_study(result, job.out_dir), evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=SOURCES)
    assert imp["values"] == pytest.approx(expect) and imp["n_trials"] == 20 and imp["evaluator"] == "PedAnovaImportanceEvaluator"
    assert sum(imp["values"].values()) == pytest.approx(1.0)
    assert imp["values"]["add"] > imp["values"]["rev.words"]  # only add's weight changes the objective
    assert (tmp_path / "run" / "importances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # too few trials: no importances, and no stale plot left behind
    small = search_weights(make_job(tmp_path / "run", n_trials=3, sampler="random", high=1.4), tiny_base, adapters,
                           VALIDATION, log=lambda s: None)
    assert small["importances"] is None and not (tmp_path / "run" / "importances.png").exists()


# ---- overhead -------------------------------------------------------------------------

@pytest.mark.slow
def test_overhead_measurement_prints(tiny_base, tmp_path, capsys):
    """bench_search on the tiny model: both trial kinds run, agree on the loss, and the table prints (no timing asserted)."""
    import importlib.util as iu

    spec = iu.spec_from_file_location("bench_search", Path(__file__).parents[1] / "benchmarks" / "bench_search.py")
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--base", str(tiny_base), "--trials", "2", "--rows", "3", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "loradem (fold, the search)" in out and "loradem (LoRA scales)" in out and "naive (load + cat merge)" in out
    assert "naive / loradem (fold) trial time" in out
    for kind in ("loradem", "scales", "naive"):
        r = result[kind]
        assert len(r["trials"]) == 2 and 0 <= r["non_eval_fraction"] <= 1
        assert all(t["trial_seconds"] == pytest.approx(t["setup_seconds"] + t["eval_seconds"]) for t in r["trials"])
    assert result["ratio"] > 0 and result["rows"] == {"random0": 3, "random1": 3, "random2": 3}
    assert result["max_rel_loss_diff"] < 1e-4  # the naive (cat) merge and the LoRA scales compute the same model
    assert result["loradem"]["trials"][0]["losses"] != result["loradem"]["trials"][1]["losses"]  # the weights matter
    for fold, scales in zip(result["loradem"]["trials"], result["scales"]["trials"]):
        assert fold["losses"] == pytest.approx(scales["losses"], rel=1e-5)


def test_worker_failures_reach_the_parent():
    """run_workers with tiny picklable jobs: success, a child's LorademError as is, anything else as RuntimeError."""
    from loradem.merge.study import run_workers

    run_workers(Storage.parse, ["a.log", "b.log"], lambda s: None)  # Storage.parse(job, log) returns: done
    with pytest.raises(LorademError, match=r"search.storage: expected an RDB URL .*got 'bad'"):
        run_workers(Storage.parse, ["ok.log", "bad"], lambda s: None)
    with pytest.raises(RuntimeError, match=r"search: worker process \d+ failed: TypeError: .*re-run to resume"):
        run_workers(divmod, [1], lambda s: None)
