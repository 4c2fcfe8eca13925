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
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
