"""Each merge against data mixing, on the four things a merge has to match to replace a mixed training run.

    verdict = against_mix(rows, metrics)      # None without a mix row, or when a source is scored by loss
    lines = against_mix_lines(verdict)         # report.md's section
    fig = against_mix_figure(verdict, rows)    # against_mix.png: in-domain against KL, the goal's corner shaded

A merge is a row named ``uniform``, ``sum``, ``dem`` or ``dem-<option>`` (with or without a variant's prefix).
It is set against the best of the report's mixes (``mix``, ``mix-tuned``) on each measure on its own:

- in-domain: its average over the sources' test rows is at most `IN_DOMAIN_GAP` below the best mix's;
- held-out: its held-out average (unseen related tasks) is at least the best mix's;
- retention: its KL to the base on generic prompts is at most the lowest mix's;
- its adapters: on each source it keeps at least `ADAPTER_SHARE` of what that source's own adapter (the one the
  merge folds: the same variant's) scores there.

A criterion whose numbers the report lacks (no held-out tasks, no retention) is None: neither met nor missed.
Exact match only: with a loss, "within 5 points" has no meaning.
"""

from __future__ import annotations

from typing import Optional

from loradem.plots import figure, styled

IN_DOMAIN_GAP = 0.05
ADAPTER_SHARE = 0.90
MIX_ROWS = ("mix", "mix-tuned")
_EPS = 1e-9  # exact-match averages are sums of k/n: 145/180 against 154/180 - 0.05 must count as equal
CRITERIA = ("in_domain", "held_out", "retention", "adapters")


def held_out_average(row: dict) -> Optional[float]:
    values = [v for v in (row.get("held_out") or {}).values() if v is not None]
    return sum(values) / len(values) if values else None


def retention_kl(row: dict) -> Optional[float]:
    return (row.get("retention") or {}).get("kl")


def is_merge(name: str) -> bool:
    kind = name.rpartition(":")[2]
    return kind in ("uniform", "sum", "dem") or kind.startswith("dem-")


def is_single_adapter(name: str) -> bool:
    return name.startswith("adapter:") or ":adapter:" in name


def _adapter_shares(row: dict, by_name: dict[str, dict], sources: list[str]) -> dict[str, Optional[float]]:
    """{source: the merge's score / its own adapter's score}; None where the adapter scores 0 or is not in the report."""
    prefix = row["name"].rpartition(":")[0]
    shares = {}
    for s in sources:
        own = by_name.get(f"{prefix}:adapter:{s}" if prefix else f"adapter:{s}")
        value = own["per_source"].get(s) if own else None
        mine = row["per_source"].get(s)
        shares[s] = mine / value if value and mine is not None else None
    return shares


def against_mix(rows: list[dict], metrics: dict[str, str]) -> Optional[dict]:
    """The best mix on each measure and every merge's four criteria (True, False, or None when unmeasured), merges
    meeting the most criteria first (then by in-domain average); None when the report has no mix row or scores a
    source by loss."""
    if set(metrics.values()) != {"exact_match"}:
        return None
    mixes = [r for r in rows if r["name"] in MIX_ROWS and r.get("average") is not None]
    if not mixes:
        return None
    sources = list(metrics)
    by_name = {r["name"]: r for r in rows}
    best = max(mixes, key=lambda r: r["average"])
    held = max(((h, r["name"]) for r in mixes if (h := held_out_average(r)) is not None), default=(None, None))
    kl = min(((k, r["name"]) for r in mixes if (k := retention_kl(r)) is not None), default=(None, None))
    mix = {"row": best["name"], "average": best["average"], "held_out": held[0], "held_out_row": held[1],
           "kl": kl[0], "kl_row": kl[1]}
    merges = []
    for row in rows:
        if not is_merge(row["name"]) or row.get("average") is None:
            continue
        shares = _adapter_shares(row, by_name, sources)
        known = [v for v in shares.values() if v is not None]
        held_out, kl = held_out_average(row), retention_kl(row)
        met = {
            "in_domain": row["average"] >= mix["average"] - IN_DOMAIN_GAP - _EPS,
            "held_out": None if held_out is None or mix["held_out"] is None else held_out >= mix["held_out"] - _EPS,
            "retention": None if kl is None or mix["kl"] is None else kl <= mix["kl"] + _EPS,
            "adapters": None if not known else min(known) >= ADAPTER_SHARE - _EPS,
        }
        merges.append({"row": row["name"], "average": row["average"], "held_out": held_out, "kl": kl,
                       "lowest_share": min(known) if known else None, "shares": shares, "met": met,
                       "goal": all(v is True for v in met.values())})
    merges.sort(key=lambda m: (-sum(v is True for v in m["met"].values()), -m["average"]))
    return {"mix": mix, "merges": merges}


def percent(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mark(ok: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "–"}[ok]


def against_mix_lines(verdict: Optional[dict]) -> list[str]:
    """report.md's section: the bar each criterion sets, one line per merge, and which merges meet all four."""
    if not verdict:
        return []
    mix, merges = verdict["mix"], verdict["merges"]
    bars = [f"in-domain average at least {percent(mix['average'] - IN_DOMAIN_GAP)} (`{mix['row']}` {percent(mix['average'])} "
            f"less {100 * IN_DOMAIN_GAP:.0f} points)"]
    if mix["held_out"] is not None:
        bars.append(f"held-out average at least {percent(mix['held_out'])} (`{mix['held_out_row']}`)")
    if mix["kl"] is not None:
        bars.append(f"retention KL at most {mix['kl']:.4f} (`{mix['kl_row']}`)")
    bars.append(f"at least {100 * ADAPTER_SHARE:.0f}% of each source's own adapter's score on that source")
    lines = ["", "## Against data mixing", "",
             "Can a merge replace the mixed training? Each merge against the best mix on each measure: "
             + "; ".join(bars) + ".", "",
             "| merge | in-domain | held-out | KL | lowest share of its adapter | in-domain | held-out | retention | adapters |",
             "|---|---:|---:|---:|---:|:-:|:-:|:-:|:-:|"]
    for m in merges:
        kl = "–" if m["kl"] is None else f"{m['kl']:.4f}"
        lines.append(f"| `{m['row']}` | {percent(m['average'])} | {percent(m['held_out'])} | {kl} | {percent(m['lowest_share'])}{'%' if m['lowest_share'] is not None else ''} | "
                     + " | ".join(_mark(m["met"][c]) for c in CRITERIA) + " |")
    winners = [m["row"] for m in merges if m["goal"]]
    if winners:
        lines += ["", "Meets all four: " + ", ".join(f"`{w}`" for w in winners) + "."]
    elif merges:
        first = merges[0]
        missed = [c.replace("_", "-") for c in CRITERIA if first["met"][c] is False]
        lines += ["", f"No merge meets all four; the closest is `{first['row']}` (misses {', '.join(missed)})."]
    return lines


@styled
def against_mix_figure(verdict: dict, rows: list[dict]):
    """In-domain average against retention KL (lower is up): the mixes, every merge (filled where its held-out
    average reaches the best mix's, hollow where it does not), the adapters in grey, and the goal's corner shaded.
    None when the report has no retention numbers."""
    mix = verdict["mix"]
    if mix["kl"] is None:
        return None
    fig = figure(6.8, 4.6)
    ax = fig.add_subplot()
    points = [(r["name"], 100 * r["average"], retention_kl(r)) for r in rows
              if r.get("average") is not None and retention_kl(r) is not None]
    singles = [(x, y) for name, x, y in points if is_single_adapter(name)]
    if singles:
        ax.plot(*zip(*singles), "o", color="0.75", label="one adapter alone")
    for name, x, y in points:
        if name in MIX_ROWS:
            ax.plot([x], [y], "*", color="black", markersize=11)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    for m in verdict["merges"]:
        if m["kl"] is None:
            continue
        x, y = 100 * m["average"], m["kl"]
        filled = m["met"]["held_out"] is not False
        color = "tab:green" if m["goal"] else "tab:blue"
        ax.plot([x], [y], "o", color=color, markerfacecolor=color if filled else "white")
        ax.annotate(m["row"], (x, y), textcoords="offset points", xytext=(5, -9), fontsize="x-small")
    bar = 100 * (mix["average"] - IN_DOMAIN_GAP)
    ys = [y for _, _, y in points]
    top, right = min(ys + [0.0]), max([x for _, x, _ in points] + [bar]) + 3
    ax.fill_between([bar, right], top, mix["kl"], color="tab:green", alpha=0.12, label="the goal's in-domain and KL bars")
    ax.axvline(bar, color="tab:green", linewidth=0.8, linestyle="--")
    ax.axhline(mix["kl"], color="tab:green", linewidth=0.8, linestyle="--")
    ax.set_xlim(right=right)
    ax.invert_yaxis()  # closer to the base is up
    ax.set_xlabel("in-domain average exact match (%)")
    ax.set_ylabel("KL(base ‖ model) on generic prompts (lower is up)")
    ax.plot([], [], "o", color="tab:blue", markerfacecolor="white", label="merge, held-out below the best mix")
    ax.plot([], [], "o", color="tab:blue", label="merge, held-out at least the best mix's")
    ax.plot([], [], "o", color="tab:green", label="merge meeting all four")
    ax.legend(fontsize="x-small", loc="lower left")
    return fig
