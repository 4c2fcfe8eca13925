"""The results report: each task's dev metrics for fine-tuning, each adapter, the best trial of
each sweep and the ensemble, beside the task's baseline, as a markdown table and a PNG bar chart.

    write_report(ReportConfig(results="runs/"))   # runs/report.md, runs/report.png

Runs are found by their run records (bertvision.records), wherever they sit under the results
URL: the record's `kind` says what a folder holds, its `settings` the task (and the adapter), and
metrics.json the dev metrics:

    finetune      a fine-tuned encoder                column "fine-tuning"
    train         an adapter run                      column "adapter: <name>"
    sweep         a sweep: its best trial BY VALIDATION metric, column "best trial (<adapter>)"
    ensemble      an ensemble                         column "ensemble"
    trial         a sweep's trial: counts only through its sweep

A row per task and metric: the metrics its family reports (`TaskFamily.report_metrics`: a GLUE
task's primary metric; SQuAD 2.0's official f1, exact, HasAns_* and NoAns_*, in percent). The
"baseline" column is the family's trivial prediction (`majority_baseline`, named by its
`baseline_name`: TRAIN's majority class, or no answer to every question), computed from the data
folder the runs' records name (a fine-tuning's `data_dir`, else the one the extraction of an
adapter's or sweep's embeddings read); a task whose runs name none (read from the hub, older
runs) or whose data cannot be read has no baseline, and a note says why.

Runs written before run records are told apart by what they hold (metrics.json with "members":
an ensemble; with a "config" naming the task: a fine-tuned encoder; config.json with "train": an
adapter run; sweep.json: a sweep; a run inside a sweep's trials/ folder: a trial). Several runs
of one kind for one task (seeds) are shown as mean ± standard deviation (n). A folder not stored
whole (a commit under way or killed, committed files gone: `runs.not_whole`) is left out, and a
note under the table names it and why. Published numbers of
other work are shown only when given (`reference`: a JSON file {"source": "...", "dev": {task:
{metric: value}}}); the report does not carry any of its own.
"""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bertvision import records, runs, storage
from bertvision.config import ReportConfig, require
from bertvision.families import get_task, task_names
from bertvision.glue import DataError
from bertvision.runs import COMMIT_RECORD
from bertvision.schema import RUN_FILE
from bertvision.sweep import SWEEP_FILE, TRIALS_DIR, best_trials, load_sweep, load_trials

BASELINE = "baseline"
FINETUNED = "fine-tuning"
ENSEMBLE = "ensemble"
REFERENCE = "reference"
METRICS = "metrics.json"

Row = tuple[str, str]  # (task, metric)
Table = dict[Row, dict[str, list[float]]]  # row -> column -> values (seeds)


@dataclass(frozen=True)
class Result:
    task: str
    column: str  # fine-tuning, adapter: <name>, best trial (<adapter>), ensemble
    metric: str  # one of the family's report_metrics
    value: float  # its dev value
    url: str
    data_dir: str | None = None  # the data folder the run's record names, if any


def find_results(results: str) -> tuple[list[Result], list[str]]:
    """Every run, sweep and ensemble under `results`, a Result per dev metric its task's family
    reports; and a note for each folder left out because it is not stored whole (a commit
    under way or killed, committed files gone: `runs.not_whole`), whose metrics may be another
    run's or none."""
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
    found, left_out = [], []
    for folder in folders:
        url = _url(results, root, folder)
        in_sweep = any(folder.startswith(f"{s}/{TRIALS_DIR}/") for s in sweeps)
        if not in_sweep and (why := runs.not_whole(url)) is not None:
            left_out.append(f"{url} left out, not stored whole: {why}")
            continue
        run = _kind_and_settings(url, in_sweep)
        if run is not None:
            kind, settings, source = run
            found.extend(_results(url, kind, _checked_settings(kind, settings, source)))
    return found, left_out


def _url(results: str, root: str, path: str) -> str:
    """The URL of `path` (found under `root`) spelled from the results URL."""
    return storage.join(results, path[len(root.rstrip("/")) :])


def _kind_and_settings(folder: str, in_sweep: bool) -> tuple[str, Any, str] | None:
    """The run at `folder`: its kind, its settings and the URL of the file they were read from:
    its run record, or for a run written before run records what it holds (`in_sweep`: it sits
    in a sweep's trials/ folder). None for a folder that holds no run."""
    record_url = storage.join(folder, COMMIT_RECORD)
    record = records.read_record(record_url)
    if record is not None:
        return record.kind, record.settings, record_url
    if storage.exists(storage.join(folder, SWEEP_FILE)):
        return "sweep", load_sweep(folder)["config"], storage.join(folder, SWEEP_FILE)
    if in_sweep:
        return "trial", {}, folder
    url = storage.join(folder, METRICS)
    if not storage.exists(url):
        return None
    metrics = storage.read_json(url, keys=())
    config = metrics.get("config")  # ensembles and fine-tuning keep theirs in metrics.json
    if "members" in metrics:
        return "ensemble", config, url
    if isinstance(config, dict) and "task" in config:
        return "finetune", config, url
    train = _adapter_run_config(folder)
    return None if train is None else ("train", train, storage.join(folder, "config.json"))


def _checked_settings(kind: str, settings: Any, source: str) -> Any:
    """`settings` of a run of `kind` (read from `source`) when they give what the report reads
    of them: a known task; an adapter's or sweep's adapter; data folder and embeddings as URLs.
    FileFormatError naming `source` otherwise. Settings of kinds without a result pass as they
    are."""
    if kind not in ("finetune", "train", "ensemble", "sweep"):
        return settings
    if not isinstance(settings, dict):
        problem = f"its settings are a {type(settings).__name__}, not an object"
    else:
        named = ("task", "adapter") if kind in ("train", "sweep") else ("task",)
        problem = next((f"its settings name no {n!r}" for n in named if n not in settings), None)
        for name in (*named, "data_dir", "embeddings"):
            value = settings.get(name)
            if problem is None and value is not None and not isinstance(value, str):
                problem = f"its {name!r} is {value!r}, not text"
        if problem is None:
            try:
                get_task(settings["task"])
            except ValueError as exc:
                problem = str(exc)
    if problem is not None:
        raise storage.FileFormatError(f"{source} is not the record of a {kind} run: {problem}")
    return settings


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
        task = get_task(settings["task"]).name
        if kind == "ensemble":
            return _metric_results(task, ENSEMBLE, metrics["ensemble"], folder, None)
        column = FINETUNED if kind == "finetune" else f"adapter: {settings['adapter']}"
        dev = metrics.get("dev", {})
        return _metric_results(task, column, dev, folder, _data_dir(task, settings))
    except (KeyError, TypeError, ValueError) as exc:  # a metrics.json of something else
        raise storage.FileFormatError(f"{url} is not a run's metrics: {exc!r}") from None


def _metric_results(
    task: str, column: str, dev: dict[str, Any], url: str, data_dir: str | None
) -> list[Result]:
    """A Result per metric of the task's report_metrics that `dev` holds."""
    names = get_task(task).family.report_metrics(task)
    return [Result(task, column, m, float(dev[m]), url, data_dir) for m in names if m in dev]


def _sweep_result(sweep: str, settings: dict[str, Any]) -> list[Result]:
    task = get_task(settings["task"])
    best = best_trials(load_trials(sweep), task.family.primary_metric(task.name), 1)
    if not best:
        return []
    column = f"best trial ({settings['adapter']})"
    return _metric_results(task.name, column, best[0].dev, sweep, _data_dir(task.name, settings))


def _data_dir(task: str, settings: dict[str, Any]) -> str | None:
    """The data folder a run read, as its settings name it: a fine-tuning's `data_dir`, else
    the `data_dir` of the extraction of its `embeddings` (its train split's run record). None
    when none is named (the hub, runs and extractions without run records, moved embeddings)."""
    if settings.get("data_dir"):
        return settings["data_dir"]
    if not settings.get("embeddings"):
        return None
    from bertvision.shards import manifest_url, split_url

    url = manifest_url(split_url(settings["embeddings"], task, "train"), RUN_FILE)
    record = records.read_record(url)
    return record.settings.get("data_dir") if record is not None else None


def baselines(found: list[Result]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Each task's baseline dev metrics (its family's `majority_baseline`) from the first data
    folder its runs name, and a note for each task without one, saying why."""
    values, notes = {}, []
    for task in dict.fromkeys(r.task for r in found):
        data_dir = next((r.data_dir for r in found if r.task == task and r.data_dir), None)
        if data_dir is None:
            notes.append(f"{task}: no baseline, its runs name no data folder")
            continue
        try:
            values[task] = get_task(task).family.majority_baseline(task, data_dir)
        except (DataError, OSError) as exc:  # malformed; missing, unreadable, unreachable
            reason = str(exc)
            if isinstance(exc, OSError) and exc.filename and exc.strerror:
                reason = f"{exc.filename}: {exc.strerror}"
            notes.append(f"{task}: no baseline, its data cannot be read ({reason})")
    return values, notes


def _adapter_run_config(folder: str) -> dict[str, Any] | None:
    """The TrainConfig an adapter run saved in its config.json (under "train")."""
    url = storage.join(folder, "config.json")
    if not storage.exists(url):
        return None
    train = storage.read_json(url, keys=()).get("train")
    return train if isinstance(train, dict) and {"task", "adapter"} <= set(train) else None


def _column_order(column: str) -> tuple[int, str]:
    """The baseline, fine-tuning, the adapters, the best trials, the ensemble: cheapest last."""
    kinds = (BASELINE, FINETUNED, "adapter: ", "best trial", ENSEMBLE)
    rank = next(i for i, kind in enumerate(kinds) if column.startswith(kind))
    return rank, column


def summarize(found: list[Result], baseline: dict[str, dict[str, float]] | None = None) -> Table:
    """(task, metric) -> column -> values: tasks in the families' order (GLUE's first), metrics
    in their family's report_metrics order; `baseline[task]` adds the column "baseline"."""
    table: Table = defaultdict(lambda: defaultdict(list))
    for result in found:
        table[result.task, result.metric][result.column].append(result.value)
    for (task, metric), by_column in table.items():
        if metric in (baseline or {}).get(task, {}):
            by_column[BASELINE] = [float(baseline[task][metric])]
    tasks = list(task_names())

    def order(row: Row) -> tuple[int, int]:
        task, metric = row
        return tasks.index(task), get_task(task).family.report_metrics(task).index(metric)

    return {row: dict(table[row]) for row in sorted(table, key=order)}


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n={len(values)})"


def render_markdown(
    table: Table,
    columns: list[str],
    reference: dict[str, Any] | None,
    plot_name: str,
    notes: list[str] = (),
) -> str:
    header = ["task", "metric", *columns] + ([REFERENCE] if reference else [])
    lines = [
        "# BERTVision results",
        "",
        "Dev-set metrics: each GLUE task's primary metric, SQuAD 2.0's official scores (percent). "
        "Selection (best trial, ensemble members, SQuAD's no-answer threshold) used the "
        "validation slice of TRAIN only.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for (task, metric), by_column in table.items():
        cells = [task, metric, *(_cell(by_column.get(c)) for c in columns)]
        if reference:
            value = reference["dev"].get(task, {}).get(metric)
            cells.append("–" if value is None else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    tasks = dict.fromkeys(task for (task, _), by_column in table.items() if BASELINE in by_column)
    if tasks:
        named = [f"{task}, {get_task(task).family.baseline_name}" for task in tasks]
        lines.append(
            "Baseline column: the dev metrics of a trivial prediction, from the data the runs "
            f"read ({'; '.join(named)})."
        )
    lines += [f"Note: {note}." for note in notes]
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


def render_plot(table: Table, columns: list[str]) -> bytes:
    """Grouped bars: one group per row (task, metric), one bar per column (mean, with std when
    n > 1); a panel per task family, each on its own scale (GLUE's 0 to 1, SQuAD's percent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels: dict[str, list[Row]] = defaultdict(list)
    for row in table:
        panels[get_task(row[0]).family.name].append(row)
    width = 0.8 / max(1, len(columns))
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(3.0 + max(4.0, 0.35 * len(table) * len(columns)), 4.0),
        width_ratios=[len(rows) for rows in panels.values()],
        squeeze=False,
    )
    for ax, rows in zip(axes[0], panels.values(), strict=True):
        for i, column in enumerate(columns):
            xs, means, errors = [], [], []
            for t, row in enumerate(rows):
                values = table[row].get(column)
                if values:
                    xs.append(t + (i - (len(columns) - 1) / 2) * width)
                    means.append(statistics.mean(values))
                    errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            errors = errors if any(errors) else None
            ax.bar(xs, means, width, yerr=errors, label=column, capsize=2, color=f"C{i}")
        ax.set_xticks(range(len(rows)))
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xticklabels([f"{task}\n({metric})" for task, metric in rows], fontsize="small")
    axes[0][0].set_ylabel("dev metric")
    legend = [Patch(color=f"C{i}", label=column) for i, column in enumerate(columns)]
    axes[0][-1].legend(
        handles=legend, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=120)
    plt.close(fig)
    return sink.getvalue()


def read_reference(url: str) -> dict[str, Any]:
    """Published numbers: {"source": text, "dev": {task: {metric: number}}}. FileFormatError
    naming the file, and the entry, when it holds anything else."""
    reference = storage.read_json(url, keys=("source", "dev"))
    where = f"reference file {url}"
    if not isinstance(reference["source"], str):
        raise storage.FileFormatError(
            f"{where}: 'source' must be text, got {reference['source']!r}"
        )
    dev = reference["dev"]
    if not (isinstance(dev, dict) and all(isinstance(metrics, dict) for metrics in dev.values())):
        raise storage.FileFormatError(f"{where}: 'dev' must map each task to {{metric: value}}")
    for task, metrics in dev.items():
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise storage.FileFormatError(
                    f"{where}: {task}/{metric} must be a number, got {value!r}"
                )
    return reference


def write_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write report.md and report.png under cfg.out; returns their URLs and the table.

    Both are rendered before either is written, and written together
    (`storage.write_together`) by cfg.out's only writer (`runs.lease`): a failure leaves the
    report before, never a new plot beside an old table, and a second report into the same
    folder meanwhile stops with FolderBusy instead of pairing its plot with the other's table."""
    require(cfg)
    reference = read_reference(cfg.reference) if cfg.reference else None
    found, left_out = find_results(cfg.results)
    if not found:
        raise FileNotFoundError(
            f"no runs, sweeps or ensembles with dev metrics under {cfg.results}"
            + (f" ({'; '.join(left_out)})" if left_out else "")
        )
    baseline, notes = baselines(found)
    table = summarize(found, baseline)
    columns = sorted({c for by_column in table.values() for c in by_column}, key=_column_order)
    markdown_url = storage.join(cfg.out, "report.md")
    plot_url = storage.join(cfg.out, "report.png")
    markdown = render_markdown(table, columns, reference, "report.png", [*notes, *left_out])
    plot = render_plot(table, columns)
    with runs.lease(cfg.out):
        storage.write_together({plot_url: plot, markdown_url: markdown.encode("utf-8")})
    return {"markdown": markdown_url, "plot": plot_url, "table": table, "text": markdown}
