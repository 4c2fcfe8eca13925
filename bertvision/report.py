"""The results report: each task's dev metric for fine-tuning, each adapter, the best trial of
each sweep and the ensemble, as a markdown table and a PNG bar chart.

    write_report(ReportConfig(results="runs/"))   # runs/report.md, runs/report.png

Runs are found by their run records (bertvision.records), wherever they sit under the results
URL: the record's `kind` says what a folder holds, its `settings` the task (and the adapter), and
metrics.json the dev metrics:

    finetune      a fine-tuned encoder                column "fine-tuning"
    train         an adapter run                      column "adapter: <name>"
    sweep         a sweep: its best trial BY VALIDATION metric, column "best trial (<adapter>)"
    ensemble      an ensemble                         column "ensemble"
    trial         a sweep's trial: counts only through its sweep

Runs written before run records are told apart by what they hold (metrics.json with "members":
an ensemble; with a "config" naming the task: a fine-tuned encoder; config.json with "train": an
adapter run; sweep.json: a sweep; a run inside a sweep's trials/ folder: a trial). Several runs
of one kind for one task (seeds) are shown as mean ± standard deviation (n). Published numbers of
other work are shown only when given (`reference`: a JSON file {"source": "...", "dev": {task:
{metric: value}}}); the report does not carry any of its own.
"""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bertvision import records, storage
from bertvision.config import ReportConfig, require
from bertvision.glue import TASKS, get_task
from bertvision.runs import COMMIT_RECORD
from bertvision.sweep import SWEEP_FILE, TRIALS_DIR, best_trials, load_sweep, load_trials

FINETUNED = "fine-tuning"
ENSEMBLE = "ensemble"
REFERENCE = "reference"
METRICS = "metrics.json"


@dataclass(frozen=True)
class Result:
    task: str
    column: str  # fine-tuning, adapter: <name>, best trial (<adapter>), ensemble
    value: float  # the task's primary dev metric
    url: str


def find_results(results: str) -> list[Result]:
    """Every run, sweep and ensemble under `results`, with its primary dev metric."""
    fs, root = storage.url_to_fs(results)
    if not fs.exists(root):
        raise FileNotFoundError(f"results folder {results} does not exist")
    files = fs.find(root)
    folders = sorted(
        {
            folder
            for folder, name in (p.rsplit("/", 1) for p in files)
            if name in (COMMIT_RECORD, METRICS, SWEEP_FILE) and "/_staging/" not in f"{folder}/"
        }
    )
    sweeps = [p.rsplit("/", 1)[0] for p in files if p.endswith(f"/{SWEEP_FILE}")]
    found = []
    for folder in folders:
        url = _url(results, root, folder)
        in_sweep = any(folder.startswith(f"{s}/{TRIALS_DIR}/") for s in sweeps)
        run = _kind_and_settings(url, in_sweep)
        if run is not None:
            found.extend(_results(url, *run))
    return found


def _url(results: str, root: str, path: str) -> str:
    """The URL of `path` (found under `root`) spelled from the results URL."""
    return storage.join(results, path[len(root.rstrip("/")) :])


def _kind_and_settings(folder: str, in_sweep: bool) -> tuple[str, dict[str, Any]] | None:
    """The run at `folder`: its kind and settings, from its run record, or for a run written
    before run records from what it holds (`in_sweep`: it sits in a sweep's trials/ folder).
    None for a folder that holds no run."""
    record = records.read_record(storage.join(folder, COMMIT_RECORD))
    if record is not None:
        return record.kind, record.settings
    if storage.exists(storage.join(folder, SWEEP_FILE)):
        return "sweep", load_sweep(folder)["config"]
    if in_sweep:
        return "trial", {}
    url = storage.join(folder, METRICS)
    if not storage.exists(url):
        return None
    metrics = storage.read_json(url, keys=())
    config = metrics.get("config")  # ensembles and fine-tuning keep theirs in metrics.json
    if "members" in metrics:
        return "ensemble", config
    if isinstance(config, dict) and "task" in config:
        return "finetune", config
    train = _adapter_run_config(folder)
    return None if train is None else ("train", train)


def _results(folder: str, kind: str, settings: Any) -> list[Result]:
    """The result of the run at `folder` (none for trials, extractions, runs without a dev
    metric); FileFormatError naming metrics.json when it is not the run's metrics."""
    if kind == "sweep":
        return _sweep_result(folder, settings)
    if kind not in ("finetune", "train", "ensemble"):
        return []
    url = storage.join(folder, METRICS)
    metrics = storage.read_json(url, keys=())
    try:
        task = get_task(settings["task"])
        if kind == "ensemble":
            return [Result(task.name, ENSEMBLE, metrics["ensemble"][task.primary_metric], folder)]
        column = FINETUNED if kind == "finetune" else f"adapter: {settings['adapter']}"
        dev = metrics.get("dev", {})
        if task.primary_metric not in dev:
            return []
        return [Result(task.name, column, float(dev[task.primary_metric]), folder)]
    except (KeyError, TypeError, ValueError) as exc:  # a metrics.json of something else
        raise storage.FileFormatError(f"{url} is not a run's metrics: {exc!r}") from None


def _sweep_result(sweep: str, settings: dict[str, Any]) -> list[Result]:
    task = get_task(settings["task"])
    best = best_trials(load_trials(sweep), task.primary_metric, 1)
    if not best:
        return []
    column = f"best trial ({settings['adapter']})"
    return [Result(task.name, column, best[0].dev[task.primary_metric], sweep)]


def _adapter_run_config(folder: str) -> dict[str, Any] | None:
    """The TrainConfig an adapter run saved in its config.json (under "train")."""
    url = storage.join(folder, "config.json")
    if not storage.exists(url):
        return None
    train = storage.read_json(url, keys=()).get("train")
    return train if isinstance(train, dict) and {"task", "adapter"} <= set(train) else None


def _column_order(column: str) -> tuple[int, str]:
    """fine-tuning, the adapters, the best trials, the ensemble: cheapest last."""
    kinds = (FINETUNED, "adapter: ", "best trial", ENSEMBLE)
    rank = next(i for i, kind in enumerate(kinds) if column.startswith(kind))
    return rank, column


def summarize(found: list[Result]) -> dict[str, dict[str, list[float]]]:
    """task -> column -> values, tasks in GLUE order."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for result in found:
        table[result.task][result.column].append(result.value)
    order = list(TASKS)
    return {task: dict(table[task]) for task in sorted(table, key=order.index)}


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n={len(values)})"


def render_markdown(
    table: dict[str, dict[str, list[float]]],
    columns: list[str],
    reference: dict[str, Any] | None,
    plot_name: str,
) -> str:
    header = ["task", "metric", *columns] + ([REFERENCE] if reference else [])
    lines = [
        "# BERTVision results",
        "",
        "Dev-set value of each task's primary metric. Selection (best trial, ensemble members) "
        "used the validation slice of TRAIN only.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for task, by_column in table.items():
        metric = get_task(task).primary_metric
        cells = [task, metric, *(_cell(by_column.get(c)) for c in columns)]
        if reference:
            value = reference["dev"].get(task, {}).get(metric)
            cells.append("–" if value is None else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if reference:
        lines.append(f"Reference column: {reference['source']}.")
    else:
        lines.append(
            "No published reference numbers are shown; `bertvision report --reference FILE` "
            "adds them from a file whose source you can vouch for."
        )
    lines += ["", f"![dev metrics]({plot_name})", ""]
    return "\n".join(lines)


def render_plot(table: dict[str, dict[str, list[float]]], columns: list[str]) -> bytes:
    """Grouped bars: one group per task, one bar per column (mean, with std when n > 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    width = 0.8 / max(1, len(columns))
    fig, ax = plt.subplots(figsize=(3.0 + max(4.0, 0.35 * len(tasks) * len(columns)), 4.0))
    for i, column in enumerate(columns):
        xs, means, errors = [], [], []
        for t, task in enumerate(tasks):
            values = table[task].get(column)
            if values:
                xs.append(t + (i - (len(columns) - 1) / 2) * width)
                means.append(statistics.mean(values))
                errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.bar(xs, means, width, yerr=errors if any(errors) else None, label=column, capsize=2)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({get_task(t).primary_metric})" for t in tasks])
    ax.set_ylabel("dev metric")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=120)
    plt.close(fig)
    return sink.getvalue()


def write_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write report.md and report.png under cfg.out; returns their URLs and the table."""
    require(cfg)
    reference = storage.read_json(cfg.reference, keys=("source", "dev")) if cfg.reference else None
    if reference is not None and not (
        isinstance(reference["dev"], dict)
        and all(isinstance(metrics, dict) for metrics in reference["dev"].values())
    ):
        raise storage.FileFormatError(
            f"reference file {cfg.reference}: 'dev' must map each task to {{metric: value}}"
        )
    table = summarize(find_results(cfg.results))
    if not table:
        raise FileNotFoundError(
            f"no runs, sweeps or ensembles with dev metrics under {cfg.results}"
        )
    columns = sorted({c for by_column in table.values() for c in by_column}, key=_column_order)
    markdown_url = storage.join(cfg.out, "report.md")
    plot_url = storage.join(cfg.out, "report.png")
    storage.write_bytes_atomic(plot_url, render_plot(table, columns))
    markdown = render_markdown(table, columns, reference, "report.png")
    storage.write_text_atomic(markdown_url, markdown)
    return {"markdown": markdown_url, "plot": plot_url, "table": table, "text": markdown}
