"""Flow `pipeline`: fine-tune -> extract -> train -> sweep -> ensemble, for each task.

Every stage is a child flow run (each visible in the UI on its own) writing under `out`:

    out/<task>/finetune      the fine-tuned encoder checkpoint and its dev metrics
    out/embeddings/<task>/   all-layer hidden states of its splits, as Parquet shards
    out/<task>/<adapter>     one adapter trained on them
    out/<task>/sweep         hyperopt trials over the adapter
    out/<task>/ensemble      the average of the best trials and the fine-tuned model

A rerun redoes only what storage lacks. A stage whose finished result in `out` was made with
other settings or inputs is refused unless `overwrite`, which every stage is given.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, runtime

from bertvision import storage
from flows.ensemble import ensemble
from flows.extract_glue import extract_glue
from flows.finetune import finetune
from flows.report import artifact_key, publish_metrics
from flows.sweep import sweep
from flows.train_adapter import train_adapter


def _run_name() -> str:
    return "pipeline-" + "-".join(runtime.flow_run.parameters["tasks"])


@flow(name="pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(
    tasks: list[str],
    out: str = "runs/pipeline",
    data_dir: str | None = None,
    model: str = "",
    finetune_epochs: float = 1.0,
    max_train_examples: int | None = None,
    max_seq_length: int = 128,
    splits: list[str] | None = None,
    shard_size: int = 1000,
    adapter: str = "pooler",
    adapter_epochs: int = 20,
    trials: int = 20,
    parallel: int = 2,
    sweep_space: dict[str, Any] | None = None,
    top_k: int = 5,
    seed: int = 0,
    device: str = "",
    workers: int = 0,
    overwrite: bool = False,
) -> dict[str, dict]:
    """The whole pipeline for each of `tasks`; returns each task's dev metrics per stage.

    `splits` to extract default to train, dev and test (test gives GLUE submission files);
    `workers` > 0 spreads extraction over that many runs of the shard deployment;
    `sweep_space` overrides entries of the adapter's search space (e.g. {"epochs": 5})."""
    embeddings = storage.join(out, "embeddings")
    results = {}
    for name in tasks:
        checkpoint = storage.join(out, name, "finetune")
        # partial fine-tune of the encoder
        tuned = finetune(
            task=name, out=checkpoint, model=model, data_dir=data_dir, epochs=finetune_epochs,
            max_seq_length=max_seq_length, seed=seed, device=device,
            max_train_examples=max_train_examples, overwrite=overwrite,
        )  # fmt: skip
        # all-layer hidden states of every split -> Parquet shards
        extract_glue(
            tasks=[name], out=embeddings, model=checkpoint, data_dir=data_dir,
            splits=splits or ["train", "dev", "test"], max_seq_length=max_seq_length,
            shard_size=shard_size, device=device, workers=workers, overwrite=overwrite,
        )  # fmt: skip
        # one adapter trained on the stored embeddings
        trained = train_adapter(
            task=name, embeddings=embeddings, out=storage.join(out, name, adapter),
            adapter=adapter, epochs=adapter_epochs, seed=seed, device=device, overwrite=overwrite,
        )  # fmt: skip
        # hyperopt trials of the adapter, then the average of the best with the fine-tuned model
        swept = sweep(
            embeddings=embeddings, out=out, tasks=[name], trials=trials, parallel=parallel,
            adapter=adapter, space=sweep_space, seed=seed, device=device, overwrite=overwrite,
        )[name]  # fmt: skip
        combined = ensemble(
            tasks=[name], out=out, top_k=top_k, with_finetuned=True, overwrite=overwrite
        )[name]
        results[name] = {
            "finetune": tuned["dev"],
            adapter: trained["dev"],
            "best trial": swept["best"]["dev"],
            "ensemble": combined["ensemble"],
        }
    rows = {
        f"{name} {stage}": {"dev": dev} for name in results for stage, dev in results[name].items()
    }
    publish_metrics(
        "Dev metrics per task and stage", rows, artifact_key("pipeline", *tasks, "metrics")
    )
    return results
