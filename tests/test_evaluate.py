"""Masked loss against a hand computation, greedy generation against unpadded `generate`, exact match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from loradem.errors import LorademError
from loradem.model.generate import evaluate_source, exact_match, generate_answers, mean_loss
from loradem.model.render import encode_for_loss, encode_row, render_prompt
from loradem.recipe import EvalSettings, LoraSettings, TrainSettings
from loradem.train.sft import trainer_configs, trl_rows

ROWS = [
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is 123 + 456?"},
                  {"role": "assistant", "content": "579"}]},
    {"prompt": "Reverse the word 'planet'. ", "completion": "tenalp"},
    {"text": "The quick brown fox jumps over the lazy dog"},
    {"messages": [{"role": "user", "content": "Sort these numbers: 42, 7, 19, 3."},
                  {"role": "assistant", "content": "3, 7, 19, 42"}]},
]


@pytest.fixture(scope="module")
def model_and_tok(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.padding_side = "left"
    return model, tok


def hand_loss(model, encoded) -> float:
    """Σ −log p(label) over unmasked positions, each row alone and unpadded, in float64 / number of tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in encoded:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for pos in range(1, len(ids)):
                if labels[pos] != -100:
                    total -= logp[pos - 1, labels[pos]].item()
                    count += 1
    return total / count


def test_prompt_tokens_are_masked(model_and_tok):
    _, tok = model_and_tok
    enc = encode_for_loss(ROWS, tok, max_length=128)
    # messages: the prompt is the chat template with the generation prompt; the completion is the rest of the
    # templated conversation: the answer and what the template closes the assistant turn with
    prompt = tok.apply_chat_template(ROWS[0]["messages"][:-1], add_generation_prompt=True, tokenize=False)
    ids, labels = enc[0]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert tok.decode(labels[n_prompt:]) == "579<|im_end|>\n"
    assert ids[n_prompt:] == labels[n_prompt:]
    # prompt/completion: plain text; the prompt's trailing space merges with the completion's first
    # token, so (as in TRL) the completion starts where the two tokenizations diverge
    ids, labels = enc[1]
    scored = [t for t in labels if t != -100]
    assert tok.decode(scored) == " tenalp<|im_end|>"
    assert tok.decode(ids) == "Reverse the word 'planet'. tenalp<|im_end|>"
    # text: every token is scored
    ids, labels = enc[2]
    assert labels == ids and tok.decode(ids).endswith("<|im_end|>")


def test_mean_loss_equals_hand_computation(model_and_tok):
    model, tok = model_and_tok
    enc = encode_for_loss(ROWS, tok, max_length=128)
    # batch 3 over 4 rows of different lengths: right padding inside a batch, and a second batch
    assert mean_loss(model, enc, batch_size=3) == pytest.approx(hand_loss(model, enc), rel=1e-5)
    assert mean_loss(model, enc[:1], batch_size=16) == pytest.approx(hand_loss(model, enc[:1]), rel=1e-5)


def test_mean_loss_on_a_model_that_ignores_logits_to_keep(model_and_tok):
    """The vocabulary projection is skipped for prompt tokens when the model supports it; other models still work."""
    model, tok = model_and_tok

    class FullLogits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, **ignored):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    enc = encode_for_loss(ROWS, tok, max_length=128)
    assert mean_loss(FullLogits(model), enc, batch_size=3) == pytest.approx(hand_loss(model, enc), rel=1e-5)


def test_loss_is_on_the_completion_only(model_and_tok):
    model, tok = model_and_tok
    row = {"prompt": "What is 123 + 456? Answer: ", "completion": "579"}
    base = mean_loss(model, encode_for_loss([row], tok, 128))
    other_completion = mean_loss(model, encode_for_loss([{**row, "completion": "580"}], tok, 128))
    assert other_completion != pytest.approx(base, rel=1e-4)
    # the unmasked loss over the whole sequence is a different number: the mask is applied
    ids, _ = encode_for_loss([row], tok, 128)[0]
    assert mean_loss(model, [(ids, ids)]) != pytest.approx(base, rel=1e-3)


def test_truncated_completion_is_an_error(model_and_tok):
    model, tok = model_and_tok
    enc = encode_for_loss([{"prompt": "The quick brown fox jumps over the lazy dog", "completion": "579"}], tok, 4)
    assert len(enc[0][0]) == 4
    with pytest.raises(LorademError, match="no completion tokens to score"):
        mean_loss(model, enc)


def test_bad_row_is_named(model_and_tok):
    _, tok = model_and_tok
    with pytest.raises(LorademError, match=r"row 1: expected keys messages \| prompt\+completion \| text, got \['question'\]"):
        encode_for_loss([ROWS[1], {"question": "x"}], tok, 64)


def test_exact_match_normalizes_whitespace_only():
    preds = ["579", "  HELLO   WORLD\n", "abc", "3, 7,19, 42"]
    refs = ["579", "HELLO WORLD", "ABC", "3, 7, 19, 42"]
    assert exact_match(preds, refs) == 0.5
    assert exact_match(["a\tb"], ["a b"]) == 1.0
    with pytest.raises(LorademError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def greedy_alone(model, tok, prompt, max_new_tokens: int, eos_id: int) -> str:
    ids = torch.tensor([render_prompt(prompt, tok)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id)
    new = out[0, ids.shape[1]:].tolist()
    new = new[: new.index(eos_id)] if eos_id in new else new
    return tok.decode(new, skip_special_tokens=True)


PROMPTS = [
    [{"role": "user", "content": "What is 123 + 456?"}],
    "Reverse the word 'planet'.",
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Sort these numbers: 42, 7, 19, 3, and then uppercase hello world"}],
]


def test_generate_is_greedy_and_left_padding_changes_nothing(model_and_tok):
    model, tok = model_and_tok
    lengths = {len(render_prompt(p, tok)) for p in PROMPTS}
    assert len(lengths) == 3  # the batch really is padded
    got = generate_answers(model, tok, PROMPTS, max_new_tokens=12, batch_size=3, log=None)
    want = [greedy_alone(model, tok, p, 12, tok.eos_token_id) for p in PROMPTS]
    assert got == want
    assert all(g for g in got)


def test_generation_stops_at_eos(tiny_base, model_and_tok):
    """Make a token the model emits mid-answer the eos: the answer must end right before it."""
    from transformers import AutoTokenizer

    model, tok = model_and_tok
    ids = torch.tensor([render_prompt(PROMPTS[1], tok)])
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=10, eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    stop = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    tok2 = AutoTokenizer.from_pretrained(tiny_base)
    tok2.padding_side = "left"
    tok2.eos_token = tok2.convert_ids_to_tokens(full[stop])
    got = generate_answers(model, tok2, [PROMPTS[1], PROMPTS[0]], max_new_tokens=10, log=None)
    assert got[0] == tok.decode(full[:stop], skip_special_tokens=True)


def test_evaluate_source(model_and_tok):
    model, tok = model_and_tok
    rows = [{"messages": [*p, {"role": "assistant", "content": "?"}]} if isinstance(p, list)
            else {"prompt": p, "completion": "?"} for p in PROMPTS]
    settings = EvalSettings(max_new_tokens=8, batch_size=2)
    greedy = generate_answers(model, tok, PROMPTS, max_new_tokens=8, log=None)
    # references = the model's own greedy answers: exact match 1; change one reference: 2/3
    rows = [{"messages": [*r["messages"][:-1], {"role": "assistant", "content": g}]} if "messages" in r
            else {"prompt": r["prompt"], "completion": g} for r, g in zip(rows, greedy)]
    res = evaluate_source(model, tok, rows, "exact_match", settings, 128, log=None)
    assert res == {"metric": "exact_match", "value": 1.0, "n": 3, "predictions": greedy}
    rows[1] = {"prompt": rows[1]["prompt"], "completion": greedy[1] + "x"}
    assert evaluate_source(model, tok, rows, "exact_match", settings, 128, log=None)["value"] == pytest.approx(2 / 3)
    capped = evaluate_source(model, tok, rows, "exact_match", EvalSettings(max_new_tokens=8, max_rows_per_source=1), 128, log=None)
    assert capped["n"] == 1 and capped["predictions"] == greedy[:1]
    loss = evaluate_source(model, tok, rows, "loss", settings, 128, log=None)
    assert loss == {"metric": "loss", "value": pytest.approx(mean_loss(model, encode_for_loss(rows, tok, 128)), rel=1e-6), "n": 3}
    with pytest.raises(LorademError, match="exact match needs a prompt and an answer.*use metric: loss"):
        evaluate_source(model, tok, [{"text": "abc"}], "exact_match", settings, 128, log=None)


# ---- evaluation scores the tokens training scores ------------------------------------

LONG = ", ".join(str(n) for n in range(40, 0, -1))  # runs past max_length: truncated mid-completion
TRL_ROWS = {
    "messages": [
        ROWS[0],
        ROWS[3],
        {"messages": [{"role": "user", "content": "What is 123 + 456?"}, {"role": "assistant", "content": "579"},
                      {"role": "user", "content": "Sort these numbers: 42, 7, 19, 3."},
                      {"role": "assistant", "content": "3, 7, 19, 42"}]},
        {"messages": [{"role": "user", "content": "Sort these numbers:"}, {"role": "assistant", "content": LONG}]},
    ],
    "prompt_completion": [
        ROWS[1],  # the prompt's trailing space merges with the completion's first token
        {"prompt": "What is 123 + 456? Answer:", "completion": " 579"},
        {"prompt": "Uppercase: hello world.", "completion": " HELLO WORLD<|im_end|>"},  # eos already there
        {"prompt": "Sort these numbers:", "completion": " " + LONG},
    ],
    "text": [ROWS[2], {"text": "Uppercase: hello world. HELLO WORLD<|im_end|>"}, {"text": "Sort: " + LONG}],
}


def trl_training_tokens(base: Path, rows: list[dict], fmt: str, max_length: int, scratch: Path) -> list[tuple[list, list]]:
    """(input_ids, labels) of each row as TRL's SFT trainer prepares it for training, built as loradem.train.sft
    builds its trainer (same configs, same row conversion); -100 where training computes no loss."""
    train = TrainSettings(max_length=max_length, max_steps=1, batch_size=1, eval_steps=1)
    sft, lora = trainer_configs(train, LoraSettings(r=2), seed=0, output_dir=scratch / fmt, fmt=fmt)
    data = Dataset.from_list(trl_rows(rows, fmt))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=sft, train_dataset=data, eval_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(base), peft_config=lora)
    out = []
    for example in trainer.train_dataset:
        ids = example["input_ids"]
        if "labels" in example:  # TRL >= 1.x folds its completion mask into labels
            labels = example["labels"]
        elif "completion_mask" in example:
            labels = [t if m else -100 for t, m in zip(ids, example["completion_mask"])]
        else:
            labels = list(ids)
        out.append((list(ids), list(labels)))
    return out


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "text"])
def test_evaluation_scores_the_tokens_training_scores(tiny_base, tmp_path, fmt):
    """The loss the search and the report compute averages over exactly the tokens TRL trains on."""
    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = TRL_ROWS[fmt]
    trained = trl_training_tokens(tiny_base, rows, fmt, 96, tmp_path)
    assert len(trained) == len(rows)  # TRL kept every row (none lost its completion to truncation)
    for row, (ids, labels) in zip(rows, trained):
        assert encode_row(row, tok, 96) == (ids, labels), row
    assert any(len(ids) == 96 and labels[-1] != -100 for ids, labels in trained)  # one row is cut mid-completion
    if fmt == "messages":  # what the chat template closes the assistant turn with is scored, as in training
        ids, labels = trained[0]
        assert tok.decode([t for t in labels if t != -100]) == "579<|im_end|>\n"


# ---- the evaluation stage from plain inputs ------------------------------------------

def test_compare_models_from_plain_settings_and_paths(tiny_base, tmp_path, capsys, monkeypatch):
    """No recipe and no YAML: settings, rows and folders in, real scores (checked against the models) out."""
    monkeypatch.delenv("LORADEM_NO_PROGRESS", raising=False)
    from test_multi import make_adapter

    from loradem.evaluate.compare import EvalPlan, EvalSource, compare_models
    from loradem.model.soup import load_multi, load_tokenizer, set_weights

    tok = load_tokenizer(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    prompts = [p for p in PROMPTS if isinstance(p, list)]
    own = generate_answers(base, tok, prompts, max_new_tokens=6, log=None)  # the base's own answers: it scores 100%
    answered = [{"messages": [*p, {"role": "assistant", "content": a}]} for p, a in zip(prompts, own)]
    text = [ROWS[2], {"text": "Uppercase: hello world. HELLO WORLD"}]
    adapters = {name: make_adapter(tiny_base, tmp_path / name, seed=i, r=4, targets=["q_proj", "v_proj", "down_proj"])
                for i, name in enumerate(("answers", "text"))}
    plan = EvalPlan(
        run_name="plain", sources=(EvalSource("answers", "exact_match", answered), EvalSource("text", "loss", text)),
        settings=EvalSettings(max_new_tokens=6, batch_size=4), max_length=64, base_dir=tiny_base, adapters=adapters,
        search={"weights": {"answers": 0.0, "text": 0.0}, "search_seconds": 1.5},
        model_dir=tiny_base,  # the "assembled" model folds weight 0: the dem row must score as the base row
        out_dir=tmp_path / "run", reproduce="loradem run plain.yaml",
    )
    lines: list[str] = []
    rows = compare_models(plan, log=lines.append)

    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ["base", "adapter:answers", "adapter:text", "uniform", "sum", "dem"]
    base_loss = mean_loss(base, encode_for_loss(text, tok, 64))
    assert by_name["base"]["per_source"] == {"answers": 1.0, "text": pytest.approx(base_loss, rel=1e-5)}
    assert by_name["dem"]["per_source"] == by_name["base"]["per_source"]
    assert by_name["base"]["average"] is None  # exact match and loss do not average
    model, tok2 = load_multi(tiny_base, adapters)
    set_weights(model, {"answers": 1.0, "text": 1.0})
    summed = evaluate_source(model, tok2, answered, "exact_match", plan.settings, 64, log=None)
    assert by_name["sum"]["per_source"]["answers"] == summed["value"]
    assert by_name["sum"]["per_source"]["text"] == pytest.approx(mean_loss(model, encode_for_loss(text, tok2, 64)), rel=1e-5)
    assert by_name["sum"]["per_source"]["text"] != pytest.approx(base_loss, rel=1e-4)  # the adapters do change the model
    assert by_name["dem"]["cost"]["search_seconds"] == 1.5

    # one log line per model, and one bar over the models
    assert [line.split()[0] for line in lines] == list(by_name)
    err = capsys.readouterr().err
    assert "eval" in err and "6/6" in err and "model" in err

    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert doc["recipe"] == "plain" and doc["metric"] == {"answers": "exact_match", "text": "loss"}
    assert doc["rows"] == rows and doc["test_rows"] == {"answers": 2, "text": 2} and "recipe_path" not in doc
    assert doc["predictions"]["base"]["answers"] == own
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.startswith("# plain: results") and "```\nloradem run plain.yaml\n```" in md


def test_increment_finds_the_warm_start_after_the_run_moved(tmp_path):
    from loradem.evaluate.compare import _increment

    records = {"a": {"train_tokens": 10, "train_seconds": 1.0}, "b": {"train_tokens": 7, "train_seconds": 2.0}}
    rows = [{"name": "mix", "cost": {"train_tokens": 30}}]
    built = tmp_path / "built" / "run"
    (built / "search").mkdir(parents=True)
    (built / "old").mkdir()
    (built / "old" / "weights.json").write_text(json.dumps({"weights": {"a": 1.0}}))
    run = tmp_path / "moved" / "run"
    run.parent.mkdir()
    built.rename(run)  # the run folder moved after its search: the recorded path is relative to search/
    inc = _increment({"warm_start": "../old/weights.json", "search_seconds": 3.0}, ["a", "b"], records, rows, run)
    assert inc["previous"] == "old/weights.json"  # relative to report.json's folder
    assert inc["new_sources"] == ["b"] and inc["dem_cost"]["train_tokens"] == 7 and inc["dem_cost"]["search_seconds"] == 3.0
    # a record naming the file as an absolute path still works; one naming a missing file gives no increment
    absolute = str(run / "old" / "weights.json")
    assert _increment({"warm_start": absolute}, ["a", "b"], records, rows, run)["new_sources"] == ["b"]
    assert _increment({"warm_start": "../nowhere.json"}, ["a", "b"], records, rows, run) is None
    assert inc["mix_retrain_cost"] == {"train_tokens": 30} and inc["mix_retrain_row"] == "mix"
    # with a proportion grid, retraining the mix retrains the whole grid: mix-tuned's cost
    grid = [*rows, {"name": "mix-tuned", "cost": {"train_tokens": 90}}]
    inc = _increment({"warm_start": "../old/weights.json"}, ["a", "b"], records, grid, run)
    assert inc["mix_retrain_cost"] == {"train_tokens": 90} and inc["mix_retrain_row"] == "mix-tuned"


def test_model_identity_is_the_base_the_used_adapters_and_their_weights(tmp_path):
    from loradem.evaluate.compare import model_identity

    a, b, base = tmp_path / "a", tmp_path / "b", tmp_path / "base"
    two = {"x": a, "y": b}
    assert model_identity(base, two, {"x": 1.0, "y": 0.0}) == model_identity(base, {"x": a}, {"x": 1.0})
    assert model_identity(base, two, {"x": 1.0, "y": 0.0}) != model_identity(base, two, {"x": 1.0, "y": 1e-9})
    assert model_identity(base, two, {"x": 0.5, "y": 0.5}) != model_identity(tmp_path / "other", two, {"x": 0.5, "y": 0.5})
    assert model_identity(base, two, {"x": 0.5, "y": 0.5}) != model_identity(base, {"x": a, "y": a}, {"x": 0.5, "y": 0.5})
    layered = {"x": {"0": 1.0, "1": 0.5}, "y": {"0": 0.0, "1": 0.0}}  # per layer group: kept whole
    assert model_identity(base, two, layered) != model_identity(base, {"x": a}, {"x": layered["x"]})
