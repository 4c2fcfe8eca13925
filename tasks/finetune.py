"""The fine-tuning task: one brief fine-tuning run of the encoder on one task."""

from __future__ import annotations

import json
from dataclasses import asdict

from prefect import task

from bertvision import __version__, storage
from bertvision import finetune as core
from bertvision.finetune import FinetuneConfig
from tasks.policy import RETRY, WhileStored


def _metrics_file(inputs: dict) -> str:
    return storage.join(inputs["cfg"].out, "metrics.json")


def finished_run(cfg: FinetuneConfig) -> dict | None:
    """metrics.json of a run finished at `cfg.out` with the same settings and code, else None.

    metrics.json is written last, so its presence means the checkpoint is complete."""
    url = _metrics_file({"cfg": cfg})
    if not storage.exists(url):
        return None
    metrics = storage.read_json(url)
    same_config = metrics.get("config") == json.loads(json.dumps(asdict(cfg)))
    return metrics if same_config and metrics.get("code_version") == __version__ else None


@task(
    task_run_name="{cfg.task}-finetune",
    cache_policy=WhileStored(_metrics_file),
    persist_result=True,
    timeout_seconds=24 * 3600,
    **RETRY,
)
def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune and evaluate; a run already stored with these settings is returned as it is."""
    return finished_run(cfg) or core.finetune_encoder(cfg, progress=False)
