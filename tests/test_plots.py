"""The experiment's cost plot labels its log axis with readable numbers."""

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from bertvision.plots import _label_log_axis, plot_cost_metric  # noqa: E402


def tick_labels(low: float, high: float) -> list[str]:
    figure, axis = plt.subplots()
    axis.set_xscale("log")
    axis.set_xlim(low, high)
    _label_log_axis(axis.xaxis, [low, high])
    figure.canvas.draw()
    labels = [
        tick.get_text()
        for tick, at in zip(axis.get_xticklabels(), axis.get_xticks(), strict=True)
        if low <= at <= high
    ]
    plt.close(figure)
    return labels


@pytest.mark.parametrize(
    ("low", "high", "labels"),
    [
        (12, 800, ["20", "50", "100", "200", "500"]),
        (0.3, 25000, ["1", "10", "100", "1000", "10000"]),  # no 0.2 shown as "0"
    ],
)
def test_a_log_cost_axis_labels_plain_numbers_as_many_as_fit(low, high, labels):
    assert tick_labels(low, high) == labels


def test_a_log_cost_axis_within_one_decade_labels_several_numbers():
    labels = tick_labels(10, 12)
    assert len(labels) >= 3 and labels[0] == "10"


def test_a_cost_plot_of_one_panel_and_many_methods_is_a_png():
    points = {"wnli (accuracy)": [(f"method-{i}", 10.0 + i, 0.5, 0.01) for i in range(22)]}
    assert plot_cost_metric(points, "a title " * 20).startswith(b"\x89PNG")


def test_the_reference_is_a_dashed_line_in_its_panels_and_in_the_legend(monkeypatch):
    from bertvision import plots

    drawn = []
    monkeypatch.setattr(plots, "_png", lambda figure, *args, **kwargs: drawn.append(figure))
    points = {"rte (accuracy)": [("pooler@0", 30.0, 0.55, 0.01), ("finetune-3", 900.0, 0.56, 0.02)]}
    plot_cost_metric(points, reference="finetune-3")

    [figure] = drawn
    [legend] = figure.legends
    lines = zip(legend.get_texts(), legend.get_lines(), strict=True)
    entries = {text.get_text(): line for text, line in lines}
    assert list(entries) == ["pooler@0", "finetune-3 (reference)"]
    assert entries["finetune-3 (reference)"].get_linestyle() == "--"
    assert entries["pooler@0"].get_linestyle() == "None"
    [dashed] = [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert list(dashed.get_ydata()) == [0.56, 0.56]
    plt.close(figure)
