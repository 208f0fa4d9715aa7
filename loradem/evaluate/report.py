"""The report `loradem eval` writes: one table of every model on every source, with its cost.

    write_report(out_dir, "demo", {"addition": "exact_match", "reverse": "loss"}, rows,
                 extra={...}, reproduce="loradem run recipes/demo.yaml")

A row is ``{"name": "dem", "per_source": {source: value}, "average": float,
"cost": {"train_tokens", "train_seconds", "search_seconds", "total_seconds"},
"weights": {source: w}, "benchmarks": {task: {metric: value}}, "held_out": {task:
exact match}, "retention": {"agreement", "kl"}}`` (weights, benchmarks and the
held-out measures optional; a per-source or held-out value may be None when
not evaluated).
Names in use: ``base``, ``warm-base``, ``adapter:<source>``, ``uniform``, ``sum``, ``dem``,
``mix``, ``mix-tuned``, ``dem-<option>``, and ``<variant>:<any of these>`` for a recipe's variants.
A row built on a warmed base has ``warmup_tokens`` and ``warmup_seconds`` in its cost too (already
counted in its training tokens and seconds).

Writes, each atomically, after every row has been checked and every figure
drawn (a bad row leaves earlier reports untouched): report.json (the run
name under "recipe", each source's metric, the rows, and `extra`), report.md
(the table, the held-out table when rows carry the held-out measures, each
merge against the best mix when there is a mix row (`against_mix`), the
searched weights, the facts in `extra`, the lm-eval
benchmarks when any row has them, the command that reproduces the run),
per_source.png (each source's metric per model: grouped bars, or a grid of cells past 12 models),
cost_vs_score.png (average score against total cost, one labelled point per
model) and, when there is a mix row and retention, against_mix.png (in-domain
average against KL to the base, the goal's corner shaded). report.md is a view of report.json: everything it prints is in the
document (lm-eval's example cap is ``extra["lm_eval"]["limit"]``). Exact match
prints as a percentage, loss with 3 decimals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from loradem.errors import LorademError
from loradem.evaluate.against_mix import against_mix, against_mix_figure, against_mix_lines, is_single_adapter
from loradem.files import atomic_write_files, json_text
from loradem.machine import summary as machine_summary
from loradem.plots import figure, labelled_cells, png_bytes, styled
from loradem.recipe import format_overrides

AGAINST_MIX_PNG = "against_mix.png"
COST_KEYS = ("train_tokens", "train_seconds", "search_seconds", "total_seconds")
METRIC_LABEL = {"exact_match": "exact match", "loss": "loss"}


# ---- checking and formatting ----------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_rows(rows: list[dict], sources: list[str]) -> None:
    """Every row has a unique name, a value (or None) per source, an average and the four cost numbers."""
    if not rows:
        raise LorademError("report: expected at least one row")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        name = row.get("name") if isinstance(row, dict) else None
        where = f"report: row {i} ({name!r})"
        if not isinstance(name, str) or not name:
            raise LorademError(f"report: row {i}: name: expected a non-empty string")
        if name in seen:
            raise LorademError(f"{where}: name: appears twice")
        seen.add(name)
        per = row.get("per_source")
        if not isinstance(per, dict) or sorted(per) != sorted(sources):
            got = sorted(per) if isinstance(per, dict) else per
            raise LorademError(f"{where}: per_source: expected a value for each of {sources}, got {got}")
        for s, v in per.items():
            if v is not None and not _is_number(v):
                raise LorademError(f"{where}: per_source.{s}: expected a finite number or null, got {v!r}")
        if row.get("average") is not None and not _is_number(row.get("average")):
            raise LorademError(f"{where}: average: expected a finite number or null, got {row.get('average')!r}")
        cost = row.get("cost")
        if not isinstance(cost, dict) or any(not _is_number(cost.get(k)) for k in COST_KEYS):
            raise LorademError(f"{where}: cost: expected numbers for {', '.join(COST_KEYS)}, got {cost!r}")
        weights = row.get("weights")
        if weights is not None and (not isinstance(weights, dict) or any(not _is_number(w) for w in weights.values())):
            raise LorademError(f"{where}: weights: expected {{source: number}}, got {weights!r}")
        held = row.get("held_out")  # optional: exact match on tasks no source trains on
        if held is not None and (not isinstance(held, dict) or any(v is not None and not _is_number(v) for v in held.values())):
            raise LorademError(f"{where}: held_out: expected {{task: finite number or null}}, got {held!r}")
        kept = row.get("retention")  # optional: agreement with the base and KL(base || model)
        if kept is not None and (not isinstance(kept, dict) or sorted(kept) != ["agreement", "kl"]
                                 or not all(_is_number(v) for v in kept.values())):
            raise LorademError(f"{where}: retention: expected {{agreement: number, kl: number}}, got {kept!r}")
        bench = row.get("benchmarks")  # optional: lm-eval tasks run on this row's model
        if bench is not None and (not isinstance(bench, dict) or any(
                not isinstance(m, dict) or any(not isinstance(k, str) or not _is_number(v) for k, v in m.items())
                for m in bench.values())):
            raise LorademError(f"{where}: benchmarks: expected {{task: {{metric: finite number}}}}, got {bench!r}")


def format_value(value: Optional[float], metric: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if metric == "exact_match" else f"{value:.3f}"


def average_metric(metrics: dict[str, str]) -> str:
    """How to print an average: as exact match when every source is, else as a plain number."""
    kinds = set(metrics.values())
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _seconds(s: float) -> str:
    return f"{s:.0f}" if s >= 100 else f"{s:.1f}"


# ---- report.md ------------------------------------------------------------------

def held_out_lines(rows: list[dict], extra: dict) -> list[str]:
    """The held-out table of report.md: one column per held-out task, their average, then retention's agreement and
    KL; '–' where a row has none; [] when no row has any."""
    tasks: list[str] = []
    for row in rows:
        tasks += [t for t in (row.get("held_out") or {}) if t not in tasks]
    kept = any(row.get("retention") for row in rows)
    if not tasks and not kept:
        return []
    notes = []
    if tasks:
        notes.append("Held-out tasks are exact-match tasks none of the sources trains on (the test of skill transfer); "
                     "the average is over them.")
    if kept:
        r = extra.get("retention") or {}
        notes.append(f"Retention compares each model with the base on {r.get('n', '?')} generic prompts no source "
                     f"trains on ({r.get('prompts', '?')}): agreement is the share of the base's greedy reply "
                     f"(first {r.get('max_new_tokens', '?')} tokens) that the model's greedy reply repeats before it "
                     "first departs from it (mean over prompts; 100%: the base's replies), KL the mean KL(base ‖ model) "
                     "per token of the base's replies (0: the base's distribution; lower is closer).")
    head = [*tasks, *(["held-out average"] if tasks else []), *(["agreement", "KL"] if kept else [])]
    lines = ["", "## Held-out", "", " ".join(notes), "", "| model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for row in rows:
        held, r = row.get("held_out") or {}, row.get("retention")
        cells = [format_value(held.get(t), "exact_match") for t in tasks]
        if tasks:
            values = [v for v in held.values() if v is not None]
            cells.append(format_value(sum(values) / len(values) if values else None, "exact_match"))
        if kept:
            cells += [format_value(r["agreement"], "exact_match"), f"{r['kl']:.4f}"] if r else ["–", "–"]
        lines.append(f"| `{row['name']}` | " + " | ".join(cells) + " |")
    return lines


def benchmark_lines(rows: list[dict], lm_eval_limit: Optional[int] = None) -> list[str]:
    """The lm-eval table of report.md: one column per task and metric, '–' where a row has none; [] when no row has any."""
    columns: list[tuple[str, str]] = []
    for row in rows:
        for task, values in (row.get("benchmarks") or {}).items():
            columns += [(task, m) for m in values if (task, m) not in columns]
    if not columns:
        return []
    note = ("Standard benchmarks run by lm-evaluation-harness on each row's model, with lm-eval's metric names "
            "(acc, acc_norm, exact_match: higher is better; brier_score, perplexity: lower is better).")
    if lm_eval_limit:
        note += f" At most {lm_eval_limit} examples per task (`eval.lm_eval_limit`): an estimate, not the full benchmark."
    lines = ["", "## Benchmarks", "", note, "", "| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row in rows:
        bench = row.get("benchmarks") or {}
        cells = [f"{bench[t][m]:.4f}" if m in bench.get(t, {}) else "–" for t, m in columns]
        lines.append(f"| `{row['name']}` | " + " | ".join(cells) + " |")
    return lines


def summary_lines(rows: list[dict], extra: dict) -> list[str]:
    """Search, cost and vector facts under the table (from report.json's extra data, measured by the run)."""
    lines: list[str] = []
    search = extra.get("search") or {}
    dem = next((r for r in rows if r["name"] == "dem"), None)
    if search and dem:
        c = dem["cost"]
        frac = search.get("eval_fraction")
        lines += ["", "## Run", "",
                  f"- Weight search: {search.get('n_trials')} trials ({search.get('sampler')}, objective "
                  f"{_num(search.get('objective'))}), {_seconds(c['search_seconds'])} s, next to "
                  f"{_seconds(c['train_seconds'])} s of training for the per-source adapters"
                  + (f"; {100 * frac:.1f}% of trial time was evaluation." if isinstance(frac, (int, float)) else ".")]
    learn = extra.get("learn")
    if learn:
        lines.append(
            f"- Learned per-module weights (`dem-learned`, LoRA Soups' CAT): {learn.get('n_parameters')} weights "
            f"({learn.get('granularity')}), {learn.get('steps')} steps on {sum((learn.get('fit_rows') or {}).values())} training rows, "
            f"{int(learn.get('learn_tokens') or 0):,} tokens in {_seconds(float(learn.get('learn_seconds') or 0))} s "
            f"(counted as training); validation loss {_num(learn.get('initial_objective'))} at the start, "
            f"{_num(learn.get('objective'))} kept (step {learn.get('best_step')}). Weights by layer: `learn/learn.png`.")
    lines += _regmean_lines(extra.get("regmean"), "")
    mix = extra.get("mix")
    if mix and mix.get("cost_ratio_mix_to_dem"):
        r = mix["cost_ratio_mix_to_dem"]
        what = "all per-source adapters + " + {"dem-learned": "the weight search + the learned weights",
                                               "dem-regmean": "the RegMean merge"}.get(mix.get("dem_row"), "the weight search")
        lines.append(f"- Data mixing vs DEM (`{mix.get('dem_row', 'dem')}`, the assembled model) cost: {_num(r.get('train_tokens'))}x the "
                     f"training tokens, {_num(r.get('seconds'))}x the seconds (DEM = {what}).")
    lines += _warmup_lines(extra.get("warmup"), "")
    lines += _mix_grid_lines(extra.get("mix_grid"), rows, (mix or {}).get("dem_row", "dem"))
    lines += _increment_lines(extra.get("increment"))
    lines += _vector_lines(extra.get("vectors") or {})
    for name, v in (extra.get("variants") or {}).items():
        changes = format_overrides(v.get("overrides") or {})
        s, learned = v.get("search") or {}, v.get("learn")
        line = (f"- Variant `{name}` (rows `{name}:...`; {changes}){': ' + v['description'] if v.get('description') else ''}. "
                f"Its own adapters, a {s.get('n_trials')}-trial search (objective {_num(s.get('objective'))}, "
                f"{_seconds(float(s.get('search_seconds') or 0))} s)")
        if learned:
            line += (f" and learned weights ({int(learned.get('learn_tokens') or 0):,} tokens, "
                     f"validation loss {_num(learned.get('initial_objective'))} -> {_num(learned.get('objective'))})")
        lines.append(line + f"; outputs in `{v.get('out_dir')}/`; its rows are scored on in-memory exact folds.")
        lines += ["  " + x for x in _warmup_lines(v.get("warmup"), f"{name}:") + _regmean_lines(v.get("regmean"), f"{name}:")
                  + _increment_lines(v.get("increment"))
                  + _vector_lines(v.get("vectors") or {})]
    return lines


def _regmean_lines(record: Optional[dict], prefix: str) -> list[str]:
    """The RegMean merge in one line: which activations, the alpha kept (and each candidate's validation loss), its
    rank and seconds."""
    if not record:
        return []
    settings = record.get("settings") or {}
    losses = record.get("validation_loss_by_alpha") or {}
    chosen = (f"alpha {record.get('alpha')} chosen by validation loss of "
              + ", ".join(f"{a}: {_num(v)}" for a, v in losses.items()) if len(losses) > 1 else f"alpha {record.get('alpha')}")
    rows = sum((record.get("rows") or {}).values())
    ridged = record.get("ridged_modules") or []
    return [f"- RegMean (`{prefix}dem-regmean`): {settings.get('activations', 'base')} activations, {chosen}; "
            f"Gram matrices on {rows} training rows, {record.get('modules')} layers, one exact LoRA of rank "
            f"{'/'.join(str(r) for r in record.get('ranks') or [])}"
            + (f" ({len(ridged)} layers needed the ridge)" if ridged else "")
            + f"; {_seconds(float(record.get('regmean_seconds') or 0.0))} s."]


def _mix_grid_lines(grid: Optional[dict], rows: list[dict], dem_row: str) -> list[str]:
    """The proportion grid in two lines: each set's validation loss (the chosen one marked), then what
    `mix-tuned` is charged next to DEM's cost."""
    if not grid:
        return []
    sets = []
    for i, g in enumerate(grid["sets"]):
        shares = ", ".join(f"{n} {p:.2f}" for n, p in (g.get("shares") or {}).items())
        loss = g.get("best_val_loss")
        sets.append(f"{'natural ' if g.get('natural') else ''}({shares}) {loss:.4f}"
                    + (" **chosen**" if i == grid["chosen"] else ""))
    cost = grid["cost"]
    line = (f"- Mix proportions (`mix-tuned` = the lowest validation loss of {len(sets)} trainings at equal tokens): "
            + "; ".join(sets) + ".")
    dem = next((r for r in rows if r["name"] == dem_row), None)
    cost_line = (f"  `mix-tuned` is charged the whole grid: {cost['train_tokens']:,} training tokens, "
                 f"{_seconds(cost['train_seconds'])} s")
    if dem:
        d = dem["cost"]
        cost_line += (f", next to DEM's (`{dem_row}`) {d['train_tokens']:,} tokens and {_seconds(d['total_seconds'])} s "
                      "(one training per source + the search" + (" + the learned weights)" if dem_row == "dem-learned" else ")"))
    return [line, cost_line + "."]


def _warmup_lines(warm: Optional[dict], prefix: str) -> list[str]:
    """The shared warm-up in one line: what it trained on, its cost, which rows it is charged to."""
    if not warm:
        return []
    return [f"- Shared warm-up (`{prefix}warm-base`): adapter `{warm['adapter']['name']}`, {warm.get('steps')} steps on up to "
            f"{warm.get('rows_per_source')} training rows each of {', '.join(warm.get('sources') or [])} "
            f"({int(warm.get('train_tokens') or 0):,} tokens, {_seconds(float(warm.get('train_seconds') or 0))} s)"
            + _warmup_anchor(warm.get("anchor")) + ", folded exactly into the base; "
            + (f"every `{prefix}...` row" if prefix else "every row but `base`, `mix` and `mix-tuned`")
            + " is built on it and charged its cost."]


def _warmup_anchor(anchored: Optional[dict]) -> str:
    if not anchored:
        return ""
    loss = "learned by KL to the base" if anchored.get("loss") == "kl" else "the base's own replies"
    return f" with {int(anchored.get('rows') or 0):,} anchor rows ({loss})"


def _increment_lines(inc: Optional[dict]) -> list[str]:
    if not inc:
        return []
    d, m = inc["dem_cost"], inc.get("mix_retrain_cost")
    line = (f"- Adding {', '.join(inc['new_sources'])} under DEM: {d['train_tokens']:,} training tokens and "
            f"{_seconds(d['total_seconds'])} s (the new adapter(s) + a search warm-started from {inc['previous']}"
            + (" + relearning the per-module weights" if inc.get("relearned") else "") + ")")
    if m:
        grid = " (every set of its proportion grid)" if inc.get("mix_retrain_row") == "mix-tuned" else ""
        line += f"; retraining the mixing baseline{grid} on all sources: {m['train_tokens']:,} tokens, {_seconds(m['total_seconds'])} s"
    return [line + "."]


def _vector_lines(vec: dict) -> list[str]:
    lines = []
    if vec.get("norms"):
        lines.append("- Delta norms: " + ", ".join(f"{k} {v:.3f}" for k, v in vec["norms"].items()) + ".")
    if vec.get("cosine"):
        names = list(vec["cosine"])
        pairs = [f"{a}/{b} {vec['cosine'][a][b]:+.3f}" for i, a in enumerate(names) for b in names[i + 1:]]
        lines.append("- Cosine similarity of deltas: " + ", ".join(pairs) + ".")
    return lines


def _num(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else "–"


def _merge_seconds(cost: dict) -> float:
    """What finding the row's weights cost beside training: the weight search, or RegMean's passes (learned weights
    count as training)."""
    return float(cost["search_seconds"]) + float(cost.get("regmean_seconds") or 0.0)


def markdown(run_name: str, metrics: dict[str, str], rows: list[dict], *, extra: Optional[dict] = None,
             reproduce: Optional[str] = None) -> str:
    sources = list(metrics)
    extra = extra or {}
    avg_kind = average_metric(metrics)
    head = ["model", *[f"{s} ({METRIC_LABEL[m]})" for s, m in metrics.items()], "average",
            "train tokens", "train s", "search / merge s", "total s"]
    lines = [
        f"# {run_name}: results",
        "",
        "Each source is scored on its held-out test rows: exact match (higher is better) or loss (lower is better). "
        "Costs are wall-clock seconds on the machine that ran them"
        + (f"; this report was scored on {machine_summary(extra['machine'])}." if extra.get("machine") else "."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    for row in rows:
        c = row["cost"]
        cells = [f"`{row['name']}`", *[format_value(row["per_source"][s], metrics[s]) for s in sources],
                 format_value(row.get("average"), avg_kind), f"{int(c['train_tokens']):,}",
                 _seconds(c["train_seconds"]), _seconds(_merge_seconds(c)), _seconds(c["total_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += held_out_lines(rows, extra)
    lines += against_mix_lines(against_mix(rows, metrics))
    weighted = [r for r in rows if r.get("weights")]
    if weighted:
        lines += ["", "## Weights", "", "| model | " + " | ".join(sources) + " |", "|---|" + "---:|" * len(sources)]
        for row in weighted:
            ws = [f"{row['weights'][s]:.3f}" if s in row["weights"] else "–" for s in sources]
            lines.append(f"| `{row['name']}` | " + " | ".join(ws) + " |")
        if any(r["name"].endswith("dem-learned") for r in weighted):
            lines += ["", "`dem-learned` shows each source's mean over its per-module weights (every one is in `learn/weights.json`)."]
    lines += summary_lines(rows, extra)
    lines += benchmark_lines(rows, (extra.get("lm_eval") or {}).get("limit"))
    if reproduce:
        lines += ["", "## How to reproduce", "", "```", reproduce, "```"]
    return "\n".join(lines + [""])


# ---- figures --------------------------------------------------------------------

BARS_UP_TO = 12  # models; past this one bar per model and source is too thin to read, so each value is a cell


@styled
def per_source_figure(metrics: dict[str, str], rows: list[dict]):
    """One panel per metric kind present. Up to BARS_UP_TO models: grouped bars, x = source, one bar per model.
    More (a recipe with variants has dozens): a grid of cells, one row per model and one column per source,
    each cell coloured and labelled by its value."""
    kinds = [k for k in ("exact_match", "loss") if k in metrics.values()]
    if len(rows) > BARS_UP_TO:
        return _per_source_cells(metrics, rows, kinds)
    fig = figure(max(6.4, 2.0 + 0.35 * len(metrics) * len(rows)) + 1.8, 3.4 * len(kinds))
    for panel, kind in enumerate(kinds, start=1):
        ax = fig.add_subplot(len(kinds), 1, panel)
        sources = [s for s, m in metrics.items() if m == kind]
        width = 0.8 / len(rows)
        for j, row in enumerate(rows):
            xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(sources))]
            vals = [row["per_source"][s] for s in sources]
            scale = 100.0 if kind == "exact_match" else 1.0
            ax.bar([x for x, v in zip(xs, vals) if v is not None],
                   [scale * v for v in vals if v is not None], width, label=row["name"])
        ax.set_xticks(range(len(sources)), sources)
        ax.set_ylabel("exact match (%)" if kind == "exact_match" else "loss (lower is better)")
        if kind == "exact_match":
            ax.set_ylim(0, 100)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _per_source_cells(metrics: dict[str, str], rows: list[dict], kinds: list[str]):
    columns = {kind: [s for s, m in metrics.items() if m == kind] for kind in kinds}
    height = 1.2 + 0.24 * len(rows)
    fig = figure(3.0 + sum(0.9 * len(c) + 1.2 for c in columns.values()), height)
    panels = fig.subplots(1, len(kinds), squeeze=False, width_ratios=[len(columns[k]) for k in kinds])[0]
    for ax, kind in zip(panels, kinds):
        scale = 100.0 if kind == "exact_match" else 1.0
        grid = np.array([[np.nan if row["per_source"][s] is None else scale * row["per_source"][s]
                          for s in columns[kind]] for row in rows], dtype=float)
        # brighter is better for both kinds: exact match up, loss down
        match = kind == "exact_match"
        image = labelled_cells(ax, grid, "{:.1f}".format if match else "{:.3g}".format, fontsize="x-small",
                               aspect="auto", cmap="viridis" if match else "viridis_r",
                               **({"vmin": 0.0, "vmax": 100.0} if match else {}))
        ax.set_xticks(range(len(columns[kind])), columns[kind])
        ax.xaxis.tick_top()
        ax.set_yticks(range(len(rows)), [row["name"] for row in rows] if ax is panels[0] else [])
        ax.set_title("exact match (%)" if kind == "exact_match" else "loss (lower is better)")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
    return fig


@styled
def cost_vs_score_figure(metrics: dict[str, str], rows: list[dict]):
    avg_kind = average_metric(metrics)
    scale = 100.0 if avg_kind == "exact_match" else 1.0
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    singles = [r for r in rows if is_single_adapter(r["name"]) and r.get("average") is not None]
    if singles:  # one source's adapter alone scores ~1/n of the average by construction: grey, unlabelled
        ax.plot([r["cost"]["total_seconds"] for r in singles], [scale * r["average"] for r in singles], "o",
                color="0.7", label="one adapter alone")
        ax.legend(fontsize="small", loc="lower right")
    for row in rows:
        if row.get("average") is None or is_single_adapter(row["name"]):
            continue
        x, y = row["cost"]["total_seconds"], scale * row["average"]
        ax.plot([x], [y], "o")
        ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xlabel("total cost (seconds: training + search)")
    ax.set_ylabel({"exact_match": "average exact match (%)", "loss": "average loss (lower is better)"}.get(avg_kind, "average"))
    return fig


# ---- the command ----------------------------------------------------------------

def write_report(
    out_dir: Path, run_name: str, metrics: dict[str, str], rows: list[dict], *, extra: Optional[dict] = None,
    reproduce: Optional[str] = None,
) -> None:
    """Check the rows, then write report.json, report.md, per_source.png, cost_vs_score.png and (with a mix row and
    retention) against_mix.png into out_dir.

    `metrics` is {source: "exact_match" | "loss"} in column order; `extra` joins report.json after the rows
    (e.g. recipe_path, search, learn, predictions); `reproduce` is the command report.md ends with (none: no
    such section)."""
    check_rows(rows, list(metrics))
    clash = sorted(set(extra or {}) & {"recipe", "metric", "rows"})
    if clash:
        raise LorademError(f"report: extra: keys {clash} would overwrite the report's own")
    doc = {"recipe": run_name, "metric": dict(metrics), "rows": rows, **(extra or {})}
    md = markdown(run_name, metrics, rows, extra=extra, reproduce=reproduce)
    bars = png_bytes(per_source_figure(metrics, rows))
    scatter = png_bytes(cost_vs_score_figure(metrics, rows))
    verdict = against_mix(rows, metrics)
    goal = against_mix_figure(verdict, rows) if verdict else None
    out_dir = Path(out_dir)
    files = {out_dir / "report.json": json_text(doc).encode("utf-8"), out_dir / "per_source.png": bars,
             out_dir / "cost_vs_score.png": scatter, out_dir / "report.md": md.encode("utf-8")}
    if goal is not None:
        files[out_dir / AGAINST_MIX_PNG] = png_bytes(goal)
    # all or none: a full or read-only disk leaves the earlier report whole, and is one line
    atomic_write_files(files)
    if goal is None:  # an earlier run's figure would describe rows this report no longer has
        (out_dir / AGAINST_MIX_PNG).unlink(missing_ok=True)
