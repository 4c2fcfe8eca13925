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
    mean metric, its std); each method one labelled point with its std as an error bar, seconds
    (labelled `cost`) on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = list(points)
    columns = min(3, len(panels)) or 1
    rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for method, seconds, mean, std in points[panel]:
            axis.errorbar(seconds, mean, yerr=std, fmt="o", capsize=2)
            axis.annotate(
                method, (seconds, mean), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axis.set(xscale="log", xlabel=cost, ylabel="dev", title=panel)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    return _png(figure, title)


def _png(figure, title: str) -> bytes:
    """`figure` with its title, as PNG bytes (100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
