"""loradem.data.anchors: generic prompts answered by the base, cached, and mixed into each source's training rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loradem import pipeline
from loradem.data import anchors as anchor
from loradem.data.demo import task_rows
from loradem.errors import LorademError
from loradem.evaluate.compare import _cost
from loradem.files import fingerprint_weights
from loradem.recipe import AnchorSettings, Recipe, load_recipe
from loradem.train.sft import CARD, TRAIN_RECORD, adapter_key, train_source


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_recipe(tmp_path: Path, base: Path, *, anchor_block: dict | None = None, fmt_rows: list[dict] | None = None) -> Recipe:
    data = write_jsonl(tmp_path / "addition.jsonl", fmt_rows or task_rows("addition", rows=16))
    return Recipe.model_validate({
        "name": "t",
        "base": str(base),
        "adapters_dir": str(tmp_path / "adapters"),
        "train": {"max_steps": 2, "eval_steps": 1, "batch_size": 4},
        "sources": [{"name": "addition", "data": data, "validation": 2, "test": 2}],
        **({"anchor": anchor_block} if anchor_block is not None else {}),
    })


def addition_job(recipe: Recipe):
    return pipeline.train_jobs(recipe, pipeline._splits(recipe))[0]


def fake_replies(replies: list[tuple[str, bool]], calls: list):
    def generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, log):
        calls.append((len(prompts), max_new_tokens))
        return [replies[i % len(replies)] for i in range(len(prompts))]
    return generate


# ---- prompts and mixing ----------------------------------------------------------

def test_builtin_prompts_are_distinct_reproducible_and_ask_none_of_the_demo_tasks():
    prompts = anchor.builtin_prompts(400)
    assert len(prompts) == len(set(prompts)) == 400
    assert anchor.builtin_prompts(400) == prompts
    assert anchor.builtin_prompts(50, seed=1) != prompts[:50]
    for p in prompts:
        low = p.lower()
        assert not any(word in low for word in ("add ", " + ", "sort", "order", "reverse", "backwards", "capital letters",
                                                "uppercase")), p


def test_too_many_builtin_prompts_is_refused_with_the_count_it_can_give():
    with pytest.raises(LorademError, match=r"anchor.prompts: the builtin templates give only \d+ distinct prompts, not 100000"):
        anchor.builtin_prompts(100_000)


def test_with_anchors_adds_the_fraction_keeps_every_source_row_and_is_seeded():
    train = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(30)]
    anchors = [{"messages": [{"role": "user", "content": f"g{i}"}, {"role": "assistant", "content": "b"}]} for i in range(4)]
    rows = anchor.with_anchors(train, anchors, 0.25, seed=0, source="s")
    assert anchor.anchor_count(30, 0.25) == 10
    assert len(rows) == 40
    assert sorted(json.dumps(r) for r in rows if r in train) == sorted(json.dumps(r) for r in train)
    picked = [r for r in rows if r in anchors]
    assert len(picked) == 10 and len({json.dumps(r) for r in picked}) == 4  # 4 anchors, repeated to reach 10
    assert rows == anchor.with_anchors(train, anchors, 0.25, seed=0, source="s")
    assert rows != anchor.with_anchors(train, anchors, 0.25, seed=0, source="other")
    assert rows[:30] != train  # shuffled together, not appended


# ---- generation and cache ----------------------------------------------------------

def test_anchor_rows_keep_ended_replies_and_are_cached(tmp_path, tiny_base, monkeypatch, capsys):
    import loradem.model.generate as evaluate

    settings = AnchorSettings(enabled=True, prompts=6, max_new_tokens=5)
    adapters = tmp_path / "adapters"
    calls: list = []
    monkeypatch.setattr(evaluate, "generate_replies", fake_replies([("Paris.", True), ("cut off", False), ("  ", True)], calls))
    rows, info = anchor.anchor_rows(settings, tiny_base, adapters, log=lambda s: None)
    assert calls == [(6, 5)]
    bar = capsys.readouterr().err  # the base's answering, as a progress bar over the prompts
    assert "anchor replies" in bar and "6/6" in bar
    prompts = anchor.builtin_prompts(6)
    assert rows == [{"messages": [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": "Paris."}]}
                    for i in (0, 3)]
    assert (info["prompts"], info["rows"], info["dropped"]) == (6, 2, 4)
    assert info["spent_seconds"] == info["generation_seconds"] >= 0
    cached = sorted(p.name for p in (tmp_path / "adapters" / ".anchors").iterdir())
    assert cached == [f"{info['key']}.json", f"{info['key']}.jsonl"]

    monkeypatch.setattr(evaluate, "generate_replies", lambda *a, **k: pytest.fail("the cache was not used"))
    again, info2 = anchor.anchor_rows(settings, tiny_base, adapters, log=lambda s: None)
    assert again == rows and info2["spent_seconds"] == 0.0 and info2["key"] == info["key"]


def test_a_non_zero_rank_reads_rank_zeros_replies_and_never_generates(tmp_path, tiny_base, monkeypatch):
    from loradem.model import generate as evaluate

    settings, adapters = AnchorSettings(enabled=True, prompts=3), tmp_path / "adapters"
    monkeypatch.setattr(evaluate, "generate_replies", lambda *a, **k: pytest.fail("a non-zero rank generated"))
    with pytest.raises(LorademError, match=r"anchor: waited 0 s for rank 0 to write the base's anchor replies .*\.json\); did it fail\?"):
        anchor.anchor_rows(settings, tiny_base, adapters, log=lambda m: None, generate=False, wait_seconds=0)
    assert not (tmp_path / "adapters" / ".anchors").exists()

    monkeypatch.setattr(evaluate, "generate_replies", fake_replies([("Paris.", True)], []))
    written, _ = anchor.anchor_rows(settings, tiny_base, adapters, log=lambda m: None)  # rank 0
    monkeypatch.setattr(evaluate, "generate_replies", lambda *a, **k: pytest.fail("a non-zero rank generated"))
    rows, record = anchor.anchor_rows(settings, tiny_base, adapters, log=lambda m: None, generate=False, wait_seconds=0)
    assert rows == written and len(rows) == 3 and record["spent_seconds"] == 0.0


def test_a_base_that_never_ends_its_replies_is_refused_and_nothing_is_cached(tmp_path, tiny_base):
    settings = AnchorSettings(enabled=True, prompts=3, max_new_tokens=1)
    with pytest.raises(LorademError, match=r"anchor: the base ended none of its 3 replies within anchor.max_new_tokens=1; raise it"):
        anchor.anchor_rows(settings, tiny_base, tmp_path / "adapters", log=lambda s: None)  # the real tiny model: one random token, no eos
    assert not (tmp_path / "adapters" / ".anchors").exists() or not any((tmp_path / "adapters" / ".anchors").iterdir())


def test_anchor_prompts_from_a_file_use_only_the_prompts(tmp_path):
    path = write_jsonl(tmp_path / "generic.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "ignored"}]},
        {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "ignored"}]},
    ])
    settings = Recipe.model_validate({"name": "t", "base": str(tmp_path), "sources": [{"name": "a", "data": path}],
                                      "anchor": {"enabled": True, "data": path}}).anchor
    assert anchor.prompts_for(settings) == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        [{"role": "user", "content": "Why?"}],
    ]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    settings = settings.model_copy(update={"data": text})
    with pytest.raises(LorademError, match=r"text.jsonl: expected messages or prompt/completion rows .*got 'text' rows"):
        anchor.prompts_for(settings)


def test_anchor_settings_are_checked_by_the_recipe(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    body = "name: t\nbase: {base}\nsources:\n  - name: a\n    data: a.jsonl\nanchor:\n  enabled: true\n  {extra}\n"
    for extra, message in [("fraction: 1.0", "anchor.fraction: Input should be less than 1"),
                           ("data: missing.jsonl", "anchor.data: .*expected 'builtin' or an existing .jsonl/.json/.csv/.parquet file"),
                           ("prompts: 0", "anchor.prompts: Input should be greater than 0")]:
        path = tmp_path / "r.yaml"
        path.write_text(body.format(base=tmp_path, extra=extra))
        with pytest.raises(LorademError, match=message):
            load_recipe(path)


# ---- training with anchors ----------------------------------------------------------

def test_anchored_training_adds_the_rows_records_them_and_has_its_own_key(tmp_path, tiny_base, monkeypatch):
    import loradem.model.generate as evaluate

    plain = make_recipe(tmp_path, tiny_base)
    anchored = make_recipe(tmp_path, tiny_base, anchor_block={"enabled": True, "prompts": 5, "fraction": 0.5})
    job = addition_job(anchored)
    splits = job.splits
    fp = fingerprint_weights(tiny_base)
    assert adapter_key(addition_job(plain), fp) != adapter_key(job, fp)
    assert adapter_key(addition_job(plain), fp) == adapter_key(addition_job(
        plain.model_copy(update={"anchor": plain.anchor.model_copy(update={"fraction": 0.5})})), fp)  # disabled anchor settings do not touch the key

    monkeypatch.setattr(evaluate, "generate_replies", fake_replies([("Fine, thanks.", True)], []))
    log: list[str] = []
    folder = train_source(job, tiny_base, log=log.append)
    record = json.loads((folder / TRAIN_RECORD).read_text())
    n = len(splits.train)
    assert record["anchor"]["rows"] == anchor.anchor_count(n, 0.5) == n
    assert record["train_rows"] == 2 * n
    assert record["anchor"]["fraction"] == 0.5 and record["anchor"]["prompts"] == "builtin"
    assert json.loads((folder / CARD).read_text())["anchor"] == record["anchor"]
    assert any(f"+ {n} anchor rows (50% of its training set)" in line for line in log)
    assert _cost({"addition": record}, ["addition"])["train_seconds"] == round(
        record["train_seconds"] + record["anchor"]["generation_seconds"], 1)


def test_anchored_training_refuses_a_source_without_chat_rows_before_training(tmp_path, tiny_base):
    rows = [{"prompt": f"{i} + 1 =", "completion": str(i + 1)} for i in range(16)]
    recipe = make_recipe(tmp_path, tiny_base, anchor_block={"enabled": True}, fmt_rows=rows)
    with pytest.raises(LorademError, match=r"source 'addition': anchored training needs messages rows .* 'prompt_completion' rows"):
        train_source(addition_job(recipe), tiny_base, log=lambda s: None)
    assert not (tmp_path / "adapters").exists() or not any(p.name.startswith("addition") for p in (tmp_path / "adapters").iterdir())


def test_kl_anchored_training_scores_the_anchor_rows_by_kl_and_has_its_own_key(tmp_path, tiny_base, monkeypatch):
    import loradem.model.generate as evaluate
    from transformers import TrainerCallback

    sft = make_recipe(tmp_path, tiny_base, anchor_block={"enabled": True, "prompts": 5, "fraction": 0.5})
    kl = make_recipe(tmp_path, tiny_base, anchor_block={"enabled": True, "prompts": 5, "fraction": 0.5, "loss": "kl"})
    fp = fingerprint_weights(tiny_base)
    assert "loss" not in anchor.identity(sft.anchor)  # adapters anchored before `loss` existed keep their keys
    assert adapter_key(addition_job(sft), fp) != adapter_key(addition_job(kl), fp)

    class Logs(TrainerCallback):
        seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs or {}))

    monkeypatch.setattr(evaluate, "generate_replies", fake_replies([("Fine, thanks.", True)], []))
    log: list[str] = []
    folder = train_source(addition_job(kl), tiny_base, log=log.append, callbacks=[Logs()])
    record = json.loads((folder / TRAIN_RECORD).read_text())
    assert record["anchor"]["loss"] == "kl" and json.loads((folder / CARD).read_text())["anchor"]["loss"] == "kl"
    n = len(addition_job(kl).splits.train)
    assert any(f"+ {n} anchor rows (50% of its training set, scored by KL to the base)" in line for line in log)
    train_logs = [entry for entry in Logs.seen if "loss" in entry]
    assert len(train_logs) == 2 and all(entry["anchor_kl"] >= 0 for entry in train_logs)  # the tag reached the loss
    assert train_logs[1]["anchor_kl"] > 0  # after one step the adapter is no longer the base
    evals = [entry for entry in Logs.seen if "eval_loss" in entry]
    assert evals and not any(k.endswith("anchor_kl") for e in evals for k in e)  # validation rows are no anchors


def test_kl_anchored_training_needs_completion_only_loss_and_says_so_before_training(tmp_path, tiny_base):
    recipe = make_recipe(tmp_path, tiny_base, anchor_block={"enabled": True, "loss": "kl"})
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"completion_only_loss": False})})
    with pytest.raises(LorademError, match=r"^source 'addition': anchor.loss: kl scores the anchor rows' reply tokens, "
                                           r"which needs train.completion_only_loss: true \(or use anchor.loss: sft\)$"):
        train_source(addition_job(recipe), tiny_base, log=lambda s: None)
    assert not (tmp_path / "adapters").exists() or not any(p.name.startswith("addition") for p in (tmp_path / "adapters").iterdir())
