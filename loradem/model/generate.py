"""Metrics on normalized rows: masked validation loss, greedy generation, exact match.

    encoded = encode_for_loss(rows, tokenizer, max_length=256)    # once
    loss = mean_loss(model, encoded, batch_size=16)               # per trial
    preds = generate_answers(model, tokenizer, prompts)           # greedy, left-padded
    score = exact_match(preds, references)                        # fraction in [0, 1]

Rows become token ids by `loradem.model.render`, which reproduces TRL's
training tokenization, so a loss here averages over exactly the tokens
training scored. Exact match compares greedy completions, stopped at eos,
with the references after stripping and collapsing whitespace
(case-sensitive).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from loradem.errors import LorademError
from loradem.model.render import IGNORE, Prompt, encode_for_loss, eval_pair, normalize_answer, render_prompt

# ---- loss -------------------------------------------------------------------

def _device(model) -> torch.device:
    return next(model.parameters()).device


def collate_right(batch: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(y)] = torch.tensor(y)
    return ids.to(device), mask.to(device), labels.to(device)


def scored_tokens(encoded: Sequence[tuple[list[int], list[int]]]) -> int:
    """How many tokens the loss averages over (labels != -100, after the one-position shift)."""
    return sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in encoded)


def scored_logits(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the scored positions only: the vocabulary projection is skipped for prompt tokens.

    transformers' `logits_to_keep` with a boolean (batch, seq) mask returns the kept positions flattened;
    a model that does not honour it gets the full logits, sliced here.
    """
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep[:, :-1]]
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        logits = model(input_ids=ids, attention_mask=mask).logits[keep]
    return logits.float(), targets


@torch.inference_mode()
def mean_loss(
    model, encoded: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16, log: Optional[Callable[[str], None]] = None
) -> float:
    """Token-weighted mean cross-entropy over all completion tokens (right-padded batches, no grad)."""
    total_tokens = scored_tokens(encoded)
    if total_tokens == 0:
        raise LorademError("mean_loss: no completion tokens to score (empty rows, or every completion truncated by max_length)")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths together: less padding
    device = _device(model)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start : start + batch_size]]
        ids, mask, labels = collate_right(batch, device)
        if not (labels[:, 1:] != IGNORE).any():
            continue
        logits, targets = scored_logits(model, ids, mask, labels)
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double().cpu()
        if log:
            log(f"loss: {min(start + batch_size, len(order))}/{len(order)} rows")
    return float(total / total_tokens)


# ---- generation and exact match -------------------------------------------

def _greedy_config(tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.inference_mode()
def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    log: Optional[Callable[[str], None]] = print,
) -> list[list[int]]:
    """Greedy new-token ids of `prompts` (strings, or message lists rendered with the chat template), in
    left-padded batches: each up to and including eos, at most `max_new_tokens`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise LorademError("generate: the tokenizer has neither a pad nor an eos token")
    config = _greedy_config(tokenizer, max_new_tokens)
    device = _device(model)
    eos_id = tokenizer.eos_token_id
    encoded = [render_prompt(p, tokenizer) for p in prompts]
    out: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, x in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[i, width - len(x) :] = torch.tensor(x)
            mask[i, width - len(x) :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        out += [row[: row.index(eos_id) + 1] if eos_id in row else row for row in gen[:, width:].tolist()]
        if log:
            log(f"generate: {min(start + batch_size, len(encoded))}/{len(encoded)} prompts")
    return out


def generate_replies(model, tokenizer, prompts: Sequence[Prompt], **kwargs) -> list[tuple[str, bool]]:
    """Greedy completions of `prompts` (`generate_ids`' keyword arguments), decoded up to eos, each with whether
    it ended (eos within `max_new_tokens`) or was cut off."""
    eos_id = tokenizer.eos_token_id
    return [(tokenizer.decode(_cut_at_eos(row, eos_id), skip_special_tokens=True), eos_id in row)
            for row in generate_ids(model, tokenizer, prompts, **kwargs)]


def generate_answers(model, tokenizer, prompts: Sequence[Prompt], **kwargs) -> list[str]:
    """`generate_replies`' texts alone (same keyword arguments): greedy completions decoded up to eos."""
    return [text for text, _ in generate_replies(model, tokenizer, prompts, **kwargs)]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalization (case-sensitive)."""
    if len(predictions) != len(references):
        raise LorademError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise LorademError("exact_match: no rows to score")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def evaluate_source(
    model, tokenizer, rows: Sequence[dict], metric: str, settings, max_length: int, *, log: Callable[[str], None] = print
) -> dict:
    """One source's metric on its rows (capped by settings.max_rows_per_source): value, n, and predictions for exact match."""
    if settings.max_rows_per_source is not None:
        rows = list(rows)[: settings.max_rows_per_source]
    if not rows:
        raise LorademError("evaluate: no rows to evaluate")
    if metric == "loss":
        value = mean_loss(model, encode_for_loss(rows, tokenizer, max_length), batch_size=settings.batch_size, log=log)
        return {"metric": "loss", "value": value, "n": len(rows)}
    if metric != "exact_match":
        raise LorademError(f"evaluate: metric: expected 'exact_match' or 'loss', got {metric!r}")
    pairs = [eval_pair(row) for row in rows]
    preds = generate_answers(
        model, tokenizer, [p for p, _ in pairs], max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, log=log
    )
    refs = [r for _, r in pairs]
    return {"metric": "exact_match", "value": exact_match(preds, refs), "n": len(rows), "predictions": preds}
