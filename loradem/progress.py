"""What a run shows on the terminal: one line per event, one progress bar per long stage, no library noise.

    log = stage_log("train")
    log("addition: training on 892 rows")            # [12:00:01 train] addition: training on 892 rows
    with progress(80, "train addition", unit="step") as bar:
        for step in range(80):
            ...
            bar.update(1)                             # rate and ETA on one line, redrawn in place

    quiet_libraries()                                 # once, before transformers / trl / bitsandbytes load

Bars go to stderr and log lines go through the bar's writer, so the two never
tear each other. `set_verbose(True)` (the CLI's --verbose) keeps every
library's own messages and progress bars.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm.auto import tqdm

Log = Callable[[str], None]
_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    global _VERBOSE
    _VERBOSE = verbose


def verbose() -> bool:
    return _VERBOSE


def stage_log(stage: str) -> Log:
    """A logger for one stage: ``[HH:MM:SS stage] message``, printed above any live bar."""

    def log(msg: str) -> None:
        tqdm.write(f"[{time.strftime('%H:%M:%S')} {stage}] {msg}", file=sys.stdout)
        sys.stdout.flush()

    return log


@contextmanager
def progress(total: int | None, desc: str, *, unit: str = "it", bytes: bool = False) -> Iterator[tqdm]:
    """One bar with count, rate and ETA (`bytes`: sizes in kB/MB/GB). Off a terminal it redraws only with a log
    line or every 30 s, so a CI log stays short; LORADEM_NO_PROGRESS=1 turns bars off."""
    interactive = sys.stderr.isatty()
    # a terminal that reports no size (a bare pty, some CI consoles): tqdm would draw an empty bar, or hide it
    sized = interactive and min(os.get_terminal_size(sys.stderr.fileno())) > 0
    bar = tqdm(total=total, desc=desc, unit="B" if bytes else unit, unit_scale=bytes, unit_divisor=1024 if bytes else 1000,
               dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 40, leave=True, file=sys.stderr,
               mininterval=0.5 if interactive else 30.0, disable=os.environ.get("LORADEM_NO_PROGRESS") == "1")
    try:
        yield bar
    finally:
        bar.close()


# Messages that are harmless and look like errors to a user; kept out unless verbose.
_NOISY_LOGGERS = ("bitsandbytes", "transformers", "datasets", "peft", "trl", "accelerate", "optuna", "lm_eval", "torch.distributed")


def quiet_libraries() -> None:
    """Keep the libraries' warnings, info logs and own progress bars off the terminal (errors still show), unless verbose.

    Call it before the heavy libraries load: it sets the environment variables they read at import, and
    the logging levels and warning filters Python applies to them. Libraries already loaded are told too.
    """
    if _VERBOSE:
        return
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                       ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       # tqdm's default for every bar not passed `disable` (lm-eval's, TRL's); loradem's own pass it
                       ("TQDM_DISABLE", "1")):
        os.environ.setdefault(var, value)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|trl|peft|torch|accelerate|datasets|optuna|lm_eval)\b")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "optuna" in sys.modules:
        quiet_optuna()


def quiet_optuna() -> None:
    """Optuna sets its own log level when it loads: call this after `import optuna` (no-op when verbose)."""
    if not _VERBOSE:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
