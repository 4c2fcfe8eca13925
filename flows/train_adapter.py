"""Flow `train-adapter`: one adapter trained on stored embeddings, with its metrics."""

from __future__ import annotations

from bertvision_tasks.artifacts import artifact_key, evaluation, publish_metrics
from bertvision_tasks.train import train_adapter as train_task
from prefect import flow

from bertvision.config import TrainConfig


@flow(name="train-adapter", flow_run_name="train-{cfg.task}-{cfg.adapter}", log_prints=True)
def train_adapter(cfg: TrainConfig) -> dict:
    """Train `cfg.adapter` on the embeddings of `cfg.task` under `cfg.embeddings` into
    `cfg.out`; returns metrics.json of the run ({"val": ..., "dev": ...}). A run finished there
    with other settings or on other embeddings is refused unless `cfg.overwrite`."""
    metrics = train_task(cfg)  # one adapter on the stored embeddings
    publish_metrics(
        f"{cfg.task}: {cfg.adapter} adapter",
        {cfg.adapter: evaluation(metrics)},
        key=artifact_key(cfg.task, cfg.adapter, "metrics"),
    )
    return metrics
