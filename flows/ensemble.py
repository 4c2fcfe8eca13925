"""Flow `ensemble`: the average of each task's best sweep trials, as GLUE submission files.

Reads out/<task>/sweep and writes out/<task>/ensemble (the pipeline's layout); with
`with_finetuned`, the fine-tuned encoder in out/<task>/finetune joins the average.
"""

from __future__ import annotations

from prefect import flow

from bertvision import storage
from bertvision.ensemble import EnsembleConfig
from flows.report import artifact_key, evaluation, publish_metrics
from tasks.ensemble import ensemble as ensemble_task


@flow(name="ensemble", log_prints=True)
def ensemble(
    tasks: list[str],
    out: str,
    top_k: int = 5,
    with_finetuned: bool = False,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Ensemble the `top_k` best trials (by validation metric) of each task's sweep; returns
    each task's metrics.json (members and the ensemble's dev metrics). An ensemble finished with
    other settings or members is refused unless `overwrite`."""
    results = {}
    for name in tasks:
        cfg = EnsembleConfig(
            task=name, runs=storage.join(out, name, "sweep"),
            out=storage.join(out, name, "ensemble"), top_k=top_k,
            with_finetuned=storage.join(out, name, "finetune") if with_finetuned else None,
            overwrite=overwrite,
        )  # fmt: skip
        results[name] = ensemble_task(cfg)  # average the members' outputs
        print(f"{name}: ensemble of {len(results[name]['members'])}: {results[name]['ensemble']}")
    publish_metrics(
        "Ensembles of the best trials",
        {f"{name} ensemble": evaluation(metrics) for name, metrics in results.items()},
        key=artifact_key("ensemble", *tasks, "metrics"),
    )
    return results
