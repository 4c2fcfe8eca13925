"""`bertvision run`: the whole pipeline as the `pipeline` flow, from the command line.

The core CLI has no Prefect in it; this command joins it through the `bertvision.commands` entry
point (pyproject.toml). Its options are generated from `PipelineConfig` like every other
command's: the pipeline's own fields, then each stage's as `--<stage>-<field>`
(`--finetune-epochs 0.2`, `--sweep-trials 4`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import typer

from bertvision.config import PipelineConfig


def add_commands(app: typer.Typer) -> None:
    from bertvision.cli import config_command

    config_command(PipelineConfig, on=app)(run)


def run(cfg: PipelineConfig) -> None:
    """Run the whole pipeline in this process and print the dev metrics of each stage.

    Fine-tune -> extract -> train -> sweep -> ensemble, as the `pipeline` Prefect flow on
    Prefect's ephemeral API (or the server at PREFECT_API_URL, if set); a rerun redoes only what
    OUT lacks.

    Example: bertvision run --tasks rte --data-dir glue_data --out runs/rte
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline anyway
    from bertvision_flows.extract_glue import ShardsFailed
    from bertvision_flows.pipeline import pipeline
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    api = nullcontext()
    if not get_current_settings().api.url:
        # One ephemeral API for this process and the sweep's worker processes, which would each
        # start a throwaway one otherwise. A fresh one migrates its database first: on a busy
        # machine that outlasts Prefect's 20 s default.
        server = SubprocessASGIServer()
        server.start(timeout=180)
        api = temporary_settings({PREFECT_API_URL: server.api_url})
    try:
        with api:
            results = pipeline(cfg)
    except ShardsFailed as exc:
        typer.echo(f"error: {exc}; rerun to extract only those", err=True)
        raise typer.Exit(1) from None
    for name, stages in results.items():
        for stage, metrics in stages.items():
            values = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            typer.echo(f"{name} {stage} dev: {values}")
