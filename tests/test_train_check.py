"""`loradem check` refuses what `loradem train` would refuse on the data and settings, through the train stage's
own checks (`sft.check_jobs`, `mix.check_mix`), without loading the base or the ML libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loradem import pipeline
from loradem.data.demo import task_rows
from loradem.errors import LorademError


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chat_source(tmp_path: Path, name: str = "addition", **kw) -> dict:
    return {"name": name, "data": write_jsonl(tmp_path / f"{name}.jsonl", task_rows("addition", rows=12)),
            "validation": 2, "test": 2, **kw}


def pc_source(tmp_path: Path, name: str = "pc", **kw) -> dict:
    rows = [{"prompt": f"{i} + 1 =", "completion": str(i + 1)} for i in range(12)]
    return {"name": name, "data": write_jsonl(tmp_path / f"{name}.jsonl", rows), "validation": 2, "test": 2, **kw}


def recipe_file(tmp_path: Path, sources: list[dict], **blocks) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"name": "c", "base": str(tmp_path), "adapters_dir": str(tmp_path / "adapters"),
                                "sources": sources, **blocks}))  # JSON is YAML; check never loads the base
    return path


def test_a_trainable_recipe_passes(tmp_path, capsys):
    pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path), chat_source(tmp_path, "other")], anchor={"enabled": True}),
                   baseline="mix")
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok") and "note:" not in out
    assert "data-mixing baseline: one adapter on every source's rows, as many training tokens as the adapters together" in out
    pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path), chat_source(tmp_path, "other")], mix={"tokens": 5000}))
    out = capsys.readouterr().out
    assert "data-mixing baseline" not in out  # neither asked for nor enabled
    pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path), chat_source(tmp_path, "other")],
                               mix={"enabled": True, "tokens": 5000}))
    assert "data-mixing baseline: one adapter on every source's rows, 5,000 training tokens;" in capsys.readouterr().out


def test_a_source_without_validation_rows(tmp_path):
    with pytest.raises(LorademError, match=r"source 'addition': no validation rows; the best checkpoint is chosen on them"):
        pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path, validation=0)]))


def test_a_source_with_a_ready_vector_needs_no_validation_rows(tmp_path, capsys):
    ready = tmp_path / "ready"
    ready.mkdir()
    pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path, validation=0, vector=str(ready)), chat_source(tmp_path, "b")]))
    assert capsys.readouterr().out.rstrip().endswith("ok")


def test_anchored_training_on_rows_that_are_not_chat_turns(tmp_path):
    with pytest.raises(LorademError, match=r"source 'pc': anchored training needs messages rows .*'prompt_completion' rows"):
        pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path), pc_source(tmp_path)], anchor={"enabled": True}))


def test_a_variant_that_anchors_rows_that_are_not_chat_turns(tmp_path):
    path = recipe_file(tmp_path, [chat_source(tmp_path), pc_source(tmp_path)],
                       variants=[{"name": "anchored", "anchor": {"enabled": True}}])
    with pytest.raises(LorademError, match=r"variant 'anchored': source 'pc': anchored training needs messages rows"):
        pipeline.check(path)


def test_an_anchor_file_without_prompts(tmp_path):
    text = write_jsonl(tmp_path / "generic.jsonl", [{"text": "plain"}])
    with pytest.raises(LorademError, match=r"generic.jsonl: expected messages or prompt/completion rows .*got 'text' rows"):
        pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path)], anchor={"enabled": True, "data": text}))


def test_more_builtin_anchor_prompts_than_the_templates_give(tmp_path):
    with pytest.raises(LorademError, match=r"anchor.prompts: the builtin templates give only \d+ distinct prompts, not 15000"):
        pipeline.check(recipe_file(tmp_path, [chat_source(tmp_path)], anchor={"enabled": True, "prompts": 15000}))


def test_the_mix_baseline_of_sources_in_different_formats(tmp_path, capsys):
    path = recipe_file(tmp_path, [chat_source(tmp_path), pc_source(tmp_path)])
    with pytest.raises(LorademError, match=r"mix: the sources' rows have different formats \(addition: messages, pc: prompt_completion\)"):
        pipeline.check(path, baseline="mix")
    pipeline.check(path)  # per-source training is fine: only the mix is refused, as a note
    out = capsys.readouterr().out
    assert "note: `--baseline mix` would be refused: mix: the sources' rows have different formats" in out
    assert out.rstrip().endswith("ok")


def test_a_recipe_that_enables_the_mix_is_checked_as_with_baseline_mix(tmp_path, capsys):
    path = recipe_file(tmp_path, [chat_source(tmp_path), pc_source(tmp_path)], mix={"enabled": True})
    with pytest.raises(LorademError, match=r"mix: the sources' rows have different formats \(addition: messages, pc: prompt_completion\)"):
        pipeline.check(path)
    assert "note:" not in capsys.readouterr().out


def test_the_mix_baseline_with_proportions_for_some_sources_only(tmp_path):
    path = recipe_file(tmp_path, [chat_source(tmp_path, mix_proportion=2.0), chat_source(tmp_path, "other")])
    with pytest.raises(LorademError, match=r"mix: sources\[\].mix_proportion: set for addition but not for other"):
        pipeline.check(path, baseline="mix")


def test_the_mix_baseline_without_any_validation_rows(tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    path = recipe_file(tmp_path, [chat_source(tmp_path, validation=0, vector=str(ready)),
                                  chat_source(tmp_path, "other", validation=0, vector=str(ready))])
    with pytest.raises(LorademError, match=r"mix: no source has validation rows"):
        pipeline.check(path, baseline="mix")


def test_check_loads_none_of_the_ml_libraries(tmp_path):
    path = recipe_file(tmp_path, [chat_source(tmp_path)], anchor={"enabled": True})
    code = ("import sys; from loradem import pipeline; pipeline.check(sys.argv[1], baseline='mix'); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_check_says_which_adapters_and_merges_a_run_makes(tmp_path, capsys):
    sources = [chat_source(tmp_path), chat_source(tmp_path, "other")]
    pipeline.check(recipe_file(tmp_path, sources))
    out = capsys.readouterr().out
    assert "merges: uniform, sum, dem (searched: 12 tpe trials, weights in [0, 1.5]); " in out
    assert "/model folds dem\n" in out
    assert "LoRI" not in out and "anchored adapters" not in out
    pipeline.check(recipe_file(tmp_path, sources, lora={"subspace": "lori", "density": 0.2},
                               anchor={"enabled": True, "fraction": 0.1, "loss": "kl"},
                               learn={"enabled": True, "steps": 7}, regmean={"enabled": True, "alpha": [0.5, 0.9]},
                               assemble={"weights": "regmean"}, search={"n_trials": 3, "sampler": "random", "high": 2.0}))
    out = capsys.readouterr().out
    assert "LoRI-style adapters for addition, other: A frozen and shared, 20% of each B trained under the source's own mask" in out
    assert "anchored adapters: 10% of each source's rows are anchor prompts (builtin, loss kl)" in out
    assert ("merges: uniform, sum, dem (searched: 3 random trials, weights in [0, 2]), dem-learned (per-module weights, "
            "7 steps), dem-regmean (base activations, alpha 0.5/0.9); ") in out
    assert "/model folds dem-regmean\n" in out
