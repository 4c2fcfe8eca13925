"""Flow `sweep`: hyperopt TPE over an adapter for each task whose embeddings are present.

Each task's sweep goes to out/<task>/sweep (the pipeline's layout). Trials run `parallel` at a
time as task runs on a pool of two worker processes; each worker loads the embeddings once and
shares them between the trials it runs. TPE suggests a batch from the trials finished so far,
so it keeps learning while trials run in parallel. A rerun (or the next scheduled run) resumes
each sweep at its first unfinished trial and leaves a finished sweep as it is.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import ProcessPoolTaskRunner

from bertvision import runs, storage
from bertvision.sweep import SweepConfig
from flows.report import artifact_key, publish_metrics
from tasks.sweep import (
    prepare_sweep,
    record_trials,
    run_trial,
    suggest_trials,
    summarize,
    tasks_with_embeddings,
)


def publish_best(results: dict[str, dict], adapter: str) -> None:
    """A markdown artifact: each task's best trial, its val and dev metrics."""
    rows = {
        f"{name} trial {r['best']['trial']}": {"val": r["best"]["val"], "dev": r["best"]["dev"]}
        for name, r in results.items()
        if r["best"] is not None
    }
    title = f"Best {adapter} trial of each sweep (chosen by val)"
    publish_metrics(title, rows, key=artifact_key("sweep", adapter, "best"))


@flow(name="sweep", task_runner=ProcessPoolTaskRunner(max_workers=2), log_prints=True)
def sweep(
    embeddings: str,
    out: str,
    tasks: list[str] | None = None,
    trials: int = 20,
    parallel: int = 2,
    adapter: str = "pooler",
    space: dict[str, Any] | None = None,
    startup_trials: int = 5,
    seed: int = 0,
    val_fraction: float = 0.1,
    val_seed: int = 0,
    device: str = "",
    overwrite: bool = False,
) -> dict[str, dict]:
    """Sweep `adapter` for `tasks` (default: every task with complete train and dev embeddings
    under `embeddings`); returns each task's best trial by validation metric. A sweep folder
    holding another sweep is refused unless `overwrite`; one another run is sweeping into is
    refused (FolderBusy)."""
    results = {}
    for name in tasks or tasks_with_embeddings(embeddings):  # the tasks to sweep
        cfg = SweepConfig(
            task=name, embeddings=embeddings, out=storage.join(out, name, "sweep"),
            trials=trials, parallel=parallel, adapter=adapter, space=space or {},
            startup_trials=startup_trials, seed=seed, val_fraction=val_fraction,
            val_seed=val_seed, device=device, overwrite=overwrite,
        )  # fmt: skip
        with runs.lease(cfg.out):  # no other sweep writes into this folder meanwhile
            prepare_sweep(cfg)  # check the embeddings, write or check sweep.json
            done_before = len(record_trials(cfg))  # trials finished by earlier runs
            while batch := suggest_trials(cfg, parallel):  # TPE's next K points
                run_trial.map(unmapped(cfg), batch).result()  # K trials at once on the pool
                record_trials(cfg)  # trials.jsonl from the committed records
            results[name] = summarize(cfg, done_before).to_dict()  # the best trial by val
        print(f"{name}: {results[name]}")
    publish_best(results, adapter)
    return results
