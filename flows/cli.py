"""`bertvision run`: the whole pipeline as the `pipeline` flow, from the command line.

The core CLI has no Prefect in it; this command joins it through the `bertvision.commands` entry
point (pyproject.toml). Its options are generated from `PipelineConfig` like every other
command's: the pipeline's own fields, then each stage's as `--<stage>-<field>`
(`--finetune-epochs 0.2`, `--sweep-trials 4`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import typer

from bertvision import console
from bertvision.config import ConfigError, PipelineConfig


def add_commands(app: typer.Typer) -> None:
    from bertvision.cli import config_command

    config_command(PipelineConfig, on=app)(run)


def run(cfg: PipelineConfig) -> None:
    """Run the whole pipeline in this process, with progress bars; print a table of each stage's
    dev metrics and wall-clock time beside the task's baseline (GLUE: the majority class; SQuAD
    2.0: no answer), and where it all went.

    Fine-tune -> extract -> train -> sweep -> ensemble, as the `pipeline` Prefect flow on
    Prefect's ephemeral API (or the server at PREFECT_API_URL, if set); a rerun redoes only what
    OUT lacks, and its table marks each stage it found finished "done before", with the time
    that stage took when it ran beside the rerun's own. The flow runs stay in Prefect's
    database (`prefect server start` shows them).

    Example: bertvision run --tasks rte --data-dir glue_data --out runs/rte
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline anyway
    os.environ.setdefault("DO_NOT_TRACK", "1")  # the client's usage data and its notice likewise
    from bertvision_flows.extract_glue import ShardsFailed
    from bertvision_flows.pipeline import pipeline
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    server_url = get_current_settings().api.url
    if cfg.workers and not server_url:
        raise ConfigError(
            "workers",
            f"{cfg.workers} needs a Prefect server (PREFECT_API_URL) with the extract-shards "
            "deployment and workers on its bertvision-shards pool; this command's own "
            "temporary API has no workers (README: Many workers, one extraction)",
        )
    try:
        with _terminal(cfg.verbose), ExitStack() as stack:
            stack.callback(_stop_worker_processes)
            stack.enter_context(_threads_end_quietly_on_interrupt())
            if not server_url:
                # One ephemeral API for this process and the sweep's worker processes, which
                # would each start a throwaway one otherwise. A fresh one migrates its database
                # first: on a busy machine that outlasts Prefect's 20 s default.
                # a throwaway server: no usage data from it unless the user asks for it
                analytics = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
                stack.enter_context(console.environment(PREFECT_SERVER_ANALYTICS_ENABLED=analytics))
                server = SubprocessASGIServer()
                # stopped here, not at exit: quietly, and also when the command is terminated
                stack.callback(_stop_after_logs, server)
                with _interrupts_held():  # Ctrl-C stops this command, which stops the server
                    server.start(timeout=180)
                stack.enter_context(temporary_settings({PREFECT_API_URL: server.api_url}))
            results = pipeline(cfg)
    except ShardsFailed as exc:
        typer.echo(f"error: {exc}; rerun to extract only those", err=True)
        raise typer.Exit(1) from None
    for name, rows in results.items():
        typer.echo("\n" + stage_table(cfg, name, rows))
    typer.echo("\n" + where_written(cfg, server_url))


@contextmanager
def _threads_end_quietly_on_interrupt() -> Iterator[None]:
    """A thread that Ctrl-C ends (the process pool's result thread, handing the interrupt of a
    trial back to Prefect) prints no traceback: the command's one line says it all."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not issubclass(args.exc_type, KeyboardInterrupt):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _stop_worker_processes() -> None:
    """Terminate the worker processes still running (the sweep's process pool, after Ctrl-C
    reached them mid-trial): Python joins them at exit, and one interrupted while Prefect's
    pool set it up never ends."""
    for process in multiprocessing.active_children():
        process.terminate()
        process.join(timeout=5)


def _stop_after_logs(server) -> None:
    """Stop the ephemeral API once the logs queued for it are sent (else they fail at exit)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    server.stop()


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT held pending in this thread, and so in the processes it starts meanwhile, which
    inherit the mask: Ctrl-C, sent to the terminal's whole process group, then reaches this
    command alone, which sends the logs it queued to a server still running and stops it. (Reached
    by Ctrl-C too, the server died first, and the command waited on its logs for good.) A Ctrl-C
    pressed within the block takes effect at its end."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextmanager
def _terminal(verbose: bool) -> Iterator[None]:
    """Progress bars on; unless `verbose`, Prefect's console logs at CRITICAL only (a failed
    stage ends in the command's one `error:` line, not in the engine's tracebacks), and
    the other libraries quiet (console.quiet_libraries), here and in the sweep's worker
    processes (through the environment). Prefect's API still receives every log."""
    from prefect.logging.handlers import PrefectConsoleHandler

    with ExitStack() as stack:
        stack.enter_context(console.environment(**{console.PROGRESS: "1"}))
        if not verbose:
            stack.enter_context(console.quiet_libraries())
            stack.enter_context(
                console.environment(PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="CRITICAL")
            )
            handlers = [h for h in logging.getLogger().handlers if type(h) is PrefectConsoleHandler]
            for handler in handlers:
                level = handler.level
                handler.setLevel(logging.CRITICAL)
                stack.callback(handler.setLevel, level)
        else:  # the command line quiets transformers unless `bertvision --verbose` (cli.py)
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_warning()
        yield


def _seconds(value: float) -> str:
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _done_before(row: dict) -> str:
    """What follows the time of a stage this run found finished: "  done before (took 2 min
    05 s)", the time its run took when it ran; empty for a stage that ran now."""
    if not row.get("done_before"):
        return ""
    took = row.get("took")
    return "  done before" + ("" if took is None else f" (took {_seconds(took)})")


def stage_table(cfg: PipelineConfig, task: str, rows: dict[str, dict]) -> str:
    """A plain-text table of one task's stages (`pipeline`'s rows): dev metrics and time below
    the family's baseline (its `baseline_name`), each stage that does not beat the baseline's
    primary metric marked. Times are this run's own: a stage found finished is marked "done
    before", with the time it took when it ran; the total is this run's."""
    from bertvision.families import get_task

    family = get_task(task).family
    metrics = family.metric_names(task)
    primary = family.primary_metric(task)
    stages = cfg.stages(task)
    finetune, train, sweep, ensemble = (
        stages[s] for s in ("finetune", "train", "sweep", "ensemble")
    )
    subset = f", first {cfg.max_train_examples} train examples" if cfg.max_train_examples else ""
    labels = {
        "majority baseline": family.baseline_name,
        "finetune": f"fine-tuned encoder ({finetune.epochs:g} epochs{subset})",
        "extract": f"extraction (every layer; {', '.join(cfg.extract.splits)})",
        train.adapter: f"{train.adapter} adapter on the stored layers",
        "best trial": f"best of {sweep.trials} sweep trials (chosen on val)",
        "ensemble": f"ensemble (best {ensemble.top_k} trial{'s' * (ensemble.top_k != 1)} "
        "+ fine-tuned)",
    }
    width = max(len(label) for label in labels.values())
    lines = [f"{task} dev".ljust(width) + "".join(f"{m:>10}" for m in metrics) + f"{'time':>14}"]
    baseline = rows["majority baseline"]["dev"][primary]
    below = []
    for stage, row in rows.items():
        label = labels.get(stage, stage)
        if row["dev"] is None:
            values = "".join(f"{'':>10}" for _ in metrics)
        else:
            values = "".join(f"{row['dev'][m]:>10.3f}" for m in metrics)
            if stage != "majority baseline" and not row["dev"][primary] > baseline:
                below.append(label)
        time = "" if stage == "majority baseline" else _seconds(row["seconds"])
        lines.append(f"{label.ljust(width)}{values}{time:>14}{_done_before(row)}")
    total = sum(row["seconds"] for row in rows.values())
    lines.append(f"{'total'.ljust(width)}{'':>{10 * len(metrics)}}{_seconds(total):>14}")
    for label in below:
        lines.append(f"note: {label} does not beat the baseline ({primary})")
    return "\n".join(lines)


def where_written(cfg: PipelineConfig, server_url: str | None) -> str:
    """Where the results and Prefect's runs are, and what to run next."""
    from prefect.settings import get_current_settings

    out = cfg.out
    adapters = sorted({cfg.stages(task)["train"].adapter for task in cfg.tasks})
    lines = [
        f"Everything is under {out}: <task>/finetune (checkpoint), embeddings/<task> (shards), "
        f"<task>/{' or '.join(adapters)}, <task>/sweep (trials.jsonl), <task>/ensemble "
        "(predictions: GLUE's TSV, SQuAD's official JSON); each with metrics.json.",
        f"Next: bertvision report {out}    (report.md and report.png of every run under it)",
    ]
    if server_url:
        ui = server_url.rstrip("/").removesuffix("/api")
        lines.append(f"The flow runs, task runs and artifacts are on the Prefect server: {ui}")
    else:
        database = get_current_settings().server.database.connection_url
        where = database.get_secret_value() if database else ""
        where = where.split(":///", 1)[-1] if where.startswith("sqlite") else "its database"
        lines.append(
            f"The flow runs, task runs and artifacts are kept in Prefect's {where}: "
            "prefect server start, then open http://127.0.0.1:4200"
        )
    return "\n".join(lines)
