"""loradem.vectors.card: vector cards are checked against the base and the weights; ready vectors import once, or not at all.

    pytest tests/test_card.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_lora import copy_adapter, edit_tensors, make_adapter

from loradem.errors import LorademError
from loradem.files import fingerprint_weights, sha256_file
from loradem.vectors.card import check_card, format_card, import_vector, read_card


def quiet(*_args) -> None:
    pass


def with_card(folder: Path, base: Path, source: str = "sort", **changes) -> Path:
    """Give an adapter folder the vector.json card train.py writes (the contract in loradem.vectors.card)."""
    card = {
        "loradem_vector": 1,
        "source": source,
        "base": {"name": "tiny", "fingerprint": fingerprint_weights(base)},
        "data": {"fingerprint": "d" * 64, "rows": {"train": 28, "validation": 6, "test": 6}, "format": "messages"},
        "train": {"learning_rate": 0.005, "max_steps": 4, "quantization": "none"},
        "lora": {"r": 2, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "use_rslora": False},
        "metrics": {"best_val_loss": 1.25, "best_step": 4, "steps": 4, "train_tokens": 512},
        "adapter_sha256": sha256_file(folder / "adapter_model.safetensors"),
        "loradem_version": "0.1.0",
        **changes,
    }
    (folder / "vector.json").write_text(json.dumps(card))
    return folder


@pytest.fixture
def shared(tiny_base, tmp_path) -> Path:
    folder = make_adapter(tiny_base, tmp_path / "incoming" / "sort-vector", seed=7, r=2, target_modules=["q_proj", "v_proj"])
    (folder / "README.md").write_text("peft's card, not copied")
    return with_card(folder, tiny_base)


# ---- reading and checking ------------------------------------------------------

def test_read_card_and_format(shared):
    card = read_card(shared)
    assert card["source"] == "sort" and card["metrics"]["best_step"] == 4
    text = format_card(card)
    assert text.startswith("card: source 'sort', base tiny (weights ") and "best_val_loss=1.25" in text
    assert "rows train 28 / validation 6 / test 6" in text


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("adapter_sha256"), r"vector\.json: adapter_sha256: required field is missing"),
        (lambda c: c.update(loradem_vector=2), r"vector\.json: loradem_vector: expected 1, got 2"),
        (lambda c: c.update(adapter_sha256="abc"), r"vector\.json: adapter_sha256: expected 64 hex digits, got 'abc'"),
        (lambda c: c.update(base="tiny"), r"vector\.json: base: expected an object, got 'tiny'"),
        (lambda c: c["base"].update(fingerprint=12), r"vector\.json: base\.fingerprint: expected a string or null, got 12"),
        (lambda c: c.update(source="../evil"), r"vector\.json: source: expected a safe folder name, got '\.\./evil'"),
        (lambda c: c.update(metrics=[1, 2]), r"vector\.json: metrics: expected an object or null, got list"),
    ],
)
def test_malformed_cards_refused(shared, edit, message):
    card = json.loads((shared / "vector.json").read_text())
    edit(card)
    (shared / "vector.json").write_text(json.dumps(card))
    with pytest.raises(LorademError, match=message):
        read_card(shared)


def test_missing_and_invalid_json_card(shared):
    (shared / "vector.json").write_text("{not json")
    with pytest.raises(LorademError, match=r"vector\.json: line 1: not valid JSON"):
        read_card(shared)
    (shared / "vector.json").unlink()
    with pytest.raises(LorademError, match=r"vector\.json: not found \(a shared vector carries a vector\.json card\)"):
        read_card(shared)


def test_check_card_refuses_other_base_and_edited_weights(shared, tiny_base, tiny_base_tied):
    assert check_card(shared, tiny_base)["source"] == "sort"
    with pytest.raises(LorademError, match=r"trained on base 'tiny' with weights [0-9a-f]{12}, but base .* has weights [0-9a-f]{12}"):
        check_card(shared, tiny_base_tied)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(shared, lambda t: t[key].__setitem__((0, 0), 1.5))
    with pytest.raises(LorademError, match=r"adapter_model\.safetensors: sha256 [0-9a-f]{12} differs from the card's .* corrupted or edited"):
        check_card(shared, tiny_base)


# ---- importing ---------------------------------------------------------------------

def test_import_copies_once(shared, tiny_base, tmp_path):
    adapters = tmp_path / "adapters"
    folder = import_vector(shared, adapters, base_dir=tiny_base, log=quiet)
    sha = sha256_file(shared / "adapter_model.safetensors")
    assert folder == adapters / f"sort-{sha[:12]}"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "loradem-import.json", "vector.json"]
    assert (folder / "adapter_model.safetensors").read_bytes() == (shared / "adapter_model.safetensors").read_bytes()
    assert json.loads((folder / "vector.json").read_text()) == json.loads((shared / "vector.json").read_text())
    # PEFT's config named the base by a path of the machine that made it: the import names it as the card does
    config, sent = (json.loads((f / "adapter_config.json").read_text()) for f in (folder, shared))
    assert sent["base_model_name_or_path"] == str(tiny_base) and config == {**sent, "base_model_name_or_path": "tiny"}
    # where it came from, relative to the adapters folder: no absolute path of this machine in adapters/
    assert json.loads((folder / "loradem-import.json").read_text())["origin"] == "../incoming/sort-vector"
    stamp = (folder / "loradem-import.json").stat().st_mtime_ns
    logs: list[str] = []
    assert import_vector(shared, adapters, base_dir=tiny_base, log=logs.append) == folder
    assert (folder / "loradem-import.json").stat().st_mtime_ns == stamp and "already imported" in logs[0]
    assert import_vector(folder, adapters, base_dir=tiny_base, source="sort", log=quiet) == folder  # the import itself
    renamed = import_vector(shared, adapters, base_dir=tiny_base, source="sorting", log=quiet)
    assert renamed.name == f"sorting-{sha[:12]}" and read_card(renamed)["source"] == "sort"


def test_import_refusals_leave_nothing(shared, tiny_base, tiny_base_tied, tmp_path):
    adapters = tmp_path / "adapters"
    with pytest.raises(LorademError, match=r"trained on base 'tiny' with weights"):
        import_vector(shared, adapters, base_dir=tiny_base_tied, log=quiet)
    (shared / "vector.json").unlink()
    with pytest.raises(LorademError, match=r"no vector\.json card .* pass allow_no_card \(--allow-no-card\)"):
        import_vector(shared, adapters, base_dir=tiny_base, log=quiet)
    pickled = copy_adapter(shared, tmp_path / "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(LorademError, match=r"expected adapter_model\.safetensors \(adapter_model\.bin is a pickle"):
        import_vector(pickled, adapters, base_dir=tiny_base, allow_no_card=True, log=quiet)
    with pytest.raises(LorademError, match=r"vector 'org/no-such-vector': could not fetch from the model hub"):
        import_vector("org/no-such-vector", adapters, base_dir=tiny_base, log=quiet)
    with pytest.raises(LorademError, match=r"vector '\./missing': expected an adapter folder or a hub id"):
        import_vector("./missing", adapters, base_dir=tiny_base, log=quiet)
    assert not adapters.exists() or not any(adapters.iterdir())


def test_import_without_card_writes_what_is_known(shared, tiny_base, tmp_path):
    (shared / "vector.json").unlink()
    folder = import_vector(shared, tmp_path / "adapters", base_dir=tiny_base, allow_no_card=True, log=quiet)
    card = read_card(folder)
    assert card["generated"] is True and card["source"] == "sort-vector"
    assert card["base"]["fingerprint"] is None and card["data"] is None and card["metrics"] is None
    assert card["lora"]["r"] == 2 and sorted(card["lora"]["target_modules"]) == ["q_proj", "v_proj"]
    assert card["adapter_sha256"] == sha256_file(folder / "adapter_model.safetensors")
    assert "[generated on import: no training record]" in format_card(card)


def test_fold_checks_the_card_base(shared, tiny_base, tiny_base_tied, tmp_path):
    from loradem.merge.fold import assemble

    with pytest.raises(LorademError, match=r"trained on a base with fingerprint"):
        assemble(tiny_base_tied, [(shared, 1.0)], tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()
    assemble(tiny_base, [(shared, 1.0)], tmp_path / "ok", log=quiet)


# ---- wiring: the CLI and a recipe source with `vector:` ---------------------------------------

def test_cli_import_and_info(shared, tiny_base, tmp_path, capsys):
    from loradem.cli import main

    adapters = tmp_path / "adapters"
    assert main(["vectors", "import", str(shared), "--base", str(tiny_base), "--adapters-dir", str(adapters)]) == 0
    (folder,) = adapters.iterdir()
    assert main(["vectors", "info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "card: source 'sort'" in out and "||delta||" in out
    assert main(["vectors", "import", str(shared), "--base", str(tiny_base_other(tmp_path, tiny_base)),
                 "--adapters-dir", str(tmp_path / "other")]) == 2
    assert "loradem: error:" in capsys.readouterr().err and not (tmp_path / "other").exists()


def tiny_base_other(tmp_path: Path, tiny_base: Path) -> Path:
    """A copy of the base with one weight changed: another fingerprint."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    return other


@pytest.mark.slow
def test_recipe_source_with_a_ready_vector(shared, tiny_base, tmp_path, tmp_path_factory, monkeypatch):
    """`loradem run` on the embedded base's alias trains the other source, imports the vector and folds both; every
    output names the base by hub id, the model card has its license and the run's scores, and no text file in
    the run or adapter folders names a path of this machine (the embedded base is the tiny model here, in a
    cache of the test's own, under a home of the test's own)."""
    from test_pipeline import _rows
    from test_share import SMOL, front_matter, machine_paths, texts_naming

    from loradem.cli import main
    from loradem.evaluate.report import format_value
    from loradem.merge.study import load_recorded_study
    from loradem.model.base import SMOLLM2_DIR
    from loradem.recipe import load_recipe

    forbidden = machine_paths(tmp_path_factory)  # the real home and cache too, before they are moved
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_base, tmp_path / "cache" / "bases" / SMOLLM2_DIR)
    monkeypatch.setenv("LORADEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    for task in ("addition", "sort"):
        (tmp_path / "data" / f"{task}.jsonl").write_text(_rows(task, 30))
    recipe = {  # output folders given absolute: every file that names one records it relative to itself
        "name": "ready", "base": "smollm2-135m", "lora": {"r": 2, "alpha": 8},
        "output_dir": str(tmp_path / "runs" / "ready"), "adapters_dir": str(tmp_path / "adapters"),
        "train": {"max_steps": 2, "batch_size": 4, "eval_steps": 2, "max_length": 64},
        "sources": [
            {"name": "addition", "data": "data/addition.jsonl", "validation": 4, "test": 4},
            {"name": "sort", "data": "data/sort.jsonl", "validation": 4, "test": 4, "vector": str(shared)},
        ],
        "search": {"n_trials": 2, "max_rows_per_source": 4, "batch_size": 4},
        "eval": {"max_new_tokens": 2, "batch_size": 4},
    }
    (tmp_path / "ready.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", "ready.yaml"]) == 0
    run = tmp_path / "runs" / "ready"
    record = json.loads((run / "model" / "loradem.json").read_text())
    folders = [tmp_path / "adapters" / a["name"] for a in record["adapters"]]
    sha = sha256_file(shared / "adapter_model.safetensors")
    assert [a["source"] for a in record["adapters"]] == ["addition", "sort"] and folders[1].name == f"sort-{sha[:12]}"
    assert folders[0].name.startswith("addition-") and (folders[0] / "loradem-train.json").is_file()
    assert not list((tmp_path / "adapters").glob("sort-*/loradem-train.json"))  # imported, never trained
    assert record["base"] | {"sha256": None, "origin": None} == {
        "name": SMOL, "alias": "smollm2-135m", "hub_id": SMOL, "license": "apache-2.0", "sha256": None, "origin": None}

    # the adapter trained for the embedded base names its hub id, in PEFT's config, the card and the README
    assert json.loads((folders[0] / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOL
    assert read_card(folders[0])["base"] | {"fingerprint": None} == {"name": SMOL, "alias": "smollm2-135m", "fingerprint": None}
    readme = (folders[0] / "README.md").read_text()
    assert front_matter(readme)["base_model"] == SMOL and "loradem vectors import PATH_OR_REPO_ID --base smollm2-135m" in readme

    # the model card: the base's hub id and license, and the scores of the report the run wrote after it
    card = (run / "model" / "README.md").read_text()
    assert front_matter(card) | {"tags": None} == {"base_model": SMOL, "base_model_relation": "merge", "license": "apache-2.0",
                                                   "pipeline_tag": "text-generation", "library_name": "transformers", "tags": None}
    report = json.loads((run / "report.json").read_text())
    dem = next(r for r in report["rows"] if r["name"] == "dem")
    cells = [format_value(dem["per_source"][s], m) for s, m in report["metric"].items()]
    assert f"| **`dem` (this model)** | {' | '.join(cells)} | {format_value(dem['average'], 'exact_match')} |" in card
    assert "| `base` |" in card and "| `adapter:addition` |" in card

    # recipe.json names its paths relative to the run folder (the output folders relative to the working directory),
    # and reads back as the recipe that ran
    again, ran = load_recipe(run / "recipe.json"), load_recipe(tmp_path / "ready.yaml")
    assert (again.output_dir, again.adapters_dir) == ("runs/ready", "adapters")
    assert again.model_dump() | {"output_dir": ran.output_dir, "adapters_dir": ran.adapters_dir} == ran.model_dump()

    # the files that name other outputs name them relative to themselves
    assert {s: a["path"] for s, a in json.loads((run / "adapters.json").read_text()).items()} == {
        "addition": f"../../adapters/{folders[0].name}", "sort": f"../../adapters/{folders[1].name}"}
    assert report["model"] == "model"
    weights = json.loads((run / "search" / "weights.json").read_text())
    assert weights["study"] == {"name": weights["study"]["name"], "file": "search.db", "format": "sqlite"}

    # nothing of this machine in any text file loradem wrote (search.db and the pngs are binary)
    leaks = {f"runs/ready/{k}": v for k, v in texts_naming(run, forbidden).items()}
    leaks |= {f"adapters/{k}": v for k, v in texts_naming(tmp_path / "adapters", forbidden).items()}
    assert leaks == {}

    # and the run folder still finds its study once moved
    moved = tmp_path_factory.mktemp("moved") / "ready"
    shutil.move(run, moved)
    assert len(load_recorded_study(moved / "search" / "weights.json").trials) == 2


def test_assemble_recipe_with_ready_vectors_and_layer_weights(tiny_base, tmp_path, monkeypatch):
    """pipeline._assemble: `vector:` sources come from their import, `layer_weights` from weights.json win."""
    from test_pipeline import _rows

    from loradem.pipeline import assemble_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    folders = {}
    for seed, task in enumerate(("addition", "sort")):
        (tmp_path / "data" / f"{task}.jsonl").write_text(_rows(task, 20))
        folder = make_adapter(tiny_base, tmp_path / "shared" / task, seed=seed, r=2, target_modules=["q_proj", "down_proj"])
        folders[task] = with_card(folder, tiny_base, source=task)
    recipe = {"name": "ready", "base": str(tiny_base), "assemble": {"fold_base": "dequantized"},
              "sources": [{"name": t, "data": f"data/{t}.jsonl", "validation": 4, "test": 4, "vector": str(f)}
                          for t, f in folders.items()]}
    (tmp_path / "ready.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "runs/ready/search").mkdir(parents=True)
    (tmp_path / "runs/ready/search/weights.json").write_text(json.dumps(
        {"weights": {"addition": 0.75, "sort": 0.5}, "layer_weights": {"addition": [0.5, 1.0]}}))
    out = assemble_recipe(tmp_path / "ready.yaml")
    record = json.loads((out / "loradem.json").read_text())
    assert [a["weight"] for a in record["adapters"]] == [[0.5, 1.0], 0.5]
    assert [a["name"].split("-")[0] for a in record["adapters"]] == ["addition", "sort"]
    assert record["fold_base"] == "dequantized"
    out = assemble_recipe(tmp_path / "ready.yaml", out="plain", fold_base="original")
    assert json.loads((out / "loradem.json").read_text())["fold_base"] == "original"


def test_assemble_recipe_honours_the_command_line_options(tiny_base, tmp_path, monkeypatch):
    """`loradem assemble RECIPE` honours --max-shard-size-mb and refuses the options it cannot use (they were ignored)."""
    from test_pipeline import _rows

    from loradem.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "addition.jsonl").write_text(_rows("addition", 20))
    folder = with_card(make_adapter(tiny_base, tmp_path / "shared" / "addition", seed=0, r=2, target_modules=["q_proj"]),
                       tiny_base, source="addition")
    recipe = {"name": "ready", "base": str(tiny_base),
              "sources": [{"name": "addition", "data": "data/addition.jsonl", "validation": 4, "test": 4, "vector": str(folder)}]}
    (tmp_path / "ready.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "runs/ready/search").mkdir(parents=True)
    (tmp_path / "runs/ready/search/weights.json").write_text(json.dumps({"weights": {"addition": 0.75}}))

    assert main(["assemble", "ready.yaml", "--out", "small", "--max-shard-size-mb", "0.05"]) == 0
    shards = sorted(p.name for p in (tmp_path / "small").glob("*.safetensors"))
    assert len(shards) > 1 and set(json.loads((tmp_path / "small" / "loradem.json").read_text())["shards"]) == set(shards)

    for flag in ("--allow-name-mismatch", "--trust-pickle"):  # meaningless for a recipe: refused, not ignored
        assert main(["assemble", "ready.yaml", "--out", "refused", flag]) == 2
        assert not (tmp_path / "refused").exists()
