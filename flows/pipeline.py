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
from bertvision_tasks.artifacts import baseline_markdown
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.names import artifact_key, flow_run_name, where
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bertvision.config import PipelineConfig
from bertvision.families import get_task


class StageRows(dict):
    """{stage: {"dev": metrics or None, "seconds": wall-clock time}}, in order; each stage is
    timed from the end of the one before. Starts with the majority baseline (0 s): GLUE's
    most frequent label, SQuAD 2.0's "no answer" to every question."""

    def __init__(self, baseline: dict[str, float]) -> None:
        super().__init__({"majority baseline": {"dev": baseline, "seconds": 0.0}})
        self.clock = time.perf_counter()

    def add(self, stage: str, dev: dict[str, float] | None) -> None:
        now = time.perf_counter()
        self[stage] = {"dev": dev, "seconds": round(now - self.clock, 1)}
        self.clock = now


@flow(
    name="pipeline",
    flow_run_name=flow_run_name(lambda p: "pipeline-" + "-".join(p["cfg"].tasks)),
    log_prints=True,
)
def pipeline(cfg: PipelineConfig) -> dict[str, dict[str, dict]]:
    """The whole pipeline for each of `cfg.tasks`. Returns, per task, one row per stage in order:
    "majority baseline" (dev metrics of always predicting TRAIN's most frequent label; SQuAD
    2.0: no answer),
    "finetune", "extract" (no metrics), the adapter's name, "best trial", "ensemble"; each
    {"dev": metrics or None, "seconds": the stage's wall-clock time, stored results included}.
    Its artifact compares each stage's dev metrics with the majority baseline."""
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    results = {}
    for name in cfg.tasks:
        stage = cfg.stages(name)
        rows = StageRows(get_task(name).family.majority_baseline(name, cfg.data_dir))
        rows.add("finetune", finetune(stage["finetune"])["dev"])  # partial fine-tune of the encoder
        extract_glue(  # all-layer states -> Parquet shards
            stage["extract"], workers=cfg.workers, shards_per_task=cfg.shards_per_task
        )
        rows.add("extract", None)
        rows.add(stage["train"].adapter, train_adapter(stage["train"])["dev"])  # one adapter
        rows.add("best trial", sweep(stage["sweep"])[name]["best"]["dev"])  # hyperopt trials
        rows.add("ensemble", ensemble(stage["ensemble"])["ensemble"])  # best trials + fine-tuned
        results[name] = dict(rows)
    title = "Dev metrics per task and stage, against each task's baseline"
    scored = {
        name: {stage: row["dev"] for stage, row in rows.items() if stage != "majority baseline"}
        for name, rows in results.items()
    }
    baselines = {name: rows["majority baseline"]["dev"] for name, rows in results.items()}
    for stages in scored.values():
        stages.pop("extract")
    create_markdown_artifact(
        baseline_markdown(title, scored, baselines),
        key=artifact_key("pipeline", *cfg.tasks, where(cfg.out), "metrics"),
        description=title,
    )
    return results
