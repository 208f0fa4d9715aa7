"""Held-out measures: tasks no source trains on and base-capability retention, exact on every report row (mix included)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from loradem import pipeline
from loradem.data.anchors import builtin_prompts
from loradem.data.demo import HELD_OUT, HELD_OUT_DIR, WORDS, main, task_rows
from loradem.data.retention_prompts import PROMPTS
from loradem.data.rows import read_rows
from loradem.errors import LorademError
from loradem.evaluate import retention
from loradem.evaluate.heldout import prompt_text, retention_prompts
from loradem.evaluate.report import write_report
from loradem.evaluate.retention import base_reference, reference, retention_scores
from loradem.model.generate import exact_match, generate_answers
from loradem.model.render import render_prompt
from loradem.model.soup import load_base, load_multi, load_tokenizer, set_weights
from loradem.recipe import EvalSettings, RetentionSettings, load_recipe

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "data" / "demo"
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS[:7]]  # 7 prompts in batches of 3: padding and a short last batch


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(tiny_base), load_tokenizer(tiny_base)


def perturbed(tiny_base, scale: float):
    model = load_base(tiny_base)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.add_(scale * torch.randn_like(layer.mlp.down_proj.weight))
    return model


def greedy_ids_alone(model, tok, prompt, max_new_tokens: int) -> tuple[int, ...]:
    """One prompt, unpadded, through transformers' generate: the new tokens up to and including eos."""
    ids = torch.tensor([render_prompt(prompt, tok)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return tuple(out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out)


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def hand_kl(base_model, model, tok, prompts, replies) -> float:
    """Mean over reply tokens of Σ_v p(v)(log p(v) − log q(v)), each prompt alone and unpadded, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, reply in zip(prompts, replies):
            prompt_ids = render_prompt(prompt, tok)
            ids = torch.tensor([prompt_ids + list(reply)])
            lp = torch.log_softmax(base_model(input_ids=ids).logits[0].double(), -1)
            lq = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for j in range(len(reply)):
                pos = len(prompt_ids) - 1 + j  # the position that predicts reply token j
                total += float((lp[pos].exp() * (lp[pos] - lq[pos])).sum())
                count += 1
    return total / count


# ---- retention --------------------------------------------------------------------------

def test_the_base_against_itself_scores_kl_0_and_agreement_1_exactly(tiny_base, base):
    model, tok = base
    ref = reference(model, tok, CHATS, max_new_tokens=10, batch_size=3)
    assert [len(r) for r in ref.reply_ids] and all(1 <= len(r) <= 10 for r in ref.reply_ids)
    assert retention_scores(model, tok, ref) == {"agreement": 1.0, "kl": 0.0}
    assert retention_scores(load_base(tiny_base), tok, ref) == {"agreement": 1.0, "kl": 0.0}  # a second load


def test_replies_are_the_greedy_ones_of_each_prompt_alone(base):
    model, tok = base
    ref = reference(model, tok, CHATS, max_new_tokens=10, batch_size=3)
    assert list(ref.reply_ids) == [greedy_ids_alone(model, tok, p, 10) for p in CHATS]
    # teacher-forced on its replies, the base's top token at each position is its reply's token
    assert torch.cat(ref.base_logits).argmax(dim=-1).tolist() == [t for r in ref.reply_ids for t in r]


def test_kl_and_agreement_equal_a_float64_hand_computation_on_a_perturbed_model(tiny_base, base):
    model, tok = base
    ref = reference(model, tok, CHATS, max_new_tokens=10, batch_size=3)
    scores = {}
    for scale in (0.005, 0.01, 0.2):  # this seeded perturbation: some replies kept, then none
        other = perturbed(tiny_base, scale)
        got = scores[scale] = retention_scores(other, tok, ref)
        assert got["kl"] == pytest.approx(hand_kl(model, other, tok, CHATS, ref.reply_ids), rel=1e-4), scale
        # agreement is read off the teacher-forced logits: it must equal real greedy generation, prompt by prompt:
        # the share of the base's reply that the model's own greedy reply repeats before departing from it
        kept = [common_prefix(greedy_ids_alone(other, tok, p, 10), r) / len(r) for p, r in zip(CHATS, ref.reply_ids)]
        assert got["agreement"] == pytest.approx(sum(kept) / len(kept), abs=1e-12), scale
        exact = [greedy_ids_alone(other, tok, p, 10) == r for p, r in zip(CHATS, ref.reply_ids)]
        assert (got["agreement"] == 1) == all(exact), scale
    assert 0 < scores[0.005]["agreement"] < 1
    assert scores[0.2]["agreement"] < scores[0.005]["agreement"]
    assert 0 < scores[0.005]["kl"] < scores[0.01]["kl"] < scores[0.2]["kl"]  # more change, further from the base


def test_the_base_replies_are_cached_in_the_run_folder(tiny_base, tmp_path, monkeypatch):
    cache = tmp_path / "run" / "retention_base.json"
    first = base_reference(tiny_base, CHATS, max_new_tokens=8, batch_size=4, cache=cache)
    record = json.loads(cache.read_text())
    assert [tuple(r["ids"]) for r in record["replies"]] == list(first.reply_ids) and first.generation_seconds > 0
    assert record["replies"][0]["prompt"] == CHATS[0]

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached replies were not used")

    monkeypatch.setattr(retention, "generate_ids", no_generation)
    again = base_reference(tiny_base, CHATS, max_new_tokens=8, batch_size=4, cache=cache)
    assert again.reply_ids == first.reply_ids and again.generation_seconds == 0.0
    assert all(torch.equal(a, b) for a, b in zip(again.base_logits, first.base_logits))
    with pytest.raises(AssertionError, match="not used"):  # another reply length is another key: generated again
        base_reference(tiny_base, CHATS, max_new_tokens=6, batch_size=4, cache=cache)


def test_a_base_without_a_chat_template_reads_the_prompts_as_plain_text(tiny_base, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_base, plain)
    (plain / "chat_template.jinja").unlink()
    tok = load_tokenizer(plain)
    assert not tok.chat_template
    ref = base_reference(plain, CHATS, max_new_tokens=8, batch_size=3, cache=tmp_path / "r.json")
    assert list(ref.prompts) == list(PROMPTS[:7])
    model = load_base(plain)
    assert list(ref.reply_ids) == [greedy_ids_alone(model, tok, p, 8) for p in PROMPTS[:7]]
    assert retention_scores(model, tok, ref) == {"agreement": 1.0, "kl": 0.0}


# ---- the shipped lists -------------------------------------------------------------------

def test_retention_prompts_are_never_anchor_or_training_prompts():
    assert len(PROMPTS) == len(set(PROMPTS)) == 40
    assert not set(PROMPTS) & set(builtin_prompts(400))  # the anchors' default
    assert not set(PROMPTS) & set(builtin_prompts(3000))  # and far more of their templates' prompts
    trained = set()
    for path in [*DEMO.glob("*.jsonl"), *(DEMO / HELD_OUT_DIR).glob("*.jsonl")]:
        rows, _ = read_rows(str(path))
        trained |= {prompt_text(r["messages"][:-1]) for r in rows}
    assert not set(PROMPTS) & trained
    assert [prompt_text(p) for p in retention_prompts(RetentionSettings())] == list(PROMPTS)


def test_committed_held_out_files_equal_a_fresh_generation_and_every_answer_is_right(tmp_path):
    assert main(["--out", str(tmp_path), "--rows", "2"]) == 0
    for task in HELD_OUT:
        assert (tmp_path / HELD_OUT_DIR / f"{task}.jsonl").read_bytes() == (DEMO / HELD_OUT_DIR / f"{task}.jsonl").read_bytes()
    assert sorted(p.name for p in (tmp_path / HELD_OUT_DIR).iterdir()) == sorted(f"{t}.jsonl" for t in HELD_OUT)
    for task in HELD_OUT:
        rows = task_rows(task, rows=60)
        assert len({r["messages"][0]["content"] for r in rows}) == 60
        for row in rows:
            question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            if task == "subtract":
                a, b = map(int, re.fullmatch(r"\D*(\d{3})\D+(\d{3})\D*", question).groups())
                if question.startswith("Subtract"):
                    a, b = b, a
                assert a >= b and answer == str(a - b)
            elif task == "sort-words":
                words = question.split(":", 1)[1].split()
                assert 3 <= len(words) <= 5 and all(w in WORDS for w in words) and answer == " ".join(sorted(words))
            elif task == "sort-descending":
                numbers = [int(n) for n in question.split(":")[1].split(",")]
                assert len(numbers) == 4 and answer == ", ".join(map(str, sorted(numbers, reverse=True)))
            elif task == "reverse-numbers":
                numbers = question.split(":")[1].strip().split(", ")
                assert "numbers" in question and len(numbers) == 4 and answer == ", ".join(numbers[::-1])
            elif task == "reverse-long":
                words = question.split(":", 1)[1].split()
                assert 6 <= len(words) <= 7 and all(w in WORDS for w in words) and answer == " ".join(words[::-1])
            else:
                assert task == "add-small"
                a, b = map(int, re.fullmatch(r"\D*(\d{2})\D+(\d{2})\D*", question).groups())
                assert answer == str(a + b)
        # no held-out question is a training question of any source
        trained = {r["messages"][0]["content"] for t in ("addition", "reverse", "sort", "uppercase") for r in task_rows(t)}
        assert not {r["messages"][0]["content"] for r in rows} & trained, task


# ---- the evaluation stage ----------------------------------------------------------------

def test_every_row_mix_included_carries_held_out_scores_equal_to_direct_generation(tiny_base, base, tmp_path):
    from test_multi import make_adapter

    from loradem.evaluate.compare import EvalPlan, EvalSource, RetentionPlan, compare_models

    model, tok = base
    prompts = [[{"role": "user", "content": q}] for q in ("What is 123 + 456?", "Sort these numbers: 42, 7, 19, 3.",
                                                          "Uppercase: hello world.", "Reverse the word 'planet'.")]
    own = generate_answers(model, tok, prompts, max_new_tokens=6, log=None)
    answers = [own[0], own[1], "579", "tenalp"]  # the base gets the first two right
    task = [{"messages": [*p, {"role": "assistant", "content": a}]} for p, a in zip(prompts, answers)]
    other = [{"prompt": "Sort these numbers: 42, 7, 19, 3. ", "completion": "3, 7, 19, 42"}]
    adapters = {n: make_adapter(tiny_base, tmp_path / n, seed=i, r=4, targets=["q_proj", "v_proj", "down_proj"])
                for i, n in enumerate(("a", "b", "mix"))}
    (adapters["mix"] / "loradem-train.json").write_text(json.dumps({"train_tokens": 10, "train_seconds": 1.0}))
    plan = EvalPlan(
        run_name="held", sources=(EvalSource("a", "exact_match", task[:2]), EvalSource("b", "exact_match", other)),
        settings=EvalSettings(max_new_tokens=6, batch_size=3), max_length=64, base_dir=tiny_base,
        adapters={"a": adapters["a"], "b": adapters["b"]}, search={"weights": {"a": 0.5, "b": 0.5}, "search_seconds": 0.0},
        model_dir=tiny_base, out_dir=tmp_path / "run", mix_dir=adapters["mix"],
        held_out=(EvalSource("own", "exact_match", task), EvalSource("other", "exact_match", other)),
        retention=RetentionPlan(tuple(CHATS), max_new_tokens=8),
    )
    rows = {r["name"]: r for r in compare_models(plan, log=lambda m: None)}
    assert list(rows) == ["base", "adapter:a", "adapter:b", "mix", "uniform", "sum", "dem"]

    def direct(m, t) -> dict:
        out = {}
        for name, data in (("own", task), ("other", other)):
            preds = generate_answers(m, t, [r["messages"][:-1] if "messages" in r else r["prompt"] for r in data],
                                     max_new_tokens=6, batch_size=3, log=None)
            out[name] = exact_match(preds, [r["messages"][-1]["content"] if "messages" in r else r["completion"] for r in data])
        return out

    assert rows["base"]["held_out"] == direct(model, tok) and rows["base"]["held_out"]["own"] == 0.5
    assert rows["dem"]["held_out"] == rows["base"]["held_out"]  # model_dir is the base itself
    soup, soup_tok = load_multi(tiny_base, {"a": adapters["a"], "b": adapters["b"]})
    set_weights(soup, {"a": 1.0, "b": 1.0})
    assert rows["sum"]["held_out"] == direct(soup, soup_tok)
    mixed, mix_tok = load_multi(tiny_base, {"mix": adapters["mix"]})
    assert rows["mix"]["held_out"] == direct(mixed, mix_tok)

    # retention: every row; the base row and the dem row (the base folder) are the base exactly
    ref = reference(model, tok, CHATS, max_new_tokens=8, batch_size=3)
    for name in ("base", "dem"):
        assert rows[name]["retention"] == {"agreement": 1.0, "kl": 0.0}, name
    assert rows["sum"]["retention"] == pytest.approx(retention_scores(soup, soup_tok, ref), rel=1e-6)
    assert rows["mix"]["retention"] == pytest.approx(retention_scores(mixed, mix_tok, ref), rel=1e-6)
    assert rows["mix"]["retention"]["kl"] > 0

    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert all(list(r)[:4] == ["name", "per_source", "held_out", "retention"] for r in doc["rows"])
    assert doc["rows"] == list(rows.values())
    assert doc["held_out"]["rows"] == {"own": 4, "other": 1} and doc["held_out"]["predictions"]["base"]["own"][:2] == own[:2]
    assert doc["retention"]["n"] == 7 and doc["retention"]["prompts"] == "builtin" and doc["retention"]["plain_text"] is False
    assert set(doc["eval_seconds"]["mix"]) == {"test", "held_out", "retention"}
    assert json.loads((tmp_path / "run" / "retention_base.json").read_text())["max_new_tokens"] == 8
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Held-out" in md and "| model | own | other | held-out average | agreement | KL |" in md
    assert "| `base` | 50.0% | " in md and "| 100.0% | 0.0000 |" in md
    mix = rows["mix"]
    mix_line = (f"| `mix` | {100 * mix['held_out']['own']:.1f}% | {100 * mix['held_out']['other']:.1f}% | "
                f"{50 * (mix['held_out']['own'] + mix['held_out']['other']):.1f}% | "
                f"{100 * mix['retention']['agreement']:.1f}% | {mix['retention']['kl']:.4f} |")
    assert mix_line in md


# ---- the report ------------------------------------------------------------------------------

def cost() -> dict:
    return {"train_tokens": 0, "train_seconds": 0.0, "search_seconds": 0.0, "total_seconds": 0.0}


def test_report_table_and_malformed_measures(tmp_path):
    rows = [{"name": "base", "per_source": {"add": 0.0}, "held_out": {"sub": 0.25, "desc": 0.5},
             "retention": {"agreement": 1.0, "kl": 0.0}, "average": 0.0, "cost": cost()},
            {"name": "dem", "per_source": {"add": 0.5}, "held_out": {"sub": 0.75, "desc": None},
             "retention": {"agreement": 0.4, "kl": 0.123456}, "average": 0.5, "cost": cost()},
            {"name": "other", "per_source": {"add": 0.5}, "average": 0.5, "cost": cost()}]
    extra = {"retention": {"n": 40, "prompts": "builtin", "max_new_tokens": 24}}
    write_report(tmp_path, "r", {"add": "exact_match"}, rows, extra=extra)
    md = (tmp_path / "report.md").read_text()
    assert "| `base` | 25.0% | 50.0% | 37.5% | 100.0% | 0.0000 |" in md
    assert "| `dem` | 75.0% | – | 75.0% | 40.0% | 0.1235 |" in md and "| `other` | – | – | – | – | – |" in md
    assert "on 40 generic prompts" in md and "(first 24 tokens)" in md
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == rows
    for bad, message in (({"retention": {"agreement": 1.0}}, r"row 0 \('base'\): retention: expected"),
                         ({"retention": {"agreement": 1.0, "kl": float("nan")}}, "retention: expected"),
                         ({"held_out": {"sub": "x"}}, r"row 0 \('base'\): held_out: expected")):
        with pytest.raises(LorademError, match=message):
            write_report(tmp_path / "bad", "r", {"add": "exact_match"}, [{**rows[0], **bad}])
    assert not (tmp_path / "bad").exists()


# ---- recipes and `loradem check` --------------------------------------------------------------

def recipe_file(tmp_path: Path, eval_block: dict, **top) -> Path:
    data = {"name": "t", "base": "smollm2-135m", "sources": [{"name": "addition", "data": str(DEMO / "addition.jsonl")}],
            "eval": eval_block, **top}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_bad_held_out_row_is_one_line_naming_the_file_and_row(tmp_path, capsys, monkeypatch):
    from loradem.cli import main as cli

    monkeypatch.chdir(tmp_path)
    good = task_rows("subtract", rows=3)
    write_jsonl(tmp_path / "bad.jsonl", [good[0], {"messages": [good[1]["messages"][0]]}, good[2]])
    path = recipe_file(tmp_path, {"held_out": [{"name": "sub", "data": "bad.jsonl"}]})
    with pytest.raises(LorademError, match=r"^bad\.jsonl: row 2: expected a \"messages\" row .*the last message is from 'user'"):
        pipeline.check(path)
    capsys.readouterr()
    assert cli(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl: row 2:" in err

    write_jsonl(tmp_path / "text.jsonl", [{"text": "What is 5 - 3? 2"}])
    with pytest.raises(LorademError, match=r"text\.jsonl: eval\.held_out 'sub': exact match needs a prompt and an answer"):
        pipeline.check(recipe_file(tmp_path, {"held_out": [{"name": "sub", "data": "text.jsonl"}]}))
    with pytest.raises(LorademError, match=r"eval\.held_out\[0\]\.data: expected an existing data file"):
        load_recipe(recipe_file(tmp_path, {"held_out": [{"name": "sub", "data": "missing.jsonl"}]}))
    with pytest.raises(LorademError, match=r"eval\.held_out: expected unique held-out task names, 'sub' appears twice"):
        load_recipe(recipe_file(tmp_path, {"held_out": [{"name": "sub", "data": "bad.jsonl"}] * 2}))


def test_check_reads_the_demo_held_out_tasks(capsys):
    recipe = pipeline.check(Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml")
    out = capsys.readouterr().out
    assert "held-out tasks: subtract (60 rows), sort-words (60 rows), sort-descending (60 rows)" in out
    assert "retention: 40 prompts (builtin), 24 reply tokens" in out
    assert [t.name for t in recipe.eval.held_out] == list(HELD_OUT)[:3]  # the demo scores the far-transfer three
    bench = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "demo-options.yaml")
    assert [t.name for t in bench.eval.held_out] == list(HELD_OUT)  # the benchmark all six


def test_a_retention_prompt_that_is_an_anchor_prompt_is_refused(tmp_path):
    anchor = builtin_prompts(400)[5]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "-"}]}
                                                        for q in ("Describe a cloud.", anchor)])
    block = {"retention": {"prompts": str(prompts)}}
    pipeline.check(recipe_file(tmp_path, block))  # not anchored: nothing trains on it
    with pytest.raises(LorademError, match=rf"^eval\.retention\.prompts: prompt 2 \({re.escape(repr(anchor))}\) is also an anchor prompt \(anchor\.data: builtin\)"):
        pipeline.check(recipe_file(tmp_path, block, anchor={"enabled": True}))
    with pytest.raises(LorademError, match=r"prompt 2 .* \(variant 'anc': anchor\.data: builtin\)"):
        pipeline.check(recipe_file(tmp_path, block, variants=[{"name": "anc", "anchor": {"enabled": True}}]))
    # an anchored warm-up trains on the anchor prompts too, with the adapters' anchoring off
    with pytest.raises(LorademError, match=r"^eval\.retention\.prompts: prompt 2 .* is also an anchor prompt \(anchor\.data: builtin\)"):
        pipeline.check(recipe_file(tmp_path, block, warmup={"enabled": True, "anchor": True}))
    with pytest.raises(LorademError, match=r"prompt 2 .* \(variant 'aw': anchor\.data: builtin\)"):
        pipeline.check(recipe_file(tmp_path, block, variants=[{"name": "aw", "warmup": {"enabled": True, "anchor": True}}]))
    pipeline.check(recipe_file(tmp_path, block, warmup={"enabled": True}))  # a warm-up without anchors trains on none
    # RegMean with generic rows fits the merge on the anchor prompts
    with pytest.raises(LorademError, match=r"^eval\.retention\.prompts: prompt 2 .* is also an anchor prompt \(anchor\.data: builtin\)"):
        pipeline.check(recipe_file(tmp_path, block, regmean={"enabled": True, "anchor": 1.0}))
    pipeline.check(recipe_file(tmp_path, block, regmean={"enabled": True}))
    pipeline.check(recipe_file(tmp_path, {}, anchor={"enabled": True}))  # the builtin prompts with the builtin anchors
