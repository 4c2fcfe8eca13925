"""Flow `ensemble`: the average of a sweep's best trials, as GLUE submission files."""

from __future__ import annotations

from bertvision_flows.parameters import require_cfg
from bertvision_tasks.artifacts import evaluation, publish_metrics
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.ensemble import ensemble as ensemble_task
from bertvision_tasks.names import artifact_key, flow_run_name, where
from prefect import flow

from bertvision.config import EnsembleConfig


@flow(
    name="ensemble",
    flow_run_name=flow_run_name("ensemble-{cfg.task}-top-{cfg.top_k}"),
    log_prints=True,
)
def ensemble(cfg: EnsembleConfig) -> dict:
    """Ensemble the `cfg.top_k` best trials (by validation metric) of the sweep `cfg.runs`, with
    the fine-tuned run `cfg.with_finetuned` if given; returns its metrics.json (members and the
    ensemble's dev metrics). One finished with other settings or members is refused unless
    `cfg.overwrite`."""
    require_cfg(cfg)  # before any task: a bad parameter fails the run at once
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    result = ensemble_task(cfg)  # average the members' outputs
    print(f"{cfg.task}: ensemble of {len(result['members'])}: {result['ensemble']}")
    publish_metrics(
        f"{cfg.task}: ensemble of the best trials",
        {f"{cfg.task} ensemble": evaluation(result)},
        key=artifact_key("ensemble", cfg.task, where(cfg.out), "metrics"),
    )
    return result
