"""Training throughput: loradem's trainer against a minimal plain TRL script, and TRL's batching options, on one demo source.

    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/bench_train.py --threads 1     # loradem, trl, trl-matched
    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/bench_train.py --threads 1 --steps 12 \\
        --variants loradem,trl,trl-matched,trl-bf16,trl-grouped,trl-padding-free,trl-packed     # and TRL's batchings
    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/bench_train.py --threads 1 --steps 12 \
        --variants loradem,trl,trl-matched,trl-bf16,loradem-trl-loss,loradem-bf16               # what the loss saves
    flock /tmp/loradem-heavy.lock .venv/bin/python benchmarks/bench_train.py --threads 1 --steps 20 \
        --variants trl,trl-validated,loradem                                                  # equal work
    .venv/bin/python benchmarks/bench_train.py --device cuda --steps 60                         # on a GPU

Every variant trains the same rows (--source's training split of --recipe, the demo's addition rows by default)
for --steps optimizer steps of the recipe's batch size, with the recipe's LoRA (r, alpha, dropout, targets),
learning rate, schedule, max_length, seed (so the same batches are sampled) and completion-only loss, each run in
a fresh process of its own, with the same torch thread count (--threads):

- ``loradem``: loradem's trainer, through the path `loradem train` takes (`pipeline.train_jobs` ->
  `sft.train_source`, into a scratch adapters folder), whose loss projects only the scored positions onto the
  vocabulary (`loradem.train.loss`). It evaluates on the validation rows and checkpoints once, at the last step
  (--eval-steps; the demo does so every 20 of 80 steps), then reloads the best checkpoint.
- ``loradem-trl-loss``: the same with TRL's own ``SFTTrainer.compute_loss`` (its fused head scores every position
  on a CPU): what the scored-positions loss saves.
- ``loradem-bf16``: loradem with bf16 autocast (a measurement, not a loradem setting), the LM head at the scored
  positions kept in float32 outside autocast.
- ``trl``: a minimal plain TRL script (`SFTTrainer(model=<base folder>, ...)`, conversational prompt/completion
  rows); every other setting is TRL's default: gradient checkpointing on, bf16 autocast (on a CPU too), fused
  AdamW. It logs every step (so the token count covers every step) and saves nothing.
- ``trl-validated``: the plain TRL script doing the work loradem's trainer does besides training: validation loss
  on the same validation rows at the same --eval-steps, a checkpoint at each, and the best one reloaded at the end
  (``eval_strategy``/``save_strategy="steps"``, ``load_best_model_at_end``); TRL's defaults otherwise. Against
  it, loradem is compared on equal work.
- ``trl-matched``: the same script with loradem's remaining settings too (no gradient checkpointing, float32 on a
  CPU / bf16 weights on a GPU, the recipe's optimizer): loradem's computation without its evaluation and
  checkpoints.
- ``trl-bf16``: trl-matched with bf16 autocast on a CPU too (TRL's default; on a GPU it is trl-matched).
- ``trl-padding-free``, ``trl-packed``, ``trl-grouped``: trl-matched with one of TRL's batching options:
  ``padding_free=True`` (each batch's rows concatenated into one sequence, row boundaries in position_ids; TRL
  then needs ``max_length=None``: the script checks that no row is longer than the recipe's max_length, so nothing
  would have been cut), ``packing=True, packing_strategy="bfd"`` (rows packed into bins of up to max_length tokens,
  batch_size bins a step: more rows per step), ``train_sampling_strategy="group_by_length"``.

Tokens are TRL's ``num_tokens``: the non-padding tokens fed to the model, prompt and completion (the attention
mask's sum in a padded batch, the flat sequence's length in a padding-free one), counted the same way for every
variant; loradem's record calls it ``train_tokens``. A callback marks wall and process-CPU time at every training
event: ``train s`` / ``tok/s`` is the wall time of ``trainer.train()`` (loradem's evaluation, checkpoint saves and
best-checkpoint reload included, shown apart as ``evaluation + saves``); ``median step`` is the median optimizer
step (forward, backward, optimizer), in wall and in CPU seconds, and ``tok/s at the median step`` the tokens of
a step divided by it. Other jobs on the cores inflate whole runs unevenly; the median step, and with
``--threads 1`` its CPU time, are what they disturb least. With --repeat N the variants run N times, interleaved
(v1 v2 .. v1 v2 ..): each column is the median over the N runs, the step medians over all their steps. ``load``
is the mean 1-minute load average when the variant's runs started.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("loradem", "loradem-trl-loss", "loradem-bf16", "trl", "trl-validated", "trl-matched", "trl-bf16", "trl-padding-free", "trl-packed", "trl-grouped")
DEFAULT_VARIANTS = "loradem,trl,trl-matched"


def train_timer():
    """A TrainerCallback that marks wall and process-CPU time at each training event: optimizer steps (forward,
    backward, optimizer), evaluations and checkpoint saves, from the start to the end of ``trainer.train()``."""
    from transformers import TrainerCallback

    class TrainTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[str, float, float]] = []

        def mark(self, event: str) -> None:
            _sync()
            self.marks.append((event, time.perf_counter(), time.process_time()))

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark("begin")

        def on_step_begin(self, args, state, control, **kwargs):
            self.mark("step_begin")

        def on_step_end(self, args, state, control, **kwargs):
            self.mark("step")

        def on_evaluate(self, args, state, control, **kwargs):
            self.mark("evaluate")

        def on_save(self, args, state, control, **kwargs):
            self.mark("save")

        def on_train_end(self, args, state, control, **kwargs):
            self.mark("end")

        def timings(self) -> dict:
            """Seconds of each optimizer step (wall, CPU), of all evaluations and saves, and of the whole train()."""
            spans = {"step": [], "step_cpu": [], "evaluate": 0.0, "save": 0.0}
            for (_, w0, c0), (event, w1, c1) in zip(self.marks, self.marks[1:]):
                if event == "step":
                    spans["step"].append(w1 - w0)
                    spans["step_cpu"].append(c1 - c0)
                elif event in ("evaluate", "save"):
                    spans[event] += w1 - w0
            (_, w_begin, c_begin), (_, w_end, c_end) = self.marks[0], self.marks[-1]
            return {**spans, "wall": w_end - w_begin, "cpu": c_end - c_begin}

    return TrainTimer()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_loradem(variant: str, recipe, source: str, base_dir: Path, steps: int, eval_steps: int, scratch: Path) -> dict:
    from loradem import pipeline
    from loradem.train import loss, sft
    from loradem.train.sft import TRAIN_RECORD, train_source

    train = recipe.train.model_copy(update={"max_steps": steps, "eval_steps": eval_steps})
    r = recipe.model_copy(update={"adapters_dir": str(scratch / "adapters"), "train": train})
    splits = {source: _splits(recipe, source)}
    (job,) = pipeline.train_jobs(r, splits, only=[source])
    timer = train_timer()
    callbacks = [timer]
    if variant == "loradem-trl-loss":  # this child process only: fit builds TRL's own trainer
        from trl import SFTTrainer

        loss.LossPositionsSFTTrainer = SFTTrainer
    elif variant == "loradem-bf16":
        callbacks.append(_bf16_autocast(sft))
    folder = train_source(job, base_dir, force=True, log=lambda _: None, callbacks=callbacks)
    record = json.loads((folder / TRAIN_RECORD).read_text())
    losses = [h["train_loss"] for h in record["history"] if "train_loss" in h]
    return {"tokens": record["train_tokens"], **timer.timings(), "rows_per_step": train.batch_size,
            "loss": (losses[0], losses[-1]), "steps_run": record["steps"], "record_seconds": record["train_seconds"]}


def _bf16_autocast(sft):
    """Make this child's `sft.trainer_configs` ask for bf16 autocast (set in the config's constructor: set later, it
    would not take effect), and return a callback that runs the LM head in float32, outside autocast."""
    import dataclasses

    import torch
    from transformers import TrainerCallback

    configs = sft.trainer_configs

    def with_bf16(*args, **kwargs):
        config, lora = configs(*args, **kwargs)
        return dataclasses.replace(config, bf16=True), lora

    sft.trainer_configs = with_bf16

    class Float32Head(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            assert args.bf16, "bf16 autocast was not switched on"
            head = model.get_output_embeddings()

            def forward(hidden):
                with torch.autocast(hidden.device.type, enabled=False):
                    return torch.nn.functional.linear(hidden.float(), head.weight.float())

            head.forward = forward

    return Float32Head()


def run_trl(variant: str, recipe, source: str, base_dir: Path, steps: int, eval_steps: int, scratch: Path,
            cuda: bool) -> dict:
    """The plain TRL script: SFTTrainer on the base folder, TRL's defaults unless the variant says otherwise."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    train, lora = recipe.train_for(recipe.source(source)), recipe.lora_for(recipe.source(source))
    splits = _splits(recipe, source)
    # what a TRL user writes for completion-only loss: conversational prompt/completion rows
    def trl_rows(split):
        return ([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in split]
                if splits.format == "messages" else split)

    rows = trl_rows(splits.train)
    settings: dict = {
        "output_dir": str(scratch / variant), "max_steps": steps, "per_device_train_batch_size": train.batch_size,
        "learning_rate": train.learning_rate, "lr_scheduler_type": train.lr_scheduler, "max_length": train.max_length,
        "completion_only_loss": True, "seed": recipe.seed, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "use_cpu": not cuda,
    }
    validation = None
    if variant == "trl-validated":
        validation = Dataset.from_list(trl_rows(splits.validation))
        settings.update(eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=eval_steps,
                        save_only_model=True, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                        greater_is_better=False)
    elif variant != "trl":  # loradem's remaining settings
        dtype = torch.bfloat16 if cuda else torch.float32
        settings.update(gradient_checkpointing=False, bf16=cuda or variant == "trl-bf16", optim=train.optimizer,
                        model_init_kwargs={"dtype": dtype})
    if variant == "trl-padding-free":
        settings.update(padding_free=True, max_length=None)
    elif variant == "trl-packed":
        settings.update(packing=True, packing_strategy="bfd")
    elif variant == "trl-grouped":
        settings.update(train_sampling_strategy="group_by_length")
    peft = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
    timer = train_timer()
    trainer = SFTTrainer(model=str(base_dir), args=SFTConfig(**settings), train_dataset=Dataset.from_list(rows),
                         eval_dataset=validation, peft_config=peft, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its per-step log lines; the summary below says what matters
    if variant == "trl-padding-free":
        longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
        if longest > train.max_length:
            raise SystemExit(f"trl-padding-free: a row has {longest} tokens, more than max_length={train.max_length}; "
                             "the padding-free run would not cut it as the others do")
    rows_per_step = float(train.batch_size)
    if variant == "trl-packed":
        packed = sum(len(s) for s in trainer.train_dataset["seq_lengths"])
        rows_per_step = train.batch_size * packed / len(trainer.train_dataset)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {"tokens": int(logs[-1]["num_tokens"]), **timer.timings(), "rows_per_step": rows_per_step,
            "loss": (logs[0]["loss"], logs[-1]["loss"]), "steps_run": trainer.state.global_step}


_SPLITS: dict = {}


def _splits(recipe, source: str):
    from loradem.data.rows import load_splits

    if source not in _SPLITS:
        _SPLITS[source] = load_splits(recipe.source(source), recipe.seed)
    return _SPLITS[source]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"), help="recipe giving the rows and settings (default: the demo)")
    parser.add_argument("--source", default="addition", help="the recipe's source to train (default: %(default)s)")
    parser.add_argument("--base", help="base model folder or alias (default: the recipe's base)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per variant (default: %(default)s)")
    parser.add_argument("--eval-steps", type=int, help="loradem's evaluation and checkpoint interval (default: --steps, once at the end)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, in order, from {', '.join(VARIANTS)} (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="run the variants this many times, interleaved (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads for every variant (default: torch's own choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # one run, in a fresh process
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # loradem trains on a GPU whenever torch sees one
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        Path(args.json).write_text(json.dumps(run_one(args)) + "\n")
        return []

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for rep in range(args.repeat):
            for variant in variants:
                load = os.getloadavg()[0]
                out = Path(tmp) / f"{variant}-{rep}.json"
                child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                         "--child", variant, "--json", str(out), "--scratch", str(Path(tmp) / f"{variant}-{rep}")]
                # a fresh process per run, as `loradem train` and a TRL script each are: no run inherits another's
                # process state (allocator, caches, threads)
                done = subprocess.run(child, check=False, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{variant} (run {rep + 1}) failed:\n{done.stderr[-4000:]}")
                r = json.loads(out.read_text())
                r["load"] = load
                runs[variant].append(r)
                if rep == 0 and variant == variants[0]:
                    print(f"source {args.source} of {args.recipe}: {r['rows']} training rows; {args.steps} steps of "
                          f"{r['batch_size']}; base {r['base']}; {r['device']}")
                print(f"  {variant} (run {rep + 1}): {r['tokens']:,} tokens, train {r['wall']:.1f} s "
                      f"(CPU {r['cpu']:.1f} s; evaluation {r['evaluate']:.1f} s, saves {r['save']:.1f} s), "
                      f"{r['tokens'] / r['wall']:.1f} tok/s, median step {statistics.median(r['step']):.3f} s "
                      f"(CPU {statistics.median(r['step_cpu']):.3f} s), loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}, "
                      f"load {load:.2f}", flush=True)
    results = [summary(v, rs) for v, rs in runs.items()]
    print(table(results))
    if args.json:
        first = runs[variants[0]][0]
        Path(args.json).write_text(json.dumps({"device": first["device"], "steps": args.steps, "source": args.source,
                                               "threads": args.threads, "results": results}, indent=2) + "\n")
    return results


def run_one(args) -> dict:
    """One run of one variant (in a child process): its timings and counts."""
    import torch
    import transformers

    from loradem.machine import summary as machine_summary
    from loradem.model.base import resolve_base
    from loradem.recipe import load_recipe

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    recipe = load_recipe(args.recipe)
    recipe.source(args.source)
    base_dir = resolve_base(args.base or recipe.base, log=lambda _: None)
    scratch = Path(args.scratch)
    if args.child.startswith("loradem"):
        r = run_loradem(args.child, recipe, args.source, base_dir, args.steps, args.eval_steps or args.steps, scratch)
    else:
        r = run_trl(args.child, recipe, args.source, base_dir, args.steps, args.eval_steps or args.steps, scratch, cuda)
    device = machine_summary()  # the CPU's instruction set decides what bf16 autocast costs
    return {**r, "device": device, "base": str(base_dir), "rows": len(_splits(recipe, args.source).train),
            "batch_size": recipe.train_for(recipe.source(args.source)).batch_size}


def summary(variant: str, runs: list[dict]) -> dict:
    """One row per variant: medians over its runs (their tokens are the same: the same seeded batches), step
    medians over all their steps."""
    med = statistics.median
    tokens = med(r["tokens"] for r in runs)
    steps = [x for r in runs for x in r["step"]]
    steps_cpu = [x for r in runs for x in r["step_cpu"]]
    per_step = tokens / runs[0]["steps_run"]
    return {"variant": variant, "runs": len(runs), "tokens": tokens, "rows_per_step": runs[0]["rows_per_step"],
            "wall": med(r["wall"] for r in runs), "cpu": med(r["cpu"] for r in runs),
            "tok_s": med(r["tokens"] / r["wall"] for r in runs), "tok_cpu_s": med(r["tokens"] / r["cpu"] for r in runs),
            "median_step": med(steps), "median_step_cpu": med(steps_cpu), "tok_s_step": per_step / med(steps),
            "tok_cpu_s_step": per_step / med(steps_cpu), "eval_save": med(r["evaluate"] + r["save"] for r in runs),
            "loss": runs[0]["loss"], "load": statistics.mean(r["load"] for r in runs), "per_run": runs}


def table(results: list[dict]) -> str:
    first = results[0]
    header = (f"| variant | rows/step | tokens | train s | tok/s | median step s (CPU s) | tok/s at the median step "
              f"(per CPU s) | evaluation + saves s | vs {first['variant']}: tok/s; median step (CPU) | loss first -> last | load |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['rows_per_step']:.1f} | {r['tokens']:,.0f} | {r['wall']:.1f} | {r['tok_s']:.1f} | "
            f"{r['median_step']:.3f} ({r['median_step_cpu']:.3f}) | {r['tok_s_step']:.1f} ({r['tok_cpu_s_step']:.1f}) | "
            f"{r['eval_save']:.1f} | {r['tok_s'] / first['tok_s']:.2f}x; {r['tok_s_step'] / first['tok_s_step']:.2f}x "
            f"({r['tok_cpu_s_step'] / first['tok_cpu_s_step']:.2f}x) | {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} | {r['load']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
