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
from bertvision_tasks.artifacts import baseline_markdown
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.names import artifact_key, flow_run_name, where
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bertvision.config import PipelineConfig
from bertvision.metrics import majority_baseline


@flow(
    name="pipeline",
    flow_run_name=flow_run_name(lambda p: "pipeline-" + "-".join(p["cfg"].tasks)),
    log_prints=True,
)
def pipeline(cfg: PipelineConfig) -> dict[str, dict]:
    """The whole pipeline for each of `cfg.tasks`; returns each task's dev metrics per stage.

    Its artifact compares each stage's dev metrics with the task's majority-class baseline."""
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
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
    baselines = {name: majority_baseline(name, cfg.data_dir) for name in cfg.tasks}
    title = "Dev metrics per task and stage, against always predicting TRAIN's majority class"
    create_markdown_artifact(
        baseline_markdown(title, results, baselines),
        key=artifact_key("pipeline", *cfg.tasks, where(cfg.out), "metrics"),
        description=title,
    )
    return results
