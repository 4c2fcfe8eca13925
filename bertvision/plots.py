"""Figures of a run, as PNG bytes (written through storage, so to any fsspec URL)."""

from __future__ import annotations

import io
import math


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
    reference: str | None = None,
    highlighted: tuple[str, ...] = (),
) -> bytes:
    """Metric against cost, one panel per task: `points[panel]` is a list of (method, seconds,
    mean metric, its std); each method one point with its std as an error bar, in the same
    colour and marker in every panel, named in one legend below the panels; seconds (labelled
    `cost`) on a log axis. The `reference` method's mean is also a dashed line across its
    panel, as in its legend entry ("<reference> (reference)"), and methods starting with a
    `highlighted` prefix are drawn larger, edged in black."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = list(points)
    methods = list(dict.fromkeys(method for panel in panels for method, *_ in points[panel]))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>pPX*h"
    styles = {
        method: {"color": colours[i % len(colours)], "marker": markers[i % len(markers)]}
        for i, method in enumerate(methods)
    }
    for method in methods:
        if method.startswith(highlighted) and highlighted:
            styles[method].update(markersize=10, markeredgecolor="black", zorder=3)
    columns = min(3, len(panels)) or 1
    rows = max(1, -(-len(panels) // columns))
    legend_rows = -(-len(methods) // 4)
    figure, axes = plt.subplots(
        rows, columns, figsize=(max(8, 5 * columns), 4 * rows + 0.18 * legend_rows), squeeze=False
    )
    for axis, panel in zip(axes.flat, panels, strict=False):
        for method, seconds, mean, std in points[panel]:
            axis.errorbar(seconds, mean, yerr=std, capsize=2, linestyle="", **styles[method])
            if method == reference:
                axis.axhline(mean, color=styles[method]["color"], linestyle="--", linewidth=1)
        axis.set(xscale="log", xlabel=f"{cost} (log scale)", ylabel="dev (mean ± sd)", title=panel)
        _label_log_axis(axis.xaxis, [seconds for _, seconds, *_ in points[panel]])
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    handles = [
        plt.Line2D([], [], linestyle="", label=method, **styles[method])
        if method != reference
        else plt.Line2D(
            [], [], linestyle="--", linewidth=1, label=f"{method} (reference)", **styles[method]
        )
        for method in methods
    ]
    figure.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    return _png(figure, title, below=(0.18 * legend_rows + 0.25) / figure.get_figheight())


def _label_log_axis(axis, values: list[float]) -> None:
    """Plain numbers on a log `axis` over `values`, as many as fit: evenly spaced within one
    decade, at 1, 2 and 5 of each decade over up to 2.5 decades, at each decade beyond
    (matplotlib's defaults label one number per decade, or run its minor labels together)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    positive = [v for v in values if v > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    if decades < 1:
        axis.set_major_locator(MaxNLocator(nbins=5))
    else:
        axis.set_major_locator(LogLocator(subs=(1, 2, 5) if decades <= 2.5 else (1,)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


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
