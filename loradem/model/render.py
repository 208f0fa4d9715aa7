"""How a row becomes model input: the tokens training scores are the tokens the search and evaluation score.

    ids, labels = encode_row({"prompt": "2+3=", "completion": "5"}, tokenizer, max_length=256)
    prompt, answer = eval_pair(row)          # what generation is given, and what it must produce

Training is TRL's SFT trainer (`loradem.train.sft`), and `encode_row`
reproduces its tokenization of the rows loradem gives it, so a validation or
test loss averages over exactly the tokens the adapters were trained on:

- ``messages``: trained as a conversational prompt/completion. The prompt is
  ``messages[:-1]`` through the chat template with the generation prompt; the
  sequence is the whole conversation through the chat template, so the scored
  completion is the last assistant message *and whatever the template closes
  its turn with* (SmolLM2: ``<|im_end|>`` then a newline).
- ``prompt_completion``: plain text, prompt then completion + eos (eos not
  doubled when the completion already ends with it).
- ``text``: the text + eos (not doubled), every token scored.

The completion starts where the tokenized prompt and the tokenized whole
diverge (a prompt's trailing space can merge with the completion's first
token), prompt positions are masked (-100), and both are cut on the right at
max_length, all as TRL does.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from loradem.errors import LorademError

IGNORE = -100
Row = dict[str, Any]
Prompt = Union[list[dict], str]


def _row_format(row: dict, index: int) -> str:
    keys = set(row) if isinstance(row, dict) else set()
    if keys == {"messages"}:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise LorademError(f"row {index}: messages: expected a conversation ending with the assistant's answer")
        return "messages"
    if keys == {"prompt", "completion"}:
        return "prompt_completion"
    if keys == {"text"}:
        return "text"
    raise LorademError(
        f"row {index}: expected keys messages | prompt+completion | text, got {sorted(keys) if keys else type(row).__name__}"
    )


def render_prompt(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids of a prompt: chat-templated with the generation prompt for messages, plain for a string."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(messages: list[dict], tokenizer, *, add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=True)["input_ids"]


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def encode_row(row: dict, tokenizer, max_length: int, index: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row as TRL's SFT trainer builds them for training: prompt positions are -100,
    both truncated on the right to max_length."""
    fmt = _row_format(row, index)
    eos = tokenizer.eos_token
    if fmt == "text":
        ids = tokenizer(_with_eos(row["text"], eos))["input_ids"][:max_length]
        return ids, list(ids)
    if fmt == "messages":
        prompt_ids = _chat_ids(row["messages"][:-1], tokenizer, add_generation_prompt=True)
        ids = _chat_ids(row["messages"], tokenizer)
    else:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + _with_eos(row["completion"], eos))["input_ids"]
    # like TRL: the completion starts where the two tokenizations diverge
    start = _common_prefix(prompt_ids, ids)
    labels = [IGNORE] * start + ids[start:]
    return ids[:max_length], labels[:max_length]


def encode_for_loss(rows: Sequence[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Tokenize rows once for `mean_loss`: (input_ids, labels with prompt tokens masked as -100) per row."""
    return [encode_row(row, tokenizer, max_length, i) for i, row in enumerate(rows)]


def eval_pair(row: Row) -> tuple[Prompt, str]:
    """(prompt, reference answer) of a row: the messages before the last assistant turn, or the prompt string."""
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1]["content"]
    if "prompt" in row and "completion" in row:
        return row["prompt"], row["completion"]
    raise LorademError(
        'exact match needs a prompt and an answer, but a "text" row has neither '
        "(use metric: loss, or messages / prompt_completion data)"
    )


def normalize_answer(s: str) -> str:
    """Strip, and collapse every run of whitespace to one space (case-sensitive)."""
    return " ".join(s.split())
