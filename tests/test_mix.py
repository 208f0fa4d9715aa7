"""loradem.train.mix: the data-mixing baseline at equal training tokens, its row stream, its cache and its report row.

The stage takes a `MixJob`; the tests build it from a recipe through `pipeline.mix_job`.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import yaml
from transformers import TrainerControl, TrainerState

from loradem import pipeline
from loradem.data.demo import task_rows
from loradem.data.rows import load_splits
from loradem.errors import LorademError
from loradem.recipe import LoraSettings, MixSettings, Recipe, TrainSettings
from loradem.train.callbacks import TokenBudget
from loradem.train.mix import MixJob, find_mix, mix_shares, mix_stream, plan_mix, take_steps, train_mix
from loradem.train.sft import is_finished, train_all


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_recipe(tmp_path: Path, base: Path, sources: list[dict], mix: dict | None = None, **train) -> Recipe:
    return Recipe.model_validate({
        "name": "m",
        "base": str(base),
        "adapters_dir": str(tmp_path / "adapters"),
        "train": {"max_steps": 2, "eval_steps": 1, "batch_size": 4, "max_length": 64, **train},
        "sources": sources,
        **({"mix": mix} if mix else {}),
    })


def task_source(tmp_path: Path, task: str, rows: int, **kw) -> dict:
    data = write_jsonl(tmp_path / f"{task}.jsonl", task_rows(task, rows=rows))
    return {"name": task, "data": data, "validation": 2, "test": 2, **kw}


def mix_job(recipe: Recipe) -> MixJob:
    return pipeline.mix_job(recipe, pipeline._splits(recipe))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the stream, the cut, the shares (no training) --------------------------------

def test_every_prefix_of_the_stream_holds_the_shares_within_one_row():
    for case in range(200):
        rng = random.Random(case)
        raw = [rng.uniform(0.01, 1.0) for _ in range(rng.randint(2, 6))]
        shares = {f"s{i}": v / sum(raw) for i, v in enumerate(raw)}
        rows = {n: list(range(rng.randint(1, 9))) for n in shares}
        stream, count = mix_stream(shares, rows, seed=case), dict.fromkeys(shares, 0)
        for k in range(1, 301):
            name, _ = next(stream)
            count[name] += 1
            assert all(abs(count[n] - shares[n] * k) < 1 for n in shares), (case, k, count)


def test_the_stream_cycles_each_source_through_seeded_shuffled_passes():
    rows = {"a": list(range(5)), "b": list(range(3))}
    items = [next(s) for s in [mix_stream({"a": 0.5, "b": 0.5}, rows, seed=7)] for _ in range(30)]
    assert items == [next(s) for s in [mix_stream({"a": 0.5, "b": 0.5}, rows, seed=7)] for _ in range(30)]
    a = [i for n, i in items if n == "a"]
    b = [i for n, i in items if n == "b"]
    assert [n for n, _ in items[:4]] == ["a", "b", "a", "b"]
    assert all(sorted(a[k:k + 5]) == rows["a"] for k in range(0, 15, 5))  # every pass is a permutation
    assert all(sorted(b[k:k + 3]) == rows["b"] for k in range(0, 15, 3))
    assert len({tuple(a[k:k + 5]) for k in range(0, 15, 5)}) > 1  # reshuffled between passes
    other = [next(s) for s in [mix_stream({"a": 0.5, "b": 0.5}, rows, seed=8)] for _ in range(30)]
    assert other != items
    with pytest.raises(LorademError, match=r"mix: source 'b' has no training rows left to mix"):
        next(mix_stream({"a": 0.5, "b": 0.5}, {"a": [0], "b": []}, seed=0))


def test_the_cut_is_the_first_whole_step_that_reaches_the_target():
    lengths = [10, 20, 30, 40, 50, 60, 70, 80]
    assert take_steps(iter(lengths), lambda x: x, target=60, per_step=2) == [10, 20, 30, 40]  # 30 < 60 <= 100
    assert take_steps(iter(lengths), lambda x: x, target=30, per_step=2) == [10, 20]  # exactly reached
    assert take_steps(iter(lengths), lambda x: x, target=31, per_step=3) == [10, 20, 30]
    assert take_steps(iter(lengths), lambda x: x, target=61, per_step=3) == [10, 20, 30, 40, 50, 60]


def test_token_budget_stops_at_the_first_step_that_reaches_it_and_evaluates_it():
    budget, state = TokenBudget(100), TrainerState()
    control = TrainerControl()
    state.global_step = 3
    budget.on_log(None, state, control, logs={"loss": 1.0, "num_tokens": 99.0})
    assert not control.should_training_stop and budget.reached_at is None
    budget.on_log(None, state, control, logs={"eval_loss": 1.0, "eval_num_tokens": 150.0})  # not a training log
    assert not control.should_training_stop
    state.global_step = 4
    budget.on_log(None, state, control, logs={"loss": 1.0, "num_tokens": 100.0})
    assert (control.should_training_stop, control.should_evaluate, control.should_save) == (True, True, True)
    assert budget.reached_at == 4


def test_shares_default_to_training_rows_and_proportions_are_all_or_none(tmp_path, tiny_base):
    a, s = task_source(tmp_path, "addition", 14), task_source(tmp_path, "sort", 24)
    r = make_recipe(tmp_path, tiny_base, [a, s])
    assert mix_shares(mix_job(r)) == pytest.approx({"addition": 10 / 30, "sort": 20 / 30})
    r = make_recipe(tmp_path, tiny_base, [{**a, "mix_proportion": 3}, {**s, "mix_proportion": 1}])
    assert mix_shares(mix_job(r)) == pytest.approx({"addition": 0.75, "sort": 0.25})
    r = make_recipe(tmp_path, tiny_base, [{**a, "mix_proportion": 3}, s])
    with pytest.raises(LorademError, match=r"mix_proportion: set for addition but not for sort; set it for every source or for none"):
        mix_shares(mix_job(r))


def test_a_mix_job_built_by_hand_plans_like_the_recipes(tmp_path, tiny_base):
    r = make_recipe(tmp_path, tiny_base, [task_source(tmp_path, "addition", 14, mix_proportion=2.0),
                                          task_source(tmp_path, "sort", 14, mix_proportion=1.0)], mix={"tokens": 700})
    splits = {s.name: load_splits(s, 0) for s in r.sources}
    job = MixJob(splits=splits, proportions={"addition": 2.0, "sort": 1.0}, train=r.train, lora=LoraSettings(),
                 mix=MixSettings(tokens=700), seed=0, adapters_dir=str(tmp_path / "adapters"), base_name="unused")
    plan = plan_mix(job, tiny_base, {})
    assert plan == plan_mix(mix_job(r), tiny_base, {})
    assert plan.shares == pytest.approx({"addition": 2 / 3, "sort": 1 / 3}) and plan.target_tokens == 700
    other = MixJob(**{**job.__dict__, "train": TrainSettings(**{**r.train.model_dump(), "max_steps": 50})})
    assert plan_mix(other, tiny_base, {}).folder == plan.folder  # the budget, not max_steps, ends the mix
    other = MixJob(**{**job.__dict__, "seed": 1})
    assert plan_mix(other, tiny_base, {}).folder != plan.folder


def test_plan_refuses_what_it_cannot_mix(tmp_path, tiny_base):
    a = task_source(tmp_path, "addition", 14)
    text = {"name": "txt", "validation": 2, "test": 0,
            "data": write_jsonl(tmp_path / "txt.jsonl", [{"text": f"{i} before {i + 1}"} for i in range(10)])}
    r = make_recipe(tmp_path, tiny_base, [a, text], mix={"tokens": 1000})
    with pytest.raises(LorademError, match=r"mix: the sources' rows have different formats \(addition: messages, txt: text\)"):
        plan_mix(mix_job(r), tiny_base, {})
    r = make_recipe(tmp_path, tiny_base, [a, task_source(tmp_path, "sort", 14)])
    with pytest.raises(LorademError, match=r"tokens: match needs every source's finished adapter .*; none for addition, sort"):
        plan_mix(mix_job(r), tiny_base, {})
    empty = tmp_path / "no-record"
    empty.mkdir()
    with pytest.raises(LorademError, match=r"source 'addition'.*no-record has no train_tokens in loradem-train.json or vector.json"):
        plan_mix(mix_job(r), tiny_base, {"addition": empty, "sort": empty})
    assert find_mix(mix_job(r), tiny_base, {}) is None  # the report just has no mix row
    assert pipeline.find_mix(r, tiny_base, {}, pipeline._splits(r)) is None
    fixed = r.model_copy(update={"mix": MixSettings(tokens=500)})
    plan = plan_mix(mix_job(fixed), tiny_base, {})  # a number needs no per-source adapter
    assert (plan.target_tokens, plan.source_tokens, plan.folder.parent) == (500, None, tmp_path / "adapters")
    assert plan.folder.name == f"mix-{plan.key}"


# ---- training ---------------------------------------------------------------------

@pytest.mark.slow
def test_mix_trains_on_the_per_source_token_budget_with_the_shares_and_is_cached(tmp_path, tiny_base, capsys):
    sources = [task_source(tmp_path, "addition", 24, mix_proportion=3.0),
               task_source(tmp_path, "sort", 24, mix_proportion=1.0, train={"max_steps": 2, "learning_rate": 5e-3})]
    r = make_recipe(tmp_path, tiny_base, sources, max_steps=1, eval_steps=2)
    adapters = train_all(pipeline.train_jobs(r, pipeline._splits(r)), tiny_base, log=lambda _: None)
    per_source = {n: json.loads((f / "loradem-train.json").read_text())["train_tokens"] for n, f in adapters.items()}
    target = sum(per_source.values())

    log: list[str] = []
    capsys.readouterr()
    folder = train_mix(mix_job(r), tiny_base, adapters, log=log.append)
    assert "train mix" in capsys.readouterr().err  # its progress bar, like every source's
    assert is_finished(folder) and folder.name.startswith("mix-") and folder.parent == tmp_path / "adapters"
    rec = json.loads((folder / "loradem-train.json").read_text())
    assert (rec["source"], rec["target_tokens"], rec["source_tokens"]) == ("mix", target, per_source)

    # equal compute: TRL's own token count is the planned one, and the last step is the first to reach the target
    fed = rec["rows_fed"]
    batch = 4
    assert sum(fed.values()) == rec["steps"] * batch and rec["max_steps"] == rec["steps"]
    assert rec["train_tokens"] == rec["planned_tokens"] >= target
    assert rec["train_tokens"] - target < 64 * batch  # within one batch (max_length 64 tokens a row)
    assert rec["target_reached_at_step"] == rec["steps"]
    assert [h["step"] for h in rec["history"] if "train_loss" in h] == list(range(1, rec["steps"] + 1))
    # the shares hold: addition 3/4, sort 1/4 of the rows fed, within one row
    total = sum(fed.values())
    assert abs(fed["addition"] - 0.75 * total) < 1 and abs(fed["sort"] - 0.25 * total) < 1
    assert rec["train"]["max_steps"] == rec["steps"]  # the budget's steps, not the recipe's 2
    card = json.loads((folder / "vector.json").read_text())
    assert card["source"] == "mix" and card["metrics"]["train_tokens"] == rec["train_tokens"]
    assert card["data"]["rows"] == {"train": 40, "validation": 4, "test": 4}
    assert card["adapter_sha256"] == sha(folder / "adapter_model.safetensors")
    assert log[0].startswith(f"mix: budget {target:,} training tokens (the per-source adapters' sum)")

    # cached: a second run reuses it; find_mix sees it; a different budget is another adapter
    log.clear()
    before = sha(folder / "adapter_model.safetensors")
    assert train_mix(mix_job(r), tiny_base, adapters, log=log.append) == folder
    assert log == [f"mix: skipped (finished adapter {folder})"]
    assert sha(folder / "adapter_model.safetensors") == before
    assert find_mix(mix_job(r), tiny_base, adapters) == folder
    assert pipeline.find_mix(r, tiny_base, adapters, pipeline._splits(r)) == folder
    other = make_recipe(tmp_path, tiny_base, sources, mix={"tokens": target + 1}, max_steps=1, eval_steps=2)
    assert plan_mix(mix_job(other), tiny_base, adapters).folder != folder
    assert find_mix(mix_job(other), tiny_base, adapters) is None


@pytest.mark.slow
def test_run_with_the_mix_baseline_reports_a_mix_row_and_the_cost_ratio(tmp_path, tiny_base, monkeypatch, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loradem.cli import main
    from loradem.model.generate import evaluate_source

    monkeypatch.chdir(tmp_path)
    recipe = {
        "name": "tiny",
        "base": str(tiny_base),
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 1, "batch_size": 4, "eval_steps": 2, "max_length": 64, "learning_rate": 5e-3},
        "sources": [task_source(tmp_path, "addition", 24, metric="loss"), task_source(tmp_path, "sort", 24)],
        "search": {"n_trials": 2, "max_rows_per_source": 2, "batch_size": 2},
        "eval": {"max_new_tokens": 4, "batch_size": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--baseline", "mix"]) == 0
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["base", "adapter:addition", "adapter:sort", "mix", "uniform", "sum", "dem"]
    rows = {r["name"]: r for r in report["rows"]}
    assert report["mix"]["adapter"].startswith("../../adapters/mix-")  # relative to report.json
    mix_dir = Path("adapters") / Path(report["mix"]["adapter"]).name
    rec = json.loads((mix_dir / "loradem-train.json").read_text())
    assert rows["mix"]["cost"]["train_tokens"] == rec["train_tokens"]
    assert rows["mix"]["cost"]["search_seconds"] == 0
    dem = rows["dem"]["cost"]
    assert rec["target_tokens"] == dem["train_tokens"]  # equal compute: the per-source adapters' sum
    ratio = report["mix"]["cost_ratio_mix_to_dem"]
    assert ratio["train_tokens"] == pytest.approx(rec["train_tokens"] / dem["train_tokens"], abs=1e-4)
    assert ratio["seconds"] == pytest.approx(rows["mix"]["cost"]["total_seconds"] / dem["total_seconds"], abs=1e-4)
    assert "`mix`" in (tmp_path / "runs" / "tiny" / "report.md").read_text()

    # the row's numbers are the mix adapter's own: evaluate it here through PEFT and compare
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(mix_dir)).eval()
    r = Recipe.model_validate(recipe)
    for s in r.sources:
        with torch.no_grad():
            res = evaluate_source(model, tok, load_splits(s, r.seed).test, s.metric, r.eval, r.train.max_length,
                                  log=lambda _: None)
        assert rows["mix"]["per_source"][s.name] == pytest.approx(res["value"], rel=1e-6)
    assert rows["mix"]["per_source"]["addition"] != rows["base"]["per_source"]["addition"]  # the adapter is applied

    # `loradem train --baseline mix` again: everything is reused
    capsys.readouterr()
    assert main(["train", str(path), "--baseline", "mix"]) == 0
    out = capsys.readouterr().out
    assert f"mix: skipped (finished adapter {mix_dir})" in out and "trained ->" not in out

    # a recipe with mix.enabled reaches the mix stage without --baseline (and without it, does not)
    assert main(["train", str(path)]) == 0
    assert "mix:" not in capsys.readouterr().out
    path.write_text(yaml.safe_dump({**recipe, "mix": {"enabled": True}}))
    assert main(["train", str(path)]) == 0
    assert f"mix: skipped (finished adapter {mix_dir})" in capsys.readouterr().out
