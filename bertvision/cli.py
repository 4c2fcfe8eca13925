"""The `bertvision` command: one command per core function, its options generated from the
stage's config dataclass (bertvision.config), so a field added there is an option here.

    bertvision train --task rte --embeddings emb --out runs/rte-pooler --lr 3e-4

Usage errors and bad input end with one line on stderr (`error: ...`) naming the option or file,
and exit code 2. The core command imports no Prefect; commands of other installed parts (the
orchestration's `run`) join through the `bertvision.commands` entry point group.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import itertools
import os
import signal
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from importlib.metadata import entry_points
from typing import Annotated, Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, NoSuchOption, UsageError
from typer.core import TyperGroup
from typer.exceptions import Abort

from bertvision import __version__, console
from bertvision.config import (
    ConfigError,
    EnsembleConfig,
    ExtractConfig,
    FinetuneConfig,
    ReportConfig,
    SweepConfig,
    TrainConfig,
    VerifyConfig,
)
from bertvision.finite import strict_json

INTERRUPTED = 128 + signal.SIGINT


class OneLineUsageErrors(TyperGroup):
    """Usage errors (a value an option cannot take, a missing option, an unknown command) end
    like every other bad input: one `error:` line on stderr and exit code 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            with console.terminated_as_exit():
                code = super().main(*args, standalone_mode=False, **kwargs)
        except console.Terminated:
            typer.echo(
                "\nterminated: what was committed is kept; the same command resumes", err=True
            )
            sys.exit(console.TERMINATED)
        except NoArgsIsHelpError as exc:  # a bare `bertvision`: the help, as usual
            exc.show()
            sys.exit(exc.exit_code)
        except UsageError as exc:
            typer.echo(f"error: {exc.format_message()}{_space_hint(exc)}", err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        if code == INTERRUPTED:  # Typer's exit code for KeyboardInterrupt (Ctrl-C)
            typer.echo(
                "\ninterrupted: what was committed is kept; the same command resumes", err=True
            )
        sys.exit(code if isinstance(code, int) else 0)


def _space_hint(error: UsageError) -> str:
    """Where `sweep --<training option>` goes instead: a sweep's training settings are entries of
    its search space (constants or distributions), not options of the command."""
    if not isinstance(error, NoSuchOption) or error.ctx is None:
        return ""
    name = error.option_name.lstrip("-").replace("-", "_")
    if error.ctx.command.name != "sweep" or name not in TrainConfig.__dataclass_fields__:
        return ""
    return f"; a sweep's training options are set in its space: --space '{{\"{name}\": VALUE}}'"


# Plain help, not Rich's: Rich's panels label every option with its type, flags too (`--json
# <bool>`, `--help <bool>`), as if they took a value.
app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Store all-layer hidden states once; train small adapters on them.",
)


@app.callback()
def _libraries(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the libraries' logs and warnings")
    ] = False,
) -> None:
    """Store all-layer hidden states once; train small adapters on them."""
    if not verbose:  # transformers' weight-loading tables and warnings, for this command only
        from bertvision.console import quiet_libraries

        ctx.with_resource(quiet_libraries())


# -- options from config fields ----------------------------------------------------------------


def flag(field: str) -> str:
    """The option of a config field: `lr` -> `--lr`, `finetune.epochs` ->
    `--finetune-epochs`."""
    return "--" + field.replace(".", "-").replace("_", "-")


def _param(field: str) -> str:
    return field.replace(".", "__")


def option_fields(config_class: type, prefix: str = "") -> Iterator[tuple[str, Any, Any, Any]]:
    """(dotted name, Field, type, default) of every option of `config_class`, nested configs
    flattened. A nested config's fields that its parent sets itself (fields of the same name, and
    the parent's LINKED names) are not options."""
    hints = typing.get_type_hints(config_class)
    own = {f.name for f in dataclasses.fields(config_class)}
    linked = set(getattr(config_class, "LINKED", ()))
    for f in dataclasses.fields(config_class):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):  # its defaults as declared: nothing built, no torch
            for name, sub, sub_kind, default in option_fields(kind, f"{prefix}{f.name}."):
                leaf = name.rsplit(".", 1)[-1]
                if leaf not in own and leaf not in linked:
                    yield name, sub, sub_kind, default
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        yield f"{prefix}{f.name}", f, kind, default


def _parameter(name: str, f: Any, kind: Any, default: Any) -> inspect.Parameter:
    help_text = f.metadata.get("help", "")
    as_text = f.metadata.get("parse") is not None or typing.get_origin(kind) in (list, dict)
    if as_text:
        if isinstance(default, list):
            default, help_text = ",".join(map(str, default)), f"{help_text} (comma-separated)"
        elif isinstance(default, dict):
            default = None
        kind = str | None
    if f.metadata.get("required"):
        default = ...
    decls = [f"{flag(name)}/--no-{flag(name)[2:]}"] if kind is bool else [flag(name)]
    shown = default not in ("", None, ...)
    if f.metadata.get("argument"):
        info = typer.Argument(help=help_text, show_default=shown)
    else:
        info = typer.Option(*decls, help=help_text, show_default=shown)
    return inspect.Parameter(
        _param(name),
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if default is ... else default,
        annotation=Annotated[kind, info],
    )


def _value(f: Any, kind: Any, text: Any) -> Any:
    """The command line's value of field `f` as the config takes it."""
    parse = f.metadata.get("parse")
    if parse is not None:
        return f.default_factory() if text is None else parse(text)
    if typing.get_origin(kind) is list:
        return [part.strip() for part in (text or "").split(",") if part.strip()]
    return text


def build_config(config_class: type, values: dict[str, Any], prefix: str = "") -> Any:
    """The config from the command's option values (by parameter name); nested configs start
    from their default (the parent's template) with the options given applied."""
    hints = typing.get_type_hints(config_class)
    kwargs = {}
    for f in dataclasses.fields(config_class):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            template = f.default_factory()
            given = (
                build_config(type(template), values, f"{name}.").__dict__
                if any(key.startswith(_param(f"{name}.")) for key in values)
                else {}
            )
            kwargs[f.name] = dataclasses.replace(
                template, **{k: v for k, v in given.items() if _param(f"{name}.{k}") in values}
            )
        elif _param(name) in values:
            if f.metadata.get("required") and values[_param(name)] == "":
                raise ConfigError(name, "must not be empty")  # given, as required, but empty
            try:
                kwargs[f.name] = _value(f, hints[f.name], values[_param(name)])
            except ConfigError as exc:  # a value the option's parser refused
                raise ConfigError(f"{prefix}{exc.field}", exc.message) from None
    try:
        return config_class(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc.field}", exc.message) from None


def config_command(
    config_class: type, name: str | None = None, on: typer.Typer | None = None
) -> Callable:
    """Register `body(cfg)` as command `name` of `on` (default: `app`) with one option per field
    of `config_class`."""

    def register(body: Callable[[Any], None]) -> Callable[[Any], None]:
        options = list(option_fields(config_class))
        params = [_parameter(*option) for option in options]
        params.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # required first
        arguments = frozenset(name for name, f, _, _ in options if f.metadata.get("argument"))

        def command(**values: Any) -> None:
            body(build_config(config_class, values))

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        command_name = name or body.__name__.replace("_", "-")
        (on or app).command(command_name)(user_errors(command, arguments))
        return body

    return register


# -- errors ------------------------------------------------------------------------------------


def user_errors(command: Callable, arguments: frozenset[str] = frozenset()) -> Callable:
    """Bad input becomes one line, `error: ...`, and exit code 2, not a traceback.

    A ConfigError names its field as the command line spells it: `--lr`, or `RESULTS` for a
    field in `arguments` (positional arguments).

    Bad input is what the core raises for it: ValueError (ConfigError naming the option,
    DataError, ModelError, ShardError, StorageError, FileFormatError, each naming the file) and
    OSError (a path that is missing, unreadable, a file where a folder should be, a full disk,
    storage that stayed unreachable), and FolderBusy (another process writes the same folder).
    Anything else is a bug and keeps its traceback.
    """
    from bertvision.runs import FolderBusy

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            name = exc.field.upper() if exc.field in arguments else flag(exc.field)
            typer.echo(f"error: {name} {exc.message}", err=True)
            raise typer.Exit(2) from None
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


# -- the commands ------------------------------------------------------------------------------


@contextmanager
def noting_if_stored(out: str) -> Iterator[None]:
    """Say on stderr when the command found its result already finished at `out` with the same
    settings and inputs (the same commit record before and after) and so redid nothing."""
    from bertvision import runs

    before = runs.commit_record(out)
    yield
    if before is not None and runs.commit_record(out) == before:
        typer.echo(
            f"{out}: finished before with the same settings and inputs; returned as stored",
            err=True,
        )


@config_command(FinetuneConfig)
def finetune(cfg: FinetuneConfig) -> None:
    """Fine-tune an encoder briefly on a task; write the checkpoint and its dev metrics.

    A finished run with the same settings and inputs is returned as stored.

    Example: bertvision finetune --task rte --data-dir glue_data --epochs 0.2 --out ckpt
    """
    from bertvision.finetune import finetune_encoder

    with noting_if_stored(cfg.out):
        metrics = finetune_encoder(cfg)
    shown = {k: metrics[k] for k in ("val", "dev", "train")}
    typer.echo(strict_json(shown, sort_keys=True))


@config_command(ExtractConfig)
def extract(cfg: ExtractConfig) -> None:
    """Store the hidden states of every layer for every example as Parquet shards.

    Example: bertvision extract --task rte --data-dir glue_data --splits train,dev --out emb
    """
    from bertvision.extract import extract_hidden_states

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


@config_command(TrainConfig)
def train(cfg: TrainConfig) -> None:
    """Train an adapter on stored embeddings; select on held-out TRAIN, report dev metrics.

    Example: bertvision train --task rte --embeddings emb --out runs/rte-pooler --seed 1
    """
    from bertvision.train import train_adapter

    with noting_if_stored(cfg.out):
        metrics = train_adapter(cfg)
    typer.echo(strict_json(metrics, sort_keys=True))


@config_command(SweepConfig)
def sweep(cfg: SweepConfig) -> None:
    """Tune an adapter with hyperopt's TPE on held-out TRAIN; dev is only reported. Resumable.

    Example: bertvision sweep --task rte --embeddings emb --out sweeps/rte --trials 20
    """
    from bertvision.sweep import run_sweep

    summary = run_sweep(cfg)
    out = cfg.out
    typer.echo(
        f"{summary.done_before + summary.ran} of {summary.trials} trials finished "
        f"({summary.ran} now, {summary.done_before} before, {summary.failed} failed); "
        f"every trial: {out.rstrip('/')}/trials.jsonl"
    )
    if summary.best is not None:
        best = summary.best
        typer.echo(
            f"best trial {best.trial}: val {strict_json(best.val)} dev {strict_json(best.dev)} "
            f"params {strict_json(best.params)}"
        )


@config_command(EnsembleConfig)
def ensemble(cfg: EnsembleConfig) -> None:
    """Average the outputs of a sweep's best trials; write predictions (GLUE submissions;
    SQuAD 2.0: the official JSON, no-answer threshold chosen on held-out TRAIN) and dev metrics.

    Prints each member's val (held-out TRAIN) and dev metrics, then the ensemble's: its val is
    scored from the members' mean held-out outputs, to compare it with its trials without a dev
    label; absent when a member has no held-out outputs (outputs/val.parquet).

    Example: bertvision ensemble --task rte --runs sweeps/rte --top-k 5 --out ens/rte
    """
    from bertvision.ensemble import build_ensemble, lacking_outputs

    with noting_if_stored(cfg.out):
        result = build_ensemble(cfg)
    for member in result["members"]:
        name = "fine-tuned" if member["trial"] is None else f"trial {member['trial']}"
        typer.echo(f"{name}: val {strict_json(member['val'])} dev {strict_json(member['dev'])}")
    if "val" in result:
        val = f"val {strict_json(result['val'])}"
    else:
        lacking = lacking_outputs([m["run"] for m in result["members"]], "val")
        why = f"{lacking[0]} has no held-out outputs" if lacking else "no held-out outputs"
        val = f"val absent ({why}, outputs/val.parquet)"
    typer.echo(f"ensemble: {val} dev {strict_json(result['ensemble'])}")


@config_command(ReportConfig)
def report(cfg: ReportConfig) -> None:
    """Markdown table and PNG plot of each task's dev metric per run kind.

    Example: bertvision report runs/ --out reports/
    """
    from bertvision.report import write_report

    result = write_report(cfg)
    typer.echo(result["text"])
    typer.echo(f"wrote {result['markdown']} and {result['plot']}")


@app.command()
@user_errors
def status(
    url: Annotated[str, typer.Argument(help="An extraction output URL")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Examples (a span task's windows) and shards (total, done, failed, missing) of each
    task/split under URL.

    A URL that does not exist or holds no extraction is an error (exit code 2)."""
    from bertvision import storage
    from bertvision.shards import ShardError, pipeline_hint
    from bertvision.shards import status as shard_status

    if not storage.exists(url):
        raise ShardError(f"{url} does not exist")
    result = shard_status(url)
    if not result:
        raise ShardError(
            f"{url} holds no extraction (no TASK/SPLIT/_manifest/plan.json under it)"
            + pipeline_hint(url)
        )
    if as_json:
        typer.echo(strict_json(result, indent=2, sort_keys=True))
        return
    for name, s in result.items():
        typer.echo(
            f"{name}: {s['examples']} {s['rows']} ({s['dtype']}, format {s['format_version']}), "
            f"{s['shards']} shards: {s['done']} done, {s['failed']} failed, {s['missing']} missing"
        )
        if s["strays"]:
            typer.echo(
                f"  {len(s['strays'])} stray files, not counted (not committed, or a garbled or "
                f"foreign record): {', '.join(s['strays'])}"
            )
        for kind in ("failed", "missing"):
            if s[f"{kind}_shards"]:
                typer.echo(f"  {kind}: shards {shard_ranges(s[f'{kind}_shards'])}")
        if s["leftovers"]:
            typer.echo(
                f"  {len(s['leftovers'])} staging files (a running or killed writer's; the next "
                f"extract removes stale ones): {', '.join(s['leftovers'])}"
            )


def shard_ranges(indices: list[int]) -> str:
    """Sorted shard indices as runs: [0, 1, 2, 5] -> "0-2, 5"."""
    runs = []
    for _, run in itertools.groupby(enumerate(indices), key=lambda pair: pair[1] - pair[0]):
        numbers = [index for _, index in run]
        runs.append(f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0]))
    return ", ".join(runs)


@config_command(VerifyConfig)
def verify(cfg: VerifyConfig) -> None:
    """Read every committed shard under OUT in full: its sha256 and size against its commit
    record, page checksums, row count, row ids and extraction key. Prints a table per split.

    Exit code 0: every committed shard is as committed; 1: some are bad (each named, with why;
    with --redo they are uncommitted, so the next extract redoes exactly those); 2: bad input,
    such as OUT holding no extraction. Deciding what is done (status, extract) never reads
    shards; this is the check that does.

    Example: bertvision verify emb --task rte --redo
    """
    from bertvision.shards import verify as verify_extraction

    checks = verify_extraction(cfg)
    typer.echo(_verify_table(checks))
    if not all(check.ok for check in checks.values()):
        raise typer.Exit(1)


def _verify_table(checks: dict) -> str:
    """One row per split (shards, checked, bad, pending, MB read, seconds), each bad shard
    under its split's row with why."""
    header = ("split", "shards", "checked", "bad", "pending", "MB read", "seconds")
    rows = [
        (
            name,
            c.shards,
            c.checked,
            len(c.bad),
            c.pending,
            f"{c.bytes_read / 1e6:.1f}",
            f"{c.seconds:.1f}",
        )
        for name, c in checks.items()
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row, check in zip([header, *rows], [None, *checks.values()], strict=True):
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(v).rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        for index, why in (check.bad if check else {}).items():
            done = "; uncommitted, the next extract redoes it" if index in check.redone else ""
            lines.append(f"  bad shard {index}: {why}{done}")
    return "\n".join(lines)


@app.command("evaluate-squad")
@user_errors
def evaluate_squad(
    gold: Annotated[str, typer.Argument(help="A SQuAD 2.0 data file (dev-v2.0.json)")],
    predictions: Annotated[
        str, typer.Argument(help='Predictions: a JSON object {question_id: answer text or ""}')
    ],
) -> None:
    """The official SQuAD 2.0 scores (exact, f1, HasAns_*, NoAns_*; percent) of a prediction
    file, as JSON. Every question of GOLD needs a prediction, and no other id may appear.

    Example: bertvision evaluate-squad data/squad/dev-v2.0.json runs/squad/dev_predictions.json
    """
    from bertvision.squad import evaluate_files

    typer.echo(strict_json(evaluate_files(gold, predictions), indent=2))


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def _add_installed_commands() -> None:
    """Commands of other installed parts: entry points `bertvision.commands`, each a function
    that adds its commands to `app` (the orchestration adds `run`)."""
    for entry in entry_points(group="bertvision.commands"):
        entry.load()(app)


_add_installed_commands()


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="bertvision")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
