"""Every figure loradem draws: one style, written atomically as PNG.

    @styled
    def plot_something(values, path):
        fig = figure(6.4, 3.6)      # a matplotlib Figure, no pyplot state, Agg
        ax = fig.subplots()
        ...
        save_png(fig, path)

Drawing through `Figure` (not pyplot) keeps no global state, so a long run or
a test that draws many plots leaks no figures and needs no display. The style
is matplotlib settings (rcParams), which it reads when axes, ticks and legends
are made and when a figure is rendered: a drawing function runs under `styled`
(and rendering always does), so loradem's style applies while it draws and
the settings of a program that plots on its own are put back afterwards.
"""

from __future__ import annotations

import contextlib
import functools
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


@contextlib.contextmanager
def style():
    """STYLE as matplotlib's settings inside the block; the caller's are put back after it."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def styled(draw):
    """`draw` run inside `style()`: what it creates is drawn in loradem's style."""
    @functools.wraps(draw)
    def call(*args, **kwargs):
        with style():
            return draw(*args, **kwargs)
    return call


def figure(width: float = 6.4, height: float = 4.0):
    """A new Figure (call it under `styled` / `style()` for loradem's style)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def labelled_cells(ax, values, label, *, fontsize="small", **imshow):
    """`values` (2-D, NaN for none) as a grid of coloured cells on `ax`, each finite one labelled `label(value)` in
    black or white, whichever reads on its colour; `imshow` goes to Axes.imshow (cmap, vmin, vmax). Returns the image."""
    import numpy as np

    ax.grid(False)  # grid lines would cut through the cells
    image = ax.imshow(values, **imshow)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            red, green, blue, _ = image.cmap(image.norm(value))
            ax.text(j, i, label(value), ha="center", va="center", fontsize=fontsize,
                    color="black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white")
    return image


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    with style():
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig, path: Path) -> None:
    """Render a Figure and write it atomically (aside, then renamed into place)."""
    atomic_write_bytes(Path(path), png_bytes(fig))
