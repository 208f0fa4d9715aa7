"""Recipe variants: a second adapter set compared in the same run and report (`variants:`)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import _read_all, _rows

from loradem.cli import main
from loradem.errors import LorademError
from loradem.recipe import load_recipe


def _write(tmp_path: Path, variants, **extra) -> Path:
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    (tmp_path / "anchors.jsonl").write_text('{"prompt": "Hi", "completion": "Hello"}\n')
    raw = {"base": "smollm2-135m", "sources": [{"name": "a", "data": "a.jsonl"}], "train": {"learning_rate": 1e-3},
           "variants": variants, **extra}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_variant_overrides_field_by_field(tmp_path):
    recipe = load_recipe(_write(tmp_path, [
        {"name": "anchored", "anchor": {"enabled": True, "data": "anchors.jsonl"}},
        {"name": "slow", "train": {"max_steps": 7}, "search": {"warm_start": "w.json"}, "description": "fewer steps"},
    ]))
    anchored, slow = recipe.variant("anchored"), recipe.variant("slow")
    assert anchored.anchor.enabled and anchored.anchor.fraction == 0.25  # the rest of the block is the recipe's
    assert anchored.anchor.data == str((tmp_path / "anchors.jsonl").resolve())  # relative to the recipe
    assert anchored.out_dir == Path("runs/r/variants/anchored")
    assert anchored.variants == [] and anchored.adapters_dir == recipe.adapters_dir
    assert anchored.sources == recipe.sources and anchored.train == recipe.train
    assert (slow.train.max_steps, slow.train.learning_rate) == (7, 1e-3)
    assert slow.search.warm_start == "w.json" and not slow.anchor.enabled
    assert recipe.variants[1].overrides() == {"train": {"max_steps": 7}, "search": {"warm_start": "w.json"}}
    assert not recipe.anchor.enabled and recipe.search.warm_start is None  # the recipe itself is untouched
    with pytest.raises(LorademError, match=r"no variant named 'x' \(have: anchored, slow\)"):
        recipe.variant("x")


@pytest.mark.parametrize("variants, extra, expected", [
    ([{"name": "v"}], {}, r"r\.yaml: variants\[0\] \(v\): overrides nothing; expected at least one of lora, train"),
    ([{"name": "v", "lora": {"r": 2}}, {"name": "v", "train": {"max_steps": 3}}], {},
     r"r\.yaml: variants\[1\]\.name: expected unique variant names, 'v' appears twice"),
    ([{"name": "v", "learn": {"enabled": False}}], {"learn": {"enabled": True}, "assemble": {"weights": "learned"}},
     r"r\.yaml: variants\[0\] \(v\): assemble\.weights: 'learned' needs learn\.enabled: true"),
    ([{"name": "v", "anchor": {"fraction": 2}}], {}, r"r\.yaml: variants\[0\]\.anchor\.fraction: .*less than 1"),
    ([{"name": "v", "anchor": {"data": "none.jsonl"}}], {}, r"r\.yaml: variants\[0\]\.anchor: expected 'builtin' or an existing"),
    ([{"name": "v", "trian": {}}], {}, r"r\.yaml: variants\[0\]\.trian: unknown key; expected one of: name, description, lora"),
    ([{"name": "a/b", "lora": {"r": 2}}], {}, r"r\.yaml: variants\[0\]\.name: expected a safe folder name"),
])
def test_bad_variants_fail_with_one_line(tmp_path, variants, extra, expected):
    with pytest.raises(LorademError, match=expected) as err:
        load_recipe(_write(tmp_path, variants, **extra))
    assert "\n" not in str(err.value)


# ---- end to end on the tiny model ----------------------------------------------------

def _merged_state(base_dir: Path, adapters: dict[str, Path], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """base + sum_i w_i * s_i * B_i A_i in float64, from the safetensors files alone (no loradem, no PEFT)."""
    state = {k: v.double() for k, v in _read_all(base_dir).items()}
    for source, folder in adapters.items():
        cfg = json.loads((folder / "adapter_config.json").read_text())
        factors = _read_all(folder)
        for key, a in factors.items():
            if ".lora_A." not in key:
                continue
            b = factors[key.replace(".lora_A.", ".lora_B.")].double()
            scale = cfg["lora_alpha"] / (a.shape[0] ** 0.5 if cfg.get("use_rslora") else a.shape[0])
            state[key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")] += weights[source] * scale * (b @ a.double())
    return {k: v.float() for k, v in state.items()}


@pytest.mark.slow
def test_run_with_a_variant_reports_both_adapter_sets(tmp_path, tiny_base, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for task in ("addition", "sort"):
        (tmp_path / "data" / f"{task}.jsonl").write_text(_rows(task, 40))
    recipe = {
        "name": "tiny", "base": str(tiny_base),
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "max_length": 64, "learning_rate": 5e-3},
        "sources": [{"name": "addition", "data": "data/addition.jsonl", "validation": 6, "test": 6},
                    {"name": "sort", "data": "data/sort.jsonl", "validation": 6, "test": 6}],
        "search": {"n_trials": 3, "max_rows_per_source": 6, "batch_size": 6},
        "eval": {"max_new_tokens": 4, "batch_size": 6},
        "variants": [{"name": "r2", "lora": {"r": 2}, "train": {"learning_rate": 2e-2}, "description": "rank 2",
                      "learn": {"enabled": True, "steps": 2, "rows_per_source": 4, "batch_size": 4, "eval_every": 1}}],
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", "tiny.yaml"]) == 0

    run, variant = Path("runs/tiny"), Path("runs/tiny/variants/r2")
    report = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["base", "adapter:addition", "adapter:sort", "uniform", "sum", "dem",
                          "r2:adapter:addition", "r2:adapter:sort", "r2:uniform", "r2:sum", "r2:dem", "r2:dem-learned"]

    # the variant trained its own adapters, with its overrides, next to the recipe's
    main_adapters = {k: (run / v["path"]).resolve() for k, v in json.loads((run / "adapters.json").read_text()).items()}
    var_adapters = {k: (variant / v["path"]).resolve() for k, v in json.loads((variant / "adapters.json").read_text()).items()}
    for source in ("addition", "sort"):
        assert main_adapters[source] != var_adapters[source]
        assert json.loads((main_adapters[source] / "adapter_config.json").read_text())["r"] == 4
        assert json.loads((var_adapters[source] / "adapter_config.json").read_text())["r"] == 2
        record = json.loads((var_adapters[source] / "loradem-train.json").read_text())
        assert rows[f"r2:adapter:{source}"]["cost"]["train_tokens"] == record["train_tokens"]
    assert {"search", "learn"} <= {p.name for p in variant.iterdir()} and not (variant / "model").exists()
    assert (variant / "vectors.json").is_file() and (variant / "recipe.json").is_file()

    # its rows use its own searched and learned weights, and its costs count its own adapters, search and learning
    searched = json.loads((variant / "search" / "weights.json").read_text())
    learned = json.loads((variant / "learn" / "weights.json").read_text())
    assert rows["r2:dem"]["weights"] == pytest.approx(searched["weights"])
    tokens = sum(rows[f"r2:adapter:{s}"]["cost"]["train_tokens"] for s in ("addition", "sort"))
    assert rows["r2:sum"]["cost"]["train_tokens"] == tokens
    assert rows["r2:dem"]["cost"]["search_seconds"] == pytest.approx(searched["search_seconds"], abs=0.05)
    assert rows["r2:dem-learned"]["cost"]["train_tokens"] == tokens + learned["learn_tokens"]
    assert report["variants"]["r2"]["overrides"] == {"lora": {"r": 2}, "train": {"learning_rate": 2e-2},
                                                     "learn": {"enabled": True, "steps": 2, "rows_per_source": 4,
                                                               "batch_size": 4, "eval_every": 1}}
    md = (run / "report.md").read_text()
    assert "`r2:dem-learned`" in md and "Variant `r2` (rows `r2:...`; lora: r=2" in md

    # the variant's dem row answers exactly like a plain HF model holding base + its weighted deltas (float64 fold)
    from transformers import AutoModelForCausalLM

    from loradem.data.rows import load_splits
    from loradem.model.generate import evaluate_source
    from loradem.model.soup import load_tokenizer

    loaded = load_recipe("tiny.yaml")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.load_state_dict(_merged_state(tiny_base, var_adapters, searched["weights"]))
    model.eval()
    tokenizer = load_tokenizer(tiny_base)
    for source in loaded.sources:
        test_rows = load_splits(source, loaded.seed).test
        expected = evaluate_source(model, tokenizer, test_rows, "exact_match", loaded.eval, 64, log=lambda m: None)
        assert report["predictions"]["r2:dem"][source.name] == expected["predictions"], source.name

    # `loradem eval` alone rebuilds the same report from what the run left
    before = {r["name"]: r["per_source"] for r in report["rows"]}
    assert main(["eval", "tiny.yaml"]) == 0
    after = {r["name"]: r["per_source"] for r in json.loads((run / "report.json").read_text())["rows"]}
    assert after == before


    # a variant added after the run: `loradem eval` names it and what to run, and leaves the report as it was
    recipe["variants"].append({"name": "r3", "lora": {"r": 3}})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    report_before = (run / "report.json").read_bytes()
    capsys.readouterr()
    assert main(["eval", "tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert "variant 'r3': recipe 'tiny': no finished adapter for source(s) addition, sort; run `loradem train <recipe>` first" in err, err
    assert (run / "report.json").read_bytes() == report_before


def test_report_summary_names_each_variant_and_its_increment():
    from loradem.evaluate.report import summary_lines

    cost = {"train_tokens": 1234, "train_seconds": 5.0, "search_seconds": 2.0, "total_seconds": 7.0}
    extra = {"variants": {"anchored": {
        "description": "with anchors", "overrides": {"anchor": {"enabled": True, "fraction": 0.25}},
        "out_dir": "runs/x/variants/anchored", "search": {"n_trials": 4, "objective": 1.5, "search_seconds": 2.0},
        "learn": {"learn_tokens": 900, "initial_objective": 2.0, "objective": 1.25},
        "increment": {"previous": "old/weights.json", "new_sources": ["c"], "dem_cost": cost, "mix_retrain_cost": cost,
                      "relearned": True},
        "vectors": {"norms": {"a": 1.0, "b": 2.0}, "cosine": {"a": {"a": 1.0, "b": 0.125}, "b": {"a": 0.125, "b": 1.0}}},
    }}}
    lines = summary_lines([], extra)
    assert lines == [
        "- Variant `anchored` (rows `anchored:...`; anchor: enabled=True, fraction=0.25): with anchors. Its own adapters, "
        "a 4-trial search (objective 1.5, 2.0 s) and learned weights (900 tokens, validation loss 2 -> 1.25); "
        "outputs in `runs/x/variants/anchored/`; its rows are scored on in-memory exact folds.",
        "  - Adding c under DEM: 1,234 training tokens and 7.0 s (the new adapter(s) + a search warm-started from "
        "old/weights.json + relearning the per-module weights); retraining the mixing baseline on all sources: 1,234 tokens, 7.0 s.",
        "  - Delta norms: a 1.000, b 2.000.",
        "  - Cosine similarity of deltas: a/b +0.125.",
    ]
