"""The transformers TrainerCallbacks loradem adds to TRL's trainer: log lines, a progress bar, the mix's token budget.

They live apart from `loradem.train.sft` and `loradem.train.mix` because subclassing
TrainerCallback imports transformers' trainer stack (about 10 s), and `loradem check`
and `pipeline.finished_adapters` import those modules for their jobs, keys and checks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from transformers import TrainerCallback

from loradem.progress import progress

Log = Callable[[str], Any]


class ProgressLog(TrainerCallback):
    """One line per evaluation: step, last train loss, validation loss."""

    def __init__(self, name: str, log: Log):
        self.name, self.log, self.train_loss = name, log, float("nan")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train_loss = logs["loss"]
        if "eval_loss" in logs:
            self.log(
                f"{self.name}: step {state.global_step}/{state.max_steps}: "
                f"train loss {self.train_loss:.4f}, val loss {logs['eval_loss']:.4f}"
            )


class ProgressBar(TrainerCallback):
    """One bar per training run, in optimizer steps with rate and ETA. It opens when training begins (the step
    count is known only then); the caller calls `close` after ``trainer.train()``, which also runs when
    training raises (on_train_end does not)."""

    def __init__(self, desc: str):
        self.desc, self.bar, self._open = desc, None, contextlib.ExitStack()

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = self._open.enter_context(progress(state.max_steps, self.desc, unit="step"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        self._open.close()
        self.bar = None


class TokenBudget(TrainerCallback):
    """Stop at the first optimizer step whose counted training tokens (TRL's num_tokens) reach `target`,
    and evaluate and checkpoint that step so it can be the one kept."""

    def __init__(self, target: int):
        self.target, self.reached_at = target, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.reached_at is None and "loss" in logs and logs.get("num_tokens", 0) >= self.target:
            self.reached_at = state.global_step
            control.should_training_stop = True
            control.should_evaluate = True
            control.should_save = True
