"""loradem's plots draw in loradem's style and leave the process's matplotlib.rcParams as they were."""

from __future__ import annotations

import matplotlib
import numpy as np
import optuna
import pytest

from loradem.plots import STYLE, figure, png_bytes, save_png, styled

PNG = b"\x89PNG\r\n\x1a\n"
USER = {"font.size": 13.0, "axes.grid": False, "grid.alpha": 1.0, "axes.spines.top": True, "axes.titlesize": "large",
        "legend.fontsize": "medium", "legend.frameon": True}  # a library user's own settings, all unlike STYLE


@styled
def own_figure(path):  # a drawing function as loradem's are written
    fig = figure(4, 3)
    ax = fig.subplots()
    ax.plot([0, 1], [1, 0], label="a")
    ax.set_title("t")
    ax.legend()
    fig.colorbar(ax.imshow(np.eye(2)), ax=ax)
    save_png(fig, path)
    return fig


def heatmap(path):
    from loradem.vectors.similarity import save_heatmap

    save_heatmap(["a", "b"], np.array([[1.0, 0.2], [0.2, 1.0]]), path, "cosine")


def report_figures(path):
    from loradem.evaluate.report import cost_vs_score_figure, per_source_figure

    cost = {"train_tokens": 0, "train_seconds": 1.0, "search_seconds": 0.0, "total_seconds": 1.0}
    rows = [{"name": "base", "per_source": {"add": 0.5, "rev": 2.0}, "average": 1.25, "cost": cost},
            {"name": "adapter:add", "per_source": {"add": 0.75, "rev": 2.5}, "average": 1.625, "cost": cost},
            {"name": "dem", "per_source": {"add": 1.0, "rev": 1.5}, "average": 1.25, "cost": cost}]
    metrics = {"add": "exact_match", "rev": "loss"}
    path.write_bytes(png_bytes(per_source_figure(metrics, rows)) + png_bytes(cost_vs_score_figure(metrics, rows)))


def report_cells(path):  # past BARS_UP_TO models the per-source figure is a grid of cells
    from loradem.evaluate.report import per_source_figure

    rows = [{"name": f"m{i}", "per_source": {"add": i / 20, "rev": 2.0 + i}} for i in range(20)]
    path.write_bytes(png_bytes(per_source_figure({"add": "exact_match", "rev": "loss"}, rows)))


def training_curve(path):
    from loradem.train.sft import plot_curve

    plot_curve([{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5, "eval_loss": 1.7}], path, "add", best_step=2)


def learning(path):
    from loradem.merge.learn import plot_learning

    result = {"history": [{"step": 0, "train_loss": 2.0, "val_loss": 2.1}, {"step": 1, "train_loss": 1.8, "val_loss": 1.9}],
              "best_step": 1, "settings": {"init": 1.0},
              "module_weights": {"add": {"model.layers.0.self_attn.q_proj": 0.9, "model.layers.1.self_attn.q_proj": 1.1}}}
    plot_learning(result, path, "learned weights")


def search_plots(path):
    from loradem.merge.search import plot_importances, plot_search

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("a", 0, 1) - 0.3) ** 2 + t.suggest_float("b", 0, 1), n_trials=4)
    plot_search(study, path, "search", "loss")
    importances = {"evaluator": "PedAnovaImportanceEvaluator", "n_trials": 4, "values": {"a": 0.5, "b": 0.5}}
    plot_importances(study, importances, path.with_name("importances.png"), "importances")


@pytest.mark.parametrize("draw", [own_figure, heatmap, report_figures, report_cells, training_curve, learning, search_plots])
def test_plotting_leaves_the_users_rcparams_as_they_were(tmp_path, draw):
    matplotlib.get_backend()  # matplotlib's own once-per-process choice (made when pyplot is first imported), not a style
    with matplotlib.rc_context(USER):
        before = dict(matplotlib.rcParams.copy())
        draw(tmp_path / "plot.png")
        assert dict(matplotlib.rcParams.copy()) == before
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG)


def test_the_style_is_the_figures_own(tmp_path):
    """Drawn under a user's settings, a loradem figure still has loradem's grid, spines, font sizes and legend."""
    with matplotlib.rc_context(USER):
        fig = own_figure(tmp_path / "plot.png")
        ax, bar = fig.axes
        legend = ax.get_legend()
        assert ax.title.get_fontsize() == STYLE["axes.titlesize"] and legend.get_texts()[0].get_fontsize() == STYLE["legend.fontsize"]
        assert not legend.get_frame_on() and not ax.spines["top"].get_visible() and not ax.spines["right"].get_visible()
        labels = [t for t in ax.get_xticklabels() + bar.get_yticklabels() if t.get_text()]  # ticks made while drawing
        assert labels and {t.get_fontsize() for t in labels} == {STYLE["font.size"]}
        grid = ax.xaxis.get_gridlines()
        assert grid and all(g.get_visible() and g.get_alpha() == STYLE["grid.alpha"] for g in grid)
        # the user's own figures are drawn in the user's settings
        from matplotlib.figure import Figure

        theirs = Figure().subplots()
        assert theirs.title.get_fontsize() == matplotlib.font_manager.FontProperties(size="large").get_size_in_points()
        assert not theirs.xaxis.get_gridlines()[0].get_visible() and theirs.spines["top"].get_visible()


def test_per_source_draws_bars_for_a_few_models_and_a_grid_of_values_for_many():
    from loradem.evaluate.report import BARS_UP_TO, per_source_figure

    metrics = {"add": "exact_match", "rev": "exact_match", "txt": "loss"}
    rows = [{"name": f"m{i}", "per_source": {"add": i / 20, "rev": 1 - i / 20, "txt": 2.0 + i}} for i in range(BARS_UP_TO + 1)]
    rows[3]["per_source"]["rev"] = None  # a source this model was not scored on: an empty cell, not a zero

    few = per_source_figure(metrics, rows[:BARS_UP_TO])
    assert [len(ax.patches) for ax in few.axes if ax.patches] == [2 * BARS_UP_TO - 1, BARS_UP_TO]

    many = per_source_figure(metrics, rows)
    match, loss = [ax for ax in many.axes if ax.images]
    expected = np.array([[100 * r["per_source"]["add"], np.nan if r["per_source"]["rev"] is None else 100 * r["per_source"]["rev"]]
                         for r in rows])
    np.testing.assert_array_equal(np.asarray(match.images[0].get_array().filled(np.nan)), expected)
    np.testing.assert_array_equal(np.asarray(loss.images[0].get_array()).ravel(), [r["per_source"]["txt"] for r in rows])
    assert [t.get_text() for t in match.get_yticklabels()] == [r["name"] for r in rows]
    assert [t.get_text() for t in match.get_xticklabels()] == ["add", "rev"]
    labels = [t.get_text() for t in match.texts]
    assert len(labels) == 2 * len(rows) - 1 and labels[:2] == ["0.0", "100.0"]
