"""Standard benchmarks (lm-evaluation-harness) on a model already in memory.

    scores = run_lm_eval(model, tokenizer, ["loradem_demo_arith"], include_path=Path("eval/tasks"), limit=None)
    # {"loradem_demo_arith": {"acc": 0.45, "acc_norm": 0.4, "brier_score": 0.71}}

`model` is any causal LM transformers can run: a plain model, or the PeftModel
of `loradem.model.soup.load_multi` with its weights set (the weights live in the
LoRA layers' scales, so lm-eval scores θ₀ + Σ wᵢ·ΔWᵢ without a merge or a
reload). Tasks are lm-eval task, group or tag names: the paper's public
benchmarks (`mmlu`, `bbh`, `drop`), which need their datasets reachable (a
dataset hub or a local datasets cache; nothing is downloaded here otherwise),
or custom tasks from task YAMLs in `include_path` (the repo ships
`eval/tasks`, see eval/README.md).

Differences from running `lm_eval` yourself, each on purpose:
- relative ``dataset_kwargs.data_files`` (and a relative local
  ``dataset_path``) resolve against the YAML's own folder when the file is
  there (lm-eval resolves them against the working directory, which is
  kept as the fallback): the include folder is read through a private copy
  whose YAMLs carry absolute paths, so a task folder works from any cwd;
- a task YAML that does not parse, or names a local data file that exists in
  neither place, is an error (lm-eval skips an unparsable YAML silently and
  the task then reads as unknown);
- lm-eval's own task index (~14,700 names, ~10 s to build) is built only
  when a task is not in `include_path`, and once per process;
- the global random, numpy and torch RNG states that lm-eval reseeds are
  restored afterwards.

Task YAMLs may run Python (`!function`): include only folders you trust.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import glob
import importlib
import io
import logging
import math
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from loradem.errors import LorademError, first_line
from loradem.files import yaml_problem
from loradem.progress import verbose

REPO_ROOT = Path(__file__).resolve().parents[2]
HUB_HINT = "public tasks need their datasets reachable (a dataset hub, or a local datasets cache)"


# ---- where the task YAMLs are ------------------------------------------------------

def resolve_include_path(value: Optional[str | Path], *, recipe_dir: Optional[Path] = None) -> Optional[Path]:
    """`eval.lm_eval_include_path` as a folder: absolute as is; relative against the recipe's folder
    (when known), then the working directory, then the loradem checkout (so `eval/tasks` works from anywhere)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    roots = [] if path.is_absolute() else [r for r in (recipe_dir, Path.cwd(), REPO_ROOT) if r is not None]
    candidates = [path] if path.is_absolute() else [Path(r) / path for r in roots]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise LorademError(f"eval.lm_eval_include_path: {str(value)!r} is not a folder (looked for {tried})")


# ---- a private copy of the include folder, with absolute data paths ----------------

class _Function(str):
    """A YAML `!function module.name` reference, kept verbatim (never imported here)."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def _read_task_yaml(path: Path) -> dict:
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader plus !function kept as text)
    except yaml.YAMLError as exc:
        raise LorademError(f"{path}: {yaml_problem(exc, column=False)}") from None
    if not isinstance(cfg, dict):
        raise LorademError(f"{path}: expected a mapping of lm-eval task keys, got {type(cfg).__name__}")
    return cfg


def _is_local(p: str) -> bool:
    return "://" not in p


def _absolute_path(p: str, yaml_path: Path, field: str) -> str:
    """A relative local path: beside the YAML if there, else left for the working directory; else an error."""
    if not _is_local(p) or Path(p).expanduser().is_absolute():
        return p
    beside = yaml_path.parent / p
    if glob.glob(str(beside)):
        return str(beside.resolve()) if beside.exists() else str(yaml_path.parent.resolve() / p)
    if glob.glob(p):
        return p  # lm-eval's own rule: relative to the working directory
    raise LorademError(f"{yaml_path}: {field}: {p!r} not found beside the YAML nor in the working directory ({Path.cwd()})")


def _rewrite_paths(cfg: dict, yaml_path: Path, root: Path) -> bool:
    """Make cfg's local data paths absolute (see the module docstring); returns whether anything changed."""
    changed = False
    kwargs = cfg.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is not None:
        def fix(value, where):
            if isinstance(value, str):
                return _absolute_path(value, yaml_path, where)
            if isinstance(value, list):
                return [fix(v, f"{where}[{i}]") for i, v in enumerate(value)]
            if isinstance(value, dict):
                return {k: fix(v, f"{where}.{k}") for k, v in value.items()}
            raise LorademError(f"{yaml_path}: {where}: expected a path, a list or a mapping of paths, got {type(value).__name__}")

        fixed = fix(files, "dataset_kwargs.data_files")
        if fixed != files:
            kwargs["data_files"] = fixed
            changed = True
    local = cfg.get("dataset_path")
    if isinstance(local, str) and _is_local(local) and not Path(local).is_absolute() and (yaml_path.parent / local).exists():
        cfg["dataset_path"] = str((yaml_path.parent / local).resolve())
        changed = True
    include = cfg.get("include")
    if isinstance(include, (str, list)):
        def outside(inc):  # the copy only holds the include folder: point outside files at the original
            target = (yaml_path.parent / inc).resolve() if isinstance(inc, str) and not Path(inc).is_absolute() else None
            return str(target) if target is not None and not target.is_relative_to(root) else inc

        fixed = outside(include) if isinstance(include, str) else [outside(i) for i in include]
        if fixed != include:
            cfg["include"] = fixed
            changed = True
    return changed


def _fingerprint(folder: Path) -> tuple:
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file()))


_PREPARED: dict[tuple, Path] = {}


def prepare_task_folder(include: Path) -> Path:
    """Check every task YAML under `include` and return a private copy whose local data paths are absolute.

    Cached per process while the folder's files are unchanged; copies are removed at exit."""
    include = Path(include).resolve()
    key = (str(include), _fingerprint(include))
    if key in _PREPARED and _PREPARED[key].is_dir():
        return _PREPARED[key]
    rewritten: dict[Path, dict] = {}
    for path in sorted(include.rglob("*.yaml")):
        if "__pycache__" in path.parts or any(part.startswith(".") for part in path.relative_to(include).parts):
            continue
        cfg = _read_task_yaml(path)
        if _rewrite_paths(cfg, path, include):
            rewritten[path.relative_to(include)] = cfg
    scratch = Path(tempfile.mkdtemp(prefix="loradem-lm-eval-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    copy = scratch / "tasks"
    shutil.copytree(include, copy, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    for rel, cfg in rewritten.items():
        (copy / rel).write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    _PREPARED[key] = copy
    return copy


# ---- lm-eval's task manager ----------------------------------------------------------

@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's info logs, and (unless --verbose) the progress bars it draws with an explicit disable=False,
    which no tqdm default can turn off, kept off the terminal. Its errors still raise."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if not verbose() else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)


_MANAGERS: dict[tuple[Optional[str], bool], object] = {}


def _task_manager(folder: Optional[str], with_defaults: bool, log: Callable[[str], None]):
    """lm-eval's TaskManager over `folder` (and lm-eval's own tasks), built once per process."""
    key = (folder, with_defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        if with_defaults:
            log("lm-eval: indexing lm-eval's own tasks (~10 s, once per process)")
        with _quiet_lm_eval():
            _MANAGERS[key] = TaskManager(include_path=folder, include_defaults=with_defaults)
    return _MANAGERS[key]



def load_lm_eval_tasks(tasks: list[str], *, include_path: Optional[Path], log: Callable[[str], None] = print):
    """Check the names and build every task (its dataset loaded); returns (task manager, {name: [Task | Group]})."""
    seen: set[str] = set()
    for name in tasks:
        if not isinstance(name, str) or not name:
            raise LorademError(f"eval.lm_eval_tasks: expected task names, got {name!r}")
        if name in seen:
            raise LorademError(f"eval.lm_eval_tasks: {name!r} appears twice")
        seen.add(name)
    try:
        importlib.import_module("lm_eval")  # installed, and importable: the optional dependency this needs
    except ImportError:
        raise LorademError("eval.lm_eval_tasks: needs lm-evaluation-harness (pip install lm_eval==0.4.13)") from None
    folder = str(prepare_task_folder(include_path)) if include_path is not None else None
    custom = set(_task_manager(folder, False, log).all_tasks) if folder else set()
    tm = _task_manager(folder, not (folder and set(tasks) <= custom), log)
    for name in tasks:
        if name not in tm.all_tasks:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f"in {include_path} nor " if include_path is not None else ""
            custom_hint = "" if include_path is not None else " (custom tasks need eval.lm_eval_include_path, e.g. eval/tasks)"
            raise LorademError(f"lm-eval task {name!r}: unknown: not {where}among lm-eval's tasks{custom_hint}{hint}")
    built = {}
    for name in tasks:
        try:
            with _quiet_lm_eval():
                loaded = tm.load([name])
        except Exception as exc:  # noqa: BLE001 - datasets raises many types when data is unreachable
            if name in custom:
                raise LorademError(f"lm-eval task {name!r} (from {include_path}): could not build it ({_described(exc)})") from None
            raise LorademError(f"lm-eval task {name!r}: could not load its data ({_described(exc)}); {HUB_HINT}") from None
        groups = loaded.get("groups") or {}
        built[name] = [groups[name]] if name in groups else list(loaded["tasks"].values())
    return tm, built


# ---- running -------------------------------------------------------------------------

@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _metrics(entry: dict) -> dict[str, float]:
    """lm-eval's 'acc,none' -> 'acc'; other filters keep lm-eval's 'metric,filter' name; stderr and text dropped."""
    out = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else key] = float(value)
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: Optional[Path] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the in-memory `model`; returns {task: {metric: value}}.

    One entry per requested task or group (a group's aggregate metrics); a tag,
    or a group without an aggregate, gives one entry per task in it. `limit`
    caps the examples of each task (the first ones). Puts the model in eval
    mode; changes neither its weights nor its LoRA scales, nor the caller's
    RNG states."""
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm, built = load_lm_eval_tasks(list(tasks), include_path=include_path, log=log)
    log(f"lm-eval {lm_eval.__version__}: {', '.join(tasks)}" + (f" (at most {limit} examples each)" if limit else ""))
    with _quiet_lm_eval(), _kept_rng_state():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        result = lm_eval.simple_evaluate(
            model=lm, tasks=[obj for objs in built.values() for obj in objs], task_manager=tm, limit=limit,
            bootstrap_iters=0, log_samples=False,
        )
    table = result["results"]
    out: dict[str, dict[str, float]] = {}
    for name, objs in built.items():
        own = _metrics(table.get(name, {}))
        if own:
            out[name] = own
            continue
        leaves = [t for obj in objs for t in (obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj])]
        for task in leaves:
            out[task.task_name] = _metrics(table.get(task.task_name, {}))
    for name, metrics in out.items():
        log(f"lm-eval {name}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return out


def _described(exc: BaseException) -> str:
    """`first_line` with the exception's type, capped: lm-eval's messages can be long and untyped."""
    line = first_line(exc)
    return type(exc).__name__ if line == type(exc).__name__ else f"{type(exc).__name__}: {line[:300]}"
