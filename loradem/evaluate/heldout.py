"""What the held-out measures read: held-out tasks' rows and the retention prompts, checked before any model runs.

    from loradem.evaluate.heldout import held_out_rows, retention_prompts, check_not_anchors
    rows = held_out_rows(recipe.eval.held_out[0])          # messages / prompt-completion rows, each checked
    prompts = retention_prompts(recipe.eval.retention)     # chat turns (or plain strings), builtin or a file
    check_not_anchors(prompts, recipe.anchor)              # a retention prompt the adapters trained on is refused

A held-out task (``eval.held_out[]``) is a file of rows no source trains on,
scored by exact match on every report row (`loradem.evaluate.compare`), so
each needs a prompt and an answer: ``text`` rows are refused, and a bad row
is one line naming the file and the row, as for a source's data. Retention
prompts (``eval.retention.prompts``) are the 40 builtin everyday instructions
(`loradem.data.retention_prompts`, each one user turn) or a file's prompts
(answers ignored); they measure how far each model moved from the base
(`loradem.evaluate.retention`), which means nothing on a prompt the adapters
were trained to answer like the base: one that is also an anchor prompt is
refused. No torch here: `loradem check` reads these in about a second.
"""

from __future__ import annotations

from loradem.data.anchors import prompts_for
from loradem.data.retention_prompts import PROMPTS
from loradem.data.rows import as_chat, display_name, read_rows
from loradem.errors import LorademError
from loradem.model.render import Prompt, Row, eval_pair
from loradem.recipe import AnchorSettings, HeldOutTask, RetentionSettings


def held_out_rows(task: HeldOutTask) -> list[Row]:
    """Every row of a held-out task, checked (a bad row raises naming the file and row), as evaluation renders it."""
    rows, fmt = read_rows(task.data)
    if fmt == "text":
        raise LorademError(f"{display_name(task.data)}: eval.held_out {task.name!r}: exact match needs a prompt and an "
                           "answer; expected messages or prompt/completion rows, got text rows")
    return [as_chat(r) for r in rows] if task.chat_template and fmt == "prompt_completion" else rows


def retention_prompts(settings: RetentionSettings) -> list[Prompt]:
    """The retention prompts: the builtin list as one user turn each, or a file's prompts as evaluation renders them."""
    if settings.prompts == "builtin":
        return [[{"role": "user", "content": p}] for p in PROMPTS]
    rows, fmt = read_rows(settings.prompts)
    if fmt == "text":
        raise LorademError(f"{display_name(settings.prompts)}: eval.retention.prompts: expected messages or "
                           "prompt/completion rows (only their prompts are used), got text rows")
    return [eval_pair(r)[0] for r in rows]


def prompt_text(prompt: Prompt) -> str:
    """What a prompt asks: a plain string, or the last user turn of a conversation (stripped)."""
    if isinstance(prompt, str):
        return prompt.strip()
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "").strip()


def check_not_anchors(prompts: list[Prompt], anchor: AnchorSettings, where: str = "") -> None:
    """Refuse a retention prompt that anchored training answers with the base's own reply (it would measure nothing)."""
    anchored = {prompt_text(p) for p in prompts_for(anchor)}
    for i, p in enumerate(prompts, start=1):
        if prompt_text(p) in anchored:
            raise LorademError(f"eval.retention.prompts: prompt {i} ({prompt_text(p)[:60]!r}) is also an anchor prompt "
                               f"({where}anchor.data: {anchor.data}); a held-out prompt must not be trained on")
