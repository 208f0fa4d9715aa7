"""Base-capability retention: how close a model stays to the base on generic prompts no source trains on.

    ref = base_reference(base_dir, prompts, max_new_tokens=24, batch_size=32, cache=Path("runs/demo/retention_base.json"))
    retention_scores(model, tokenizer, ref)       # {"agreement": 0.85, "kl": 0.0123}

Two numbers per model, both against the base's own greedy replies to the
prompts (`loradem.evaluate.heldout.retention_prompts`), both from one
teacher-forced forward pass per batch over prompt + base reply (no
generation for the model):

- ``agreement``: how much of the base's greedy reply (the new tokens up to and
  including eos, at most ``max_new_tokens``) the model's own greedy reply
  repeats before it first departs from it, as a share of the base's reply,
  averaged over prompts: 1 when every reply is the base's, 0.5 when replies
  follow the base for half their length. Greedy decoding takes the top token
  given the prefix so far, so up to the first difference both replies share
  their prefix, and the model keeps to the base's reply at a position exactly
  when its top token there is the base's token, which is the base's own top
  token: that is what is checked, on the teacher-forced logits of both (a test
  compares it with real generation). A whole-reply match would be too strict
  to rank merges: on 24-token replies every merged model of the demo scored 0.
- ``kl``: KL(base ‖ model) = Σ_v p_base(v)·(log p_base(v) − log p_model(v)) at
  every position of the base's replies, averaged over all reply tokens;
  computed in float64 from the logits. 0 means the base's next-token
  distributions exactly.

A base without a chat template gets each conversation's last user turn as
plain text (report.json's ``retention.plain_text``), the way it reads a
prompt/completion source.

The base's replies are generated once and cached in the run folder (`cache`,
keyed by the base's weights, the prompts' tokens, ``max_new_tokens`` and the
batch size, which fixes the padding); its logits on them are recomputed by one
forward pass per evaluation and held in memory (float32, reply positions only:
about 190 MB for 40 prompts × 24 tokens on a 49k vocabulary). Batches are the
same for the base and every model, so a model equal to the base scores kl 0
and agreement 1 exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loradem.evaluate.heldout import prompt_text
from loradem.files import atomic_write_json, fingerprint_weights, read_json, stable_hash
from loradem.model.generate import collate_right, generate_ids, scored_logits
from loradem.model.render import IGNORE, Prompt, render_prompt
from loradem.model.soup import load_base, load_tokenizer

KL_CHUNK = 128  # reply positions per float64 softmax: bounds the temporary memory on a large vocabulary


@dataclass(frozen=True)
class Reference:
    """The base's side of retention: its greedy replies, and its logits at every reply position (per batch)."""

    prompts: tuple[Prompt, ...]
    reply_ids: tuple[tuple[int, ...], ...]
    base_logits: tuple[torch.Tensor, ...]  # one (reply tokens in the batch, vocab) float32 CPU tensor per batch
    max_new_tokens: int
    batch_size: int
    generation_seconds: float  # spent generating the base's replies in this call (0 when they came from the cache)


@torch.inference_mode()
def reply_logits(model, tokenizer, prompts: Sequence[Prompt], replies: Sequence[Sequence[int]], batch_size: int) -> list[torch.Tensor]:
    """Per batch of `batch_size` prompts, the model's logits (float32, CPU) at each position that predicts a reply
    token, teacher-forced on prompt + reply (right-padded), in prompt order then reply order."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = []
        for prompt, reply in zip(prompts[start:start + batch_size], replies[start:start + batch_size]):
            ids = render_prompt(prompt, tokenizer)
            batch.append((ids + list(reply), [IGNORE] * len(ids) + list(reply)))
        ids, mask, labels = collate_right(batch, device)
        logits, _ = scored_logits(model, ids, mask, labels)
        out.append(logits.float().cpu())
    return out


def kl_sum(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Σ over positions of KL(softmax(p) ‖ softmax(q)), in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, p_logits.shape[0], KL_CHUNK):
        lp = torch.log_softmax(p_logits[i:i + KL_CHUNK].double(), dim=-1)
        lq = torch.log_softmax(q_logits[i:i + KL_CHUNK].double(), dim=-1)
        total += (lp.exp() * (lp - lq)).sum()
    return float(total)


def reference(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int,
              replies: Sequence[Sequence[int]] | None = None) -> Reference:
    """`model` as the base: its greedy replies (generated unless given) and its logits on them."""
    seconds = 0.0
    if replies is None:
        start = time.perf_counter()
        replies = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, log=None)
        seconds = time.perf_counter() - start
    return Reference(tuple(prompts), tuple(tuple(r) for r in replies),
                     tuple(reply_logits(model, tokenizer, prompts, replies, batch_size)), max_new_tokens, batch_size,
                     round(seconds, 3))


def renderable(prompts: Sequence[Prompt], tokenizer) -> list[Prompt]:
    """`prompts` as this tokenizer can render them: conversations become their last user turn's text when it has
    no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [p if isinstance(p, str) else prompt_text(p) for p in prompts]


def base_reference(base_dir: Path, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int, cache: Path) -> Reference:
    """The base's `Reference` on `renderable` prompts, its replies read from `cache` when it holds them for this base,
    prompts and settings (else generated and written there)."""
    model, tokenizer = load_base(base_dir), load_tokenizer(base_dir)
    prompts = renderable(prompts, tokenizer)
    key = stable_hash({"base": fingerprint_weights(base_dir), "prompt_ids": [render_prompt(p, tokenizer) for p in prompts],
                       "max_new_tokens": max_new_tokens, "batch_size": batch_size})
    cached = read_json(cache) if Path(cache).is_file() else {}
    if cached.get("key") == key:
        return reference(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         replies=[r["ids"] for r in cached["replies"]])
    ref = reference(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    eos = tokenizer.eos_token_id
    atomic_write_json(cache, {
        "key": key, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "generation_seconds": ref.generation_seconds,
        "replies": [{"prompt": p, "text": tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True),
                     "ended": eos in r, "ids": list(r)} for p, r in zip(prompts, ref.reply_ids)],
    })
    return ref


def retention_scores(model, tokenizer, ref: Reference) -> dict[str, float]:
    """{"agreement": mean share of the base's reply that the model's greedy reply repeats before departing from it,
    "kl": mean KL(base ‖ model) per reply token}."""
    logits = reply_logits(model, tokenizer, ref.prompts, ref.reply_ids, ref.batch_size)
    total = sum(kl_sum(p, q) for p, q in zip(ref.base_logits, logits))
    # the base's top tokens are its reply's tokens (greedy); taken from the same logits, a model equal to the base
    # agrees exactly even where generation and teacher forcing could round a near-tie differently
    same = torch.cat(logits).argmax(dim=-1) == torch.cat(ref.base_logits).argmax(dim=-1)
    agreement = sum(kept_prefix(h) / len(h) for h in same.split([len(r) for r in ref.reply_ids])) / len(ref.reply_ids)
    return {"agreement": agreement, "kl": total / len(same)}


def kept_prefix(same: torch.Tensor) -> int:
    """How many leading positions of a reply agree (`same` is one bool per position)."""
    differ = (~same).nonzero()
    return int(differ[0, 0]) if len(differ) else len(same)
