"""The weight search on a NaN or Inf score: the trial fails (recorded, logged, not counted) on every storage, and a
search whose every trial fails stops with one line and writes nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file
from test_multi import make_adapter
from test_search import VALIDATION, adapters, load_study, make_job, read_csv  # noqa: F401 - adapters is a fixture

import loradem.model.generate
from loradem.errors import LorademError
from loradem.merge.search import search_weights
from loradem.merge.study import Storage
from loradem.model.generate import mean_loss

STORAGES = [None, "journal"]  # the default SQLite file, and a journal file


def storage_spec(kind, tmp_path: Path):
    return None if kind is None else f"journal:{tmp_path / 'study.log'}"


def scoring(bad: dict[int, float]):
    """mean_loss, except that call n (from 1, two per trial: 'add' then 'rev.words') returns bad[n]; records the calls."""
    calls: list[int] = []

    def fake(model, encoded, *, batch_size=16, log=None):
        calls.append(len(calls) + 1)
        if calls[-1] in bad:
            return bad[calls[-1]]
        return mean_loss(model, encoded, batch_size=batch_size)

    return fake, calls


def states(study) -> list[str]:
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_score_fails_the_trial(tiny_base, adapters, tmp_path, monkeypatch, storage, value):  # noqa: F811
    fake, calls = scoring({3: value})  # trial 1's first source
    monkeypatch.setattr(loradem.model.generate, "mean_loss", fake)
    out = tmp_path / "run"
    lines: list[str] = []
    result = search_weights(make_job(out, n_trials=4, storage=storage_spec(storage, tmp_path)), tiny_base, adapters,
                            VALIDATION, log=lines.append)
    study = load_study(result, out)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    failed = study.trials[1]
    assert failed.user_attrs["non_finite"] == {"source": "add", "value": repr(value)} and failed.params == {"add": 1.0, "rev.words": 1.0}
    assert len(calls) == 7  # the failed trial's second source was never evaluated
    assert f"trial 1: add=1.000 rev.words=1.000 failed: source 'add' scored {value!r} (a non-finite score; the trial does not count)" in lines
    assert result["n_trials"] == 3 and result["best_trial"] != 1 and math.isfinite(result["objective"])
    assert [r["number"] for r in read_csv(out / "trials.csv")] == ["0", "2", "3"]
    assert lines[-1].startswith("search: best val_loss") and "(3 complete, 0 pruned, 1 failed on a non-finite score)" in lines[-1]


def test_a_nan_partial_mean_fails_rather_than_prunes(tiny_base, adapters, tmp_path, monkeypatch):  # noqa: F811
    """A pruner takes a NaN intermediate value for a reason to prune (and a pruned trial then has no value): the NaN
    is caught before it is reported."""
    fake, _ = scoring({13: math.nan})  # trial 6's first source, once the pruner has its 5 completed trials
    monkeypatch.setattr(loradem.model.generate, "mean_loss", fake)
    job = make_job(tmp_path / "run", n_trials=8, sampler="random", pruning=True)
    result = search_weights(job, tiny_base, adapters, VALIDATION, log=lambda s: None)
    study = load_study(result, job.out_dir)
    trial = study.trials[6]
    assert trial.state == TrialState.FAIL and trial.intermediate_values == {} and trial.user_attrs["non_finite"]["source"] == "add"
    assert states(study).count("FAIL") == 1 and result["n_trials"] + result["n_pruned"] == 7


@pytest.fixture
def nan_adapter(tiny_base, tmp_path) -> Path:
    """A real adapter with one NaN in a lora_B factor (PEFT loads it without a word)."""
    folder = make_adapter(tiny_base, tmp_path / "nan-adapter", seed=13, r=4, targets=["q_proj"])
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][0, 0] = torch.nan
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("storage", STORAGES)
def test_every_trial_failing_stops_the_stage_and_writes_nothing(tiny_base, adapters, nan_adapter, tmp_path, storage):  # noqa: F811
    out = tmp_path / "run"
    lines: list[str] = []
    with pytest.raises(LorademError) as err:
        search_weights(make_job(out, n_trials=3, storage=storage_spec(storage, tmp_path)), tiny_base,
                       {"add": nan_adapter, "rev.words": adapters["rev.words"]}, VALIDATION, log=lines.append)
    message = str(err.value)
    assert "\n" not in message and message.startswith("search: study 't-") and message.endswith(
        "has no completed trial: 3 trials failed on a non-finite score (NaN or Inf), the last, trial 2 "
        "(add=0.823 rev.words=1.073), when source 'add' scored nan; look for NaN or Inf in the adapters' or the base's "
        "weights, or search a narrower weight range")
    assert [line.split(" failed: ")[1] for line in lines if " failed: " in line] == \
        ["source 'add' scored nan (a non-finite score; the trial does not count)"] * 3
    assert sorted(p.name for p in out.iterdir()) == (["search.db"] if storage is None else [])  # no weights.json, csv or plot


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://"])
def test_an_in_memory_study_is_refused(tmp_path, url):
    """Workers and later runs open the storage afresh: an in-memory database would be another, empty one each time."""
    with pytest.raises(LorademError, match=rf"^--storage: '{url}' is an in-memory SQLite database, which worker processes "
                                           r"and later runs cannot open; give a file \(sqlite:///path/search.db\) or a journal file \(.log\)$"):
        Storage.parse(url, tmp_path, field="--storage")
