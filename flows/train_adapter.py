"""Flow `train-adapter`: one adapter trained on stored embeddings, with its metrics."""

from __future__ import annotations

from prefect import flow

from bertvision.train import TrainConfig
from flows.report import artifact_key, evaluation, publish_metrics
from tasks.train import train_adapter as train_task


@flow(name="train-adapter", flow_run_name="train-{task}-{adapter}", log_prints=True)
def train_adapter(
    task: str,
    embeddings: str,
    out: str,
    adapter: str = "pooler",
    adapter_dim: int = 64,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    epochs: int = 20,
    patience: int = 5,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "",
    val_fraction: float = 0.1,
    overwrite: bool = False,
) -> dict:
    """Train `adapter` on the embeddings of `task` under `embeddings`; the run goes to `out`.

    A run finished in `out` with other settings or on other embeddings is refused unless
    `overwrite`.

    Returns metrics.json of the run ({"val": ..., "dev": ...})."""
    cfg = TrainConfig(
        task=task,
        embeddings=embeddings,
        out=out,
        adapter=adapter,
        adapter_dim=adapter_dim,
        dropout=dropout,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        seed=seed,
        device=device,
        val_fraction=val_fraction,
        overwrite=overwrite,
    )
    metrics = train_task(cfg)  # one adapter on the stored embeddings
    publish_metrics(
        f"{cfg.task}: {adapter} adapter",
        {adapter: evaluation(metrics)},
        key=artifact_key(cfg.task, adapter, "metrics"),
    )
    return metrics
