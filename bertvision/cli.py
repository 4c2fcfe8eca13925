"""The `bertvision` command: one command per core function, same names, same config fields.

Usage errors and bad input end with one line on stderr (`error: ...`) and exit code 2; the
command never imports Prefect except `run`, which starts the pipeline flow.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from functools import wraps
from typing import Annotated

import typer

from bertvision import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Store all-layer hidden states once; train small adapters on them.",
)

# Options shared by several commands, defined once.
TaskOpt = Annotated[
    str,
    typer.Option("--task", help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="Hub name, local folder or fsspec URL of an encoder; default: bundled MiniLM",
    ),
]
DataDirOpt = Annotated[
    str | None, typer.Option("--data-dir", help="A glue_data folder; default: the Hugging Face hub")
]
MaxLenOpt = Annotated[int, typer.Option("--max-seq-length", help="Tokens per example, at most")]
SeedOpt = Annotated[int, typer.Option("--seed")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="cpu, cuda, cuda:1; default: cuda if available")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace a finished result with other settings or inputs"),
]


def _splits(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def user_errors(command):
    """Bad input becomes one line, `error: ...`, and exit code 2, not a traceback.

    Bad input is what the core raises for it: ValueError (DataError, ModelError, ShardError,
    StorageError, FileFormatError and the config classes' checks, each naming the file or
    option) and OSError (a path that is missing, unreadable, a file where a folder should be, a
    full disk, storage that stayed unreachable), and FolderBusy (another process writes the same
    folder). Anything else is a bug and keeps its traceback.
    """
    from bertvision.runs import FolderBusy

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError, IndexError, FolderBusy) as exc:
            typer.echo(f"error: {_describe(exc, kwargs.get('out') or kwargs.get('url'))}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _describe(exc: BaseException, out: str | None) -> str:
    """One line for `exc`; a raw OS error names its path (or the output it was writing)."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and text.startswith("[Errno"):
        paths = [p for p in (exc.filename, exc.filename2) if p is not None]
        where = " -> ".join(map(str, paths)) if paths else f"writing under {out or 'the output'}"
        text = f"{where}: {exc.strerror}"
        if out and exc.errno in (errno.ENOENT, errno.EEXIST) and _inside(paths, out):
            text += f"; is another process writing to {out} at the same time?"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or repr(exc)


def _inside(paths: list, folder: str) -> bool:
    root = os.path.abspath(folder)
    return any(os.path.abspath(str(p)).startswith(root + os.sep) for p in paths)


@app.command()
@user_errors
def finetune(
    task: TaskOpt,
    out: Annotated[str, typer.Option("--out", help="Checkpoint URL (from_pretrained loads it)")],
    model: ModelOpt = "",
    data_dir: DataDirOpt = None,
    epochs: Annotated[float, typer.Option("--epochs", help="May be a fraction: 0.2")] = 1.0,
    lr: Annotated[float, typer.Option("--lr")] = 5e-5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    max_seq_length: MaxLenOpt = 128,
    seed: SeedOpt = 0,
    device: DeviceOpt = "",
    max_train_examples: Annotated[
        int | None, typer.Option("--max-train-examples", help="First N only, for quick runs")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Held-out slice of TRAIN, left out here too")
    ] = 0.1,
    val_seed: Annotated[int, typer.Option("--val-seed", help="Which held-out slice")] = 0,
    predict_test: Annotated[
        bool, typer.Option("--predict-test/--no-predict-test", help="Write test predictions")
    ] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tune an encoder briefly on a task; write the checkpoint and its dev metrics.

    Example: bertvision finetune --task rte --data-dir glue_data --epochs 0.2 --out ckpt
    """
    from bertvision.finetune import FinetuneConfig, finetune_encoder

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
        val_fraction=val_fraction,
        val_seed=val_seed,
        predict_test=predict_test,
        overwrite=overwrite,
    )
    metrics = finetune_encoder(cfg)
    shown = {k: metrics[k] for k in ("val", "dev", "train")}
    typer.echo(json.dumps(shown, sort_keys=True))


@app.command()
@user_errors
def extract(
    task: TaskOpt,
    out: Annotated[str, typer.Option("--out", help="Output URL: a path, memory://, az://")],
    model: ModelOpt = "",
    data_dir: DataDirOpt = None,
    splits: Annotated[
        str, typer.Option("--splits", help="Comma-separated: train,dev,test")
    ] = "train,dev",
    max_seq_length: MaxLenOpt = 128,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Examples per shard")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    dtype: Annotated[str, typer.Option("--dtype", help="float16 or float32")] = "float16",
    device: DeviceOpt = "",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an extraction with other settings")
    ] = False,
) -> None:
    """Store the hidden states of every layer for every example as Parquet shards.

    Example: bertvision extract --task rte --data-dir glue_data --splits train,dev --out emb
    """
    from bertvision.extract import ExtractConfig, extract_hidden_states

    cfg = ExtractConfig(
        task=task,
        out=out,
        model=model,
        data_dir=data_dir,
        splits=_splits(splits),
        max_seq_length=max_seq_length,
        shard_size=shard_size,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
    )
    summary = extract_hidden_states(cfg)
    for name in summary.committed:
        typer.echo(
            f"{name}: {len(summary.committed[name])} shards written, "
            f"{len(summary.skipped[name])} already there, "
            f"{len(summary.failed[name])} failed"
        )
        for index, error in summary.failed[name].items():
            typer.echo(f"  shard {index} failed: {error}", err=True)
        for lost in summary.missing.get(name, []):
            typer.echo(f"  not stored at the end: {lost}", err=True)
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def train(
    task: TaskOpt,
    embeddings: Annotated[
        str, typer.Option("--embeddings", help="Extraction output URL (bertvision extract --out)")
    ],
    out: Annotated[str, typer.Option("--out", help="Run folder URL: a path, memory://, az://")],
    adapter: Annotated[
        str, typer.Option("--adapter", help="pooler, scalarmix or cls (the [CLS] linear probe)")
    ] = "pooler",
    adapter_dim: Annotated[
        int, typer.Option("--adapter-dim", help="Width of the pooler's shared adapter")
    ] = 64,
    dropout: Annotated[float, typer.Option("--dropout")] = 0.1,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.01,
    epochs: Annotated[int, typer.Option("--epochs")] = 20,
    patience: Annotated[
        int, typer.Option("--patience", help="Stop after N epochs without a better val metric")
    ] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    seed: SeedOpt = 0,
    device: DeviceOpt = "",
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Slice of TRAIN held out for selection")
    ] = 0.1,
    val_seed: Annotated[
        int, typer.Option("--val-seed", help="Which held-out slice (as fine-tuning's)")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a finished run with other settings")
    ] = False,
) -> None:
    """Train an adapter on stored embeddings; select on held-out TRAIN, report dev metrics.

    Example: bertvision train --task rte --embeddings emb --out runs/rte-pooler --seed 1
    """
    from bertvision.train import TrainConfig, train_adapter

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
        val_seed=val_seed,
        overwrite=overwrite,
    )
    metrics = train_adapter(cfg)
    typer.echo(json.dumps(metrics, sort_keys=True))


@app.command()
@user_errors
def sweep(
    task: TaskOpt,
    embeddings: Annotated[
        str, typer.Option("--embeddings", help="Extraction output URL (bertvision extract --out)")
    ],
    out: Annotated[str, typer.Option("--out", help="Sweep folder URL; a rerun resumes it")],
    trials: Annotated[int, typer.Option("--trials", help="Finished trials wanted in all")] = 20,
    parallel: Annotated[
        int, typer.Option("--parallel", help="Trials at once (TPE suggests K at a time)")
    ] = 1,
    adapter: Annotated[str, typer.Option("--adapter", help="pooler, scalarmix or cls")] = "pooler",
    space: Annotated[
        str | None,
        typer.Option("--space", help="JSON or YAML file of search-space entries to override"),
    ] = None,
    startup_trials: Annotated[
        int, typer.Option("--startup-trials", help="Random trials before TPE takes over")
    ] = 5,
    seed: SeedOpt = 0,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Slice of TRAIN held out: the objective")
    ] = 0.1,
    val_seed: Annotated[
        int, typer.Option("--val-seed", help="Which slice; the same for every trial")
    ] = 0,
    device: DeviceOpt = "",
    overwrite: OverwriteOpt = False,
) -> None:
    """Tune an adapter with hyperopt's TPE on held-out TRAIN; dev is only reported. Resumable.

    Example: bertvision sweep --task rte --embeddings emb --out sweeps/rte --trials 20
    """
    from bertvision.sweep import SweepConfig, load_space, run_sweep

    cfg = SweepConfig(
        task=task,
        embeddings=embeddings,
        out=out,
        trials=trials,
        parallel=parallel,
        adapter=adapter,
        space=load_space(space) if space else {},
        startup_trials=startup_trials,
        seed=seed,
        val_fraction=val_fraction,
        val_seed=val_seed,
        device=device,
        overwrite=overwrite,
    )
    summary = run_sweep(cfg)
    typer.echo(
        f"{summary.done_before + summary.ran} of {summary.trials} trials finished "
        f"({summary.ran} now, {summary.done_before} before, {summary.failed} failed); "
        f"every trial: {out.rstrip('/')}/trials.jsonl"
    )
    if summary.best is not None:
        best = summary.best
        typer.echo(
            f"best trial {best.trial}: val {json.dumps(best.val)} dev {json.dumps(best.dev)} "
            f"params {json.dumps(best.params)}"
        )


@app.command()
@user_errors
def ensemble(
    task: TaskOpt,
    runs: Annotated[str, typer.Option("--runs", help="A sweep folder (bertvision sweep --out)")],
    out: Annotated[str, typer.Option("--out", help="Ensemble folder URL")],
    top_k: Annotated[
        int, typer.Option("--top-k", help="Members: the K best trials by validation metric")
    ] = 5,
    with_finetuned: Annotated[
        str | None,
        typer.Option("--with-finetuned", help="A fine-tuning run whose outputs join the average"),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Average the outputs of a sweep's best trials; write GLUE submissions and dev metrics.

    Example: bertvision ensemble --task rte --runs sweeps/rte --top-k 5 --out ens/rte
    """
    from bertvision.ensemble import EnsembleConfig, build_ensemble

    cfg = EnsembleConfig(
        task=task,
        runs=runs,
        out=out,
        top_k=top_k,
        with_finetuned=with_finetuned,
        overwrite=overwrite,
    )
    result = build_ensemble(cfg)
    for member in result["members"]:
        name = "fine-tuned" if member["trial"] is None else f"trial {member['trial']}"
        typer.echo(f"{name}: val {json.dumps(member['val'])} dev {json.dumps(member['dev'])}")
    typer.echo(f"ensemble: dev {json.dumps(result['ensemble'])}")


@app.command()
@user_errors
def report(
    url: Annotated[str, typer.Argument(help="Results URL holding runs, sweeps and ensembles")],
    out: Annotated[
        str, typer.Option("--out", help="Where report.md and report.png go; default: URL")
    ] = "",
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            help='JSON {"source": ..., "dev": {task: {metric: value}}} of published numbers',
        ),
    ] = None,
) -> None:
    """Markdown table and PNG plot of each task's dev metric per run kind.

    Example: bertvision report runs/ --out reports/
    """
    from bertvision.report import ReportConfig, write_report

    result = write_report(ReportConfig(results=url, out=out, reference=reference))
    typer.echo(result["text"])
    typer.echo(f"wrote {result['markdown']} and {result['plot']}")


@app.command()
@user_errors
def status(
    url: Annotated[str, typer.Argument(help="An extraction output URL")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Examples and shards (total, done, failed, missing) of each task/split under URL."""
    from bertvision.shards import status as shard_status

    result = shard_status(url)
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    if not result:
        typer.echo(f"no extractions under {url}")
    for name, s in result.items():
        typer.echo(
            f"{name}: {s['examples']} examples, {s['shards']} shards: {s['done']} done, "
            f"{s['failed']} failed, {s['missing']} missing"
        )
        if s["strays"]:
            typer.echo(f"  {len(s['strays'])} stray files, not read: {', '.join(s['strays'])}")
        if s["leftovers"]:
            typer.echo(
                f"  {len(s['leftovers'])} staging files (a running or killed writer's; the next "
                f"extract removes stale ones): {', '.join(s['leftovers'])}"
            )


@app.command()
@user_errors
def run(
    task: Annotated[
        str, typer.Option("--task", help="GLUE task(s), comma-separated: rte or rte,mrpc")
    ],
    data_dir: DataDirOpt = None,
    out: Annotated[str, typer.Option("--out", help="Output URL of every stage")] = "runs/pipeline",
    model: ModelOpt = "",
    epochs: Annotated[
        float, typer.Option("--epochs", help="Of fine-tuning; a fraction is quick on a CPU")
    ] = 0.2,
    max_seq_length: MaxLenOpt = 128,
    splits: Annotated[
        str, typer.Option("--splits", help="Extracted: train,dev (add test for GLUE submissions)")
    ] = "train,dev",
    shard_size: Annotated[int, typer.Option("--shard-size", help="Examples per shard")] = 500,
    adapter: Annotated[str, typer.Option("--adapter", help="pooler, scalarmix or cls")] = "pooler",
    adapter_epochs: Annotated[
        int, typer.Option("--adapter-epochs", help="Of the adapter and of each sweep trial")
    ] = 3,
    trials: Annotated[int, typer.Option("--trials", help="Hyperopt trials of the sweep")] = 2,
    top_k: Annotated[int, typer.Option("--top-k", help="Best trials in the ensemble")] = 2,
    seed: SeedOpt = 0,
    device: DeviceOpt = "",
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the whole pipeline in this process and print the dev metrics of each stage.

    Fine-tune -> extract -> train -> sweep -> ensemble, as the `pipeline` Prefect flow on
    Prefect's ephemeral API (or the server at PREFECT_API_URL, if set); a rerun redoes only what
    OUT lacks.

    Example: bertvision run --task rte --data-dir glue_data --out runs/rte
    """
    import os
    from contextlib import nullcontext

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline anyway
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.extract_glue import ShardsFailed
    from flows.pipeline import pipeline

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
            results = pipeline(
                tasks=_splits(task),
                out=out,
                data_dir=data_dir,
                model=model,
                finetune_epochs=epochs,
                max_seq_length=max_seq_length,
                splits=_splits(splits),
                shard_size=shard_size,
                adapter=adapter,
                adapter_epochs=adapter_epochs,
                trials=trials,
                sweep_space={"epochs": adapter_epochs},
                top_k=top_k,
                seed=seed,
                device=device,
                overwrite=overwrite,
            )
    except ShardsFailed as exc:
        typer.echo(f"error: {exc}; rerun to extract only those", err=True)
        raise typer.Exit(1) from None
    for name, stages in results.items():
        for stage, metrics in stages.items():
            values = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            typer.echo(f"{name} {stage} dev: {values}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="bertvision")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
