"""What the flows show in the Prefect UI: extraction progress, a table of shards, metrics tables.

All figures are read from storage (commit records, metrics.json), so what the UI shows is what
storage holds, whichever worker wrote it.
"""

from __future__ import annotations

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from bertvision.config import ExtractConfig
from bertvision.schema import ExtractionPlan
from bertvision.shards import load_failures, load_records, split_status, split_url


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text)


class ExtractionProgress:
    """A progress artifact of the examples committed out of all planned, advanced as shards land."""

    def __init__(self, work: list[tuple[ExtractConfig, ExtractionPlan]], key: str) -> None:
        self.work = work
        self.total = sum(plan.num_examples for _, plan in work)
        self.done = self._committed_examples()
        self.artifact_id = create_progress_artifact(
            self.percent, key=key, description=f"examples committed of {self.total}"
        )

    @property
    def percent(self) -> float:
        return round(100.0 * self.done / max(1, self.total), 1)

    def advance(self, rows: int) -> None:
        self.done += rows
        update_progress_artifact(self.artifact_id, self.percent)

    def refresh(self) -> None:
        """Recount from storage (other workers commit shards too)."""
        self.done = self._committed_examples()
        update_progress_artifact(self.artifact_id, self.percent)

    def _committed_examples(self) -> int:
        return sum(
            split_status(split_url(cfg.out, plan.task, plan.split))["examples_done"]
            for cfg, plan in self.work
        )


def shard_table(cfg: ExtractConfig, plans: list[ExtractionPlan]) -> list[dict]:
    """One row per committed shard: where it is, its size, how long it took and who wrote it."""
    rows = []
    for plan in plans:
        records = load_records(split_url(cfg.out, plan.task, plan.split), plan)
        rows += [
            {
                "split": plan.split,
                "shard": r.index,
                "examples": f"{r.start}-{r.stop - 1}",
                "rows": r.rows,
                "bytes": r.bytes,
                "seconds": r.seconds,
                "worker": r.worker,
                "committed_at": r.committed_at,
            }
            for r in sorted(records.values(), key=lambda r: r.index)
        ]
    return rows


def publish_shard_table(cfg: ExtractConfig, plans: list[ExtractionPlan]) -> None:
    create_table_artifact(
        shard_table(cfg, plans),
        key=artifact_key(cfg.task, "shards"),
        description=f"committed shards of {cfg.task} under {cfg.out}",
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


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else ""


def publish_metrics(title: str, metrics: dict[str, dict], key: str) -> None:
    create_markdown_artifact(metrics_markdown(title, metrics), key=key, description=title)
