"""Flow `pipeline`: fine-tune -> extract -> train -> sweep -> ensemble, for each task.

Every stage is a child flow run (each visible in the UI on its own) with the stage config that
`PipelineConfig.stages` links to the others; its docstring gives the layout under `cfg.out`.
A rerun redoes only what storage lacks.
"""

from __future__ import annotations

from bertvision_flows.ensemble import ensemble
from bertvision_flows.extract_glue import extract_glue
from bertvision_flows.finetune import finetune
from bertvision_flows.sweep import sweep
from bertvision_flows.train_adapter import train_adapter
from bertvision_tasks.artifacts import artifact_key, publish_metrics
from prefect import flow

from bertvision.config import PipelineConfig


@flow(name="pipeline", flow_run_name="pipeline-{cfg.out}", log_prints=True)
def pipeline(cfg: PipelineConfig) -> dict[str, dict]:
    """The whole pipeline for each of `cfg.tasks`; returns each task's dev metrics per stage."""
    results = {}
    for name in cfg.tasks:
        stage = cfg.stages(name)
        tuned = finetune(stage["finetune"])  # partial fine-tune of the encoder
        extract_glue(stage["extract"], workers=cfg.workers)  # all-layer states -> Parquet shards
        trained = train_adapter(stage["train"])  # one adapter on the stored embeddings
        swept = sweep(stage["sweep"])[name]  # hyperopt trials of the adapter
        combined = ensemble(stage["ensemble"])  # the best trials with the fine-tuned model
        results[name] = {
            "finetune": tuned["dev"],
            stage["train"].adapter: trained["dev"],
            "best trial": swept["best"]["dev"],
            "ensemble": combined["ensemble"],
        }
    rows = {
        f"{name} {stage}": {"dev": dev} for name in results for stage, dev in results[name].items()
    }
    publish_metrics(
        "Dev metrics per task and stage", rows, artifact_key("pipeline", *cfg.tasks, "metrics")
    )
    return results
