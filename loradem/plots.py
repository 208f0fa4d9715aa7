"""Every figure loradem draws: one style, written atomically as PNG.

    fig = figure(6.4, 3.6)          # a matplotlib Figure, no pyplot state, Agg
    ax = fig.subplots()
    ...
    save_png(fig, run_dir / "search.png")

Drawing through `Figure` (not pyplot) keeps no global state, so a long run or
a test that draws many plots leaks no figures and needs no display.
"""

from __future__ import annotations

import io
from pathlib import Path

from loradem.files import atomic_write_bytes

STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
DPI = 120


def figure(width: float = 6.4, height: float = 4.0):
    """A new Figure in loradem's style (the style is applied to the axes created from it)."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams.update(STYLE)
    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig, path: Path) -> None:
    """Render a Figure and write it atomically (aside, then renamed into place)."""
    atomic_write_bytes(Path(path), png_bytes(fig))
