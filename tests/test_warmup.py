"""The shared format warm-up (`warmup:`): one short adapter on every source's rows, folded exactly into the base,
from which every source's adapter trains; on the tiny model, through the pipeline and the CLI."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from test_anchor import fake_replies
from test_assemble import read_folder, reference
from test_pipeline import _rows
from test_share import machine_paths, texts_naming
from test_variants import _merged_state

from loradem import pipeline
from loradem.cli import main
from loradem.errors import LorademError
from loradem.files import fingerprint_weights
from loradem.recipe import load_recipe
from loradem.train.sft import adapter_key
from loradem.data.anchors import anchor_count
from loradem.evaluate.report import markdown
from loradem.train.warmup import warm_base, warmup_job, warmup_record

TRAIN = {"max_steps": 2, "batch_size": 4, "eval_steps": 2, "max_length": 64, "learning_rate": 5e-3}
WARMUP = {"enabled": True, "steps": 2, "rows_per_source": 6}


def _source(name: str) -> dict:
    return {"name": name, "data": f"data/{name}.jsonl", "validation": 4, "test": 4}


def _recipe(tmp_path: Path, base: Path, sources: list[str], **extra) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for task in ("addition", "sort", "reverse"):
        (data / f"{task}.jsonl").write_text(_rows(task, 24))
    raw = {"name": "tiny", "base": str(base), "lora": {"r": 2, "alpha": 4}, "train": TRAIN,
           "sources": [_source(s) for s in sources],
           "search": {"n_trials": 2, "max_rows_per_source": 4, "batch_size": 4},
           "eval": {"max_new_tokens": 4, "batch_size": 4}, **extra}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _quiet(_: str) -> None:
    pass


def test_unknown_warmup_source_is_refused_before_any_work(tmp_path, tiny_base, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, tiny_base, ["addition"], warmup={"enabled": True, "sources": ["nope"]})
    with pytest.raises(LorademError, match=r"tiny\.yaml: warmup\.sources: unknown source 'nope'; expected names of "
                                           r"the recipe's sources \(addition\)") as err:
        load_recipe(path)
    assert "\n" not in str(err.value)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(path)]) == 2
    assert "warmup.sources: unknown source 'nope'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no adapters/


def test_variant_with_an_unknown_warmup_source_names_the_variant(tmp_path, tiny_base):
    path = _recipe(tmp_path, tiny_base, ["addition"], variants=[{"name": "w", "warmup": {"enabled": True, "sources": ["x"]}}])
    with pytest.raises(LorademError, match=r"variants\[0\] \(w\): warmup\.sources: unknown source 'x'"):
        load_recipe(path)


def test_sources_of_different_formats_are_refused_by_check(tmp_path, tiny_base, capsys):
    path = _recipe(tmp_path, tiny_base, ["addition"], warmup=WARMUP)
    raw = yaml.safe_load(path.read_text())
    (tmp_path / "data" / "pc.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n"
                                                        for i in range(20)))
    raw["sources"].append({"name": "pc", "data": "data/pc.jsonl", "validation": 4, "test": 4})
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "warmup: the sources' rows have different formats (addition: messages, pc: prompt_completion)" in err, err
    raw["warmup"]["sources"] = ["addition"]  # pinned to one format: accepted, and printed
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "shared warm-up: 2 steps of 4 rows, lr 0.005, on up to 6 training rows each of addition" in out, out


def test_an_anchored_warmup_has_its_own_key_and_the_adapters_stay_unanchored(tmp_path, tiny_base, capsys):
    plain = load_recipe(_recipe(tmp_path, tiny_base, ["addition", "sort"], warmup=WARMUP))
    splits = pipeline._splits(plain)
    fp = fingerprint_weights(tiny_base)
    key = adapter_key(warmup_job(plain, splits), fp)
    # anchoring the sources' adapters leaves the warm-up (and its key) as it was
    anchored_adapters = load_recipe(_recipe(tmp_path, tiny_base, ["addition", "sort"], warmup=WARMUP,
                                            anchor={"enabled": True, "loss": "kl"}))
    assert warmup_job(anchored_adapters, splits).anchor is None
    assert adapter_key(warmup_job(anchored_adapters, splits), fp) == key
    path = _recipe(tmp_path, tiny_base, ["addition", "sort"], warmup={**WARMUP, "anchor": True},
                   anchor={"prompts": 5, "fraction": 0.5, "loss": "kl"})
    assert main(["check", str(path)]) == 0
    assert "each of addition, sort, plus 50% anchor rows (builtin, loss kl); its adapters" in capsys.readouterr().out
    anchored = load_recipe(path)
    job = warmup_job(anchored, splits)
    assert job.anchor == anchored.anchor.model_copy(update={"enabled": True}) and job.anchor.loss == "kl"
    assert adapter_key(job, fp) != key
    assert all(j.anchor is None for j in pipeline.train_jobs(anchored, splits))  # the sources train without anchors
    # a variant turns it on with `warmup: {anchor: true}`
    with_variant = load_recipe(_recipe(tmp_path, tiny_base, ["addition", "sort"], warmup=WARMUP,
                                       anchor={"prompts": 5, "fraction": 0.5, "loss": "kl"},
                                       variants=[{"name": "aw", "warmup": {"anchor": True}}]))
    variant = pipeline.variant_recipes(with_variant)["aw"]
    assert adapter_key(warmup_job(variant, splits), fp) == adapter_key(job, fp)
    assert adapter_key(warmup_job(with_variant, splits), fp) == key


def test_a_kl_anchored_warmup_needs_completion_only_loss_and_check_says_so(tmp_path, tiny_base, capsys):
    path = _recipe(tmp_path, tiny_base, ["addition"], warmup={**WARMUP, "anchor": True}, anchor={"loss": "kl"},
                   train={**TRAIN, "completion_only_loss": False})
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "source 'warmup': anchor.loss: kl scores the anchor rows' reply tokens, which needs " \
           "train.completion_only_loss: true" in err, err


@pytest.mark.slow
def test_an_anchored_warmup_trains_on_the_bases_replies_and_the_report_says_so(tmp_path, tiny_base, monkeypatch,
                                                                               own_cache):
    import loradem.model.generate as generate

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(_recipe(tmp_path, tiny_base, ["addition", "sort"], warmup={**WARMUP, "anchor": True},
                                 anchor={"prompts": 5, "fraction": 0.5, "loss": "kl"}))
    splits = pipeline._splits(recipe)
    calls: list = []
    monkeypatch.setattr(generate, "generate_replies", fake_replies([("Fine, thanks.", True)], calls))
    log: list[str] = []
    warm = warm_base(recipe, tiny_base, splits, log=log.append)
    assert calls == [(5, 48)]  # the original base answers the anchor prompts
    adapter = Path("adapters") / f"warmup-{adapter_key(warmup_job(recipe, splits), fingerprint_weights(tiny_base))}"
    record = json.loads((adapter / "loradem-train.json").read_text())
    assert record["anchor"]["rows"] == anchor_count(12, 0.5) == 12  # beside 6 sampled rows of each source
    assert record["train_rows"] == 24 and record["anchor"]["loss"] == "kl"
    assert any("warmup: + 12 anchor rows (50% of its training set, scored by KL to the base)" in line for line in log), log

    described = warmup_record(recipe, warm, tmp_path / "runs" / "tiny")
    generation = record["anchor"]["generation_seconds"]
    assert described["anchor"] == {"prompts": "builtin", "n": 5, "fraction": 0.5, "loss": "kl", "rows": 12,
                                   "generation_seconds": generation}
    assert described["train_seconds"] == round(record["train_seconds"] + generation, 3)  # its replies are its cost
    rows = [{"name": "base", "per_source": {"addition": 0.0}, "average": 0.0,
             "cost": {"train_tokens": 0, "train_seconds": 0.0, "search_seconds": 0.0, "total_seconds": 0.0}}]
    md = markdown("tiny", {"addition": "exact_match"}, rows, extra={"warmup": described})
    assert "with 12 anchor rows (learned by KL to the base), folded exactly into the base" in md, md


@pytest.mark.slow
def test_warm_base_is_the_exact_fold_and_adapters_train_from_it(tmp_path, tiny_base, monkeypatch, capsys, own_cache,
                                                                tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, tiny_base, ["addition", "sort"],
                   warmup={**WARMUP, "sources": ["addition", "sort"]}, eval={"max_new_tokens": 4, "batch_size": 4,
                                                                             "retention": {"enabled": False}})
    assert main(["train", str(path)]) == 0
    recipe = load_recipe(path)
    splits = pipeline._splits(recipe)
    warm = warm_base(recipe, tiny_base, splits, log=_quiet, train=False)
    job = warmup_job(recipe, splits)
    adapter = Path("adapters") / f"warmup-{adapter_key(job, fingerprint_weights(tiny_base))}"
    assert warm.parent == own_cache / "bases" and warm.name == f"warm-{adapter.name.removeprefix('warmup-')}"

    # (a) the warmed base is base + s·B·A of the warm-up adapter in float64, rounded once to float32
    got, ref = read_folder(warm), reference(tiny_base, [(adapter, 1.0)])
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k].float()) for k in ref)
    assert sum(not torch.equal(got[k], read_folder(tiny_base)[k]) for k in ref) >= 14  # every LoRA target moved
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(warm)  # a complete Hugging Face folder
    AutoTokenizer.from_pretrained(warm)
    record = json.loads((warm / "loradem.json").read_text())
    assert record["base"]["sha256"] == fingerprint_weights(tiny_base)
    assert [a["name"] for a in record["adapters"]] == [adapter.name] and record["adapters"][0]["weight"] == 1.0
    train_record = json.loads((adapter / "loradem-train.json").read_text())
    assert train_record["steps"] == 2 and train_record["train_rows"] == 12  # 6 sampled training rows of each source
    sampled = [r for n in ("addition", "sort") for r in splits[n].train]
    assert all(r in sampled for r in job.splits.train)  # training rows only: never validation or test

    # (b) every source's adapter records the warmed base, under another key than the plain recipe's
    adapters = pipeline.finished_adapters(recipe, warm, splits)
    plain = {j.source: adapter_key(j, fingerprint_weights(tiny_base)) for j in pipeline.train_jobs(recipe, splits)}
    for name, folder in adapters.items():
        rec = json.loads((folder / "loradem-train.json").read_text())
        assert rec["base_fingerprint"] == fingerprint_weights(warm) != fingerprint_weights(tiny_base)
        assert folder.name != f"{name}-{plain[name]}"
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == warm.name

    # the assembled model is the warmed base + Σ w·ΔW, and its record and card name the original base and the warm-up
    pipeline.search(path)
    model = pipeline.assemble_recipe(path)
    weights = json.loads(Path("runs/tiny/search/weights.json").read_text())["weights"]
    expected = _merged_state(warm, adapters, weights)
    merged = read_folder(model)
    for k, v in merged.items():
        torch.testing.assert_close(v.double(), expected[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    provenance = json.loads((model / "loradem.json").read_text())
    assert provenance["base"]["name"] == warm.name and provenance["base"]["sha256"] == fingerprint_weights(warm)
    assert provenance["warm_up"]["base"]["sha256"] == fingerprint_weights(tiny_base)
    assert provenance["warm_up"]["adapter"]["name"] == adapter.name
    assert provenance["warm_up"]["adapter"]["path"] == os.path.relpath(adapter, model)
    card = (model / "README.md").read_text()
    assert f"warm-up adapter `{adapter.name}`" in card and "base_model:" not in card  # the tiny base has no hub id

    # its report: base (the original), warm-base, then the rest, each built on the warmed base charged its cost
    pipeline.evaluate(path)
    report = json.loads(Path("runs/tiny/report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["base", "warm-base", "adapter:addition", "adapter:sort", "uniform", "sum", "dem"]
    warm_tokens = train_record["train_tokens"]
    assert rows["base"]["cost"]["train_tokens"] == 0 and rows["warm-base"]["cost"]["train_tokens"] == warm_tokens
    own = sum(json.loads((f / "loradem-train.json").read_text())["train_tokens"] for f in adapters.values())
    assert rows["dem"]["cost"]["train_tokens"] == own + warm_tokens == rows["sum"]["cost"]["train_tokens"]
    assert rows["dem"]["cost"]["warmup_tokens"] == warm_tokens
    assert report["warmup"]["adapter"]["name"] == adapter.name and report["warmup"]["sources"] == ["addition", "sort"]
    assert "Shared warm-up (`warm-base`)" in Path("runs/tiny/report.md").read_text()
    leaks = texts_naming(Path("runs/tiny"), machine_paths(tmp_path_factory))
    assert not leaks, leaks

    # (c) a source added with warmup.sources pinned trains alone: the warm-up and the other adapters are reused
    before = {"adapter": _mtimes(adapter), "warm": _mtimes(warm), **{n: _mtimes(f) for n, f in adapters.items()}}
    _recipe(tmp_path, tiny_base, ["addition", "sort", "reverse"], warmup={**WARMUP, "sources": ["addition", "sort"]})
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "reverse: trained" in out and "warmup: trained" not in out, out
    grown = load_recipe(path)
    again = pipeline.finished_adapters(grown, warm_base(grown, tiny_base, pipeline._splits(grown), log=_quiet, train=False))
    assert {n: again[n] for n in adapters} == adapters
    assert before == {"adapter": _mtimes(adapter), "warm": _mtimes(warm), **{n: _mtimes(f) for n, f in adapters.items()}}
    # unpinned, the warm-up samples the new source too: another warm-up adapter, another warmed base
    _recipe(tmp_path, tiny_base, ["addition", "sort", "reverse"], warmup=WARMUP)
    unpinned = load_recipe(path)
    key = adapter_key(warmup_job(unpinned, pipeline._splits(unpinned)), fingerprint_weights(tiny_base))
    assert f"warmup-{key}" != adapter.name


@pytest.mark.slow
def test_run_with_a_warm_variant_reports_the_warm_base_and_its_merges(tmp_path, tiny_base, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, tiny_base, ["addition", "sort"], variants=[{"name": "warm", "warmup": WARMUP}])
    assert main(["run", str(path)]) == 0

    run = Path("runs/tiny")
    report = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["base", "adapter:addition", "adapter:sort", "uniform", "sum", "dem",
                          "warm:warm-base", "warm:adapter:addition", "warm:adapter:sort", "warm:uniform", "warm:sum",
                          "warm:dem"]
    recipe = load_recipe(path)
    variant = recipe.variant("warm")
    splits = pipeline._splits(recipe)
    warm = warm_base(variant, tiny_base, splits, log=_quiet, train=False)
    warm_record = report["variants"]["warm"]["warmup"]
    assert warm_record["warmed_base"] == {"name": warm.name, "sha256": fingerprint_weights(warm)}
    tokens = warm_record["train_tokens"]
    assert tokens > 0 and rows["warm:warm-base"]["cost"]["train_tokens"] == tokens
    assert rows["warm:sum"]["cost"]["train_tokens"] == tokens + sum(
        rows[f"warm:adapter:{s}"]["cost"]["train_tokens"] - tokens for s in ("addition", "sort"))
    assert "warmup" not in report  # the recipe itself has no warm-up: its rows are on the original base
    assert rows["sum"]["cost"]["train_tokens"] == sum(rows[f"adapter:{s}"]["cost"]["train_tokens"] for s in ("addition", "sort"))

    # the variant's dem row answers exactly like a plain HF model holding warmed base + its weighted deltas
    from transformers import AutoModelForCausalLM

    from loradem.model.generate import evaluate_source
    from loradem.model.soup import load_tokenizer

    adapters = pipeline.finished_adapters(variant, warm, splits)
    searched = json.loads((run / "variants" / "warm" / "search" / "weights.json").read_text())["weights"]
    tokenizer = load_tokenizer(warm)
    for name, state in (("warm:dem", _merged_state(warm, adapters, searched)),
                        ("warm:warm-base", {k: v.float() for k, v in read_folder(warm).items()})):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        model.load_state_dict(state)
        model.eval()
        for source in recipe.sources:
            expected = evaluate_source(model, tokenizer, splits[source.name].test, "exact_match", recipe.eval, 64,
                                       log=_quiet)
            assert report["predictions"][name][source.name] == expected["predictions"], (name, source.name)

    # logits: the in-memory fold of the searched weights equals PEFT's weighted adapters on the warmed base
    from peft import PeftModel

    from loradem.model.soup import load_multi, set_weights

    ids = tokenizer("What is 12 + 34?", return_tensors="pt")["input_ids"]
    folded, _ = load_multi(warm, adapters, fold=True)
    set_weights(folded, searched)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(warm), str(adapters["addition"]), adapter_name="a")
    peft.load_adapter(str(adapters["sort"]), adapter_name="s")
    peft.add_weighted_adapter(["a", "s"], [searched["addition"], searched["sort"]], "dem", combination_type="cat")
    peft.set_adapter("dem")
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-4, atol=1e-5)

    md = (run / "report.md").read_text()
    assert "`warm:warm-base`" in md and "Shared warm-up (`warm:warm-base`)" in md
    leaks = texts_naming(run, machine_paths(tmp_path_factory))
    assert not leaks, leaks
