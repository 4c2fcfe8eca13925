"""The adapter training task: one adapter trained on stored embeddings."""

from __future__ import annotations

from prefect import task

from bertvision import storage
from bertvision import train as core
from bertvision.train import TrainConfig
from tasks.policy import RETRY, WhileStored


def _metrics_file(inputs: dict) -> str:
    return storage.join(inputs["cfg"].out, "metrics.json")


@task(
    task_run_name="{cfg.task}-train-{cfg.adapter}",
    cache_policy=WhileStored(_metrics_file),
    persist_result=True,
    timeout_seconds=12 * 3600,
    **RETRY,
)
def train_adapter(cfg: TrainConfig) -> dict:
    """Train, select on held-out train, evaluate; a finished run is returned as it is."""
    return core.train_adapter(cfg, progress=False)
