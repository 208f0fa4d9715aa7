"""The `loradem` command: a thin layer over the library.

    loradem demo                          # = loradem run recipes/demo.yaml
    loradem run RECIPE                    # train -> vectors -> search (-> learn) -> assemble -> eval -> report
    loradem train|search|learn|assemble|eval RECIPE
    loradem assemble --base smollm2-135m --adapter PATH=0.7 --adapter PATH=0.4 --out DIR
    loradem vectors info|similarity ADAPTER...
    loradem vectors import PATH_OR_HUB_ID --base BASE
    loradem vectors export SOURCE_OR_FOLDER --out DIR [--recipe R]   # what a receiver needs, nothing of this machine
    loradem vectors push SOURCE_OR_FOLDER ORG/NAME [--recipe R]      # the same files, to the model hub
    loradem export runs/demo/model --gguf demo.gguf --type q8_0   # one GGUF file for llama.cpp / Ollama
    loradem check RECIPE                  # validate only

Each subcommand loads the recipe, calls one library function and returns an
exit code: 0 done, 2 bad input (one line on stderr, nothing written), 130
interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from loradem import __version__
from loradem.errors import LorademError
from loradem.files import disk_error
from loradem.progress import quiet_libraries, set_verbose

EPILOG = """\
The recipe (YAML) is the single source of truth: base model, sources, LoRA,
training, search, assembly and evaluation settings. Outputs go to
runs/<recipe name>/ unless the recipe says otherwise; trained adapters are
cached in adapters/ keyed by what produced them, so re-running trains only
what changed. See README.md for the recipe reference.
"""


def _recipe_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML file (e.g. recipes/demo.yaml)")


def _weight(text: str) -> tuple[str, float | list[float]]:
    """PATH=W, or PATH=W1,W2,... (one weight per layer group)."""
    path, sep, w = text.rpartition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected PATH=WEIGHT, got {text!r}")
    try:
        values = [float(x) for x in w.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (or comma-separated numbers) after '=' in {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected a finite weight in {text!r}, got {w}")
    return path, values[0] if len(values) == 1 else values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradem",
        description="Train one model on several data sources the DEM way (Distribution Edited Model, "
        "arXiv 2406.15570), LoRA-native: one adapter per source, per-source weights searched with "
        "Optuna on validation data, weighted deltas folded exactly into the full-precision base.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"loradem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' own warnings, logs and progress bars (hidden by default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run every stage of a recipe", description="Run every stage: train the "
                       "missing adapters, analyse the vectors, search the weights, learn per-module weights (when learn.enabled), assemble the model, "
                       "evaluate and write report.md / report.json. A recipe's `variants:` (other adapter sets, e.g. anchored) are trained, "
                       "searched and learned too, and scored in the same report.")
    _recipe_arg(p)
    p.add_argument("--force", action="append", default=[], metavar="SOURCE",
                   help="retrain this source even if a finished adapter exists (repeatable)")
    p.add_argument("--baseline", choices=["mix"],
                   help="also train the data-mixing baseline (one adapter on all sources' rows, as many "
                   "training tokens as the per-source adapters together) and add its row to the report; with "
                   "mix.proportions, one more mix per set and the row mix-tuned (the best on validation)")
    p.add_argument("--rescore", action="store_true", help=RESCORE_HELP)

    p = sub.add_parser("demo", help="run recipes/demo.yaml on the embedded SmolLM2-135M base",
                       description="Equivalent to `loradem run recipes/demo.yaml` (three generated "
                       "exact-match tasks on the embedded SmolLM2-135M-Instruct, with the data-mixing baseline; measured 26 min on "
                       "2 CPU cores with AMX, 2-4x that on AVX2-only ones).")
    p.add_argument("--recipe", default=DEMO_RECIPE, help="demo recipe (default: %(default)s, from the working directory "
                   "or else the loradem checkout; outputs go to ./runs/ and ./adapters/)")
    p.add_argument("--rescore", action="store_true", help=RESCORE_HELP)

    p = sub.add_parser("check", help="validate a recipe and its data without running anything",
                       description="Validate the recipe schema, every data file and every row, and refuse "
                       "what `loradem train` would refuse on them (for each variant too); print the effective "
                       "per-source settings and split sizes. Loads no model: takes about a second.")
    _recipe_arg(p)
    p.add_argument("--baseline", choices=["mix"], help="also check the data-mixing baseline's inputs (a refusal "
                   "is otherwise printed as a note)")

    p = sub.add_parser("train", help="train one LoRA adapter per source (only what is missing)",
                       description="Train one LoRA adapter per source with TRL's SFT trainer (and per source of each "
                       "recipe variant). Adapters are keyed by base, data and settings: finished ones are skipped.")
    _recipe_arg(p)
    p.add_argument("--source", action="append", default=None, metavar="NAME",
                   help="train only this source (repeatable); one job per source lets you spread "
                   "sources over GPUs or machines")
    p.add_argument("--force", action="append", default=[], metavar="SOURCE",
                   help="retrain this source even if a finished adapter exists (repeatable)")
    p.add_argument("--baseline", choices=["mix"],
                   help="then train the data-mixing baseline: one adapter on all sources' training rows, "
                   "by default for as many tokens as all per-source adapters together (recipe `mix:`); "
                   "cached in adapters/mix-<key>/")

    p = sub.add_parser("search", help="search per-source weights with Optuna on validation data",
                       description="Search one weight per source (or per source and layer group) with Optuna. "
                       "All adapters stay loaded; a trial folds their weighted deltas into the resident weights and "
                       "evaluates (no reload, no write). The study lives in "
                       "runs/<name>/search/search.db unless --storage says otherwise, and resumes when "
                       "interrupted. Several workers, or several machines pointed at one --storage, share "
                       "one study.")
    _recipe_arg(p)
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: an RDB URL (sqlite:///search.db, postgresql://user@host/db) or a "
                   "journal file (a path ending in .log, or journal:PATH for any file name) (default: the "
                   "recipe's search.storage, else runs/<name>/search/search.db)")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="worker processes on this machine, each with its own copy of the model "
                   "(default: %(default)s)")

    p = sub.add_parser("learn", help="learn one weight per source per LoRA module by gradient (LoRA Soups' CAT)",
                       description="With every adapter loaded on the frozen base, fit one weight per source per "
                       "LoRA module (recipe `learn:`; a few hundred numbers) with Adam on a sample of each "
                       "source's training rows, keeping the weights with the best validation loss. Writes "
                       "runs/<name>/learn/weights.json and learn.png; `loradem eval` adds the row 'dem-learned', and "
                       "assemble.weights: learned folds them into the model.")
    _recipe_arg(p)

    p = sub.add_parser("regmean", help="merge the adapters by RegMean on their layers' inputs, as one exact LoRA",
                       description="For every LoRA module, solve RegMean's least squares over the sources' layer "
                       "inputs (Gram matrices of the base's activations on a sample of each source's training "
                       "rows, recipe `regmean:`) and write the merge as one PEFT adapter of rank Σ rᵢ to "
                       "runs/<name>/regmean/ with regmean.json; `loradem eval` adds the row 'dem-regmean', and "
                       "assemble.weights: regmean folds it into the model (needs regmean.enabled: true).")
    _recipe_arg(p)

    p = sub.add_parser("assemble", help="fold weighted adapter deltas into the base, exactly",
                       description="Write base + sum_i w_i * (s_i B_i A_i) as an ordinary Hugging Face model "
                       "folder, streamed tensor by tensor. Either give a RECIPE (uses its searched weights) "
                       "or --base/--adapter/--out.")
    p.add_argument("recipe", nargs="?", help="recipe YAML (uses runs/<name>/search/weights.json)")
    p.add_argument("--base", help="base model: a local folder or 'smollm2-135m'")
    p.add_argument("--adapter", action="append", type=_weight, default=[], metavar="PATH=WEIGHT",
                   help="a PEFT LoRA adapter folder and its weight, or comma-separated weights, one per layer "
                   "group (repeatable)")
    p.add_argument("--out", help="output model folder (default for a recipe: runs/<name>/model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size-mb", type=float, default=None,
                   help="largest safetensors shard written, in MB (default: the recipe's assemble.max_shard_size_mb, "
                   "else 2000; tensors are streamed, so peak memory does not depend on it)")
    p.add_argument("--fold-base", choices=["original", "dequantized"],
                   help="fold onto the base's original weights, or onto the NF4 round trip of its 4-bit layers "
                   "(what QLoRA adapters were trained against) (default: the recipe's assemble.fold_base, "
                   "else original)")
    p.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=None,
                   help="write the weights with O_DIRECT, past the page cache: the same bytes with less CPU, and no "
                   "eviction of other cached files; falls back to ordinary writes where the file system refuses it "
                   "(default: the recipe's assemble.direct_io, else on)")
    p.add_argument("--allow-name-mismatch", action="store_true",
                   help="accept adapters whose recorded base name differs (shapes must still match; --adapter folds only)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow adapter_model.bin (a pickle; only for files you trust; --adapter folds only)")
    p.add_argument("--rehash", action="store_true",
                   help="hash the base's weights in full again for its fingerprint and loradem.json, instead of "
                   "trusting $LORADEM_CACHE/fingerprints.json (which remembers each weights file's sha256 while its "
                   "size, mtime, ctime and inode stay the same)")

    p = sub.add_parser("eval", help="evaluate base, each adapter, uniform, sum and DEM; write the report",
                       description="Evaluate every model of the run on each source's held-out test rows "
                       "and write report.md, report.json and plots to runs/<name>/. A model an earlier run scored "
                       "with the same weights (by content), the same rows and settings, and the same evaluation code "
                       "keeps that run's scores instead of being scored again.")
    _recipe_arg(p)
    p.add_argument("--rescore", action="store_true", help=RESCORE_HELP)

    p = sub.add_parser("vectors", help="inspect distribution vectors (adapter deltas)",
                       description="Norms and pairwise similarities of adapter deltas, computed exactly from "
                       "the low-rank factors (no dense delta is materialized).")
    vsub = p.add_subparsers(dest="vectors_command", metavar="ACTION", required=True)
    base_help = "base model (folder or 'smollm2-135m'); needed only for adapters with modules_to_save"
    vp = vsub.add_parser("info", help="norm of each vector, per layer and in total")
    vp.add_argument("adapters", nargs="+", help="adapter folders")
    vp.add_argument("--base", help=base_help)
    vp = vsub.add_parser("similarity", help="pairwise cosine similarity and distance, plus a heatmap PNG")
    vp.add_argument("adapters", nargs="+", help="adapter folders (at least two)")
    vp.add_argument("--base", help=base_help)
    vp.add_argument("--png", default="similarity.png", help="heatmap output (default: %(default)s)")
    vp = vsub.add_parser("import", help="check a shared vector against its card and the base, copy it to adapters/",
                         description="Copy a shared adapter folder (or a hub id) with its vector.json card into "
                         "ADAPTERS_DIR/<source>-<sha12>/, after checking that the card's base fingerprint is "
                         "this base's and that the weights still have the card's sha256.")
    vp.add_argument("adapters", nargs=1, metavar="PATH", help="adapter folder or hub id 'org/name'")
    vp.add_argument("--base", required=True, help="base model (folder or 'smollm2-135m') the vector must be for")
    vp.add_argument("--source", help="source name for the imported folder (default: the card's)")
    vp.add_argument("--adapters-dir", default="adapters", help="where to import to (default: %(default)s)")
    vp.add_argument("--allow-no-card", action="store_true",
                    help="import a folder without vector.json, writing a card of what can be known (no base check)")
    source_help = "adapter folder, or with --recipe the name of one of its sources"
    recipe_help = "recipe whose finished adapter of source SOURCE to share (found by key like every stage)"
    vp = vsub.add_parser("export", help="write a vector as exactly the files a receiver needs (+ README.md card)",
                         description="Write adapter_config.json, adapter_model.safetensors, vector.json and a README.md "
                         "model card to DIR, naming the base portably (hub id or folder name), with no path of this "
                         "machine; `loradem vectors import DIR --base BASE` reads it on another machine.")
    vp.add_argument("adapters", nargs=1, metavar="SOURCE", help=source_help)
    vp.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, nor be inside the adapter folder)")
    vp.add_argument("--recipe", help=recipe_help)
    vp.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    vp = vsub.add_parser("push", help="upload a vector's exported files to a Hugging Face model hub repo",
                         description="Export SOURCE (see `vectors export`) and upload exactly those four files to the "
                         "model repo REPO_ID with huggingface_hub (created if missing; uses your Hugging Face login or "
                         "HF_TOKEN). `loradem vectors import REPO_ID --base BASE` downloads it again.")
    vp.add_argument("adapters", nargs=1, metavar="SOURCE", help=source_help)
    vp.add_argument("repo_id", metavar="REPO_ID", help="model repo 'org/name'")
    vp.add_argument("--recipe", help=recipe_help)
    vp.add_argument("--private", action="store_true", help="create the repo private (when it does not exist yet)")
    p = sub.add_parser("export", help="write an assembled model as one GGUF file (llama.cpp, Ollama, LM Studio)",
                       description="Convert a model folder (a run's runs/<name>/model, or any Llama, Mistral or Qwen2 "
                       "Hugging Face folder with config.json, safetensors and tokenizer.json) into one GGUF file: "
                       "weights in the chosen type, the model's settings, its tokenizer and chat template. Streamed "
                       "one tensor at a time; the file appears only when complete. Example: loradem export "
                       "runs/demo/model --gguf demo.gguf --type q8_0")
    p.add_argument("model", metavar="MODEL_DIR_OR_RUN",
                   help="model folder (e.g. runs/demo/model) or a run folder holding model/ (e.g. runs/demo)")
    p.add_argument("--gguf", nargs="?", const="", required=True, metavar="OUT.gguf",
                   help="GGUF file to write; given without a path: <name>-<type>.gguf beside the model folder "
                   "(runs/demo/model -> runs/demo/demo-f16.gguf)")
    p.add_argument("--type", choices=["f16", "bf16", "f32", "q8_0"], default="f16",
                   help="weight type: f16 (default), bf16, f32 (exact), or q8_0 (8-bit blocks, about half of f16's "
                   "size); norms stay f32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file")
    for command in (*sub.choices.values(), *vsub.choices.values()):  # --verbose after the subcommand works too
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


DEMO_RECIPE = "recipes/demo.yaml"

RESCORE_HELP = ("score every model again, even one an earlier run scored with the same weights and evaluation "
                "(those scores are kept in $LORADEM_CACHE/scores/ and reused by default)")


def _demo_recipe(given: str) -> str:
    """The demo recipe from any working directory: the given path, else the checkout's own recipes/demo.yaml."""
    if given != DEMO_RECIPE or Path(given).is_file():
        return given
    shipped = Path(__file__).resolve().parents[1] / DEMO_RECIPE
    if not shipped.is_file():
        raise LorademError(f"{given}: not found here nor in the loradem checkout; pass --recipe PATH")
    return str(shipped)


def _dispatch(args: argparse.Namespace) -> int:
    from loradem import pipeline

    if args.command == "run":
        pipeline.run(args.recipe, force=args.force, baseline=args.baseline, rescore=args.rescore)
    elif args.command == "demo":
        pipeline.run(_demo_recipe(args.recipe), rescore=args.rescore)
    elif args.command == "check":
        pipeline.check(args.recipe, baseline=args.baseline)
    elif args.command == "train":
        pipeline.train(args.recipe, only=args.source, force=args.force, baseline=args.baseline)
    elif args.command == "search":
        pipeline.search(args.recipe, storage=args.storage, workers=args.workers)
    elif args.command == "learn":
        pipeline.learn(args.recipe)
    elif args.command == "regmean":
        pipeline.regmean(args.recipe)
    elif args.command == "assemble":
        _assemble(args)
    elif args.command == "eval":
        pipeline.evaluate(args.recipe, rescore=args.rescore)
    elif args.command == "export":
        from loradem.export.gguf import export_gguf
        from loradem.progress import stage_log

        export_gguf(args.model, args.gguf or None, out_type=args.type, overwrite=args.overwrite, log=stage_log("export"))
    elif args.command == "vectors":
        pipeline.vectors_cli(args.vectors_command, args.adapters, png=getattr(args, "png", None), base=getattr(args, "base", None),
                             source=getattr(args, "source", None), adapters_dir=getattr(args, "adapters_dir", "adapters"),
                             allow_no_card=getattr(args, "allow_no_card", False), out=getattr(args, "out", None),
                             recipe=getattr(args, "recipe", None), overwrite=getattr(args, "overwrite", False),
                             repo_id=getattr(args, "repo_id", None), private=getattr(args, "private", False))
    return 0


def _assemble(args: argparse.Namespace) -> None:
    from loradem import pipeline
    from loradem.files import rehash_weights
    from loradem.merge.fold import assemble

    if args.rehash:
        rehash_weights()
    if args.recipe:
        if args.base or args.adapter:
            raise LorademError("assemble: give either a RECIPE or --base/--adapter, not both")
        # a recipe's vectors are its own trained adapters or imported ones, checked by base fingerprint and
        # stored as safetensors: these two options could only be ignored there, so they are refused
        for flag, given in (("--allow-name-mismatch", args.allow_name_mismatch), ("--trust-pickle", args.trust_pickle)):
            if given:
                raise LorademError(f"assemble: {flag} applies to --adapter folds only; a recipe's vectors are checked by "
                                   "base fingerprint and read from safetensors")
        pipeline.assemble_recipe(args.recipe, out=args.out, dtype=args.dtype, overwrite=args.overwrite,
                                 fold_base=args.fold_base, max_shard_size_mb=args.max_shard_size_mb,
                                 direct_io=args.direct_io)
        return
    if not args.base or not args.adapter or not args.out:
        raise LorademError("assemble: without a RECIPE, --base, at least one --adapter PATH=WEIGHT and --out are required")
    assemble(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
             max_shard_size_mb=args.max_shard_size_mb or 2000, allow_name_mismatch=args.allow_name_mismatch,
             trust_pickle=args.trust_pickle, fold_base=args.fold_base or "original",
             direct_io=args.direct_io is not False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    quiet_libraries()
    try:
        return _dispatch(args)
    except LorademError as exc:
        print(f"loradem: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk at a write no stage wrapped is still one line
        error = disk_error(exc.filename or ".", exc)
        if error is None:
            raise
        print(f"loradem: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loradem: interrupted; finished outputs are intact, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
