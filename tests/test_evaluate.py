"""Masked loss against a hand computation, greedy generation against unpadded `generate`, exact match."""

from __future__ import annotations

import pytest
import torch

from loradem.errors import LorademError
from loradem.model.generate import evaluate_source, exact_match, generate_answers, mean_loss
from loradem.model.render import encode_for_loss, render_prompt
from loradem.recipe import EvalSettings

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    # messages: the prompt is the chat template with the generation prompt; the completion is answer + eos
    prompt = tok.apply_chat_template(ROWS[0]["messages"][:-1], add_generation_prompt=True, tokenize=False)
    ids, labels = enc[0]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert tok.decode(labels[n_prompt:]) == "579<|im_end|>"
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
