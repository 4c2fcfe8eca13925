"""Flow `finetune`: a brief fine-tuning of the encoder on one task, with its dev metrics."""

from __future__ import annotations

from prefect import flow

from bertvision.finetune import FinetuneConfig
from flows.report import artifact_key, evaluation, publish_metrics
from tasks.finetune import finetune as finetune_task


@flow(name="finetune", flow_run_name="finetune-{task}", log_prints=True)
def finetune(
    task: str,
    out: str,
    model: str = "",
    data_dir: str | None = None,
    epochs: float = 1.0,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_seq_length: int = 128,
    seed: int = 0,
    device: str = "",
    max_train_examples: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Fine-tune `model` on `task` for `epochs` (may be a fraction); the checkpoint goes to `out`.

    A run finished in `out` with other settings, model or data is refused unless `overwrite`.
    Returns metrics.json of the run."""
    cfg = FinetuneConfig(
        task=task,
        out=out,
        model=model,
        data_dir=data_dir,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        seed=seed,
        device=device,
        max_train_examples=max_train_examples,
        overwrite=overwrite,
    )
    metrics = finetune_task(cfg)  # partial fine-tune of the encoder
    publish_metrics(
        f"{cfg.task}: fine-tuned encoder ({epochs} epochs)",
        {"finetune": evaluation(metrics)},
        key=artifact_key(cfg.task, "finetune", "metrics"),
    )
    return metrics
