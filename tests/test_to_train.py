"""`loradem check` says what a run would still train, by the keys training uses: the warm-up, each adapter set
(the recipe's and each variant's), the mix once its adapters exist; and it follows what training leaves behind."""

from __future__ import annotations

import shutil

import pytest
import yaml

from loradem import pipeline
from loradem.recipe import load_recipe
from loradem.to_train import training_status
from test_pipeline import _rows


@pytest.fixture
def warmed_recipe(tmp_path, tiny_base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORADEM_CACHE", str(tmp_path / "cache"))  # the warmed base is folded here
    (tmp_path / "data").mkdir()
    for task in ("addition", "sort"):
        (tmp_path / "data" / f"{task}.jsonl").write_text(_rows(task, 30))
    recipe = {
        "name": "tiny", "base": str(tiny_base), "lora": {"r": 2, "alpha": 4},
        "train": {"max_steps": 2, "batch_size": 4, "eval_steps": 2, "max_length": 64},
        "sources": [{"name": "addition", "data": "data/addition.jsonl", "validation": 4, "test": 4},
                    {"name": "sort", "data": "data/sort.jsonl", "validation": 4, "test": 4}],
        "warmup": {"enabled": True, "steps": 2, "rows_per_source": 4},
        "variants": [{"name": "cold", "warmup": {"enabled": False}}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def status(path) -> list[str]:
    recipe = load_recipe(path)
    return training_status(recipe, pipeline._splits(recipe), baseline="mix")


@pytest.mark.slow
def test_check_follows_what_training_leaves_behind(warmed_recipe, capsys):
    assert status(warmed_recipe) == [
        "recipe: warm-up to train; adapters 0 of 2 trained (to train: addition, sort)",
        "variant 'cold': adapters 0 of 2 trained (to train: addition, sort)",
        "mix: to train, after the recipe's adapters (its token budget is theirs)"]
    pipeline.train(warmed_recipe, only=["addition"])
    assert status(warmed_recipe)[:2] == [
        "recipe: warm-up trained; adapters 1 of 2 trained (to train: sort)",
        "variant 'cold': adapters 1 of 2 trained (to train: sort)"]
    pipeline.train(warmed_recipe)
    assert status(warmed_recipe) == ["recipe: warm-up trained; adapters 2 of 2 trained",
                                     "variant 'cold': adapters 2 of 2 trained", "mix: 1 of 1 to train"]
    pipeline.train(warmed_recipe, baseline="mix")
    assert status(warmed_recipe)[2] == "mix: trained"
    # the check prints the same lines
    capsys.readouterr()
    pipeline.check(warmed_recipe, baseline="mix")
    assert "recipe: warm-up trained; adapters 2 of 2 trained\n" in capsys.readouterr().out
    # a warmed base that left the cache: its adapters' keys are unknown until the run folds it again
    shutil.rmtree(next((warmed_recipe.parent / "cache" / "bases").glob("warm-*")))
    assert status(warmed_recipe)[0] == ("recipe: warm-up trained, not folded (the run folds it again; its adapters are "
                                        "looked up then)")


def test_a_base_not_on_this_machine_yet_is_said_in_one_line(warmed_recipe):
    text = warmed_recipe.read_text().replace("base: ", "base: someorg/some-model  # ", 1)  # a hub id, never fetched
    warmed_recipe.write_text(text)
    assert status(warmed_recipe) == ["trained so far: nothing known yet (the base 'someorg/some-model' is fetched or "
                                     "converted by the first run)"]
