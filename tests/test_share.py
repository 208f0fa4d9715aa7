"""Sharing vectors and models: README cards, `vectors export`, import on another machine, hub push and pull,
honest model cards. No hub is reachable here: the hub calls are replaced by recorders (what would be uploaded or
downloaded is asserted), and the real library's offline failure is checked too.

    pytest tests/test_share.py
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_card import quiet, with_card
from test_lora import edit_tensors, make_adapter

from loradem.cli import main
from loradem.errors import LorademError
from loradem.files import fingerprint_weights, sha256_file
from loradem.model.base import (
    EMBEDDED_ORIGIN,
    SMOLLM2_DIR,
    SMOLLM2_SOURCE,
    cache_root,
    portable_name,
)
from loradem.vectors.card import adapter_readme, import_vector, read_card, write_readme
from loradem.vectors.share import EXPORT_FILES, export_vector, push_vector

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HERE = (str(Path.home()), str(cache_root()), str(Path(__file__).resolve().parents[1]))  # before any test moves HOME


def front_matter(text: str) -> dict:
    """The README's metadata as the Hub's own library reads it."""
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def machine_paths(tmp_path_factory) -> list[str]:
    """Every absolute prefix of this test machine an output must not name: the pytest temp root (which holds
    tmp_path, the tiny base, any monkeypatched HOME and cache), the real home and cache, this checkout."""
    return [str(tmp_path_factory.getbasetemp().resolve()), *HERE]


def texts_naming(folder: Path, prefixes: list[str]) -> dict[str, list[str]]:
    """{file relative to folder: prefixes it contains} for every text file under folder (binary files skipped)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits = [p for p in prefixes if p in text]
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found


@pytest.fixture
def local(tiny_base, tmp_path) -> Path:
    """A vector as an older loradem or plain PEFT leaves it: PEFT's config names the base by absolute path,
    the card too, and a README of PEFT's that must not travel."""
    folder = make_adapter(tiny_base, tmp_path / "adapters" / "sort-vector", seed=7, r=2, target_modules=["q_proj", "v_proj"])
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)
    (folder / "README.md").write_text("peft's card")
    return set_base(with_card(folder, tiny_base), name=str(tiny_base), fingerprint=fingerprint_weights(tiny_base))


def set_base(folder: Path, **base) -> Path:
    card = json.loads((folder / "vector.json").read_text())
    card["base"] = base
    (folder / "vector.json").write_text(json.dumps(card))
    return folder


# ---- A: the adapter's README card --------------------------------------------------------

def test_readme_of_an_embedded_base_vector(local, tiny_base):
    set_base(local, name=SMOL, alias="smollm2-135m", fingerprint=fingerprint_weights(tiny_base))
    text = write_readme(local).read_text()
    assert front_matter(text) == {"base_model": SMOL, "library_name": "peft",
                                  "tags": ["loradem", "dem", "lora", "distribution-vector"], "pipeline_tag": "text-generation"}
    sha = sha256_file(local / "adapter_model.safetensors")
    for fact in ("# `sort`: a distribution vector for HuggingFaceTB/SmolLM2-135M-Instruct",
                 EMBEDDED_ORIGIN, fingerprint_weights(tiny_base),
                 "rows: 28 train, 6 validation (chose the kept checkpoint), 6 test", "`" + "d" * 64 + "`",
                 "LoRA: r 2, alpha 16, dropout 0, use_rslora no; target modules: q_proj, v_proj",
                 "training: learning_rate 0.005, max_steps 4, quantization none",
                 "best validation loss 1.2500 at step 4 of 4", "512 training tokens", f"sha256 `{sha}`",
                 f'base = AutoModelForCausalLM.from_pretrained("{SMOL}")',
                 'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_ID")',
                 "loradem vectors import PATH_OR_REPO_ID --base smollm2-135m"):
        assert fact in text, fact


def test_readme_of_a_local_base_vector_names_no_hub_model(local):
    text = adapter_readme(read_card(local), {"target_modules": ["v_proj", "q_proj"]})
    assert "base_model" not in front_matter(text) and "a local model folder (not a hub id)" in text
    assert "--base path/to/base" in text and str(local.parent) not in text  # the folder's name, not its path


# ---- B: export -----------------------------------------------------------------------------

def test_export_writes_exactly_what_a_receiver_needs_and_nothing_of_this_machine(local, tiny_base, tmp_path,
                                                                                  tmp_path_factory):
    out = export_vector(local, tmp_path / "shared" / "sort", log=quiet)
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert (out / "adapter_model.safetensors").read_bytes() == (local / "adapter_model.safetensors").read_bytes()
    config, card = json.loads((out / "adapter_config.json").read_text()), read_card(out)
    assert config["base_model_name_or_path"] == "base" and card["base"]["name"] == "base"  # folder name, not path
    original = json.loads((local / "vector.json").read_text())
    assert {**card, "base": original["base"]} == original and card["base"]["fingerprint"] == original["base"]["fingerprint"]
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in json.loads((local / "adapter_config.json").read_text()).items() if k != "base_model_name_or_path"}
    assert (out / "README.md").read_text() == adapter_readme(card, config)
    assert texts_naming(out, machine_paths(tmp_path_factory)) == {}
    assert not list(out.parent.glob(".*partial*"))


def test_export_refusals_leave_nothing(local, tmp_path, capsys):
    def refused(out, match, **kw):
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        with pytest.raises(LorademError, match=match):
            export_vector(local, out, log=quiet, **kw)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before

    refused(local, r"sort-vector: is the adapter folder being exported")
    refused(local / "out", r"sort-vector/out: is inside the adapter folder being exported")
    refused(local.parent, r"adapters: holds the adapter folder being exported", overwrite=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    refused(tmp_path / "taken", r"taken: already exists \(pass --overwrite to replace it\)")
    refused(tmp_path / "taken", r"taken: --overwrite replaces only an earlier export", overwrite=True)

    first = export_vector(local, tmp_path / "export", log=quiet)
    stamp = (first / "vector.json").stat().st_mtime_ns
    export_vector(local, tmp_path / "export", overwrite=True, log=quiet)  # an earlier export is replaced
    assert sorted(p.name for p in first.iterdir()) == sorted(EXPORT_FILES) and (first / "vector.json").stat().st_mtime_ns != stamp

    sent = (local / "vector.json").read_text()
    card = json.loads(sent)
    card["train"]["notes"] = str(Path.home() / "runs" / "mine")  # a field nobody made portable
    (local / "vector.json").write_text(json.dumps(card))
    refused(tmp_path / "leaky", r"vector\.json: holds '.*', a path of this machine; a shared vector must not")
    (local / "vector.json").write_text(sent)

    edit_tensors(local, lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].__setitem__((0, 0), 2.0))
    refused(tmp_path / "edited", r"adapter_model\.safetensors: sha256 [0-9a-f]{12} differs from the card's")
    (local / "vector.json").unlink()
    refused(tmp_path / "nocard", r"no vector\.json card to share .* import it with `loradem vectors import --allow-no-card` first")
    assert main(["vectors", "export", str(local), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loradem: error: ") and err.count("\n") == 1 and not (tmp_path / "cli").exists()


def test_a_copy_that_fails_its_check_leaves_no_export(local, tmp_path, monkeypatch):
    from loradem.vectors import share

    def truncated(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:-8])

    monkeypatch.setattr(share.shutil, "copyfile", truncated)
    with pytest.raises(LorademError, match=r"adapter_model\.safetensors: sha256 .* differs"):
        export_vector(local, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_export_of_a_recipe_source_through_the_cli(local, tiny_base, tmp_path, monkeypatch):
    """SOURCE with --recipe is the recipe's adapter for that source, found the way every stage finds it."""
    from test_pipeline import _rows

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sort.jsonl").write_text(_rows("sort", 20))
    recipe = {"name": "r", "base": str(tiny_base),
              "sources": [{"name": "sort", "data": "sort.jsonl", "validation": 4, "test": 4, "vector": str(local)}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["vectors", "export", "sort", "--recipe", "r.yaml", "--out", "out"]) == 0
    imported = tmp_path / "adapters" / f"sort-{sha256_file(local / 'adapter_model.safetensors')[:12]}"
    assert imported.is_dir()  # the recipe's own copy of its ready vector, as `loradem run` makes it
    direct = export_vector(imported, tmp_path / "direct", log=quiet)
    for name in EXPORT_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (direct / name).read_bytes(), name
    assert main(["vectors", "export", "nosuch", "--recipe", "r.yaml", "--out", "never"]) == 2
    assert not (tmp_path / "never").exists()


# ---- C: import on another machine --------------------------------------------------------------

def test_an_export_imports_on_another_machine_and_loads_with_peft(local, tiny_base, tmp_path, monkeypatch,
                                                                   tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shared = export_vector(local, tmp_path / "shared", log=quiet)
    other = tmp_path / "other-machine"  # another home, cache and working folder; the base as a folder of its own
    for name in ("home", "cache"):
        (other / name).mkdir(parents=True)
    shutil.copytree(shared, other / "received")
    shutil.copytree(tiny_base, other / "models" / "my-base")
    monkeypatch.setenv("HOME", str(other / "home"))
    monkeypatch.setenv("LORADEM_CACHE", str(other / "cache"))
    monkeypatch.chdir(other)
    assert main(["vectors", "import", "received", "--base", "models/my-base"]) == 0
    (imported,) = (other / "adapters").iterdir()
    assert read_card(imported)["base"]["name"] == "base"
    assert texts_naming(imported, machine_paths(tmp_path_factory)) == {}

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(other / "models" / "my-base")(ids).logits
        there = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other / "models" / "my-base"), imported)(ids).logits
        here = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), local)(ids).logits
    assert torch.equal(there, here) and not torch.allclose(there, plain)


# ---- D: hub push and pull ----------------------------------------------------------------------

class FakeHub:
    """Records what HfApi would be asked, and the files upload_folder would send (read while they exist)."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.uploaded, self.fail = [], {}, fail

    def api(self):
        hub = self

        class Api:
            def create_repo(self, repo_id, **kw):
                hub.calls.append(("create_repo", repo_id, kw))
                if hub.fail is not None:
                    raise hub.fail

            def upload_folder(self, *, folder_path, allow_patterns=None, **kw):
                hub.calls.append(("upload_folder", kw["repo_id"], {**kw, "allow_patterns": allow_patterns}))
                hub.folder = Path(folder_path)
                for p in Path(folder_path).rglob("*"):
                    name = str(p.relative_to(folder_path))
                    if p.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(name, a) for a in allow_patterns)):
                        hub.uploaded[name] = p.read_bytes()

        return Api


def test_push_uploads_exactly_the_export(local, tmp_path, monkeypatch, tmp_path_factory):
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    assert main(["vectors", "push", str(local), "me/sort-vector", "--private"]) == 0
    assert [c[:2] for c in hub.calls] == [("create_repo", "me/sort-vector"), ("upload_folder", "me/sort-vector")]
    assert hub.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert hub.calls[1][2]["allow_patterns"] == list(EXPORT_FILES) and hub.calls[1][2]["repo_type"] == "model"
    assert sorted(hub.uploaded) == sorted(EXPORT_FILES) and not hub.folder.exists()  # the staging folder is gone
    exported = export_vector(local, tmp_path / "export", log=quiet)
    assert hub.uploaded == {name: (exported / name).read_bytes() for name in EXPORT_FILES}
    leaks = [(n, p) for n, data in hub.uploaded.items() if n != "adapter_model.safetensors"
             for p in machine_paths(tmp_path_factory) if p in data.decode()]
    assert leaks == []


def test_push_failures_are_one_line_naming_the_repo(local, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["vectors", "push", str(local), "me/sort-vector"]) == 2  # the real library, offline
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vector push to 'me/sort-vector': the model hub refused or could not be reached" in err
    hub = FakeHub(fail=ConnectionError("Failed to resolve 'huggingface.co'\n(and a traceback's worth of detail)"))
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    with pytest.raises(LorademError, match=r"^vector push to 'me/sort-vector': .*\(Failed to resolve 'huggingface\.co'\)$"):
        push_vector(local, "me/sort-vector", log=quiet)
    assert [c[0] for c in hub.calls] == ["create_repo"]
    with pytest.raises(LorademError, match=r"repo id '\.\./x': expected 'org/name'"):
        push_vector(local, "../x", log=quiet)


def test_pull_downloads_only_the_shared_files_once(local, tiny_base, tmp_path, monkeypatch):
    import huggingface_hub

    exported = export_vector(local, tmp_path / "export", log=quiet)
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        """What the hub would return: the repo's files that match the patterns, in a snapshot folder."""
        asked.append((repo_id, allow_patterns))
        snap = tmp_path / "hub-cache" / repo_id.replace("/", "--") / str(len(asked))
        snap.mkdir(parents=True)
        for p in exported.iterdir():
            if any(fnmatch.fnmatch(p.name, a) for a in allow_patterns):
                shutil.copyfile(p, snap / p.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    adapters = tmp_path / "adapters-here"
    folder = import_vector("me/sort-vector", adapters, base_dir=tiny_base, log=quiet)
    assert asked == [("me/sort-vector", ["adapter_config.json", "adapter_model.safetensors", "vector.json"])]
    assert json.loads((folder / "loradem-import.json").read_text())["origin"] == "me/sort-vector"
    assert (folder / "adapter_model.safetensors").read_bytes() == (local / "adapter_model.safetensors").read_bytes()
    assert import_vector("me/sort-vector", adapters, base_dir=tiny_base, log=quiet) == folder and len(asked) == 1

    def unreachable(repo_id, **kw):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(LorademError, match=r"^vector 'me/other': could not fetch from the model hub \(Failed to resolve "
                                           r"'huggingface\.co'\); use a local folder$"):
        import_vector("me/other", adapters, base_dir=tiny_base, log=quiet)


# ---- E: model cards ------------------------------------------------------------------------------

@pytest.fixture
def embedded_cache(tiny_base, tmp_path, monkeypatch) -> Path:
    """A cache whose embedded base is the tiny model (the real conversion is 540 MB): `smollm2-135m` resolves to it."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_base, cache / "bases" / SMOLLM2_DIR)
    monkeypatch.setenv("LORADEM_CACHE", str(cache))
    return cache / "bases" / SMOLLM2_DIR


def test_model_card_of_the_embedded_base(local, embedded_cache, tmp_path, tmp_path_factory):
    from loradem.merge.fold import assemble

    out = assemble("smollm2-135m", [(local, 0.5)], tmp_path / "model", log=quiet)
    record = json.loads((out / "loradem.json").read_text())
    assert record["base"] == {"name": SMOL, "alias": "smollm2-135m", "hub_id": SMOL, "license": "apache-2.0",
                              "sha256": fingerprint_weights(embedded_cache), "origin": EMBEDDED_ORIGIN}
    assert record["adapters"][0] | {"weight": None} == {
        "name": "sort-vector", "source": "sort", "weights_file": "adapter_model.safetensors", "weight": None,
        "sha256": sha256_file(local / "adapter_model.safetensors"), "base_model_name_or_path": "base"}
    card = (out / "README.md").read_text()
    assert front_matter(card) == {"base_model": SMOL, "base_model_relation": "merge", "license": "apache-2.0",
                                  "pipeline_tag": "text-generation", "library_name": "transformers",
                                  "tags": ["loradem", "dem", "lora", "merge"]}
    assert EMBEDDED_ORIGIN in card and "| `sort-vector` | 0.5 |" in card and "| sort | base |" in card
    assert "`apache-2.0`, inherited from the base" in card
    assert texts_naming(out, machine_paths(tmp_path_factory)) == {}
    # the cache folder given as a path is still the embedded base, recognised by the record its conversion writes
    (embedded_cache / "loradem-base.json").write_text(json.dumps({"source": SMOLLM2_SOURCE, "dequantized_to": "float32"}))
    assert portable_name(str(embedded_cache)) == SMOL
    by_path = assemble(str(embedded_cache), [(local, 0.5)], tmp_path / "by-path", log=quiet)
    assert json.loads((by_path / "loradem.json").read_text())["base"] == record["base"]


def test_model_card_of_a_local_base_says_the_license_is_unknown(local, tiny_base, tmp_path, tmp_path_factory):
    from loradem.merge.fold import assemble

    out = assemble(tiny_base, [(local, 1.0)], tmp_path / "model", log=quiet)
    base = json.loads((out / "loradem.json").read_text())["base"]
    assert base == {"name": "base", "alias": None, "hub_id": None, "license": None, "sha256": fingerprint_weights(tiny_base)}
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert "base_model" not in meta and "license" not in meta and meta["library_name"] == "transformers"
    assert "Unknown: loradem does not know the license of the base `base`. Check the base's license" in card
    assert texts_naming(out, machine_paths(tmp_path_factory)) == {}
    assert portable_name("/home/someone/models/their-base") == "their-base"  # another machine's path: its name only


def test_recipe_json_names_its_paths_relative_to_the_run_and_reads_back(tiny_base, tmp_path, monkeypatch, tmp_path_factory):
    from test_pipeline import _rows

    from loradem.files import atomic_write_json
    from loradem.pipeline import recipe_record
    from loradem.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    (tmp_path / "recipes" / "data" / "sort.jsonl").write_text(_rows("sort", 20))
    (tmp_path / "tasks").mkdir()
    recipe = {"name": "r", "base": str(tiny_base), "output_dir": "out/r", "search": {"warm_start": "w.json"},
              "sources": [{"name": "sort", "data": "data/sort.jsonl", "validation": 4, "test": 4}],
              "anchor": {"data": "data/sort.jsonl"}, "eval": {"lm_eval_include_path": "../tasks"},
              "variants": [{"name": "v", "anchor": {"enabled": True, "data": str(tmp_path / "recipes/data/sort.jsonl")}}]}
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(tmp_path / "recipes" / "r.yaml")
    record = recipe_record(loaded)
    assert record["sources"][0]["data"] == "../../recipes/data/sort.jsonl" and record["anchor"]["data"] == record["sources"][0]["data"]
    assert record["variants"][0]["anchor"]["data"] == record["sources"][0]["data"]
    assert record["eval"]["lm_eval_include_path"] == "../../tasks" and record["output_dir"] == "out/r"
    assert record["search"]["warm_start"] == "w.json"  # relative to the working folder, as written
    assert texts_naming_json(record, machine_paths(tmp_path_factory)) == []
    atomic_write_json(loaded.out_dir / "recipe.json", record)
    assert load_recipe(loaded.out_dir / "recipe.json").model_dump() == loaded.model_dump()


def texts_naming_json(record, prefixes: list[str]) -> list[str]:
    text = json.dumps(record)
    return [p for p in prefixes if p in text]
