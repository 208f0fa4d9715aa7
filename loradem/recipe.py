"""The recipe: one YAML file, one typed schema, the single source of truth of a run.

    from loradem.recipe import load_recipe
    recipe = load_recipe("recipes/demo.yaml")   # raises LorademError on any problem

Every model here is frozen and forbids unknown keys (a typo is an error, never
a silent default). Relative data paths resolve against the recipe's folder;
output folders (``output_dir``, ``adapters_dir``) against the working
directory. Per-source ``train:`` / ``lora:`` blocks override the recipe-wide
defaults field by field; `Recipe.train_for` / `Recipe.lora_for` give the
effective settings.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from loradem.errors import LorademError
from loradem.files import yaml_problem
from loradem.model.base import BASE_ALIASES

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SAFE_NAME_HELP = "a safe folder name (letters, digits, '.', '_', '-'; starts with a letter or digit; at most 64 characters)"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _safe_name(value: str) -> str:
    if not SAFE_NAME.match(value) or value in (".", ".."):
        raise ValueError(f"expected {SAFE_NAME_HELP}, got {value!r}")
    return value


def _under_root(value: str, info: ValidationInfo) -> Path:
    """A path from the recipe: `~` expanded; a relative one taken from the recipe's folder (validation context 'root')."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path((info.context or {}).get("root", ".")) / path


class LoraSettings(_Strict):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the delta's scale is alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout probability during training.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' or a list of module names (e.g. [q_proj, v_proj])."
    )
    use_rslora: bool = Field(False, description="rsLoRA scaling alpha/sqrt(r) instead of alpha/r.")
    subspace: Literal["none", "lori"] = Field("none", description="'lori': LoRI-style adapters that overlap less when merged: every LoRA A is a frozen random projection shared by all sources (seeded by the recipe's seed and the module), and each source trains only a random `density` share of its B (docs/stages.md, 'Subspace adapters (LoRI-style)'; measured effect in benchmarks/RESULTS.md). 'none': ordinary LoRA.")
    density: float = Field(0.1, gt=0, le=1, description="With subspace: lori, the share of each B's entries a source trains (a random choice per source and module, seeded; two sources share about density² of them). Ignored otherwise.")

    @model_serializer(mode="wrap")
    def _subspace_fields_only_when_used(self, handler):
        # adapter and mix keys hash this dump: without subspace adapters, these fields stay out of it when at
        # their defaults, so adapters cached before the fields existed keep their keys
        return {k: v for k, v in handler(self).items() if k not in ("subspace", "density")
                or self.subspace != "none" or v != type(self).model_fields[k].default}


class TrainSettings(_Strict):
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    max_steps: Optional[int] = Field(60, gt=0, description="Optimizer steps; when null, `epochs` decides.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training rows (used when max_steps is null).")
    batch_size: int = Field(8, gt=0, description="Rows per device batch.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps (effective batch = batch_size * grad_accum).")
    max_length: int = Field(256, gt=0, description="Tokens per row; longer rows are truncated.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate schedule.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    eval_steps: int = Field(20, gt=0, description="Evaluate on the validation split (and checkpoint) every N steps.")
    early_stopping_patience: Optional[int] = Field(
        None, gt=0, description="Stop after this many evaluations without a better validation loss (null: run all steps; the best checkpoint is kept either way)."
    )
    quantization: Literal["none", "nf4"] = Field(
        "none", description="'nf4': QLoRA on a 4-bit NF4 base (bitsandbytes); 'none': full-precision base."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (consumer GPUs).")
    optimizer: str = Field("adamw_torch", description="transformers optimizer name, e.g. adamw_torch, paged_adamw_8bit.")
    completion_only_loss: bool = Field(True, description="Training loss on completions / assistant turns only (false: on every token). The search, learned weights, RegMean's alpha choice and `metric: loss` score the completions only either way: they judge a merge by its answers.")


class _Override(_Strict):
    """An override block: it holds, and dumps, only the fields the YAML gave (an explicit null included), so a
    dumped recipe validates back to the same recipe."""

    @model_serializer(mode="wrap")
    def _only_given(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """The same fields as `model`, each optional and defaulting to None (an override block)."""
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        inner = Annotated[tuple([f.annotation, *f.metadata])] if f.metadata else f.annotation
        fields[name] = (Optional[inner], Field(None, description=f.description))
    return create_model(f"{model.__name__}Override", __base__=_Override, **fields)


LoraOverride = _partial(LoraSettings)
TrainOverride = _partial(TrainSettings)

def _split(value: Union[int, float]) -> Union[int, float]:
    if isinstance(value, bool) or not (
        (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0 < value < 1)
    ):
        raise ValueError(f"expected a row count (integer >= 0) or a fraction strictly between 0 and 1, got {value!r}")
    return value


Split = Annotated[Union[int, float], AfterValidator(_split)]


class Source(_Strict):
    name: str = Field(description=f"Source name: {SAFE_NAME_HELP}. Names the adapter folder.")
    data: str = Field(description="Training data: a local .jsonl/.json/.csv/.parquet file (relative to the recipe) or a datasets hub id.")
    hub_split: str = Field("train", description="Split to read when `data` is a hub dataset id.")
    format: Literal["auto", "messages", "prompt_completion", "text"] = Field(
        "auto", description="Row format; 'auto' detects it from the first row and checks every row against it."
    )
    chat_template: bool = Field(
        False, description="Render prompt/completion rows through the base's chat template, as one user turn and one assistant turn (how an instruct base saw its training); false: plain text, prompt then completion. Training, the search and evaluation all see the same rendering. messages rows always use the template."
    )
    validation: Split = Field(0.1, description="Validation rows carved from `data` (int: rows, float: fraction), seeded.")
    test: Split = Field(0.1, description="Held-out test rows carved from `data` when `test_data` is not given (never trained or searched on).")
    test_data: Optional[str] = Field(None, description="Separate test file; when given, `test` is ignored.")
    metric: Literal["exact_match", "loss"] = Field("exact_match", description="Per-source evaluation metric on the test rows.")
    vector: Optional[str] = Field(
        None, description="A ready distribution vector (a LoRA adapter folder, or a hub id) to use instead of training; `data` still gives its validation and test rows."
    )
    importance: float = Field(1.0, ge=0, description="This source's weight in the search objective (a weighted mean over sources).")
    mix_proportion: Optional[float] = Field(
        None, gt=0, description="Share of this source in the data-mixing baseline (default: proportional to its training rows)."
    )
    train: TrainOverride = Field(default_factory=TrainOverride, description="Overrides of the recipe's `train:` for this source.")  # type: ignore[valid-type]
    lora: LoraOverride = Field(default_factory=LoraOverride, description="Overrides of the recipe's `lora:` for this source.")  # type: ignore[valid-type]

    _check_name = field_validator("name")(classmethod(lambda cls, v: _safe_name(v)))

    @field_validator("vector")
    @classmethod
    def _resolve_vector(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        candidate = _under_root(value, info)
        if candidate.is_dir():
            return str(candidate.resolve())
        if value.startswith((".", "/", "~")) or candidate.exists() or not re.match(r"^[\w.-]+/[\w.-]+$", value):
            raise ValueError(f"expected an adapter folder or a hub id 'org/name', {str(candidate)!r} is not a directory")
        return value

    @field_validator("data", "test_data")
    @classmethod
    def _resolve_data(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        path = _under_root(value, info)
        if value.lower().endswith(DATA_SUFFIXES) or path.exists():
            if not path.is_file():
                raise ValueError(f"expected an existing data file, {str(path)!r} does not exist")
            return str(path.resolve())
        if re.match(r"^[\w.-]+(/[\w.-]+)?$", value):
            return value  # a datasets hub id, used as is
        raise ValueError(f"expected a local {'/'.join(DATA_SUFFIXES)} file or a datasets hub id, got {value!r}")


class SearchSettings(_Strict):
    n_trials: int = Field(12, gt=0, description="Optuna trials (each costs one evaluation of the validation rows).")
    sampler: Literal["tpe", "random", "cmaes", "gp", "grid"] = Field("tpe", description="Optuna sampler.")
    low: float = Field(0.0, description="Lowest weight a source may get.")
    high: float = Field(1.5, description="Highest weight a source may get.")
    grid_points: int = Field(4, gt=1, description="Points per source for sampler: grid.")
    objective: Literal["val_loss", "exact_match"] = Field(
        "val_loss", description="'val_loss': importance-weighted mean of each source's validation loss (minimized); 'exact_match': the same mean of exact match on the validation rows (maximized)."
    )
    granularity: Literal["source", "layer-groups"] = Field(
        "source", description="'source': one weight per source; 'layer-groups': one weight per source per group of consecutive layers."
    )
    layer_groups: int = Field(4, gt=0, description="Number of layer groups when granularity is 'layer-groups'.")
    global_scale: bool = Field(False, description="Also search one scale shared by all weights.")
    storage: Optional[str] = Field(
        None, description="Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or a journal file (a path ending in .log, or journal:PATH for any file name) (default: runs/<name>/search/search.db)."
    )
    warm_start: Optional[str] = Field(
        None, description="A previous run's weights.json (relative to the working directory) whose best weights seed this study; new sources start at 0."
    )
    pruning: bool = Field(False, description="Stop a hopeless trial early (Optuna median pruner over per-source partial results).")
    max_rows_per_source: int = Field(32, gt=0, description="Validation rows per source used by each trial.")
    batch_size: int = Field(16, gt=0, description="Rows per forward pass during a trial.")

    @model_validator(mode="after")
    def _range(self) -> "SearchSettings":
        if not self.low < self.high:
            raise ValueError(f"expected low < high, got low={self.low}, high={self.high}")
        return self


class LearnSettings(_Strict):
    enabled: bool = Field(False, description="Learn one weight per source per LoRA module by gradient (LoRA Soups' CAT, arXiv 2410.13025) after the search; adds the row 'dem-learned' to the report.")
    granularity: Literal["module", "layer"] = Field(
        "module", description="'module': a weight per source per LoRA module; 'layer': one per source per decoder layer (shared by its modules)."
    )
    steps: int = Field(60, gt=0, description="Optimizer steps; each is a forward and backward pass of the whole model over one batch.")
    learning_rate: float = Field(0.1, gt=0, description="Adam's learning rate on the weights (chosen by measurement: benchmarks/RESULTS.md).")
    batch_size: int = Field(8, gt=0, description="Rows per step.")
    rows_per_source: int = Field(64, gt=0, description="Training rows per source (a seeded sample; never validation or test rows) the weights are fit on.")
    init: float = Field(0.5, description="Every weight's starting value.")
    eval_every: int = Field(20, gt=0, description="Steps between validation-loss checks; the weights with the best validation loss are kept (the start included).")


class RegMeanSettings(_Strict):
    enabled: bool = Field(False, description="Merge the adapters by RegMean (arXiv 2212.09849) on their LoRA deltas: per LoRA module, the delta that best reproduces every adapter's own delta on that source's layer inputs (least squares over the Gram matrices of the inputs), written as one exact LoRA adapter of rank Σrᵢ to runs/<name>/regmean/; adds the row 'dem-regmean' to the report (docs/stages.md).")
    alpha: Union[Annotated[float, Field(ge=0, le=1)], Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)]] = Field(
        [0.9, 0.99], description="Scale of each Gram matrix's off-diagonal entries: 1 is plain least squares, 0 keeps only the diagonal (a per-input-feature weighted average of the deltas). A list is a set of candidates, each solved from the one collection of Gram matrices (with activations 'merged', one pass each), and the one whose merge has the lowest validation loss (the search's validation rows: `search.max_rows_per_source` per source, never test rows) is kept; regmean.json records every candidate's loss. The default [0.9, 0.99] is chosen by measurement on both suites (benchmarks/RESULTS.md): the validation loss picked 0.99 with base and merged activations on each, and 0.99 scored at least 0.9 on their test rows; 0.9 stays a candidate because alpha 1 breaks (near-singular Gram matrices) and an unfamiliar dataset may sit closer to that edge."
    )
    rows_per_source: int = Field(64, gt=0, description="Training rows per source (a seeded sample; never validation or test rows) whose non-padding tokens give the Gram matrices.")
    activations: Literal["base", "own", "merged"] = Field(
        "base", description="Whose layer inputs the Gram matrices are taken from: the base model's ('base'); each source's rows through base + that source's own adapter ('own', as RegMean does with fine-tuned models); or the merge's own ('merged', as RegMean++ does: one decoder block at a time, each block's inputs from the blocks already merged before it; one pass per candidate alpha)."
    )
    anchor: float = Field(
        0.0, ge=0, description="Weight of generic prompts in the least squares, as one more source whose delta is zero: the recipe's `anchor:` prompts (data, prompts, max_new_tokens; whether or not anchor.enabled) with the original base's cached greedy replies, rows_per_source of them. The merge then also keeps the layers' outputs on generic inputs as its base's (the warmed base when the recipe warms up), trading some of each source's fit for retention; 1 weighs them as one source. 0 (the default) leaves them out: at 1 the KL to the base fell on both suites measured, but in-domain accuracy fell on the demo (docs/stages.md, 'RegMean')."
    )


    @field_validator("alpha")
    @classmethod
    def _distinct_alphas(cls, value):
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"expected distinct alphas, got {value}")
        return value


class AnchorSettings(_Strict):
    enabled: bool = Field(False, description="Train every source's adapter on anchor rows too: generic prompts answered by the base itself, so each vector learns to leave other inputs alone (docs/stages.md, 'Anchored training'; measured effect in benchmarks/RESULTS.md).")
    data: str = Field("builtin", description="'builtin' (everyday questions generated from templates, loradem.data.anchors) or a .jsonl/.json/.csv/.parquet file of messages or prompt/completion rows (relative to the recipe); only the prompts are used.")
    prompts: int = Field(400, gt=0, description="How many builtin prompts (ignored for a file).")
    fraction: float = Field(0.25, gt=0, lt=1, description="Share of anchor rows in each source's training set; steps and batch size stay the same. 0.25 scored best of 0.1 / 0.25 / 0.5 when measured (benchmarks/RESULTS.md).")
    max_new_tokens: int = Field(48, gt=0, description="The base's replies that have not ended within this many tokens are dropped.")
    loss: Literal["sft", "kl"] = Field("sft", description="How an anchor row is learned. 'sft': the cross-entropy of the base's greedy reply, like any training row. 'kl': KL(base ‖ adapter) of the next-token distributions over the reply's tokens, so the whole distribution of the base is the target, not only its first choice; the base's side is the same model with its adapter switched off (one more forward pass of the anchor rows a step, without gradient). Needs train.completion_only_loss (docs/stages.md, 'Anchored training').")

    @field_validator("data")
    @classmethod
    def _resolve_anchor_data(cls, value: str, info: ValidationInfo) -> str:
        if value == "builtin":
            return value
        path = _under_root(value, info)
        if not path.is_file() or not value.lower().endswith(DATA_SUFFIXES):
            raise ValueError(f"expected 'builtin' or an existing {'/'.join(DATA_SUFFIXES)} file, got {str(path)!r}")
        return str(path.resolve())


class WarmupSettings(_Strict):
    enabled: bool = Field(False, description="Train one short shared adapter on a small seeded sample of every source's training rows (never validation or test rows), fold it exactly into the base (a warmed base, cached under the loradem cache's bases/), and train every source's adapter from that warmed base; every later stage treats it as the base, so the model is the warmed base + Σ wᵢΔWᵢ. Adds the report row 'warm-base' and charges its training to every row built on it (docs/stages.md, 'Shared warm-up'). The data-mixing baseline still trains from the original base.")
    steps: int = Field(20, gt=0, description="Optimizer steps of the warm-up adapter, each of train.batch_size × train.grad_accum rows; the adapter after the last step is kept (validation loss is recorded once, at the end).")
    rows_per_source: int = Field(64, gt=0, description="Training rows per source in the warm-up's sample (seeded by the recipe's seed; all of a source's training rows when it has fewer).")
    learning_rate: Optional[float] = Field(None, gt=0, description="The warm-up's peak learning rate (null: train.learning_rate). Its other training settings are the recipe's `train:` block, its LoRA settings the recipe's `lora:` block.")
    sources: Optional[list[str]] = Field(None, description="Sources whose rows the warm-up samples (null: every source of the recipe). Pin the list to keep the same warmed base when sources are added later: then only the new sources' adapters train.")
    anchor: bool = Field(False, description="Train the warm-up on anchor rows too, as the recipe's `anchor:` block describes them (data, prompts, fraction, max_new_tokens, loss), whether or not `anchor.enabled` anchors the sources' adapters: the warmed base then learns the sources' format while keeping the base's answers elsewhere (docs/stages.md, 'Shared warm-up'). Needs messages rows. Measured on both suites with `anchor: {loss: kl}`: RegMean's held-out score up and its KL to the base down to a third; recipes/demo.yaml turns it on.")


AnchorOverride = _partial(AnchorSettings)
WarmupOverride = _partial(WarmupSettings)
LearnOverride = _partial(LearnSettings)
SearchOverride = _partial(SearchSettings)
RegMeanOverride = _partial(RegMeanSettings)


class Variant(_Strict):
    """A second set of adapters compared in the same run and report: the recipe with some blocks overridden."""

    name: str = Field(description=f"Variant name ({SAFE_NAME_HELP}); its report rows are '<name>:adapter:<source>', '<name>:uniform', '<name>:sum', '<name>:dem' (and '<name>:dem-learned', '<name>:dem-regmean', '<name>:warm-base' when it learns, merges by RegMean or warms its base); its outputs go to runs/<recipe>/variants/<name>/.")
    description: str = Field("", description="Free text, shown in the report.")
    lora: LoraOverride = Field(default_factory=LoraOverride, description="Overrides of the recipe's `lora:`.")  # type: ignore[valid-type]
    train: TrainOverride = Field(default_factory=TrainOverride, description="Overrides of the recipe's `train:`.")  # type: ignore[valid-type]
    anchor: AnchorOverride = Field(default_factory=AnchorOverride, description="Overrides of the recipe's `anchor:` (e.g. {enabled: true}).")  # type: ignore[valid-type]
    search: SearchOverride = Field(default_factory=SearchOverride, description="Overrides of the recipe's `search:` (e.g. its own warm_start).")  # type: ignore[valid-type]
    learn: LearnOverride = Field(default_factory=LearnOverride, description="Overrides of the recipe's `learn:`.")  # type: ignore[valid-type]
    warmup: WarmupOverride = Field(default_factory=WarmupOverride, description="Overrides of the recipe's `warmup:` (e.g. {enabled: true}: this variant's adapters train from a warmed base).")  # type: ignore[valid-type]
    regmean: RegMeanOverride = Field(default_factory=RegMeanOverride, description="Overrides of the recipe's `regmean:` (e.g. {alpha: 0.5}, or {enabled: false}: no RegMean merge of this variant's adapters).")  # type: ignore[valid-type]

    _check_name = field_validator("name")(classmethod(lambda cls, v: _safe_name(v)))

    @field_validator("anchor")
    @classmethod
    def _resolve_variant_anchor_data(cls, value, info: ValidationInfo):
        if value.data is None:
            return value
        return value.model_copy(update={"data": AnchorSettings._resolve_anchor_data(value.data, info)})

    def overrides(self) -> dict:
        """{block: {field: value}} of what this variant changes: the fields it sets, an explicit null included."""
        blocks = {b: set_fields(getattr(self, b)) for b in VARIANT_BLOCKS}
        return {b: v for b, v in blocks.items() if v}


VARIANT_BLOCKS = ("lora", "train", "anchor", "search", "learn", "warmup", "regmean")


def set_fields(override: BaseModel) -> dict:
    """The fields an override block was given in the YAML, `null` included (`max_steps: null` means run by
    epochs, not "inherit"), and none of the fields it left out."""
    return override.model_dump(include=override.model_fields_set)


def format_overrides(overrides: dict) -> str:
    """`Variant.overrides()` in one line: ``anchor: enabled=True, fraction=0.25; train: max_steps=60``."""
    return "; ".join(f"{block}: " + ", ".join(f"{k}={v}" for k, v in fields.items()) for block, fields in overrides.items())


class AssembleSettings(_Strict):
    weights: Literal["search", "learned", "regmean"] = Field(
        "search", description="Which weights the assembled model folds: the searched ones, the learned per-module ones (needs learn.enabled), or the RegMean adapter at weight 1 (needs regmean.enabled)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Output dtype; 'auto' keeps the base's.")
    max_shard_size_mb: int = Field(2000, gt=0, description="Largest safetensors shard written, in MB.")
    fold_base: Literal["original", "dequantized"] = Field(
        "original", description="Which full-precision weights receive the deltas when adapters were trained on a 4-bit base: the original ones, or the de-quantized NF4 weights they were trained against."
    )
    direct_io: bool = Field(True, description="Write the model's weights with O_DIRECT, past the page cache (same bytes): less CPU (the fold measured 1.35-1.8x faster on 2 cores) and no eviction of other cached files; the next read of the model comes from the disk. Falls back to ordinary writes where the file system refuses it; false: always through the page cache.")


class HeldOutTask(_Strict):
    name: str = Field(description=f"Task name ({SAFE_NAME_HELP}); a key of each report row's `held_out`.")
    data: str = Field(description="Its rows: a messages or prompt/completion file (.jsonl/.json/.csv/.parquet, relative to the recipe) or a datasets hub id; every row is scored, by exact match.")
    chat_template: bool = Field(False, description="Render prompt/completion rows through the base's chat template, as a source's `chat_template` does.")

    _check_name = field_validator("name")(classmethod(lambda cls, v: _safe_name(v)))

    @field_validator("data")
    @classmethod
    def _resolve_task_data(cls, value: str, info: ValidationInfo) -> str:
        return Source._resolve_data(value, info)


class RetentionSettings(_Strict):
    enabled: bool = Field(True, description="Score every report row against the base on generic prompts: agreement (the share of the base's greedy reply that the model's greedy reply repeats before departing from it, averaged over prompts) and KL(base || model) per token of the base's replies.")
    prompts: str = Field("builtin", description="'builtin' (40 everyday instructions shipped with loradem, none of them an anchor prompt) or a .jsonl/.json/.csv/.parquet file of messages or prompt/completion rows (relative to the recipe); only the prompts are used. A prompt that is also an anchor prompt is refused.")
    max_new_tokens: int = Field(24, gt=0, description="Reply tokens compared: the first this many of each greedy reply (up to eos).")

    @field_validator("prompts")
    @classmethod
    def _resolve_prompts(cls, value: str, info: ValidationInfo) -> str:
        return AnchorSettings._resolve_anchor_data(value, info)


class EvalSettings(_Strict):
    max_new_tokens: int = Field(24, gt=0, description="Greedy decoding budget for exact match.")
    batch_size: int = Field(32, gt=0, description="Prompts per generation batch.")
    max_rows_per_source: Optional[int] = Field(None, gt=0, description="Cap on test rows per source, and on rows per held-out task (null: all).")
    held_out: list[HeldOutTask] = Field(
        default_factory=list, description="Exact-match tasks no source trains on, scored on every report row (see `eval.held_out[]`); e.g. [{name: subtract, data: data/demo/heldout/subtract.jsonl}]."
    )
    retention: RetentionSettings = Field(default_factory=RetentionSettings, description="How much of the base each row keeps (see `eval.retention`).")
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks to run on every model (e.g. mmlu, bbh, drop; public tasks need their datasets reachable)."
    )
    lm_eval_include_path: Optional[str] = Field(
        None, description="Folder of custom lm-eval task YAMLs (relative to the recipe), e.g. eval/tasks."
    )
    lm_eval_limit: Optional[int] = Field(None, gt=0, description="Cap on examples per lm-eval task.")

    @field_validator("lm_eval_include_path")
    @classmethod
    def _resolve_include(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        candidate = _under_root(value, info)
        if not candidate.is_dir():
            raise ValueError(f"expected a folder of lm-eval task YAMLs, {str(candidate)!r} is not a directory")
        return str(candidate.resolve())

    @field_validator("held_out")
    @classmethod
    def _unique_tasks(cls, tasks: list[HeldOutTask]) -> list[HeldOutTask]:
        names = [t.name for t in tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"expected unique held-out task names, {twice[0]!r} appears twice")
        return tasks


class MixSettings(_Strict):
    enabled: bool = Field(False, description="Train the data-mixing baseline in `loradem run` and `loradem train` without being asked (as `--baseline mix` does), so the report always has its `mix` row: the comparison that says whether merging beats mixing on this data.")
    tokens: Union[Literal["match"], Annotated[int, Field(gt=0)]] = Field(
        "match", description="Training tokens of the data-mixing baseline: 'match' = the sum of the per-source adapters' tokens (equal compute), or a number."
    )
    proportions: Optional[list[dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]]]] = Field(
        None, min_length=1, description="Tuned proportions: a grid of share sets, each a mapping {source: share > 0} naming every source (normalized to sum 1), e.g. [{addition: 0.5, reverse: 0.25, sort: 0.25}]. Each set is one more mix adapter at the same token budget (cached by its shares), beside the natural one (`sources[].mix_proportion`); the report's `mix-tuned` row is the set with the lowest validation loss (every source's validation rows, never test rows) and its cost is the whole grid's training."
    )


class Recipe(_Strict):
    name: str = Field(description=f"Run name ({SAFE_NAME_HELP}); outputs go to runs/<name>/ by default.")
    description: str = Field("", description="Free text.")
    base: str = Field(description="Base model: 'smollm2-135m' (embedded default), a local HF folder, or a hub id.")
    seed: int = Field(0, description="Seed for splits, training and search.")
    output_dir: Optional[str] = Field(None, description="Where run outputs go (default runs/<name>), relative to the working directory.")
    adapters_dir: str = Field("adapters", description="Where trained adapters are cached, relative to the working directory.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings for every source (see `lora`).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Training settings for every source (see `train`).")
    sources: list[Source] = Field(min_length=1, description="The data sources; one adapter (distribution vector) each.")
    search: SearchSettings = Field(default_factory=SearchSettings, description="Weight search (see `search`).")
    assemble: AssembleSettings = Field(default_factory=AssembleSettings, description="Folding into the base (see `assemble`).")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Evaluation on held-out test rows (see `eval`).")
    mix: MixSettings = Field(default_factory=MixSettings, description="The data-mixing baseline, trained when mix.enabled or with `--baseline mix` (see `mix`).")
    learn: LearnSettings = Field(default_factory=LearnSettings, description="Learned per-module weights (see `learn`).")
    anchor: AnchorSettings = Field(default_factory=AnchorSettings, description="Anchored training of the adapters (see `anchor`).")
    regmean: RegMeanSettings = Field(default_factory=RegMeanSettings, description="RegMean merge of the adapters on their training rows' layer inputs (see `regmean`).")
    warmup: WarmupSettings = Field(default_factory=WarmupSettings, description="A shared format warm-up folded into the base before the adapters train (see `warmup`).")
    variants: list[Variant] = Field(
        default_factory=list, description="Other adapter sets to compare in the same run and report, each the recipe with some blocks overridden (see `variants[]`); e.g. [{name: anchored, anchor: {enabled: true}}]. Each trains its own adapters (cached by key like any other), searches, learns and RegMean-merges its own weights; its rows are scored on in-memory exact folds, and the assembled model stays the recipe's own."
    )

    _check_name = field_validator("name")(classmethod(lambda cls, v: _safe_name(v)))

    @field_validator("base")
    @classmethod
    def _resolve_base(cls, value: str, info: ValidationInfo) -> str:
        if value in BASE_ALIASES:
            return value
        candidate = _under_root(value, info)
        if candidate.is_dir():
            return str(candidate.resolve())
        if value.startswith((".", "/", "~")) or candidate.exists():
            raise ValueError(f"expected a model folder, {str(candidate)!r} is not a directory")
        if re.match(r"^[\w.-]+/[\w.-]+$", value):
            return value  # a hub id, used as is when a hub is reachable
        raise ValueError(f"expected {' or '.join(BASE_ALIASES)}, a local model folder, or a hub id 'org/name', got {value!r}")

    @model_validator(mode="after")
    def _effective_settings_valid(self) -> "Recipe":
        """A per-source override may set a field to null only where null means something (e.g. max_steps)."""
        for i, s in enumerate(self.sources):
            for block, effective in (("train", self.train_for), ("lora", self.lora_for)):
                try:
                    effective(s)
                except ValidationError as err:
                    first = err.errors(include_url=False)[0]
                    raise ValueError(f"sources[{i}].{block}.{_loc(first['loc'])}: {first['msg']} (got {first['input']!r})") from None
        return self

    @model_validator(mode="after")
    def _learned_needs_learn(self) -> "Recipe":
        if self.assemble.weights == "learned" and not self.learn.enabled:
            raise ValueError("assemble.weights: 'learned' needs learn.enabled: true")
        return self

    @model_validator(mode="after")
    def _regmean_needs_regmean(self) -> "Recipe":
        if self.assemble.weights == "regmean" and not self.regmean.enabled:
            raise ValueError("assemble.weights: 'regmean' needs regmean.enabled: true")
        return self

    @model_validator(mode="after")
    def _mix_proportions_name_sources(self) -> "Recipe":
        names = [s.name for s in self.sources]
        for i, shares in enumerate(self.mix.proportions or []):
            unknown = [n for n in shares if n not in names]
            if unknown:
                raise ValueError(f"mix.proportions[{i}]: unknown source {unknown[0]!r}; expected a share for each of {', '.join(names)}")
            missing = [n for n in names if n not in shares]
            if missing:
                raise ValueError(f"mix.proportions[{i}]: no share for source {missing[0]!r}; expected a share for each of {', '.join(names)}")
        return self

    @model_validator(mode="after")
    def _warmup_sources_known(self) -> "Recipe":
        names = [s.name for s in self.sources]
        for name in self.warmup.sources or []:
            if name not in names:
                raise ValueError(f"warmup.sources: unknown source {name!r}; expected names of the recipe's sources ({', '.join(names)})")
        if self.warmup.sources is not None and not self.warmup.sources:
            raise ValueError("warmup.sources: expected at least one source name, or null for every source")
        twice = sorted({n for n in self.warmup.sources or [] if self.warmup.sources.count(n) > 1})
        if twice:
            raise ValueError(f"warmup.sources: {twice[0]!r} appears twice")
        return self

    @model_validator(mode="after")
    def _variants_valid(self) -> "Recipe":
        seen: set[str] = set()
        for i, v in enumerate(self.variants):
            if v.name in seen:
                raise ValueError(f"variants[{i}].name: expected unique variant names, {v.name!r} appears twice")
            seen.add(v.name)
            if not v.overrides():
                raise ValueError(f"variants[{i}] ({v.name}): overrides nothing; expected at least one of {', '.join(VARIANT_BLOCKS)}")
            self.variant(v.name)  # the derived recipe must validate too
        return self

    @field_validator("sources")
    @classmethod
    def _unique(cls, sources: list[Source]) -> list[Source]:
        seen: set[str] = set()
        for s in sources:
            if s.name in seen:
                raise ValueError(f"expected unique source names, {s.name!r} appears twice")
            seen.add(s.name)
        return sources

    # ---- derived values -------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise LorademError(f"recipe {self.name!r}: no source named {name!r} (have: {', '.join(s.name for s in self.sources)})")

    def variant(self, name: str) -> "Recipe":
        """The recipe as variant `name` runs it: its blocks overridden field by field, outputs in
        <out_dir>/variants/<name>/, the same sources, adapters folder and mixing baseline; a variant that does not
        override `search:` keeps its Optuna studies in the recipe's search.db."""
        v = next((v for v in self.variants if v.name == name), None)
        if v is None:
            have = ", ".join(x.name for x in self.variants) or "none"
            raise LorademError(f"recipe {self.name!r}: no variant named {name!r} (have: {have})")
        raw = self.model_dump(mode="json", exclude_unset=True)  # an override's unset fields stay unset
        for block, changes in v.overrides().items():
            raw[block] = {**raw.get(block, {}), **changes}
        raw.update(variants=[], output_dir=str(self.out_dir / "variants" / v.name))
        if "search" not in v.overrides() and self.search.storage is None:
            # the recipe's study storage: a study is named by everything that defines its objective, so a variant
            # with the recipe's adapters reuses the recipe's finished study, and any other gets a study of its own
            # (named as the recipe's out_dir is: relative to the working directory unless written absolute)
            raw.setdefault("search", {})["storage"] = f"sqlite:///{self.out_dir / 'search' / 'search.db'}"
        try:  # every path in `raw` is already resolved, so no root is needed
            return Recipe.model_validate(raw)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = "" if not first["loc"] else f" {_loc(first['loc'])}:"
            raise ValueError(f"variants[{self.variants.index(v)}] ({v.name}):{where} {first['msg'].removeprefix('Value error, ')}") from None

    def train_for(self, source: Source) -> TrainSettings:
        """The source's effective training settings: the recipe's, with the fields its `train:` sets."""
        return TrainSettings(**{**self.train.model_dump(), **set_fields(source.train)})

    def lora_for(self, source: Source) -> LoraSettings:
        """The source's effective LoRA settings: the recipe's, with the fields its `lora:` sets."""
        return LoraSettings(**{**self.lora.model_dump(), **set_fields(source.lora)})


# ---- loading and error messages ----------------------------------------

def _fields_at(loc: tuple) -> list[str]:
    """Field names a model accepts at `loc` (for 'unknown key' messages)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        for cand in (ann, *typing.get_args(ann)):
            for inner in (cand, *typing.get_args(cand)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
    return list(getattr(model, "model_fields", {}))


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "lax-", "is-instance", "literal[")):
            out += f".{part}" if out else part
    return out or "(top level)"


def format_validation_error(path: str | Path, err: ValidationError) -> str:
    """One line: ``<file>: <field path>: <what was expected>`` (+ how many more problems)."""
    # an unknown key first: a typo ("dataset:") also makes its real key look missing, and the typo is the cause
    errors = sorted(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = first["loc"]
    # pydantic reports union members separately; keep the member-free path
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "float", "constrained-int", "constrained-float"))))
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        msg = f"unknown key; expected one of: {', '.join(allowed)}"
    elif first["type"] == "missing":
        msg = "required field is missing"
    else:
        msg = first["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if "input" in first and first["type"] not in ("value_error",):
            msg += f" (got {first['input']!r})"
    where = _loc(loc)
    if not loc and re.match(r"^[\w.\[\]]+( \(.*?\))?: ", msg):
        where, msg = msg.split(": ", 1)  # a whole-recipe check that names its field itself
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{path}: {where}: {msg}{more}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one silently, so a
    second `train:` block would quietly drop the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the safe loader's own check refuses it, with its message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; raises `LorademError` with a one-line message on any problem."""
    path = Path(path)
    if not path.is_file():
        raise LorademError(f"{path}: recipe file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise LorademError(f"{path}: {yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise LorademError(f"{path}: byte {exc.start}: not UTF-8 text; save the recipe as UTF-8") from None
    if not isinstance(raw, dict):
        raise LorademError(f"{path}: (top level): expected a mapping of recipe keys, got {type(raw).__name__}")
    raw.setdefault("name", _default_name(path))
    try:
        return Recipe.model_validate(raw, context={"root": str(path.parent.resolve())})
    except ValidationError as err:
        raise LorademError(format_validation_error(path, err)) from None


def _default_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem)
    return stem or "recipe"


# ---- reference documentation (generated from the Field descriptions) ---------

def _type_name(annotation: Any) -> str:
    """A field's type as a user reads it: ``int | None``, ``'match' | int``, ``list[str]``, ``'tpe' | 'random'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is Union:
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def reference_markdown() -> str:
    """The recipe reference as markdown tables, one per block (the README embeds it)."""
    blocks = [
        ("top level", Recipe), ("sources[]", Source), ("lora", LoraSettings), ("train", TrainSettings),
        ("search", SearchSettings), ("learn", LearnSettings), ("regmean", RegMeanSettings), ("anchor", AnchorSettings), ("warmup", WarmupSettings), ("variants[]", Variant), ("assemble", AssembleSettings),
        ("eval", EvalSettings), ("eval.held_out[]", HeldOutTask), ("eval.retention", RetentionSettings), ("mix", MixSettings),
    ]
    out = []
    for title, model in blocks:
        out.append(f"**`{title}`**\n\n| key | type | default | meaning |\n|---|---|---|---|")
        for name, f in model.model_fields.items():
            if model is Recipe and name == "name":
                default = "the file's name"
            elif f.is_required():
                default = "required"
            elif f.default_factory is not None:
                made = f.default_factory()
                default = "see block" if isinstance(made, BaseModel) else f"`{made!r}`"
            else:
                default = f"`{f.default!r}`" if isinstance(f.default, str) else f"`{f.default}`" if f.default is not None else "`null`"
            kind = "mapping" if (model is Source and name in ("train", "lora")) or (model is Variant and name in VARIANT_BLOCKS) else _type_name(f.annotation)
            desc = (f.description or "").replace("|", "\\|")
            out.append(f"| `{name}` | {kind.replace('|', chr(92) + '|')} | {default} | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":  # python -m loradem.recipe  -> the reference tables
    print(reference_markdown(), end="")
