"""Flow `train-adapter`: one adapter trained on stored embeddings, with its metrics."""

from __future__ import annotations

from bertvision_flows.parameters import require_cfg
from bertvision_tasks.artifacts import evaluation, publish_metrics
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.names import artifact_key, flow_run_name, where
from bertvision_tasks.train import train_adapter as train_task
from prefect import flow

from bertvision.config import TrainConfig


@flow(
    name="train-adapter",
    flow_run_name=flow_run_name("train-{cfg.task}-{cfg.adapter}"),
    log_prints=True,
)
def train_adapter(cfg: TrainConfig) -> dict:
    """Train `cfg.adapter` on the embeddings of `cfg.task` under `cfg.embeddings` into
    `cfg.out`; returns metrics.json of the run ({"val": ..., "dev": ...}). A run finished there
    with other settings or on other embeddings is refused unless `cfg.overwrite`."""
    require_cfg(cfg)  # before any task: a bad parameter fails the run at once
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    metrics = train_task(cfg)  # one adapter on the stored embeddings
    publish_metrics(
        f"{cfg.task}: {cfg.adapter} adapter",
        {cfg.adapter: evaluation(metrics)},
        key=artifact_key("train", cfg.task, cfg.adapter, where(cfg.out), "metrics"),
    )
    return metrics
