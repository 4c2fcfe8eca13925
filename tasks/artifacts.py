"""What the flows show in the Prefect UI: extraction progress, a table of shards, metrics tables.

All figures are read from storage (commit records, failure records, metrics.json), so what the UI
shows is what storage holds, whichever worker wrote it. Keys name the work and its output
(`names.artifact_key`), so two extractions of one task into two folders keep two tables.
"""

from __future__ import annotations

import contextlib
import time
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    ArtifactFilterType,
)
from prefect.runtime import flow_run
from rich.filesize import decimal as human_size

from bertvision.config import ExtractConfig
from bertvision.families import get_task
from bertvision.schema import ExtractionPlan, ShardRecord
from bertvision.shards import (
    ShardError,
    load_failures,
    load_records,
    split_status,
    split_url,
)

WRITTEN_BY = "written by (host:pid)"


def _split_name(plan: ExtractionPlan) -> str:
    return f"{plan.task}/{plan.split}"


def row_unit(plans: list[ExtractionPlan]) -> str:
    """What a row of these plans' shards is: `windows` (a span task's, SQuAD 2.0) or
    `examples` (GLUE's)."""
    return "windows" if any(plan.schema == "span" for plan in plans) else "examples"


class ExtractionProgress:
    """The progress artifact of one extraction: rows (examples, or a span task's windows)
    committed out of all planned, published at most every `PUBLISH_SECONDS` while shards commit
    (an update is an API call: one per shard cost 55 ms of a tiny shard's 165 ms of overhead,
    benchmarks/bench_prefect_overhead.py) and whenever `refresh` recounts.

    One artifact per flow run, whatever the attempt: a retry finds the artifact its flow run made
    before (by key) and goes on updating it, so no attempt's artifact is left frozen. Its
    description gives the counts, per split, and the rate of this attempt.
    """

    PUBLISH_SECONDS = 2.0

    def __init__(self, work: list[tuple[ExtractConfig, ExtractionPlan]], key: str) -> None:
        self.work = work
        self.total = sum(plan.num_examples for _, plan in work)
        self.unit = row_unit([plan for _, plan in work])
        self.done = self._committed_examples()
        self.done_at_start = sum(self.done.values())
        self.started = self.published = time.monotonic()
        self.artifact_id = _progress_artifact(key, self.percent, self.description())

    @property
    def percent(self) -> float:
        return round(100.0 * sum(self.done.values()) / max(1, self.total), 1)

    def description(self) -> str:
        """e.g. `120 of 2,767 examples committed (rte/train 100 of 2,490, rte/dev 20 of 277);
        41.3 examples/s in this attempt` (SQuAD 2.0: windows)."""
        splits = ", ".join(
            f"{_split_name(plan)} {self.done[_split_name(plan)]:,} of {plan.num_examples:,}"
            for _, plan in self.work
        )
        text = f"{sum(self.done.values()):,} of {self.total:,} {self.unit} committed ({splits})"
        added = sum(self.done.values()) - self.done_at_start
        seconds = time.monotonic() - self.started
        if added > 0 and seconds > 0:
            text += f"; {added / seconds:,.1f} {self.unit}/s in this attempt"
        return text

    def advance(self, plan: ExtractionPlan, rows: int) -> None:
        """`rows` more rows of `plan` committed here; published if `PUBLISH_SECONDS` have passed
        since the last update (the caller ends with `refresh`)."""
        self.done[_split_name(plan)] += rows
        if time.monotonic() - self.published >= self.PUBLISH_SECONDS:
            self._publish()

    def refresh(self) -> None:
        """Recount from storage (other workers commit shards too). A split whose plan storage
        no longer holds keeps its count: the flow's final listing names what was lost."""
        with contextlib.suppress(ShardError):
            self.done = self._committed_examples()
        self._publish()

    def _publish(self) -> None:
        update_progress_artifact(self.artifact_id, self.percent, description=self.description())
        self.published = time.monotonic()

    def _committed_examples(self) -> dict[str, int]:
        return {
            _split_name(plan): split_status(split_url(cfg.out, plan.task, plan.split))[
                "examples_done"
            ]
            for cfg, plan in self.work
        }


def _progress_artifact(key: str, percent: float, description: str) -> UUID:
    """The progress artifact `key` of this flow run, updated; created on its first attempt."""
    run_id = flow_run.id
    if run_id is not None:
        with get_client(sync_client=True) as client:
            earlier = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]),
                    type=ArtifactFilterType(any_=["progress"]),
                ),
                limit=1,
            )
        if earlier:
            return update_progress_artifact(earlier[0].id, percent, description=description)
    return create_progress_artifact(percent, key=key, description=description)


# The error beside the status: a failed shard's row is read for it, and the UI's table scrolls.
SHARD_COLUMNS = (
    "split", "shard", "status", "error", "examples", "rows", "size", "seconds", WRITTEN_BY,
    "committed at",
)  # fmt: skip


# Rows of a shard table listed one per shard at most: a table artifact's creation is an event,
# and the server refuses events over 1.5 MB (PREFECT_EVENTS_MAXIMUM_SIZE_BYTES; a row is ~260
# bytes, so 10,000 shards were 2.6 MB). Longer tables fold committed shards into one row per
# split; an error cell is cut at ERROR_CHARS. 500 rows of the longest errors: ~0.4 MB.
MAX_SHARD_ROWS = 500
ERROR_CHARS = 500


def shard_table(
    cfg: ExtractConfig,
    plans: list[ExtractionPlan],
    run_errors: dict[str, str] | None = None,
    max_rows: int = MAX_SHARD_ROWS,
) -> list[dict]:
    """The shard table of `plans` as storage holds them (`shard_rows`): commit records, failure
    records, and `run_errors` (`task/split/shard` -> the error of the run that had it)."""
    splits = []
    for plan in plans:
        records = load_records(split_url(cfg.out, plan.task, plan.split), plan)
        pending = [i for i in range(plan.num_shards) if i not in records]
        splits.append((plan, records, failed_shards(cfg, plan, pending, run_errors)))
    return shard_rows(splits, cfg.out, max_rows)


def shard_rows(
    splits: list[tuple[ExtractionPlan, dict[int, ShardRecord], dict[str, str]]],
    out: str,
    max_rows: int = MAX_SHARD_ROWS,
) -> list[dict]:
    """One row per planned shard of each split, then a row of totals (split `all`), in the
    columns of SHARD_COLUMNS, `examples` named `windows` for a span task (`row_unit`). Each
    split is (its plan, its commit records by shard, `task/split/shard` -> why it failed).

    A shard is `committed` (its example or window ids, rows, size, seconds, who wrote it and when),
    `failed` (its last error: the manifest's failure record, else the error of the run that had
    it, as `failed_shards` gives it) or `missing` (neither: not run yet, or its run was killed).

    More than `max_rows` shards: each split's committed shards are one row (`shard` their count,
    `committed at` the last commit), and of the failed, then the missing shards, the first in
    shard order up to `max_rows` in all; the totals' `error` says how many shards were left out
    of the listing and that `bertvision status OUT` has the full record. Errors are cut at
    ERROR_CHARS characters.
    """
    unit = row_unit([plan for plan, _, _ in splits])
    rows, written = [], []
    for plan, records, errors in splits:
        for index in range(plan.num_shards):
            row = dict.fromkeys(_columns(unit), "") | {"split": _split_name(plan), "shard": index}
            if (r := records.get(index)) is not None:
                row |= {
                    "status": "committed",
                    unit: f"{r.start}-{r.stop - 1}",
                    "rows": r.rows,
                    "size": human_size(r.bytes),
                    "seconds": round(r.seconds, 1),
                    WRITTEN_BY: r.worker,
                    "committed at": r.committed_at,
                }
                written.append(r)
            elif (error := errors.get(f"{_split_name(plan)}/{index}")) is not None:
                row |= {"status": "failed", "error": _cut(error)}
            else:
                row["status"] = "missing"
            rows.append(row)
    totals = _totals([plan for plan, _, _ in splits], rows, written, unit)
    if len(rows) <= max_rows:
        return [*rows, totals]
    folded = [
        _committed_row(plan, list(records.values()), unit) for plan, records, _ in splits if records
    ]
    room = max(0, max_rows - len(folded))
    listed = sorted(
        (row for row in rows if row["status"] != "committed"),
        key=lambda row: row["status"] != "failed",  # failed first; stable: in shard order
    )[:room]
    left_out = len(rows) - len(listed)
    totals["error"] = (
        f"{left_out:,} of {len(rows):,} shards not listed one by one (committed shards: one row "
        f"per split); the full record: bertvision status {out}"
    )
    return [*folded, *sorted(listed, key=_in_plan_order(splits)), totals]


def _committed_row(plan: ExtractionPlan, records: list[ShardRecord], unit: str) -> dict:
    """One row for the committed shards of a split."""
    return dict.fromkeys(_columns(unit), "") | {
        "split": _split_name(plan),
        "shard": f"{len(records):,} shards",
        "status": "committed",
        unit: f"{sum(r.stop - r.start for r in records):,}",
        "rows": sum(r.rows for r in records),
        "size": human_size(sum(r.bytes for r in records)),
        "seconds": round(sum(r.seconds for r in records), 1),
        WRITTEN_BY: f"{len({r.worker for r in records})} worker(s)",
        "committed at": max(r.committed_at for r in records),
    }


def _in_plan_order(splits: list[tuple[ExtractionPlan, dict, dict]]):
    order = {_split_name(plan): n for n, (plan, _, _) in enumerate(splits)}
    return lambda row: (order[row["split"]], row["shard"])


def _cut(error: str) -> str:
    return error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 1] + "…"


def _columns(unit: str) -> tuple[str, ...]:
    return tuple(unit if column == "examples" else column for column in SHARD_COLUMNS)


def _totals(
    plans: list[ExtractionPlan], rows: list[dict], written: list[ShardRecord], unit: str
) -> dict:
    counts = {
        s: sum(row["status"] == s for row in rows) for s in ("committed", "failed", "missing")
    }
    return dict.fromkeys(_columns(unit), "") | {
        "split": "all",
        "shard": f"{len(rows)} shards",
        "status": ", ".join(f"{n} {status}" for status, n in counts.items()),
        unit: f"{sum(plan.num_examples for plan in plans)} planned",
        "rows": sum(r.rows for r in written),
        "size": human_size(sum(r.bytes for r in written)),
        "seconds": round(sum(r.seconds for r in written), 1),
        WRITTEN_BY: f"{len({r.worker for r in written})} worker(s)",
    }


def publish_shard_table(
    cfg: ExtractConfig, plans: list[ExtractionPlan], key: str, run_errors: dict[str, str]
) -> None:
    """The shard table (`shard_table`) as a table artifact `key`; at most MAX_SHARD_ROWS rows
    one per shard, so its creation event stays under the server's size limit at any count."""
    rows = shard_table(cfg, plans, run_errors)
    total = rows[-1]
    left_out = f"; {total['error']}" if total["error"] else ""
    create_table_artifact(
        rows,
        key=key,
        description=f"Shards of {cfg.task} under {cfg.out}: {total['status']}{left_out}",
    )


def failed_shards(
    cfg: ExtractConfig,
    plan: ExtractionPlan,
    pending: list[int],
    run_errors: dict[str, str] | None = None,
) -> dict[str, str]:
    """`task/split/shard` -> why, for shards still pending after a run that failed: the failure
    recorded in the manifest, else the error of the run that had the shard. A pending shard with
    neither was reported committed: the final listing (`missing_from_storage`) names what
    storage lost of it."""
    if not pending:  # a complete split: no listing of its failure records
        return {}
    failures = load_failures(split_url(cfg.out, plan.task, plan.split))
    run_errors = run_errors or {}
    reasons = {}
    for i in pending:
        name = f"{plan.task}/{plan.split}/{i}"
        if i in failures:
            reasons[name] = failures[i].error
        elif name in run_errors:
            reasons[name] = run_errors[name]
    return reasons


def evaluation(metrics: dict) -> dict[str, dict[str, float]]:
    """The evaluation splits of a metrics.json ("val", "dev", MNLI's second dev split)."""
    return {
        split: values
        for split, values in metrics.items()
        if (split == "val" or split.startswith("dev") or split == "ensemble")
        and isinstance(values, dict)
    }


def metrics_markdown(title: str, metrics: dict[str, dict]) -> str:
    """A markdown table: one row per run and split, one column per metric."""
    names = sorted({m for run in metrics.values() for split in run.values() for m in split})
    lines = [f"# {title}", "", "| run | split | " + " | ".join(names) + " |"]
    lines.append("|" + " --- |" * (len(names) + 2))
    for run, splits in metrics.items():
        for split, values in splits.items():
            cells = [_cell(values.get(m)) for m in names]
            lines.append(f"| {run} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def baseline_markdown(
    title: str, results: dict[str, dict[str, dict]], baselines: dict[str, dict[str, float]]
) -> str:
    """A markdown table of each task's dev metrics per stage (`results[task][stage]`), below its
    baseline (`baselines[task]`, the family's `majority_baseline`, labelled by its
    `baseline_name`), with how far each stage's primary metric is above the baseline's."""
    names = sorted({m for stages in results.values() for dev in stages.values() for m in dev})
    header = ["task", "run", *names, "primary metric above the baseline"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for task, stages in results.items():
        family, floor = get_task(task).family, baselines[task]
        primary = family.primary_metric(task)
        for run, dev in {family.baseline_name: floor, **stages}.items():
            gain = f"{dev[primary] - floor[primary]:+.4f} {primary}" if run in stages else ""
            cells = [task, run, *(_cell(dev.get(m)) for m in names), gain]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else ""


def publish_metrics(title: str, metrics: dict[str, dict], key: str) -> None:
    create_markdown_artifact(metrics_markdown(title, metrics), key=key, description=title)
