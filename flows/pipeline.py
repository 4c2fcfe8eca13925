"""Flow `pipeline`: fine-tune -> extract -> train -> sweep -> ensemble, for each task.

Every stage is a child flow run (each visible in the UI on its own) with the stage config that
`PipelineConfig.stages` links to the others; its docstring gives the layout under `cfg.out`.
A rerun redoes only what storage lacks.
"""

from __future__ import annotations

import time

from bertvision_flows.ensemble import ensemble
from bertvision_flows.extract_glue import extract_glue
from bertvision_flows.finetune import finetune
from bertvision_flows.sweep import sweep
from bertvision_flows.train_adapter import train_adapter
from bertvision_tasks.artifacts import artifact_key, publish_metrics
from prefect import flow

from bertvision.config import PipelineConfig
from bertvision.metrics import majority_baseline


class StageRows(dict):
    """{stage: {"dev": metrics or None, "seconds": wall-clock time}}, in order; each stage is
    timed from the end of the one before. Starts with the majority baseline (0 s)."""

    def __init__(self, baseline: dict[str, float]) -> None:
        super().__init__({"majority baseline": {"dev": baseline, "seconds": 0.0}})
        self.clock = time.perf_counter()

    def add(self, stage: str, dev: dict[str, float] | None) -> None:
        now = time.perf_counter()
        self[stage] = {"dev": dev, "seconds": round(now - self.clock, 1)}
        self.clock = now


@flow(name="pipeline", flow_run_name="pipeline-{cfg.out}", log_prints=True)
def pipeline(cfg: PipelineConfig) -> dict[str, dict[str, dict]]:
    """The whole pipeline for each of `cfg.tasks`. Returns, per task, one row per stage in order:
    "majority baseline" (dev metrics of always predicting TRAIN's most frequent label),
    "finetune", "extract" (no metrics), the adapter's name, "best trial", "ensemble"; each
    {"dev": metrics or None, "seconds": the stage's wall-clock time, stored results included}."""
    results = {}
    for name in cfg.tasks:
        stage = cfg.stages(name)
        rows = StageRows(majority_baseline(name, cfg.data_dir))
        rows.add("finetune", finetune(stage["finetune"])["dev"])  # partial fine-tune of the encoder
        extract_glue(stage["extract"], workers=cfg.workers)  # all-layer states -> Parquet shards
        rows.add("extract", None)
        rows.add(stage["train"].adapter, train_adapter(stage["train"])["dev"])  # one adapter
        rows.add("best trial", sweep(stage["sweep"])[name]["best"]["dev"])  # hyperopt trials
        rows.add("ensemble", ensemble(stage["ensemble"])["ensemble"])  # best trials + fine-tuned
        results[name] = dict(rows)
    table = {
        f"{name} {stage}": {"dev": row["dev"]}
        for name in results
        for stage, row in results[name].items()
        if row["dev"] is not None
    }
    publish_metrics(
        "Dev metrics per task and stage", table, artifact_key("pipeline", *cfg.tasks, "metrics")
    )
    return results
