"""Flow `sweep`: hyperopt TPE over an adapter, for one task or each task whose embeddings are
present, of every family (the nightly deployment: GLUE's tasks with the pooler, squad2 with the
span adapter).

Trials run `cfg.parallel` at a time as task runs on a pool of two worker processes; each worker
loads the embeddings once and shares them between the trials it runs. With `cfg.together` a
batch is one task run that trains its trials together over one read of the embeddings
(bertvision.together), each still recorded as its own trial; a retry retries the batch. TPE
suggests a batch from the trials finished so far, so it keeps learning while trials run in
parallel. A rerun (or the next scheduled run) resumes each sweep at its first unfinished trial
and leaves a finished sweep as it is: one finished with the same settings is only read, nothing
written (bertvision.sweep.finished_sweep).
"""

from __future__ import annotations

from dataclasses import replace

from bertvision_flows.parameters import require_cfg
from bertvision_tasks.artifacts import publish_metrics
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.names import artifact_key, flow_run_name, where
from bertvision_tasks.sweep import (
    extracted_tasks,
    finished_sweep,
    prepare_sweep,
    record_trials,
    run_trial,
    run_trials_together,
    suggest_trials,
    summarize,
)
from prefect import flow, unmapped
from prefect.task_runners import ProcessPoolTaskRunner
from tqdm.auto import tqdm

from bertvision import runs, storage
from bertvision import sweep as core
from bertvision.config import SweepConfig
from bertvision.console import progress_wanted


def _work(parameters: dict) -> str:
    """sweep-<task>-<adapter>; sweep-all (-<adapter> when one is named) for every task."""
    cfg = parameters["cfg"]
    what = "all" if parameters.get("all_tasks") else cfg.task
    return "-".join(part for part in ("sweep", what, cfg.adapter) if part)


def publish_best(results: dict[str, dict], adapters: dict[str, str], key: str) -> None:
    """A markdown artifact: each task's best trial (of its sweep's adapter, `adapters[task]`),
    its val and dev metrics."""
    rows = {
        f"{name} {adapters[name]} trial {r['best']['trial']}": {
            "val": r["best"]["val"],
            "dev": r["best"]["dev"],
        }
        for name, r in results.items()
        if r["best"] is not None
    }
    publish_metrics("Best trial of each sweep (chosen by val)", rows, key=key)


@flow(
    name="sweep",
    flow_run_name=flow_run_name(_work),
    task_runner=ProcessPoolTaskRunner(max_workers=2),
    log_prints=True,
)
def sweep(cfg: SweepConfig, all_tasks: bool = False) -> dict[str, dict]:
    """Sweep `cfg.adapter` for `cfg.task` into `cfg.out`; returns the best trial by validation
    metric, keyed by task. With `all_tasks`, every task of every family (GLUE's, squad2) with
    complete train and dev embeddings under `cfg.embeddings` is swept, each into
    `cfg.out/<task>/sweep` (the pipeline's layout) with its family's default adapter, or with
    `cfg.adapter` when one is named, then only the tasks it fits.
    A sweep folder holding another sweep is refused unless `cfg.overwrite`; one another run is
    sweeping into is refused (FolderBusy)."""
    require_cfg(cfg, but=("task",) if all_tasks else ())  # fails the run before any task
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    if all_tasks:
        names = extracted_tasks(cfg.embeddings, cfg.adapter)  # the tasks to sweep
        cfgs = [replace(cfg, task=name, out=storage.join(cfg.out, name, "sweep")) for name in names]
    else:
        cfgs = [cfg]
    results = {}
    for one in cfgs:
        if (done := finished_sweep(one)) is not None:  # finished before: read, nothing written
            results[one.task] = done.to_dict()
        else:
            results[one.task] = _sweep_one(one)
        print(f"{one.task}: {results[one.task]}")
    work = _work({"cfg": cfg, "all_tasks": all_tasks})
    adapters = {one.task: one.adapter for one in cfgs}
    publish_best(results, adapters, key=artifact_key(work, where(cfg.out), "best"))
    return results


def _sweep_one(one: SweepConfig) -> dict:
    """Run (or resume) the sweep `one` as the only writer of its folder; its summary."""
    with runs.lease(one.out):  # no other sweep writes into this folder meanwhile
        prepare_sweep(one)  # check the embeddings, write or check sweep.json
        done_before = len(record_trials(one))  # trials finished by earlier runs
        bar = tqdm(
            total=one.trials,
            initial=min(done_before, one.trials),
            desc=f"sweep {one.task} {one.adapter}",
            unit="trial",
            disable=not progress_wanted(),
        )
        while batch := suggest_trials(one):  # TPE's next K points
            if core.trains_together(one, batch):  # one task run, one read for K trials
                run_trials_together.submit(one, batch).result()
            else:
                run_trial.map(unmapped(one), batch).result()  # K trials at once on the pool
            record_trials(one)  # trials.jsonl from the committed records, if they changed
            bar.update(len(batch))
        bar.close()
        return summarize(one, done_before).to_dict()  # the best trial by val
