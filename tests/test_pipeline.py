"""`loradem run` end to end on the tiny model, through the CLI, plus the CLI's contracts."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from loradem.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _rows(task: str, n: int) -> str:
    lines = (REPO / "recipes" / "data" / "demo" / f"{task}.jsonl").read_text().splitlines()
    return "\n".join(lines[:n]) + "\n"


@pytest.fixture
def tiny_recipe(tmp_path, tiny_base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for task in ("addition", "sort"):
        (tmp_path / "data" / f"{task}.jsonl").write_text(_rows(task, 40))
    recipe = {
        "name": "tiny",
        "base": str(tiny_base),
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "max_length": 64, "learning_rate": 5e-3},
        "sources": [
            {"name": "addition", "data": "data/addition.jsonl", "validation": 6, "test": 6},
            {"name": "sort", "data": "data/sort.jsonl", "validation": 6, "test": 6,
             "lora": {"r": 2, "use_rslora": True}},
        ],
        "search": {"n_trials": 4, "max_rows_per_source": 6, "batch_size": 6},
        "eval": {"max_new_tokens": 4, "batch_size": 6},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


@pytest.mark.slow
def test_run_end_to_end(tiny_recipe, tiny_base, capsys):
    assert main(["run", str(tiny_recipe)]) == 0
    run = Path("runs/tiny")

    report = json.loads((run / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["base", "adapter:addition", "adapter:sort", "uniform", "sum", "dem"]
    for row in report["rows"]:
        assert set(row["per_source"]) == {"addition", "sort"}
        assert all(0.0 <= v <= 1.0 for v in row["per_source"].values())
        assert row["average"] == pytest.approx(sum(row["per_source"].values()) / 2)
    assert report["rows"][0]["cost"]["train_tokens"] == 0
    assert report["rows"][-1]["cost"]["train_tokens"] > 0
    md = (run / "report.md").read_text()
    for name in names:
        assert name in md
    # where it was scored: what torch reports on this machine, also in report.md's cost line
    assert report["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["threads"] == torch.get_num_threads()
    assert f"this report was scored on {report['machine']['device']}: {report['machine']['cpu']} (" in md
    for png in ("per_source.png", "cost_vs_score.png", "similarity.png", "search/search.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # the assembled model equals base + sum_i w_i * s_i * B_i A_i, computed here in float64
    weights = json.loads((run / "search" / "weights.json").read_text())["weights"]
    adapters = {k: run / v["path"] for k, v in json.loads((run / "adapters.json").read_text()).items()}  # relative to the file
    base = _read_all(tiny_base)
    merged = _read_all(run / "model")
    expected = {k: v.double() for k, v in base.items()}
    for source, folder in adapters.items():
        cfg = json.loads((folder / "adapter_config.json").read_text())
        factors = _read_all(folder)
        for key in factors:
            if ".lora_A." not in key:
                continue
            a = factors[key].double()
            b = factors[key.replace(".lora_A.", ".lora_B.")].double()
            r = a.shape[0]
            scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
            target = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            expected[target] += weights[source] * scale * (b @ a)
    assert set(merged) == set(base)
    changed = 0
    for k, v in merged.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, base[k])
    assert changed >= 14  # every targeted linear layer of both blocks moved

    # the assembled folder is an ordinary HF model
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "model")

    # re-running trains nothing: adapters are found by key
    capsys.readouterr()
    assert main(["train", str(tiny_recipe)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2, out


def test_bad_recipe_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("base: smollm2-135m\nsources:\n  - name: a\n    data: nothere.jsonl\n")
    assert main(["run", "r.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loradem: error: r.yaml: sources[0].data: expected an existing data file")
    assert "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert set(subs) >= {"run", "demo", "check", "train", "search", "learn", "regmean", "assemble", "eval", "vectors"}
    for name in subs:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: loradem {name}") and len(out.splitlines()) > 3, name


def test_assemble_cli_requires_inputs(capsys):
    assert main(["assemble", "--base", "smollm2-135m"]) == 2
    assert "--adapter PATH=WEIGHT and --out are required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["assemble", "--adapter", "x=nan", "--base", "b", "--out", "o"])
    assert "expected a finite weight" in capsys.readouterr().err


def test_demo_finds_its_recipe_from_any_directory(tmp_path, monkeypatch):
    from loradem.cli import _demo_recipe

    monkeypatch.chdir(tmp_path)
    assert Path(_demo_recipe("recipes/demo.yaml")) == Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo.yaml").write_text("name: mine\n")
    assert _demo_recipe("recipes/demo.yaml") == "recipes/demo.yaml"  # a local one wins
    assert _demo_recipe("other.yaml") == "other.yaml"  # a path the user gave is theirs to get right


def test_verbose_flag_is_accepted_before_or_after_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["-v", "check", "missing.yaml"]) == 2
    assert main(["check", "missing.yaml", "--verbose"]) == 2
    assert capsys.readouterr().err.count("missing.yaml: recipe file not found") == 2
    from loradem.progress import set_verbose, verbose

    assert verbose()  # the flag reached the process-wide switch the libraries' noise filter reads
    set_verbose(False)


def test_a_failed_run_keeps_the_folders_recipe(tiny_recipe, tmp_path, capsys):
    """runs/<name>/recipe.json describes the model and report beside it: a run that fails on its inputs leaves it."""
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.json").write_text('{"as": "run before"}')
    recipe = yaml.safe_load(tiny_recipe.read_text())
    (tmp_path / "data" / "pc.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(30)))
    recipe["sources"][1]["data"] = "data/pc.jsonl"
    recipe["anchor"] = {"enabled": True}  # refused before any work: anchoring needs messages rows
    tiny_recipe.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tiny_recipe)]) == 2
    assert "anchor" in capsys.readouterr().err
    assert (run_dir / "recipe.json").read_text() == '{"as": "run before"}'
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
