"""The stages of a run, each reading what the previous one wrote to disk.

    loradem run recipes/demo.yaml     # every stage below, in order

    runs/<name>/
      recipe.json         the validated recipe, as run (its files named relative to this folder)
      adapters.json       source -> finished adapter folder, with its training cost   (train)
                          (with warmup.enabled, first the shared warm-up folded into a warmed base that
                          every stage of that recipe or variant then takes as its base: `recipe_base`)
      vectors.json        norms and pairwise similarities of the deltas; similarity.png (vectors)
      search/             search.db (Optuna), weights.json, trials.csv, search.png        (search)
      regmean/            the RegMean merge as one PEFT adapter + regmean.json   (with regmean.enabled)
      model/              the assembled Hugging Face model + loradem.json + README.md    (assemble)
      report.md/.json     base, adapter:<source>, uniform, sum, dem; per_source.png ...  (eval)
      variants/<v>/       each recipe variant's adapters.json, vectors.json, search/, learn/ (no model:
                          its rows in the report are scored on in-memory exact folds)

Any stage can be re-run alone; adapters are found again from the recipe (their
folder names are keyed by base, data and settings), so a stale adapters.json
can never point a later stage at the wrong vector.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from loradem.errors import LorademError
from loradem.files import atomic_write_json, fingerprint_weights, read_json
from loradem.progress import Log, stage_log
from loradem.recipe import Recipe, format_overrides, load_recipe

_log = stage_log

# Stage modules are imported inside the functions that use them: `loradem check` and a bad recipe must
# answer in under a second, and the stages pull in torch, TRL and Optuna (about 10 s on 2 CPU cores).


def _prepare(recipe_path: str | Path) -> tuple[Recipe, Path]:
    from loradem.model.base import resolve_base

    recipe = load_recipe(recipe_path)
    base_dir = resolve_base(recipe.base, log=_log("base"))
    return recipe, base_dir


def _splits(recipe: Recipe) -> dict:
    from loradem.data.rows import load_splits

    return {s.name: load_splits(s, recipe.seed) for s in recipe.sources}


def recipe_base(recipe: Recipe, base_dir: Path, splits: dict, *, train: bool = False) -> Path:
    """The base `recipe` (the recipe or a variant) trains its adapters from and folds them into: `base_dir`, or with
    warmup.enabled its warmed base (`loradem.train.warmup.warm_base`: trained only when `train`; the later stages
    fold a finished warm-up adapter again if its folder left the cache, and otherwise name the command to run)."""
    if not recipe.warmup.enabled:
        return base_dir
    from loradem.train.warmup import warm_base

    return warm_base(recipe, base_dir, splits, log=_log("warmup"), train=train)


# ---- check ---------------------------------------------------------------

def _baseline(recipe: Recipe, asked: str | None) -> str | None:
    """The baseline a command trains: the one asked for on the command line, else the recipe's (mix.enabled)."""
    return asked or ("mix" if recipe.mix.enabled else None)


def check(recipe_path: str | Path, *, baseline: str | None = None) -> Recipe:
    """Validate the recipe, every data row and the splits, and refuse what `loradem train` would refuse on them
    (the train stage's own checks, for the recipe and each variant; with baseline="mix", the mix's too);
    print what a run would use. The base is not loaded: what its tokenizer refuses shows at `loradem train`,
    before the first adapter trains."""
    from loradem.to_train import training_status
    from loradem.train.mix import check_mix
    from loradem.train.warmup import warmup_sources

    recipe = load_recipe(recipe_path)
    baseline = _baseline(recipe, baseline)
    splits = _splits(recipe)
    _check_training(recipe, splits, baseline=baseline)
    if baseline != "mix":  # neither asked for nor enabled: a refusal is only a note
        try:
            check_mix(mix_job(recipe, splits))
        except LorademError as exc:
            print(f"note: `--baseline mix` would be refused: {exc}")
    print(f"recipe {recipe.name!r}: base {recipe.base}, outputs in {recipe.out_dir}/, adapters in {recipe.adapters_dir}/")
    print(f"{'source':<16}{'format':<19}{'train':>7}{'val':>6}{'test':>6}  {'metric':<12}{'lr':>9}{'steps':>7}{'r':>4}")
    for s in recipe.sources:
        sp, tr, lo = splits[s.name], recipe.train_for(s), recipe.lora_for(s)
        print(f"{s.name:<16}{sp.format:<19}{len(sp.train):>7}{len(sp.validation):>6}{len(sp.test):>6}  "
              f"{s.metric:<12}{tr.learning_rate:>9.2g}{tr.max_steps or 0:>7}{lo.r:>4}")
    for line in _adapter_lines(recipe):
        print(line)
    print(_merges_line(recipe))
    for v in recipe.variants:
        print(f"variant {v.name!r}: {format_overrides(v.overrides())} (outputs in {recipe.variant(v.name).out_dir}/)")
    for label, r in (("", recipe), *variant_recipes(recipe).items()):
        if r.warmup.enabled:
            w = r.warmup
            print(f"{'variant ' + repr(label) + ': ' if label else ''}shared warm-up: {w.steps} steps of "
                  f"{r.train.batch_size * r.train.grad_accum} rows, lr {w.learning_rate or r.train.learning_rate:.2g}, "
                  f"on up to {w.rows_per_source} training rows each of {', '.join(warmup_sources(r))}"
                  + (f", plus {r.anchor.fraction:.0%} anchor rows "
                     f"({Path(r.anchor.data).name}, loss {r.anchor.loss})" if w.anchor else "")
                  + "; its adapters train from the warmed base")
        if r.regmean.enabled and r.regmean.anchor:
            print(f"{'variant ' + repr(label) + ': ' if label else ''}RegMean with generic rows at weight "
                  f"{r.regmean.anchor:g} ({Path(r.anchor.data).name} anchor prompts, the original base's replies)")
    if baseline == "mix":
        budget = "as many training tokens as the adapters together" if recipe.mix.tokens == "match" else f"{recipe.mix.tokens:,} training tokens"
        print(f"data-mixing baseline: one adapter on every source's rows, {budget}; its row `mix` in the report")
    if recipe.mix.proportions:
        print(f"mix proportions (with --baseline mix): the natural shares + {len(recipe.mix.proportions)} set(s), "
              "each one more mix at the same tokens; mix-tuned = the lowest validation loss")
    held_out, prompts = eval_inputs(recipe)
    if held_out:
        print("held-out tasks: " + ", ".join(f"{name} ({len(rows)} rows)" for name, rows in held_out))
    if prompts is not None:
        print(f"retention: {len(prompts)} prompts ({recipe.eval.retention.prompts}), "
              f"{recipe.eval.retention.max_new_tokens} reply tokens")
    for line in training_status(recipe, splits, baseline=baseline):
        print(line)
    print("ok")
    return recipe


def _adapter_lines(recipe: Recipe) -> list[str]:
    """What `check` says about adapters that are not plain LoRA on the sources' rows: LoRI-style subspaces, anchors."""
    lines = []
    lori = [s.name for s in recipe.sources if recipe.lora_for(s).subspace == "lori"]
    if lori:
        densities = sorted({recipe.lora_for(s).density for s in recipe.sources if s.name in lori})
        lines.append(f"LoRI-style adapters for {', '.join(lori)}: A frozen and shared, "
                     f"{'/'.join(f'{d:.0%}' for d in densities)} of each B trained under the source's own mask")
    if recipe.anchor.enabled:
        lines.append(f"anchored adapters: {recipe.anchor.fraction:.0%} of each source's rows are anchor prompts "
                     f"({Path(recipe.anchor.data).name}, loss {recipe.anchor.loss})")
    return lines


def _merges_line(recipe: Recipe) -> str:
    """The merges a run scores and the one it folds into runs/<name>/model."""
    search = recipe.search
    merges = ["uniform", "sum", f"dem (searched: {search.n_trials} {search.sampler} trials, weights in "
                                f"[{search.low:g}, {search.high:g}])"]
    if recipe.learn.enabled:
        merges.append(f"dem-learned (per-{recipe.learn.granularity} weights, {recipe.learn.steps} steps)")
    if recipe.regmean.enabled:
        alpha = recipe.regmean.alpha
        merges.append(f"dem-regmean ({recipe.regmean.activations} activations, alpha "
                      f"{'/'.join(f'{a:g}' for a in alpha) if isinstance(alpha, list) else f'{alpha:g}'})")
    folded = {"search": "dem", "learned": "dem-learned", "regmean": "dem-regmean"}[recipe.assemble.weights]
    return f"merges: {', '.join(merges)}; {recipe.out_dir}/model folds {folded}"


# ---- train -----------------------------------------------------------------

def train(recipe_path: str | Path, *, only: list[str] | None = None, force: list[str] = (),
          baseline: str | None = None) -> dict[str, Path]:
    """Train the missing per-source adapters (returned); with baseline="mix", then the data-mixing adapter."""
    recipe, base_dir = _prepare(recipe_path)
    baseline = _baseline(recipe, baseline)
    for name in [*(only or []), *force]:
        recipe.source(name)  # unknown names fail before any work
    return _train_stage(recipe, base_dir, _splits(recipe), only=only, force=force, baseline=baseline)


def _train_stage(recipe: Recipe, base_dir: Path, splits: dict, *, only: list[str] | None = None,
                 force: list[str] = (), baseline: str | None = None, checked: bool = False) -> dict[str, Path]:
    """The recipe's adapters (returned), each variant's, then with baseline="mix" the data-mixing one; every
    job is checked first (unless the caller already ran `_check_training`), so a bad source or variant fails
    before the first adapter trains."""
    from loradem.train.sft import train_all
    from loradem.train.warmup import with_base_name

    if not checked:
        _check_training(recipe, splits, only=only, baseline=baseline, base_dir=base_dir)
    force = [n for n in force if only is None or n in only]  # --force outside --only trains nothing
    adapters: dict[str, Path] = {}
    for label, r in (("", recipe), *variant_recipes(recipe).items()):
        base = recipe_base(r, base_dir, splits, train=True)  # its warm-up first, when it has one
        jobs = with_base_name(train_jobs(r, splits, only=only), base, base_dir)
        trained = train_all(jobs, base, force=force, log=_log("train"))
        adapters = adapters if label else trained
        _write_adapters_json(r, base, splits)
    if baseline == "mix":
        _train_mix(recipe, base_dir, splits)
    return adapters


def _check_training(recipe: Recipe, splits: dict, *, only: list[str] | None = None, baseline: str | None = None,
                    base_dir: Path | None = None) -> None:
    """What the train stage would refuse on the data and settings, for the recipe and each variant (the error
    names the variant; a warm-up's job first), with baseline="mix" the mix too; given `base_dir`, also what the
    base's tokenizer and TRL's config refuse (imports the ML libraries, so `check` leaves it out)."""
    from loradem.train.mix import check_mix
    from loradem.train.sft import check_jobs, check_trainable
    from loradem.train.warmup import warmup_job

    for label, r in (("", recipe), *variant_recipes(recipe).items()):
        jobs = train_jobs(r, splits, only=only)
        try:
            if r.warmup.enabled:
                jobs = [warmup_job(r, splits), *jobs]
            check_jobs(jobs)
            if base_dir is not None:
                check_trainable(jobs, base_dir)
        except LorademError as exc:
            raise (LorademError(f"variant {label!r}: {exc}") if label else exc) from None
    if baseline == "mix":
        check_mix(mix_job(recipe, splits))


def train_jobs(recipe: Recipe, splits: dict, *, only: list[str] | None = None):
    """Each source's `TrainJob` (those in `only`, when given): its splits and the recipe's settings as they
    apply to it."""
    from loradem.train.sft import TrainJob

    anchor = recipe.anchor if recipe.anchor.enabled else None
    return [TrainJob(source=s.name, splits=splits[s.name], train=recipe.train_for(s), lora=recipe.lora_for(s),
                     seed=recipe.seed, adapters_dir=Path(recipe.adapters_dir), base_name=recipe.base,
                     anchor=anchor, vector=s.vector)
            for s in recipe.sources if only is None or s.name in only]


def mix_job(recipe: Recipe, splits: dict):
    """The data-mixing baseline's `MixJob`: every source's splits and mix_proportion, the recipe-wide settings."""
    from loradem.train.mix import MixJob

    return MixJob(splits={s.name: splits[s.name] for s in recipe.sources},
                  proportions={s.name: s.mix_proportion for s in recipe.sources},
                  train=recipe.train, lora=recipe.lora, mix=recipe.mix, seed=recipe.seed,
                  adapters_dir=Path(recipe.adapters_dir), base_name=recipe.base)


def find_mix(recipe: Recipe, base_dir: Path, adapters: dict[str, Path], splits: dict) -> Path | None:
    """The recipe's finished data-mixing adapter for these per-source adapters, or None."""
    from loradem.train import mix

    return mix.find_mix(mix_job(recipe, splits), base_dir, adapters)


def find_mix_grid(recipe: Recipe, base_dir: Path, adapters: dict[str, Path], splits: dict) -> list[Path] | None:
    """The recipe's finished mix adapters at natural and every `mix.proportions` set (natural first), or None
    when it has no grid or one of them is missing."""
    from loradem.train import mix

    return mix.find_mix_grid(mix_job(recipe, splits), base_dir, adapters)


def variant_recipes(recipe: Recipe) -> dict[str, Recipe]:
    """Each variant's derived recipe (`Recipe.variant`), by name, in the recipe's order."""
    return {v.name: recipe.variant(v.name) for v in recipe.variants}


def _train_mix(recipe: Recipe, base_dir: Path, splits: dict | None = None) -> list[Path]:
    """The natural mix, then one per `mix.proportions` set (their folders, natural first): trained from the original
    base `base_dir` even when the recipe warms its own (the mix is what the warm-up is compared with)."""
    from loradem.train.mix import train_mix_grid

    splits = splits or _splits(recipe)
    adapters = finished_adapters(recipe, recipe_base(recipe, base_dir, splits), splits)  # their tokens: the budget
    return train_mix_grid(mix_job(recipe, splits), base_dir, adapters, log=_log("mix"))


def finished_adapters(recipe: Recipe, base_dir: Path, splits: dict | None = None, *, require: bool = True,
                      only: list[str] | None = None, vectors: bool = True) -> dict[str, Path]:
    """The finished adapter folder of every source (those in `only`, when given), found by its key; raise if one
    is missing. `base_dir` is the recipe's own base (`recipe_base`: its warmed base when it has a warm-up).

    A source with a ready `vector:` gets its imported copy (`loradem.vectors.card.import_vector`: checked
    against its card and this base, copied once into adapters_dir) instead of a trained adapter; with
    vectors=False it is left out (nothing is imported).
    """
    from loradem.train.sft import adapter_dir, adapter_key, is_finished
    from loradem.vectors.card import import_vector

    splits = splits or _splits(recipe)
    base_fp = fingerprint_weights(base_dir)
    found: dict[str, Path] = {}
    missing = []
    for job in train_jobs(recipe, splits, only=only):
        if job.vector is not None:
            if not vectors:
                continue
            found[job.source] = import_vector(job.vector, recipe.adapters_dir, base_dir=base_dir, source=job.source,
                                              log=_log("vectors"))
            continue
        folder = adapter_dir(job, adapter_key(job, base_fp))
        if is_finished(folder):
            found[job.source] = folder
        else:
            missing.append(job.source)
    if missing and require:
        raise LorademError(
            f"recipe {recipe.name!r}: no finished adapter for source(s) {', '.join(missing)}; run `loradem train <recipe>` first"
        )
    return found


def _train_record(folder: Path) -> dict:
    path = folder / "loradem-train.json"
    return read_json(path) if path.is_file() else {}


def _write_adapters_json(recipe: Recipe, base_dir: Path, splits: dict | None = None) -> None:
    adapters = finished_adapters(recipe, base_dir, splits, require=False)
    record = {}
    for name, folder in adapters.items():
        t = _train_record(folder)
        record[name] = {k: t.get(k) for k in ("train_tokens", "train_seconds", "steps", "best_step", "best_val_loss", "flops_estimate")}
        record[name]["path"] = os.path.relpath(folder, recipe.out_dir)  # relative to adapters.json: the run may move
    atomic_write_json(recipe.out_dir / "adapters.json", record)


# ---- vectors -----------------------------------------------------------------

def analyse_vectors(recipe: Recipe, base_dir: Path, adapters: dict[str, Path], log: Log = print) -> dict:
    """Norms and pairwise similarities of the distribution vectors -> vectors.json, similarity.png."""
    from loradem.vectors import similarity as vectors

    names = list(adapters)
    info = {n: vectors.vector_info(adapters[n], base=base_dir) for n in names}
    result: dict = {"norms": {n: info[n]["total_norm"] for n in names}}
    if len(names) > 1:
        _, cos, dist = vectors.similarity([adapters[n] for n in names], base=base_dir)
        result["cosine"] = {a: {b: float(cos[i][j]) for j, b in enumerate(names)} for i, a in enumerate(names)}
        result["distance"] = {a: {b: float(dist[i][j]) for j, b in enumerate(names)} for i, a in enumerate(names)}
        vectors.save_heatmap(names, cos, recipe.out_dir / "similarity.png", title=f"{recipe.name}: cosine similarity of deltas")
    atomic_write_json(recipe.out_dir / "vectors.json", result)
    for n in names:
        log(f"{n}: ||delta|| = {result['norms'][n]:.4f}")
    if "cosine" in result:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                log(f"cos({a}, {b}) = {result['cosine'][a][b]:+.4f}")
    return result


def vectors_cli(action: str, paths: list[str], *, png: str | None = None, base: str | None = None,
                source: str | None = None, adapters_dir: str = "adapters", allow_no_card: bool = False,
                out: str | None = None, recipe: str | None = None, overwrite: bool = False,
                repo_id: str | None = None, private: bool = False) -> None:
    from loradem.model.base import resolve_base
    from loradem.vectors import card, share
    from loradem.vectors import similarity as vectors

    if action == "export":
        share.export_vector(shared_adapter(paths[0], recipe), out, overwrite=overwrite)
        return
    if action == "push":
        share.push_vector(shared_adapter(paths[0], recipe), repo_id, private=private)
        return
    base_dir = resolve_base(base) if base else None

    if action == "import":
        if base_dir is None:
            raise LorademError("vectors import: --base is required (a vector is checked against its base)")
        for p in paths:
            card.import_vector(p, adapters_dir, base_dir=base_dir, source=source, allow_no_card=allow_no_card)
        return
    if action == "info":
        for p in paths:
            if (Path(p) / card.CARD_FILE).is_file():
                print(card.format_card(card.read_card(p)))
            print(vectors.format_info(p, vectors.vector_info(p, base=base_dir)))
        return
    if len(paths) < 2:
        raise LorademError("vectors similarity: expected at least two adapter folders")
    names, cos, dist = vectors.similarity(paths, base=base_dir)
    print(vectors.format_similarity(names, cos, dist))
    if png:
        vectors.save_heatmap(names, cos, Path(png), title="cosine similarity of deltas")
        print(f"heatmap: {png}")


def shared_adapter(given: str, recipe_path: str | None) -> Path:
    """What `vectors export` / `push` share: the adapter folder `given`, or with a recipe the finished adapter of
    its source named `given` (found by key like every stage; a `vector:` source's import)."""
    if recipe_path is None:
        return Path(given)
    recipe = load_recipe(recipe_path)
    recipe.source(given)  # an unknown name fails naming the recipe's sources, before the base is resolved
    recipe, base_dir = _prepare(recipe_path)
    splits = _splits(recipe)
    return finished_adapters(recipe, recipe_base(recipe, base_dir, splits), splits, only=[given])[given]


# ---- search ------------------------------------------------------------------

def search(recipe_path: str | Path, *, storage: str | None = None, workers: int = 1) -> dict:
    """Run or resume the weight search, then each variant's; `storage` (an Optuna RDB URL or a .log journal file)
    wins over the recipe's (variants keep their own study in runs/<name>/variants/<variant>/search/)."""
    recipe, base_dir = _prepare(recipe_path)
    splits = _splits(recipe)
    result = _search(recipe, recipe_base(recipe, base_dir, splits), splits, storage=storage, workers=workers)
    for name, variant in variant_recipes(recipe).items():  # each variant's own study, in its own folder
        _search(variant, recipe_base(variant, base_dir, splits), splits, workers=workers, label=f"search {name}")
    return result


def _search(recipe: Recipe, base_dir: Path, splits: dict, *, storage: str | None = None, workers: int = 1,
            label: str = "search") -> dict:
    from loradem.merge.search import SearchJob, search_weights

    adapters = finished_adapters(recipe, base_dir, splits)
    validation = {n: splits[n].validation for n in adapters}
    job = SearchJob(name=recipe.name, settings=recipe.search, importance={s.name: s.importance for s in recipe.sources},
                    out_dir=recipe.out_dir / "search", seed=recipe.seed, max_length=recipe.train.max_length,
                    max_new_tokens=recipe.eval.max_new_tokens)
    return search_weights(job, base_dir, adapters, validation, storage=storage, workers=workers, log=_log(label))


def learn(recipe_path: str | Path) -> dict:
    """Fit the per-module weights (recipe `learn:`) on training rows, selected on validation loss."""
    recipe, base_dir = _prepare(recipe_path)
    learning = [r for r in (recipe, *variant_recipes(recipe).values()) if r.learn.enabled]
    if not learning:
        raise LorademError(f"{recipe_path}: learn.enabled is false; set `learn: {{enabled: true}}` to learn per-module weights")
    splits = _splits(recipe)
    results = [_learn(r, recipe_base(r, base_dir, splits), splits) for r in learning]
    return results[0]


def _learn(recipe: Recipe, base_dir: Path, splits: dict | None = None) -> dict:
    from loradem.merge.learn import LearnJob, learn_weights

    splits = splits or _splits(recipe)
    adapters = finished_adapters(recipe, base_dir, splits)
    names = [s.name for s in recipe.sources]
    job = LearnJob(name=recipe.name, settings=recipe.learn, importance={s.name: s.importance for s in recipe.sources},
                   out_dir=recipe.out_dir / "learn", seed=recipe.seed, max_length=recipe.train.max_length,
                   validation_rows=recipe.search.max_rows_per_source, eval_batch_size=recipe.search.batch_size)
    return learn_weights(job, base_dir, adapters, {n: splits[n].train for n in names}, {n: splits[n].validation for n in names},
                         log=_log("learn"))


def regmean(recipe_path: str | Path) -> dict[str, dict]:
    """Merge the adapters by RegMean (recipe `regmean:`) into runs/<name>/regmean/, a PEFT adapter, and each
    variant's that merges into its own runs/<name>/variants/<variant>/regmean/; returns {label: record}, the
    recipe's own under ""."""
    recipe, base_dir = _prepare(recipe_path)
    merging = [(label, r) for label, r in (("", recipe), *variant_recipes(recipe).items()) if r.regmean.enabled]
    if not merging:
        raise LorademError(f"{recipe_path}: regmean.enabled is false; set `regmean: {{enabled: true}}` to merge by RegMean")
    splits = _splits(recipe)
    return {label: _regmean(r, recipe_base(r, base_dir, splits), splits, label=f"regmean {label}".strip(),
                            original=base_dir)
            for label, r in merging}


def _regmean(recipe: Recipe, base_dir: Path, splits: dict | None = None, *, label: str = "regmean",
             original: Path | None = None) -> dict:
    """RegMean onto `base_dir` (the recipe's adapters' base); with regmean.anchor, the generic rows are the anchor
    prompts with the replies of `original` (the base before any warm-up, default `base_dir`), as the anchored
    warm-up's are: retention is measured against that base."""
    from loradem.merge.regmean import RegMeanJob, regmean_merge

    splits = splits or _splits(recipe)
    adapters = finished_adapters(recipe, base_dir, splits)
    job = RegMeanJob(name=recipe.name, settings=recipe.regmean, out_dir=recipe.out_dir / "regmean", seed=recipe.seed,
                     max_length=recipe.train.max_length, batch_size=recipe.search.batch_size)
    validation = {n: splits[n].validation[: recipe.search.max_rows_per_source] for n in adapters}  # the search's rows
    anchors, spent = None, 0.0
    if recipe.regmean.anchor:
        from loradem.data.anchors import anchor_rows

        anchors, info = anchor_rows(recipe.anchor, Path(original or base_dir), Path(recipe.adapters_dir), log=_log(label))
        spent = info["spent_seconds"]
    return regmean_merge(job, base_dir, adapters, {n: splits[n].train for n in adapters}, validation=validation,
                         anchors=anchors, anchor_seconds=spent, log=_log(label))


def regmean_adapter(recipe: Recipe) -> Path:
    """runs/<name>/regmean, checked to be a finished RegMean adapter."""
    from loradem.merge.regmean import is_regmean_adapter

    folder = recipe.out_dir / "regmean"
    if not is_regmean_adapter(folder):
        raise LorademError(f"{folder}: no RegMean adapter; run `loradem run <recipe>` with regmean.enabled: true first")
    merged = read_json(folder / "regmean.json").get("sources")
    names = [s.name for s in recipe.sources]
    if not isinstance(merged, list) or sorted(merged) != sorted(names):
        raise LorademError(f"{folder}: merges sources {sorted(merged or [])}, the recipe has {sorted(names)}; re-run `loradem run`")
    return folder


def _weights_record(recipe: Recipe, stage: str, key: str, how: str) -> dict:
    """runs/<name>/<stage>/weights.json, checked to hold `key` for exactly the recipe's sources."""
    path = recipe.out_dir / stage / "weights.json"
    if not path.is_file():
        raise LorademError(f"{path}: no {'searched' if stage == 'search' else 'learned'} weights; run `loradem {stage} <recipe>` first{how}")
    data = read_json(path)
    weights = data.get(key)
    names = [s.name for s in recipe.sources]
    if not isinstance(weights, dict) or sorted(weights) != sorted(names):
        raise LorademError(f"{path}: {key} are for sources {sorted(weights or {})}, the recipe has {sorted(names)}; re-run `loradem {stage}`")
    return data


def searched_weights(recipe: Recipe) -> dict:
    return _weights_record(recipe, "search", "weights", "")


def learned_weights(recipe: Recipe) -> dict:
    return _weights_record(recipe, "learn", "module_weights", " (with learn.enabled: true)")


# ---- assemble ------------------------------------------------------------------

def model_weights(recipe: Recipe) -> dict:
    """The weights the assembled model folds: {source: number | per-layer-group list | {module: weight}}."""
    if recipe.assemble.weights == "learned":
        return {n: {m: float(x) for m, x in w.items()} for n, w in learned_weights(recipe)["module_weights"].items()}
    from loradem.merge.search import fold_weights

    return fold_weights(searched_weights(recipe))


def assemble_recipe(recipe_path: str | Path, *, out: str | None = None, dtype: str | None = None, overwrite: bool = False,
                    fold_base: str | None = None, max_shard_size_mb: float | None = None,
                    direct_io: bool | None = None) -> Path:
    """`loradem assemble RECIPE`: every command-line option wins over the recipe's `assemble:` block."""
    recipe, base_dir = _prepare(recipe_path)
    return _assemble(recipe, base_dir, out=out, dtype=dtype, overwrite=overwrite, fold_base=fold_base,
                     max_shard_size_mb=max_shard_size_mb, direct_io=direct_io)


def _assemble(recipe: Recipe, base_dir: Path, *, out: str | None = None, dtype: str | None = None, overwrite: bool = False,
              fold_base: str | None = None, max_shard_size_mb: float | None = None,
              direct_io: bool | None = None) -> Path:
    """Fold the searched weights (per layer group when the search found `layer_weights`), the learned
    per-module ones (assemble.weights: learned), or the RegMean adapter (assemble.weights: regmean) into the
    recipe's base (`base_dir`, or its warmed base: then loradem.json and the card also name the warm-up)."""
    from loradem.merge.fold import assemble
    from loradem.train.warmup import warmup_record

    splits = _splits(recipe)
    base = recipe_base(recipe, base_dir, splits)
    if recipe.assemble.weights == "regmean":  # one adapter, already the merge: folded at weight 1
        inputs = [(regmean_adapter(recipe), 1.0)]
    else:
        weights = model_weights(recipe)
        adapters = finished_adapters(recipe, base, splits)
        inputs = [(adapters[n], weights[n]) for n in adapters]
    target = Path(out) if out else recipe.out_dir / "model"
    # the run's own model folder is loradem's to replace; a user-given --out is not
    replace = overwrite or out is None
    dt = dtype or (None if recipe.assemble.dtype == "auto" else recipe.assemble.dtype)
    # the base as the recipe names it (it resolves to base_dir again): the model card names it by hub id or alias;
    # a warmed base by its folder, with the original base and the warm-up adapter beside it
    warm = base != base_dir
    return assemble(
        str(base) if warm else recipe.base, inputs, target, dtype=dt, overwrite=replace,
        max_shard_size_mb=max_shard_size_mb or recipe.assemble.max_shard_size_mb, fold_base=fold_base or recipe.assemble.fold_base,
        direct_io=recipe.assemble.direct_io if direct_io is None else direct_io, log=_log("assemble"),
        warm_up=warmup_record(recipe, base, target) if warm else None,
    )


# ---- eval ------------------------------------------------------------------------

def eval_inputs(recipe: Recipe) -> tuple[list[tuple[str, list]], list | None]:
    """Each held-out task's (name, checked rows), and the retention prompts (None when retention is off), refused
    when one of them is an anchor prompt of the recipe or of a variant."""
    from loradem.evaluate.heldout import check_not_anchors, held_out_rows, retention_prompts

    held_out = [(t.name, held_out_rows(t)) for t in recipe.eval.held_out]
    if not recipe.eval.retention.enabled:
        return held_out, None
    prompts = retention_prompts(recipe.eval.retention)
    from loradem.train.warmup import warmup_anchor

    for label, r in (("", recipe), *variant_recipes(recipe).items()):
        uses = r.anchor.enabled or (r.regmean.enabled and r.regmean.anchor)  # trained or merged on them
        for settings in filter(None, (r.anchor if uses else None, warmup_anchor(r))):
            check_not_anchors(prompts, settings, f"variant {label!r}: " if label else "")
    return held_out, prompts


def evaluate(recipe_path: str | Path, *, rescore: bool = False) -> list[dict]:
    recipe, base_dir = _prepare(recipe_path)
    return _evaluate(recipe, base_dir, recipe_path=str(recipe_path), rescore=rescore)


def _evaluate(recipe: Recipe, base_dir: Path, *, recipe_path: str | None = None, rescore: bool = False) -> list[dict]:
    """Resolve everything the evaluation reads from the recipe and its earlier stages, then score and report;
    then write the model's card again, with the scores. A model an earlier run scored the same way keeps its
    scores (kept under the loradem cache's scores/) unless `rescore`."""
    from loradem.evaluate.compare import EvalPlan, EvalSource, RetentionPlan, VariantPlan, compare_models
    from loradem.merge.model_card import add_scores
    from loradem.model.base import cache_root
    from loradem.train.warmup import warmup_record

    splits = _splits(recipe)
    held_out, prompts = eval_inputs(recipe)
    base = recipe_base(recipe, base_dir, splits)  # the recipe's adapters' base; `base` and `mix` rows: base_dir
    adapters = finished_adapters(recipe, base, splits)
    search_record = searched_weights(recipe)
    model_dir = recipe.out_dir / "model"
    if not (model_dir / "loradem.json").is_file():
        raise LorademError(f"{model_dir}: no assembled model; run `loradem assemble <recipe>` first")
    learned = learned_weights(recipe) if recipe.learn.enabled else None
    regmean_dir = regmean_adapter(recipe) if recipe.regmean.enabled else None
    variants = []
    for v in recipe.variants:  # each variant's adapters and weights must exist: `loradem run` makes them
        vr = recipe.variant(v.name)
        try:
            vbase = recipe_base(vr, base_dir, splits)
            variants.append(VariantPlan(
                name=v.name, adapters=finished_adapters(vr, vbase, splits), search=searched_weights(vr),
                out_dir=vr.out_dir, learned=learned_weights(vr) if vr.learn.enabled else None,
                description=v.description, overrides=v.overrides(),
                warm_dir=vbase if vbase != base_dir else None,
                regmean_dir=regmean_adapter(vr) if vr.regmean.enabled else None,
                warmup=warmup_record(vr, vbase, recipe.out_dir) if vbase != base_dir else None))
        except LorademError as exc:  # its message names the stage to run (train, search and learn cover variants)
            raise LorademError(f"variant {v.name!r}: {exc}") from None
    mix_dir = find_mix(recipe, base_dir, adapters, splits)
    mix_grid = find_mix_grid(recipe, base_dir, adapters, splits) if mix_dir is not None else None
    if mix_dir is not None and recipe.mix.proportions and mix_grid is None:
        _log("eval")("mix: no mix-tuned row: a mix.proportions set has no finished adapter "
                     "(`loradem train <recipe> --baseline mix` trains them)")
    recipe_path = _portable_path(recipe_path) if recipe_path else None
    plan = EvalPlan(
        run_name=recipe.name,
        sources=tuple(EvalSource(s.name, s.metric, splits[s.name].test) for s in recipe.sources),
        settings=recipe.eval, max_length=recipe.train.max_length, base_dir=base_dir, adapters=adapters,
        search=search_record, model_dir=model_dir, out_dir=recipe.out_dir, assembled_weights=recipe.assemble.weights,
        warm_dir=base if base != base_dir else None,
        warmup=warmup_record(recipe, base, recipe.out_dir) if base != base_dir else None,
        learned=learned, regmean_dir=regmean_dir, mix_dir=mix_dir, mix_grid=tuple(mix_grid or ()),
        variants=tuple(variants), recipe_path=recipe_path,
        held_out=tuple(EvalSource(name, "exact_match", rows) for name, rows in held_out),
        retention=None if prompts is None else RetentionPlan(tuple(prompts), recipe.eval.retention.max_new_tokens,
                                                             recipe.eval.retention.prompts),
        reproduce=f"loradem run {recipe_path or '<recipe.yaml>'}" + (" --baseline mix" if mix_dir is not None and not recipe.mix.enabled else ""),
        score_cache=None if rescore else cache_root() / "scores",
    )
    rows = compare_models(plan, log=_log("eval"))
    # the row scored on the assembled folder (a row the report lacks: the card gets no scores)
    assembled = {"learned": "dem-learned", "regmean": "dem-regmean"}.get(recipe.assemble.weights, "dem")
    add_scores(model_dir, read_json(recipe.out_dir / "report.json"), assembled)
    return rows


def _portable_path(path: str) -> str:
    """A path given on the command line as the report shows it: relative to the working directory, never absolute."""
    return os.path.relpath(path) if os.path.isabs(path) else path


# ---- run ---------------------------------------------------------------------------

def recipe_record(recipe: Recipe) -> dict:
    """recipe.json: the validated recipe, with every path it resolved against the recipe's folder (data, base,
    vector, anchor and eval files: absolute, and existing, as the recipe checked) made relative to the run folder,
    so it names no absolute path of this machine and `loradem run <out_dir>/recipe.json` resolves them back.
    Paths the user gives relative to the working directory (`_AS_WRITTEN`) stay as written, made relative to it
    when written absolute."""
    here = recipe.out_dir.resolve()

    def portable(value, key: str | None = None):
        if key in _AS_WRITTEN:
            return _portable_path(value) if isinstance(value, str) else value
        if isinstance(value, dict):
            return {k: portable(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value) and os.path.exists(value):
            return os.path.relpath(value, here)
        return value

    return portable(recipe.model_dump(mode="json"))


_AS_WRITTEN = ("output_dir", "adapters_dir", "storage", "warm_start")  # relative to the working directory


def run(recipe_path: str | Path, *, force: list[str] = (), baseline: str | None = None, rescore: bool = False) -> Path:
    """Every stage in order (with baseline="mix", the data-mixing adapter after the per-source ones, and its
    row in the report); returns the run folder (report.md is inside)."""
    t0 = time.time()
    recipe, base_dir = _prepare(recipe_path)
    baseline = _baseline(recipe, baseline)
    for name in force:
        recipe.source(name)
    splits = _splits(recipe)
    # the folder's recipe.json describes its model and report: replaced only once the new inputs check out
    _check_training(recipe, splits, baseline=baseline, base_dir=base_dir)
    eval_inputs(recipe)  # a bad held-out row fails now, not after training
    recipe.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(recipe.out_dir / "recipe.json", recipe_record(recipe))

    variants = variant_recipes(recipe)
    _train_stage(recipe, base_dir, splits, force=force, baseline=baseline, checked=True)  # every adapter first

    for label, r in (("", recipe), *variants.items()):
        r.out_dir.mkdir(parents=True, exist_ok=True)
        if label:
            atomic_write_json(r.out_dir / "recipe.json", recipe_record(r))
        base = recipe_base(r, base_dir, splits)  # its warmed base, when it has a warm-up
        analyse_vectors(r, base, finished_adapters(r, base, splits), log=_log(f"vectors {label}".strip()))
        _search(r, base, splits, label=f"search {label}".strip())
        if r.learn.enabled:
            _learn(r, base, splits)
    for label, r in (("", recipe), *variants.items()):
        if r.regmean.enabled:
            _regmean(r, recipe_base(r, base_dir, splits), splits, label=f"regmean {label}".strip(), original=base_dir)

    _assemble(recipe, base_dir)
    _evaluate(recipe, base_dir, recipe_path=str(recipe_path), rescore=rescore)
    print(f"done in {time.time() - t0:.0f} s: {recipe.out_dir / 'report.md'}", flush=True)
    return recipe.out_dir
