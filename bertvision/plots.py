"""Figures of a run, as PNG bytes (written through storage, so to any fsspec URL)."""

from __future__ import annotations

import io


def plot_curve(curve: dict, title: str = "") -> bytes:
    """Training curve: train and val loss (left), the val primary metric (right), per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib import pyplot as plt

    epochs = [e["epoch"] for e in curve["epochs"]]
    metric = curve["primary_metric"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [e["train_loss"] for e in curve["epochs"]], marker="o", label="train")
    left.plot(epochs, [e["val_loss"] for e in curve["epochs"]], marker="o", label="val")
    left.set(xlabel="epoch", ylabel="loss")
    left.legend()
    right.plot(epochs, [e["val"][metric] for e in curve["epochs"]], marker="o", color="C1")
    right.axvline(curve["best_epoch"], color="grey", linestyle="--", label="chosen epoch")
    right.set(xlabel="epoch", ylabel=f"val {metric}")
    right.legend()
    return _png(figure, title)


def plot_cost_metric(
    points: dict[str, list[tuple[str, float, float, float]]],
    title: str = "",
    cost: str = "pipeline seconds",
) -> bytes:
    """Metric against cost, one panel per task: `points[panel]` is a list of (method, seconds,
    mean metric, its std); each method one point with its std as an error bar, in the same
    colour and marker in every panel, named in one legend below the panels; seconds (labelled
    `cost`) on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    panels = list(points)
    methods = list(dict.fromkeys(method for panel in panels for method, *_ in points[panel]))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>pPX*h"
    styles = {
        method: {"color": colours[i % len(colours)], "marker": markers[i % len(markers)]}
        for i, method in enumerate(methods)
    }
    columns = min(3, len(panels)) or 1
    rows = max(1, -(-len(panels) // columns))
    legend_rows = -(-len(methods) // 4)
    figure, axes = plt.subplots(
        rows, columns, figsize=(max(8, 5 * columns), 4 * rows + 0.18 * legend_rows), squeeze=False
    )
    for axis, panel in zip(axes.flat, panels, strict=False):
        for method, seconds, mean, std in points[panel]:
            axis.errorbar(seconds, mean, yerr=std, capsize=2, linestyle="", **styles[method])
        axis.set(xscale="log", xlabel=cost, ylabel="dev", title=panel)
        axis.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())  # unlabelled: labels ran together
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    handles = [
        plt.Line2D([], [], linestyle="", label=method, **styles[method]) for method in methods
    ]
    figure.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    return _png(figure, title, below=(0.18 * legend_rows + 0.25) / figure.get_figheight())


def _png(figure, title: str, below: float = 0.0) -> bytes:
    """`figure` with its title (wrapped to the figure's width), as PNG bytes (100 dpi), the
    panels fitted above the `below` fraction of its height (a legend's room); it is closed."""
    import textwrap

    import matplotlib.pyplot as plt

    figure.suptitle(textwrap.fill(title, width=int(figure.get_figwidth() * 12)))
    figure.tight_layout(rect=(0, below, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
