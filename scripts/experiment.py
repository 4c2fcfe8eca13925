"""The experiment of issue 12: BERTVision's whole method against full fine-tuning, on GLUE.

For each task and seed, starting from one pretrained encoder (default: the bundled
all-MiniLM-L6-v2):

    finetune-E        fine-tune E epochs, E in --finetune-epochs (0.25, 0.5, 1, 3): one run per
                      learning rate of --finetune-lrs (5e-5, 1e-4, 2e-4), the one best on the
                      held-out slice of TRAIN is finetune-E's result (ties: the first in the grid)
    extract@E         all-layer train+dev embeddings of the chosen finetune-E checkpoint, for E
                      in --extract-from (0, 0.25 and 0.5; 0: the pretrained encoder itself, not
                      fine-tuned, so adapters on it are charged no fine-tuning)
    load@E            loading them once for every adapter below
    pooler@E, scalarmix@E, cls@E   the single adapters on them (bertvision.train)
    pooler@chosen     (--sweep-adapter, with more than one --extract-from) the single adapter on
                      the checkpoint where it is best on held-out TRAIN (ties: the earliest),
                      charged for every candidate checkpoint: its grid, extraction, loading and
                      adapter. Whether held-out TRAIN can choose the checkpoint for the method
    sweep-best@M      the hyperopt sweep (--trials trials, bertvision.sweep) of --sweep-adapter
                      on the embeddings of the method's checkpoint M (--method-from, 0.5): the
                      trial best on held-out TRAIN
    ensemble@M        the mean output of the sweep's --top-k best trials (bertvision.ensemble)
    ensemble+ft@M     ... with the chosen finetune-M model as one more member (M > 0)
    method@M          BERTVision's result: of ensemble@M and ensemble+ft@M, the one better on
                      held-out TRAIN (each scored on its members' mean held-out outputs; a tie
                      takes ensemble+ft), charged for the sweep and both ensembles
    ...@chosen        with --method-from chosen, M is the checkpoint pooler@chosen picked, per
                      seed: the rows above as `sweep-best@chosen`, `method@chosen` and so on,
                      charged also for the choice (every candidate's single adapter, the other
                      candidates' grids, extractions and loading)
    curve-P%@M        the best trial's settings trained on P% of TRAIN (10, 25, 50, 100; the
                      held-out slice aside; TrainConfig.train_fraction, nested subsets)

Every choice (learning rates, adapter epochs, trials, ensemble members) reads the held-out slice
of TRAIN only; dev labels are read to report, never to choose (tests/test_train.py flips them and
gets the same choices). Each record holds the dev metrics; the summary gives mean ± sample std
over seeds and, per seed, the paired difference from --reference (finetune-3: full fine-tuning).

Cost, measured with time.perf_counter around every stage (`stage_s`; on CUDA the stage holds the
one device throughout, so `device_s` = `stage_s` there) and with time.process_time, the CPU
seconds of all the process's threads (`stage_cpu_s`, and `pipeline_cpu_s`, `amortised_cpu_s`
alike: on a shared CPU machine the steadier guide):

    pipeline_s   the cost of the result from the pretrained encoder: finetune-E its whole
                 learning-rate grid (the budget of choice); an adapter result the grid of its
                 checkpoint + its extraction + loading + its own stage (the sweep's results and
                 the curves: + the whole sweep; ensembles: + their own stage)
    amortised_s  the same with the grid, extraction and loading shared by the N adapter
                 trainings that read that extraction in this run (3 single adapters, and on
                 the method's checkpoint the sweep's trials and the 4 curve points too)

One command reproduces the table and the plot (no Prefect; torch, transformers, pyarrow, fsspec,
numpy, scipy, hyperopt, matplotlib):

    python scripts/experiment.py --data-dir ../shared/data/glue --device cuda \\
        --tasks cola,sst2,mrpc,stsb,rte,wnli --seeds 5 --out experiment

and writes OUT/results.json (every record, the choices and the summary), OUT/results.md (the
tables) and OUT/results.png (dev metric against pipeline seconds, one point per method, per
task); the first two again after every finished seed, so a killed run still reports the seeds
it finished. Seeds run one at a time over all tasks. Each finished stage leaves
OUT/<key>/records/<task>/seed-<n>/<stage>.json, so rerunning the same command after an
interruption continues where it stopped. The key (results.json's
"keys", one per task) hashes the settings, the encoder's weights and tokenizer and the task's
examples, not their paths: other settings, weights or data get another key, a copy of the same
ones elsewhere the same. --records-from an earlier results.json takes its finished seeds where
its key and device are this run's: a run continued on another machine (a GPU lent for minutes at
a time) from the results it sent back (a stopped seed runs again: its checkpoints stayed there).
--max-train-examples N runs on the first N training examples (and N test rows, never scored) for
quick checks, or on N drawn at random with --train-sample random (GLUE's files are not shuffled:
the first N of STS-B are one genre); dev is always whole.

Every fine-tuning, the reference included, runs at batch --finetune-batch-size (16) over the same
lr grid: the recipe that scripts/finetune_recipe.py chose on held-out TRAIN for the brief runs
(docs/experiment.md, "Brief fine-tuning recipe").
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np

from bertvision import __version__, config, families, glue, runs, storage
from bertvision import encoder as enc
from bertvision.config import (
    ConfigError,
    EnsembleConfig,
    ExtractConfig,
    FinetuneConfig,
    SweepConfig,
)
from bertvision.console import TERMINATED, Terminated, quiet_libraries, terminated_as_exit
from bertvision.embeddings import load_embeddings
from bertvision.ensemble import build_ensemble
from bertvision.extract import extract_hidden_states
from bertvision.finetune import finetune_encoder
from bertvision.finite import strict_loads
from bertvision.records import code_info
from bertvision.sweep import TrialSpec, run_sweep, trial_train_config
from bertvision.train import TrainConfig, train_adapter

ADAPTERS = ("pooler", "scalarmix", "cls")
CURVE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
# The two clocks every cost is kept in: "" wall seconds (perf_counter), "_cpu" the process's CPU
# seconds over all its threads (process_time), which a busy shared machine inflates far less.
CLOCKS = ("", "_cpu")
CPU_COST = ("_cpu", "pipeline CPU seconds")
CHOSEN = "chosen"  # --method-from: the checkpoint chosen on held-out TRAIN
StageConfig = TypeVar("StageConfig")  # check_settings: the config class it builds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrors(
        prog="experiment.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", help="a glue_data folder (None: the Hugging Face hub)")
    parser.add_argument("--model", default="", help="encoder (empty: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte,wnli", help="GLUE tasks")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--out", type=folder, default="experiment", help="results folder")
    parser.add_argument("--device", default="", help="cpu, cuda (empty: cuda if available)")
    parser.add_argument(
        "--max-train-examples",
        type=int,
        default=None,
        help="use N training examples (the first N, or drawn with --train-sample random); dev "
        "stays whole: for quick or subset runs",
    )
    parser.add_argument(
        "--train-sample",
        choices=("first", "random"),
        default="first",
        help="which N of --max-train-examples: the file's first N rows, or N drawn at random "
        "(seed 0, the same for every seed; kept in file order). GLUE's files are not shuffled: "
        "STS-B's first 1,000 pairs are all of one genre",
    )
    parser.add_argument("--finetune-epochs", default="0.25,0.5,1,3", help="fine-tunings compared")
    parser.add_argument("--finetune-lrs", default="5e-5,1e-4,2e-4", help="each one's lr grid")
    parser.add_argument("--finetune-batch-size", type=int, default=16, help="examples a step")
    parser.add_argument("--max-seq-length", type=int, default=128, help="tokens")
    parser.add_argument("--val-fraction", type=finite_number, default=0.1, help="held out of TRAIN")
    parser.add_argument(
        "--extract-from",
        default="0,0.25,0.5",
        help="checkpoints with adapters (0: the pretrained encoder, not fine-tuned)",
    )
    parser.add_argument(
        "--method-from",
        default="0.5",
        help=f"the method's checkpoint: one of --extract-from, or {CHOSEN}: the one where the "
        "single --sweep-adapter adapter is best on held-out TRAIN",
    )
    parser.add_argument("--adapter-epochs", type=int, default=20, help="single adapters, at most")
    parser.add_argument("--adapter-lr", type=finite_number, default=1e-3, help="single adapters")
    parser.add_argument("--adapter-dim", type=int, default=64, help="single adapters")
    parser.add_argument("--sweep-adapter", default="pooler", help="the adapter swept")
    parser.add_argument("--trials", type=int, default=20, help="of the sweep")
    parser.add_argument(
        "--space",
        default="",
        help="the sweep space's overrides: JSON, or a JSON file (as bertvision sweep --space)",
    )
    parser.add_argument("--top-k", type=int, default=5, help="sweep trials in the ensembles")
    parser.add_argument(
        "--reference", default="finetune-3", help="the method the paired differences are from"
    )
    parser.add_argument(
        "--keep-embeddings", action="store_true", help="keep each seed's embeddings (large)"
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every fine-tuned checkpoint (by default only those extracted from are kept)",
    )
    parser.add_argument(
        "--stop-after",
        type=finite_number,
        default=None,
        help="seconds: start no stage after them; the seeds finished by then are reported "
        "(seeds run one at a time over all tasks; the rest continues when the command is run "
        "again)",
    )
    parser.add_argument(
        "--records-from",
        default="",
        help="an earlier run's results.json: its finished seeds are taken, not run, where its "
        "settings, encoder, data and device are this run's (a run continued on another machine)",
    )
    args = parser.parse_args(argv)
    try:
        args.tasks = [glue.get_task(t).name for t in args.tasks.split(",") if t.strip()]
    except ValueError as exc:  # a name that is no GLUE task
        parser.error(f"--tasks: {exc}")
    if not args.tasks:
        parser.error("--tasks names no task")
    args.finetune_epochs = numbers(parser, "--finetune-epochs", args.finetune_epochs)
    args.finetune_lrs = numbers(parser, "--finetune-lrs", args.finetune_lrs)
    args.extract_from = numbers(parser, "--extract-from", args.extract_from, zero=True)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.max_train_examples is not None and args.max_train_examples < 1:
        parser.error(f"--max-train-examples must be >= 1, got {args.max_train_examples}")
    if args.max_train_examples and args.data_dir is None:
        parser.error("--max-train-examples needs --data-dir (a glue_data folder)")
    if args.train_sample == "random" and not args.max_train_examples:
        parser.error("--train-sample random needs --max-train-examples (how many to draw)")
    if missing := sorted(set(args.extract_from) - {0.0, *args.finetune_epochs}):
        parser.error(
            f"--extract-from {listed(missing)}: not among --finetune-epochs "
            f"{listed(args.finetune_epochs)} (or 0, the pretrained encoder)"
        )
    args.method_from = method_checkpoint(parser, args.method_from, args.extract_from)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    if args.top_k > args.trials:
        parser.error(f"--top-k {args.top_k} is more than --trials {args.trials}")
    if args.reference not in methods(args):
        parser.error(f"--reference {args.reference} is none of the methods: {methods(args)}")
    args.space = space(parser, args.space)
    if args.records_from:
        try:
            earlier_results(args.records_from)
        except (FileNotFoundError, storage.FileFormatError) as exc:
            parser.error(f"--records-from: {exc}")
    try:
        args.model = args.model or enc.default_model()
    except enc.ModelError as exc:
        parser.error(one_line(str(exc)))
    args.device = args.device or enc.default_device()
    check_stage_settings(parser, args)
    return args


class OneLineErrors(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `PROG: error: ...`, exit status 2, as
    the script's other refusals and every bertvision command's (the usage is --help's)."""

    def error(self, message: str) -> NoReturn:
        refuse(message, self.prog)


def folder(text: str) -> str:
    """An argparse `type`: a folder to write, not an empty string (Path("") is the current
    folder, where the whole experiment would land)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}")
    return text


def run_as_command(main: Callable[[list[str]], object]) -> None:
    """Run a script's `main` on the command line's arguments. Ctrl-C (exit status 130) and
    SIGTERM (143) end in one line, as in every bertvision command, having let go of OUT; the
    stages finished are kept."""
    with quiet_libraries():
        try:
            with terminated_as_exit():
                main(sys.argv[1:])
        except (KeyboardInterrupt, Terminated) as stop:
            how = "terminated" if isinstance(stop, Terminated) else "interrupted"
            print(
                f"\n{how}: the stages finished are kept; the same command resumes",
                file=sys.stderr,
            )
            raise SystemExit(TERMINATED if isinstance(stop, Terminated) else 130) from None


def finite_number(text: str) -> float:
    """An argparse `type`: a finite number. NaN and infinity are refused: a time limit of NaN
    never stops a run, and neither can be written to results.json."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def check_settings(
    parser: argparse.ArgumentParser,
    options: dict[str, str],
    config: Callable[..., StageConfig],
    **settings: object,
) -> StageConfig:
    """Build a stage's `config` (a config class) from `settings` once, while parsing, so that a
    value it refuses is the parser's error now, not a traceback after earlier stages' work.
    `options`: the option each field comes from (others: --<field>). Returns the config."""
    try:
        return config(**settings)
    except ConfigError as exc:
        option = options.get(exc.field, "--" + exc.field.replace("_", "-"))
        parser.error(f"{option} {exc.message}")


def check_stage_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The settings of every stage checked as each stage's config will (the parser's error)."""
    task, check = args.tasks[0], partial(check_settings, parser)
    common = {"task": task, "val_fraction": args.val_fraction, "device": args.device}
    check(
        {
            "lr": "--finetune-lrs",
            "epochs": "--finetune-epochs",
            "batch_size": "--finetune-batch-size",
        },
        FinetuneConfig,
        **common,
        out="finetune",
        model=args.model,
        data_dir=args.data_dir,
        epochs=args.finetune_epochs[0],
        lr=args.finetune_lrs[0],
        batch_size=args.finetune_batch_size,
        max_seq_length=args.max_seq_length,
    )
    adapter = {"adapter_dim": "--adapter-dim", "lr": "--adapter-lr", "epochs": "--adapter-epochs"}
    check(
        {**adapter, "adapter": "--sweep-adapter"},  # the single adapters (ADAPTERS) fit GLUE
        TrainConfig,
        **common,
        embeddings="embeddings",
        out="adapter",
        adapter=args.sweep_adapter,
        adapter_dim=args.adapter_dim,
        lr=args.adapter_lr,
        epochs=args.adapter_epochs,
    )
    check(
        {},
        SweepConfig,
        **common,
        embeddings="embeddings",
        out="sweep",
        adapter=args.sweep_adapter,
        trials=args.trials,
        space=args.space,
    )
    check(
        {"top_k": "--top-k"},
        EnsembleConfig,
        task=task,
        runs="sweep",
        out="ensemble",
        top_k=args.top_k,
    )


def method_checkpoint(
    parser: argparse.ArgumentParser, text: str, extract_from: list[float]
) -> float | str:
    """--method-from: a checkpoint (epochs) of --extract-from, or CHOSEN among two or more."""
    if text == CHOSEN:
        if len(extract_from) < 2:
            parser.error(f"--method-from {CHOSEN} needs two or more checkpoints in --extract-from")
        return CHOSEN
    try:
        epochs = float(text)
    except ValueError:
        parser.error(f"--method-from must be a number of epochs or {CHOSEN}, got {text!r}")
    if epochs not in extract_from:
        parser.error(f"--method-from {epochs:g} is not in --extract-from")
    return epochs


def space(parser: argparse.ArgumentParser, text: str) -> dict:
    """--space: a JSON object, inline or in the file `text` names ({} for "")."""
    if not text:
        return {}
    try:
        value = strict_loads(Path(text).read_text() if Path(text).is_file() else text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        parser.error(f"--space must be a JSON object or a JSON file, got {text!r}: {exc}")
    if not isinstance(value, dict):
        parser.error(f"--space must be a JSON object, got {text!r}")
    return value


# A stage's name, which names its record's file: no folder, nothing hidden.
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.@%+_-]*")


def earlier_results(path: str) -> dict:
    """--records-from: the results.json of an earlier run, its records checked (`record_problem`).
    Raises FileNotFoundError, or storage.FileFormatError naming `path` and what is wrong."""
    results = storage.read_json(path, keys=("settings", "records", "device"))
    expected = {"settings": dict, "records": list, "device": str, "keys": dict}
    for key, kind in expected.items():
        if key in results and not isinstance(results[key], kind):
            got = type(results[key]).__name__
            raise storage.FileFormatError(
                f"{path} {key}: must be a JSON {kind.__name__}, got {got}"
            )
    for i, record in enumerate(results["records"]):
        problem = record_problem(record)
        if problem:
            raise storage.FileFormatError(f"{path} records[{i}]: {problem}")
    return results


def record_problem(record: object) -> str | None:
    """What makes `record` no stage record (None if nothing): a record has a str task, an int
    seed >= 0, a str method that is a stage's name (STAGE_NAME: it names the record's file), its
    seconds by both clocks (stage_s, stage_cpu_s), and dev and val metrics (objects of numbers
    or null) if any."""
    if not isinstance(record, dict):
        return f"must be a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("task"), str):
        return f"task must be a string, got {record.get('task')!r}"
    seed = record.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return f"seed must be an integer >= 0, got {seed!r}"
    method = record.get("method")
    if not isinstance(method, str) or not STAGE_NAME.fullmatch(method):
        return f"method must be a stage's name (letters, digits and .@%+_-), got {method!r}"
    for key in ("stage_s", "stage_cpu_s"):
        if not is_number(record.get(key)):
            return f"{key} must be a number, got {record.get(key)!r}"
    for key in ("dev", "val"):
        metrics = record.get(key, {})
        if not isinstance(metrics, dict) or not all(
            v is None or is_number(v) for v in metrics.values()
        ):
            return f"{key} must be an object of metrics (numbers or null), got {metrics!r}"
    return None


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def listed(values: list[float]) -> str:
    """`values` as an option takes them: 0.25,0.5"""
    return ",".join(f"{v:g}" for v in values)


def numbers(
    parser: argparse.ArgumentParser, option: str, text: str, zero: bool = False
) -> list[float]:
    """The comma-separated numbers of `option`, all positive (or with `zero`, >= 0)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{option} must be comma-separated numbers, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        parser.error(f"{option} must be finite numbers, got {text!r}")
    if not values or not all(v > 0 or (zero and v == 0) for v in values):
        kind = "numbers >= 0" if zero else "positive numbers"
        parser.error(f"{option} must be {kind}, got {text!r}")
    # stages and their folders name a value by its 6 significant digits (`:g`)
    named = [f"{v:g}" for v in values]
    twice = next((name for i, name in enumerate(named) if name in named[:i]), None)
    if twice is not None:
        parser.error(f"{option} names {twice} twice (to 6 significant digits)")
    return values


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    warm_up(args.device)
    global STOP_AT
    STOP_AT = None if args.stop_after is None else time.monotonic() + args.stop_after
    STAGES.clear()
    with tempfile.TemporaryDirectory() as staging, ExitStack() as writing:  # nothing written
        try:  # before the checks pass
            data_dirs = {
                task: sliced_data(args, task, Path(staging)) if args.max_train_examples else None
                for task in args.tasks
            }
            keys = {
                task: settings_key(args, task_data_fingerprint(task, d or args.data_dir))
                for task, d in data_dirs.items()
            }
            earlier = earlier_results(args.records_from) if args.records_from else None
        # no such data (the hub unreachable, a missing or malformed file), an encoder that
        # cannot be loaded, or --records-from changed since it was parsed
        except (glue.DataError, enc.ModelError, FileNotFoundError, storage.FileFormatError) as exc:
            refuse(str(exc))
        for task in args.tasks:
            if earlier is not None:
                check_records(earlier, args, task, keys[task])
        writing.enter_context(only_writer(out))
        if args.max_train_examples:
            shutil.copytree(Path(staging, "data"), out / "data", dirs_exist_ok=True)
        data_dirs = {t: str(out / "data") if d else args.data_dir for t, d in data_dirs.items()}
        if earlier is not None:
            for task in args.tasks:
                taken = take_records(earlier, task, out / keys[task])
                taken_from = f"stage records taken from {args.records_from}"
                print(f"{task}: {taken} {taken_from}", file=sys.stderr)
        results = {
            "settings": vars(args),
            "keys": keys,
            "stopped": None,
            "running": None,
            "code_version": __version__,
            "code": code_info(),
            "device": device_name(args.device),
            "summary": [],
            "choices": [],
            "records": [],
            "unfinished": [],  # the stopped seed's stages, reported, not taken elsewhere
        }
        try:
            run_seeds(args, keys, data_dirs, results)
        except storage.FileFormatError as exc:  # a garbled stage record: one line naming it
            refuse(str(exc))
        write_results(args, results)
    print(markdown(results))
    print(stages_line(args.out), file=sys.stderr)
    return results


@contextmanager
def only_writer(out: Path, prog: str = "experiment.py") -> Iterator[None]:
    """Hold OUT (made if absent) as its only writer while the experiment runs (runs.lease, which
    also removes what killed writes left): a second experiment into it stops in one line."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there or on its path, no permission
        refuse(f"--out {out}: cannot make the folder there ({exc.strerror})", prog)
    held = runs.Lease(str(out))
    try:
        held.acquire()
    except runs.FolderBusy as exc:
        refuse(str(exc), prog)
    try:
        yield
    finally:
        held.release()


def run_seeds(
    args: argparse.Namespace, keys: dict[str, str], data_dirs: dict[str, str | None], results: dict
) -> None:
    """Run every task's seeds into `results` (its records, choices, and where --stop-after
    stopped the run), the stages of each under OUT/<its key>, writing OUT/results.* after every
    seed. Seed by seed, so that a run stopped early has as many seeds of every task as it could.
    storage.FileFormatError for a garbled stage record."""
    out = Path(args.out)
    for seed in range(args.seeds):
        for task in args.tasks:
            keyed = out / keys[task]
            try:
                seed_records, seed_choices = run_seed(args, task, seed, data_dirs[task], keyed)
            except OutOfTime as stop:  # later seeds still count where their records all exist
                if not results["stopped"]:
                    results["stopped"] = f"{task} seed {seed}, before its stage {stop}"
                    done = sorted((keyed / "records" / task / f"seed-{seed}").glob("*.json"))
                    results["unfinished"] = [stage_record(path) for path in done]
                continue
            results["records"].extend(seed_records)
            results["choices"].append(seed_choices)
            if not results["stopped"]:  # a run killed later (a device lent for minutes) still
                # leaves its finished seeds; the plot waits for the end
                write_results(args, {**results, "running": f"{task} seed {seed}"}, plot=False)


def write_results(args: argparse.Namespace, results: dict, plot: bool = True) -> None:
    """OUT/results.md (and with `plot`, results.png), then OUT/results.json, of `results`, its
    summary made of its records so far."""
    from bertvision.plots import plot_cost_metric

    out = Path(args.out)
    results["summary"] = summarise(results["records"], methods(args), args.reference)
    files = {str(out / "results.md"): markdown(results).encode()}
    if plot:
        # on a CPU machine shared with other jobs wall-clock stretches with the load: plot CPU s
        clock, cost = ("", "pipeline seconds") if args.device.startswith("cuda") else CPU_COST
        figure = plot_cost_metric(
            plot_points(results["summary"], clock),
            title(results),
            cost,
            reference=args.reference,
            highlighted=("method@",),
        )
        files[str(out / "results.png")] = figure
    # last: the record of the run; on one line, as every seed's records make it large
    # (results.md is the view for reading). Together: a failure (a full disk) leaves each file
    # as it was, never a table cut short or one beside a record of another run
    record = storage.json_bytes(results, str(out / "results.json"), indent=None)
    storage.write_together({**files, str(out / "results.json"): record})


def methods(args: argparse.Namespace) -> list[str]:
    """The methods compared, in table order."""
    m = checkpoint_name(args.method_from)
    return [
        *(f"finetune-{e:g}" for e in args.finetune_epochs),
        *(f"{a}@{e:g}" for e in args.extract_from for a in ADAPTERS),
        *([f"{args.sweep_adapter}@chosen"] if len(args.extract_from) > 1 else []),
        f"sweep-best@{m}",
        f"ensemble@{m}",
        f"ensemble+ft@{m}",
        f"method@{m}",
        *(f"curve-{fraction:.0%}@{m}" for fraction in CURVE_FRACTIONS),
    ]


def checkpoint_name(method_from: float | str) -> str:
    """How tables name the method's checkpoint: its epochs, or CHOSEN."""
    return method_from if method_from == CHOSEN else f"{method_from:g}"


# Settings that do not change what a stage computes: where, which tasks and seeds, what is kept,
# how it is reported. The encoder and the data count by content (settings_key), not by path.
NOT_CONTENT = (
    *("out", "tasks", "seeds", "keep_embeddings", "keep_checkpoints", "device", "reference"),
    *("records_from", "stop_after"),
    "train_sample",  # which examples: in the key as the data's fingerprint
)


def settings_key(
    args: argparse.Namespace, data: str, not_content: tuple[str, ...] = NOT_CONTENT
) -> str:
    """The content key of what a stage's result depends on: the settings, the encoder by the
    fingerprint of its weights and tokenizer (encoder.fingerprint) and the data by `data`, the
    fingerprint of the examples read. Paths and file times are not in it, so a copy of the same
    encoder and data elsewhere (another machine, a reinstall) finds the same records, and other
    settings, weights or examples never take them. Runs and records live under the key."""
    content = content_settings(args, not_content)
    # the fingerprint of the weights (encoder.fingerprint), loaded where the run uses them
    content["encoder"] = enc.load_encoder(args.model, args.device).fingerprint
    content["data"] = data
    return config.content_key(content)


def content_settings(args: argparse.Namespace, not_content: tuple[str, ...] = NOT_CONTENT) -> dict:
    """The settings in the key by value: all but `not_content` and the encoder's and the data's
    paths (those count by content)."""
    return {k: v for k, v in vars(args).items() if k not in (*not_content, "model", "data_dir")}


def task_data_fingerprint(task: str, data_dir: str | None) -> str:
    """The fingerprint of the train and dev examples of `task` that its stages read."""
    family = families.get_task(task).family
    splits = ("train", *family.evaluated_splits(task, test=False))
    return config.content_key(
        {s: family.data_fingerprint(family.load_split(task, s, data_dir)) for s in splits}
    )


def check_records(earlier: dict, args: argparse.Namespace, task: str, key: str) -> None:
    """Refuse (exit status 2, one line saying which differs) `task`'s records in `earlier` (a
    results.json) unless they are of this run's `key` (settings, encoder and data) and measured
    on this run's device (their costs are compared with its own)."""
    if not any(r["task"] == task for r in earlier["records"]):
        return
    if earlier.get("keys", {}).get(task) != key:
        theirs, ours = earlier["settings"], vars(args)
        differ = [k for k in content_settings(args) if theirs.get(k) != ours[k]]
        shown = ", ".join(
            f"--{k.replace('_', '-')} {theirs.get(k)} there, {ours[k]} here" for k in differ
        )
        refuse(
            f"--records-from: its {task} records were made with "
            + (f"other settings ({shown})" if differ else "another encoder or other examples")
            + ": not taken"
        )
    if earlier["device"] != device_name(args.device):
        refuse(
            f"--records-from: its records were measured on {earlier['device']}, this run is on "
            f"{device_name(args.device)}: their costs would not compare; not taken"
        )


def take_records(earlier: dict, task: str, keyed: Path) -> int:
    """Write the stage records of `task`'s finished seeds in `earlier` (a results.json, passed
    by `check_records`) under `keyed`, where none is yet, so that this run takes them instead of
    running them; how many. A stopped seed's stages ("unfinished") are not taken: the
    checkpoints and embeddings its later stages read stayed on the machine that ran them."""
    derived = ("pipeline_s", "pipeline_cpu_s", "amortised_s", "amortised_cpu_s", "device_s")
    taken = 0
    for record in (r for r in earlier["records"] if r["task"] == task):
        if {"chosen_s", "chose", "chose_checkpoint"} & set(record):  # derived by a choice, not run
            continue
        path = keyed / "records" / task / f"seed-{record['seed']}" / f"{record['method']}.json"
        if not path.exists():
            storage.write_json(str(path), {k: v for k, v in record.items() if k not in derived})
            taken += 1
    return taken


def refuse(message: str, prog: str = "experiment.py") -> NoReturn:
    """Stop with one line on stderr and exit status 2, as a command-line error does."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def one_line(message: str) -> str:
    """`message` on one line (a library's message may quote a multi-line one)."""
    return " ".join(message.split())


def extracted(embeddings: Path, extract: Callable[[], object]) -> str:
    """The embeddings folder `embeddings`, extracted again by `extract` if it is gone though its
    extraction was recorded (removed once an earlier run was done with it, or records taken from
    another machine): the stage that needs them is charged that extraction."""
    if not embeddings.exists():
        extract()
    return str(embeddings)


@dataclass(frozen=True)
class SeedRun:
    """One task and seed of the experiment: its settings, where its runs and stage records live,
    and the fine-tuned run chosen for each number of epochs (0: the pretrained encoder)."""

    args: argparse.Namespace
    task: str
    seed: int
    data_dir: str | None
    runs: Path
    records_dir: Path
    chosen_runs: dict[float, Path]

    def stage(self, name: str, work: Callable[[], dict]) -> dict:
        return stage(self.records_dir, self.task, self.seed, name, work)

    def embeddings(self, epochs: float) -> Path:
        return self.runs / f"embeddings-{epochs:g}"

    def loaded(self, epochs: float, held: dict):
        """The embeddings of checkpoint `epochs`, loaded once into `held` (a stage that loaded
        them may have been recorded by an earlier run: then they are loaded here)."""
        if "data" not in held:
            held["data"] = self.load(epochs)
        return held["data"]

    def extract(self, epochs: float) -> dict:
        """Extract the train and dev embeddings of checkpoint `epochs` (all layers)."""
        finetuned = self.chosen_runs[epochs]
        cfg = ExtractConfig(
            task=self.task,
            out=str(self.embeddings(epochs)),
            model=str(finetuned),
            data_dir=self.data_dir,
            splits=["train", "dev"],
            max_seq_length=self.args.max_seq_length,
            batch_size=64,
            device=self.args.device,
        )
        summary = extract_hidden_states(cfg, progress=False)
        if not summary.ok:
            raise RuntimeError(f"extraction failed: {summary.failed}")
        splits = ("train", *glue.get_task(self.task).dev_splits)
        return {
            "checkpoint": finetuned.name,
            "examples": sum(len(glue.load_split(self.task, s, self.data_dir)) for s in splits),
        }

    def load(self, epochs: float):
        """The embeddings of checkpoint `epochs` (extracted again if gone: `extracted`)."""
        folder = extracted(self.embeddings(epochs), partial(self.extract, epochs))
        return load_embeddings(self.task, folder, device=self.args.device)

    def remove_embeddings(self) -> None:
        """Remove every checkpoint's embeddings, unless --keep-embeddings."""
        if not self.args.keep_embeddings:
            for folder in self.runs.glob("embeddings-*"):
                shutil.rmtree(folder)


def run_seed(
    args: argparse.Namespace, task: str, seed: int, data_dir: str | None, keyed: Path
) -> tuple[list[dict], dict]:
    """Every stage of one task and seed under `keyed`, the folder of its settings key (a stage
    whose record exists there is not run again); returns the records and the choices made (on
    held-out TRAIN only)."""
    runs = keyed / "runs" / task / f"seed-{seed}"
    records_dir = keyed / "records" / task / f"seed-{seed}"
    metric = glue.get_task(task).primary_metric
    records: list[dict] = []
    choices: dict = {"task": task, "seed": seed, "finetune_lr": {}}
    chosen_runs: dict[float, Path] = {0.0: Path(args.model)}  # 0 epochs: the pretrained encoder
    seed_run = SeedRun(args, task, seed, data_dir, runs, records_dir, chosen_runs)
    grid_s: dict[float, dict[str, float]] = {0.0: dict.fromkeys(CLOCKS, 0.0)}

    def finetune(epochs: float, lr: float) -> dict:
        cfg = FinetuneConfig(
            task=task,
            out=str(runs / f"finetune-{epochs:g}-lr{lr:g}"),
            model=args.model,
            data_dir=data_dir,
            epochs=epochs,
            lr=lr,
            batch_size=args.finetune_batch_size,
            max_seq_length=args.max_seq_length,
            val_fraction=args.val_fraction,
            seed=seed,
            device=args.device,
            predict_test=False,  # unscored, and the adapters here predict no test split either
        )
        metrics = finetune_encoder(cfg, progress=False)
        return {
            "epochs": epochs,
            "lr": lr,
            "val": metrics["val"],
            "dev": metrics["dev"],
            "train_s": metrics["train"]["seconds"],
            "train_examples": metrics["train"]["examples"],
        }

    for epochs in args.finetune_epochs:
        grid = [
            seed_run.stage(f"finetune-{epochs:g}-lr{lr:g}", partial(finetune, epochs, lr))
            for lr in args.finetune_lrs
        ]
        best = max(grid, key=lambda r: selectable(r["val"][metric]))  # ties: the first
        chosen_runs[epochs] = runs / f"finetune-{epochs:g}-lr{best['lr']:g}"
        grid_s[epochs] = {c: sum(r[f"stage{c}_s"] for r in grid) for c in CLOCKS}
        choices["finetune_lr"][f"{epochs:g}"] = best["lr"]
        records += [*grid, selected(best, f"finetune-{epochs:g}", grid_s[epochs])]
        if not args.keep_checkpoints:  # ~90 MB each (MiniLM), 12 a task and seed by default
            kept = chosen_runs[epochs] if epochs in args.extract_from else None
            for record in grid:
                folder = runs / f"finetune-{epochs:g}-lr{record['lr']:g}"
                if folder != kept:
                    shutil.rmtree(folder, ignore_errors=True)

    chosen_mode = args.method_from == CHOSEN
    by_checkpoint: dict[float, list[dict]] = {}
    for epochs in args.extract_from:
        method_here = not chosen_mode and epochs == args.method_from
        by_checkpoint[epochs], stage_choices = checkpoint_stages(seed_run, epochs, method_here)
        choices.update(stage_choices)
        if not chosen_mode:  # a chosen method's checkpoint is known only once all are done
            seed_run.remove_embeddings()
    method_from = args.method_from
    if chosen_mode:
        singles = [r for stages in by_checkpoint.values() for r in stages]
        best, _ = best_checkpoint(singles, args.sweep_adapter, args.extract_from, metric)
        method_from = args.extract_from[best]
        stages, stage_choices = method_stages(seed_run, method_from, held={})
        by_checkpoint[method_from] += stages
        choices.update(stage_choices)
        seed_run.remove_embeddings()
    for epochs, stage_records in by_checkpoint.items():
        charge(stage_records, grid_s[epochs])
        records += stage_records
    method = method_result(by_checkpoint[method_from], f"{method_from:g}", metric)
    records.append(method)
    choices["method"] = method["chose"]
    choices["method_held_out"] = method.pop("candidates")
    if len(args.extract_from) > 1:
        chosen = chosen_checkpoint(records, args.sweep_adapter, args.extract_from, metric)
        records.append(chosen)
        choices["checkpoint"] = chosen["chose"]
        choices["checkpoint_held_out"] = chosen.pop("candidates")
        if chosen_mode:
            picked = next(r for r in records if r["method"] == chosen["chose"])
            records += charged_the_choice([*stages, method], chosen, picked)
    for record in records:
        if args.device.startswith("cuda"):
            record["device_s"] = record["stage_s"]
    return records, choices


def charge(stage_records: list[dict], grid_s: dict[str, float]) -> None:
    """Set the pipeline and amortised costs of the adapter results among one checkpoint's
    `stage_records` (its extraction, loading, then the adapters): its fine-tuning grid (`grid_s`,
    by clock) + extraction + loading + the stage's own; ensembles and curves also the sweep;
    amortised: grid, extraction and loading shared by the adapter trainings that read them."""
    extract, load, *adapters = stage_records
    trainings = sum(r["trainings"] for r in adapters)
    for c in CLOCKS:
        base = grid_s[c] + extract[f"stage{c}_s"] + load[f"stage{c}_s"]
        sweep_s = sum(r[f"stage{c}_s"] for r in adapters if r["method"].startswith("sweep"))
        for record in adapters:
            extra = sweep_s if record["method"].startswith(("ensemble", "curve")) else 0.0
            own = record[f"stage{c}_s"]
            record[f"pipeline{c}_s"] = round(base + extra + own, 3)
            record[f"amortised{c}_s"] = round(base / trainings + extra + own, 3)


def charged_the_choice(records: list[dict], chosen: dict, picked: dict) -> list[dict]:
    """The method's results on the checkpoint that `chosen` (`<adapter>@chosen`) picked
    (`records`: their sweep, ensembles, curve and method records; `picked`: the single adapter
    there) as `<name>@chosen`, each also charged for the choice: every candidate's single
    adapter, and the other candidate checkpoints' grids, extractions and loading."""
    tag = picked["method"].split("@")[1]
    derived = []
    for record in records:
        name = record["method"].split("@")[0]
        copy = {**record, "method": f"{name}@chosen", "chose_checkpoint": tag}
        for c in CLOCKS:
            for cost in ("pipeline", "amortised"):
                choice = chosen[f"{cost}{c}_s"] - picked[f"{cost}{c}_s"] + picked[f"stage{c}_s"]
                copy[f"{cost}{c}_s"] = round(record[f"{cost}{c}_s"] + choice, 3)
        derived.append(copy)
    return derived


def checkpoint_stages(run: SeedRun, epochs: float, with_method: bool) -> tuple[list[dict], dict]:
    """The stages on the embeddings of the checkpoint fine-tuned `epochs`: extraction, loading,
    the single adapters and, `with_method`, the method's stages (`method_stages`). Returns their
    records and the choices made. The embeddings stay, for a method whose checkpoint is chosen
    afterwards (run_seed removes them)."""
    args, tag = run.args, f"{epochs:g}"
    held: dict = {}  # the loaded embeddings, shared by every adapter of this checkpoint

    def load() -> dict:
        held["data"] = run.load(epochs)
        return {}

    def single(adapter: str) -> dict:
        cfg = TrainConfig(
            task=run.task,
            embeddings=str(run.embeddings(epochs)),
            out=str(run.runs / f"{adapter}@{tag}"),
            adapter=adapter,
            adapter_dim=args.adapter_dim,
            lr=args.adapter_lr,
            epochs=args.adapter_epochs,
            val_fraction=args.val_fraction,
            seed=run.seed,
            device=args.device,
        )
        return adapter_result(cfg, run.loaded(epochs, held))

    done = [run.stage(f"extract@{tag}", lambda: run.extract(epochs))]
    done.append(run.stage(f"load@{tag}", load))
    done += [run.stage(f"{a}@{tag}", lambda a=a: single(a)) for a in ADAPTERS]
    if not with_method:
        return done, {}
    stages, choices = method_stages(run, epochs, held)
    return done + stages, choices


def method_stages(run: SeedRun, epochs: float, held: dict) -> tuple[list[dict], dict]:
    """BERTVision's stages on the checkpoint fine-tuned `epochs`: the sweep, the two ensembles
    (with the fine-tuned model: only on a fine-tuned checkpoint) and the learning curve of the
    best trial. `held`: the checkpoint's loaded embeddings, if any. Returns their records and the
    choices made."""
    args, tag = run.args, f"{epochs:g}"
    sweep_cfg = SweepConfig(
        task=run.task,
        embeddings=str(run.embeddings(epochs)),
        out=str(run.runs / f"sweep@{tag}"),
        adapter=args.sweep_adapter,
        trials=args.trials,
        space=args.space,
        val_fraction=args.val_fraction,
        seed=run.seed,
        device=args.device,
    )

    def sweep() -> dict:
        summary = run_sweep(sweep_cfg, data=run.loaded(epochs, held), progress=False)
        if summary.best is None:
            raise RuntimeError(f"no trial of {sweep_cfg.out} finished")
        best = summary.best
        return {
            "trial": best.trial,
            "params": best.params,
            "hyperopt_vals": best.hyperopt_vals,
            "val": best.val,
            "dev": best.dev,
            "failed": summary.failed,
            "trainings": summary.trials,
        }

    def ensemble_of(name: str, finetuned: Path | None = None) -> Callable[[], dict]:
        return lambda: ensemble(args, sweep_cfg, run.runs / f"{name}@{tag}", finetuned)

    def curve_point(spec: TrialSpec, fraction: float) -> dict:
        cfg = replace(
            trial_train_config(sweep_cfg, spec),
            out=str(run.runs / f"curve-{fraction:.0%}@{tag}"),
            train_fraction=fraction,
            overwrite=False,
        )
        return {**adapter_result(cfg, run.loaded(epochs, held)), "train_fraction": fraction}

    best = run.stage(f"sweep-best@{tag}", sweep)
    plain = run.stage(f"ensemble@{tag}", ensemble_of("ensemble"))
    done = [best, plain]
    choices = {"sweep_trial": best["trial"], "sweep_params": best["params"]}
    choices["ensemble_members"] = plain["members"]
    if epochs > 0:  # a fine-tuned model to ensemble with
        with_ft = run.stage(
            f"ensemble+ft@{tag}", ensemble_of("ensemble+ft", run.chosen_runs[epochs])
        )
        done.append(with_ft)
        choices["ensemble_ft_members"] = with_ft["members"]
    spec = TrialSpec(best["trial"], best["params"], best["hyperopt_vals"])
    done += [
        run.stage(f"curve-{f:.0%}@{tag}", lambda f=f: curve_point(spec, f)) for f in CURVE_FRACTIONS
    ]
    return done, choices


def best_checkpoint(
    records: list[dict], adapter: str, checkpoints: list[float], metric: str
) -> tuple[int, list[dict]]:
    """Which of `checkpoints` (epochs; its position) the single `adapter` scores best on
    held-out TRAIN by `metric` (ties: the earliest listed), and the records of all of them."""
    names = [f"{adapter}@{epochs:g}" for epochs in checkpoints]
    candidates = [next(r for r in records if r["method"] == name) for name in names]
    scores = [selectable(r.get("val", {}).get(metric)) for r in candidates]
    return scores.index(max(scores)), candidates


def chosen_checkpoint(
    records: list[dict], adapter: str, checkpoints: list[float], metric: str
) -> dict:
    """`adapter`@chosen: `best_checkpoint`'s result, charged for every candidate (each one's
    fine-tuning grid, extraction, loading and adapter), since choosing needed each. Its
    `candidates`: the held-out metric on each."""
    best, candidates = best_checkpoint(records, adapter, checkpoints, metric)
    chosen = candidates[best]
    record = {**chosen, "method": f"{adapter}@chosen", "chose": chosen["method"]}
    record["candidates"] = {r["method"]: r.get("val", {}).get(metric) for r in candidates}
    for c in CLOCKS:
        for cost in ("stage", "pipeline", "amortised"):
            record[f"{cost}{c}_s"] = round(sum(r[f"{cost}{c}_s"] for r in candidates), 3)
    return record


def method_result(records: list[dict], tag: str, metric: str) -> dict:
    """BERTVision's result on checkpoint `tag`: of the two ensembles (`records` holds their
    records; on the pretrained encoder only the one without a fine-tuned model), the one better
    on held-out TRAIN by `metric`, the one with the fine-tuned model on a tie; charged for the
    sweep and both. Its `candidates`: their held-out metric. The sweep's best trial is not a
    candidate: it was chosen as the best of the trials on the same held-out slice, so its
    held-out metric is the most optimistic of them (the winner's curse) and would win by
    selection alone."""
    names = (f"ensemble+ft@{tag}", f"ensemble@{tag}")
    candidates = [r for name in names for r in records if r["method"] == name]
    chosen = max(candidates, key=lambda r: selectable(r.get("val", {}).get(metric)))
    record = {**chosen, "method": f"method@{tag}", "chose": chosen["method"]}
    record["candidates"] = {r["method"]: r.get("val", {}).get(metric) for r in candidates}
    for c in CLOCKS:
        record[f"stage{c}_s"] = round(sum(r[f"stage{c}_s"] for r in candidates), 3)
        for cost in ("pipeline", "amortised"):  # each holds the sweep's and its own stage
            own = sum(r[f"stage{c}_s"] for r in candidates[1:])
            record[f"{cost}{c}_s"] = round(candidates[0][f"{cost}{c}_s"] + own, 3)
    return record


def ensemble(
    args: argparse.Namespace, sweep: SweepConfig, out: Path, finetuned: Path | None = None
) -> dict:
    """The top-k ensemble of `sweep`'s trials into `out`, with the `finetuned` run as one more
    member if given; its members by trial number ("finetuned" for the fine-tuned model)."""
    cfg = EnsembleConfig(
        task=sweep.task,
        runs=sweep.out,
        out=str(out),
        top_k=args.top_k,
        with_finetuned=str(finetuned) if finetuned else None,
    )
    result = build_ensemble(cfg)
    members = [m["trial"] if m["trial"] is not None else "finetuned" for m in result["members"]]
    return {
        "val": result.get("val", {}),
        "dev": result["ensemble"],
        "members": members,
        "trainings": 0,
    }


def adapter_result(cfg: TrainConfig, data) -> dict:
    """Train the adapter of `cfg` on the loaded embeddings; its record's fields."""
    metrics = train_adapter(cfg, data=data, progress=False)
    curve = storage.read_json(storage.join(cfg.out, "curve.json"))
    return {
        "val": metrics["val"],
        "dev": metrics["dev"],
        "train_s": curve["train_seconds"],
        "train_examples": curve["train_examples"] * curve["epochs_run"],
        "best_epoch": curve["best_epoch"],
        "epochs_run": curve["epochs_run"],
        "trainings": 1,
    }


def selectable(value: float | None) -> float:
    """A held-out metric as a choice compares it: NaN or None (constant predictions) lose."""
    return value if value is not None and math.isfinite(value) else -math.inf


def selected(best: dict, method: str, grid_s: dict[str, float]) -> dict:
    """The record of a fine-tuning method: its grid's chosen run, charged the whole grid."""
    record = {**best, "method": method, "chosen_s": best["stage_s"]}
    for c in CLOCKS:
        record[f"pipeline{c}_s"] = record[f"amortised{c}_s"] = grid_s[c]
    return record


class OutOfTime(Exception):
    """No stage starts after --stop-after: raised with the name of the one that did not."""


STOP_AT: float | None = None  # time.monotonic() after which no stage starts (set by main)
STAGES: Counter[str] = Counter()  # stages "run" and "taken" from their records (`stage`)


def stages_line(out: str) -> str:
    """What this run did: e.g. `0 stages run, 58 taken from the records in OUT` (a resume)."""
    return f"{STAGES['run']} stages run, {STAGES['taken']} taken from the records in {out}"


def stage_record(path: Path) -> dict:
    """The stage record at `path`; storage.FileFormatError naming it, and saying to delete it to
    run the stage again, if it is garbled (cut short, edited) or no stage record
    (`record_problem`)."""
    redo = "delete it to run that stage again"
    try:
        record = storage.read_json(str(path))
    except storage.FileFormatError as exc:
        raise storage.FileFormatError(f"{exc}; {redo}") from None
    problem = record_problem(record)
    if problem:
        raise storage.FileFormatError(f"{path} is no stage record: {problem}; {redo}")
    return record


def stage(records_dir: Path, task: str, seed: int, name: str, work: Callable[[], dict]) -> dict:
    """Run `work` unless its record exists; the record holds its results and wall-clock.
    OutOfTime instead of running it after --stop-after."""
    path = records_dir / f"{name}.json"
    if path.exists():
        record = stage_record(path)
        STAGES["taken"] += 1
        return record
    if STOP_AT is not None and time.monotonic() > STOP_AT:
        raise OutOfTime(name)
    print(f"{task} seed {seed}: {name} ...", file=sys.stderr, flush=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = work()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{task} seed {seed}: {name} done, {seconds:.1f} s", file=sys.stderr, flush=True)
    record = {"task": task, "seed": seed, "method": name, **result, "stage_s": round(seconds, 3)}
    record["stage_cpu_s"] = round(cpu_seconds, 3)
    if "train_examples" in record:
        record["train_ex_s"] = round(record["train_examples"] / max(record["train_s"], 1e-9), 1)
    if "examples" in record:
        record["examples_per_s"] = round(record["examples"] / seconds, 1)
    storage.write_json(str(path), record)
    STAGES["run"] += 1
    return record


def sliced_data(args: argparse.Namespace, task_name: str, out: Path) -> str:
    """A glue_data folder with N train rows of `task_name` (the first N, or with
    --train-sample random N drawn with seed 0, in file order) and the first N test rows; dev
    is whole (a test file that is not there is left out: no stage reads it). The train and dev
    files of --data-dir are read first as the stages read them: glue.DataError naming the
    user's file, not the slice's, if one is missing or malformed."""
    task = glue.get_task(task_name)
    for split in ("train", *task.dev_splits):
        glue.load_split(task, split, args.data_dir)
    folder = out / "data" / task.dir_name
    folder.mkdir(parents=True, exist_ok=True)
    source = args.data_dir
    n = args.max_train_examples
    for split in task.splits:
        url = storage.join(source, task.dir_name, f"{split}.tsv")
        if task.is_test(split) and not storage.exists(url):
            continue  # never read: the stages predict no test split
        fs, path = storage.url_to_fs(url)
        lines = fs.cat_file(path).splitlines(keepends=True)
        if split == "train" or task.is_test(split):
            has_header = task.is_test(split) or task.implicit_header is None
            header, rows = lines[: int(has_header)], lines[int(has_header) :]
            if split == "train" and args.train_sample == "random":
                drawn = np.random.default_rng(0).permutation(len(rows))[:n]
                rows = [rows[i] for i in sorted(drawn)]
            lines = header + rows[:n]
        (folder / f"{split}.tsv").write_bytes(b"".join(lines))
    return str(out / "data")


def summarise(records: list[dict], method_names: list[str], reference: str) -> list[dict]:
    """Per task and method: mean ± sample std over seeds of every dev metric and cost, and the
    per-seed paired differences of the primary dev metric from `reference`."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        metric = glue.get_task(task).primary_metric
        ours = [r for r in records if r["task"] == task]
        base = {r["seed"]: r["dev"][metric] for r in ours if r["method"] == reference}
        for method in method_names:
            group = [r for r in ours if r["method"] == method]
            if not group:
                continue
            row = {"task": task, "method": method, "seeds": len(group), "metric": metric}
            row["dev"] = {m: mean_std([r["dev"][m] for r in group]) for m in group[0]["dev"]}
            for cost in ("stage", "pipeline", "amortised"):
                for c in CLOCKS:
                    row[f"{cost}{c}_s"] = mean_std([r[f"{cost}{c}_s"] for r in group])
            paired = [r["dev"][metric] - base[r["seed"]] for r in group if r["seed"] in base]
            row["paired"] = {"reference": reference, "per_seed": paired}
            row["paired"].update(mean_std(paired) if paired else {"mean": None, "std": None})
            rows.append(row)
        for kind in ("extract", "load"):
            for tag in dict.fromkeys(
                r["method"] for r in ours if r["method"].startswith(f"{kind}@")
            ):
                group = [r for r in ours if r["method"] == tag]
                row = {"task": task, "method": tag, "seeds": len(group)}
                for c in CLOCKS:
                    row[f"stage{c}_s"] = mean_std([r[f"stage{c}_s"] for r in group])
                rows.append(row)
    return rows


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for a single seed)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std}


def shown(value: dict[str, float | None]) -> str:
    std = "" if value["std"] is None else f" ± {value['std']:.4f}"
    return f"{value['mean']:.4f}{std}"


def subset(settings: dict) -> str:
    """The training examples of a --max-train-examples run, in words ("first 1000")."""
    which = "first" if settings.get("train_sample", "first") == "first" else "a random"
    return f"{which} {settings['max_train_examples']}"


def title(results: dict) -> str:
    settings = results["settings"]
    scope = f", {subset(settings)} training examples only" if settings["max_train_examples"] else ""
    per_task = {task: 0 for task in settings["tasks"]}
    per_task.update((row["task"], row["seeds"]) for row in results["summary"])
    wanted, finished = settings["seeds"], sorted(set(per_task.values()))
    if finished == [wanted]:
        seeds = f"{wanted} seed(s)"
    elif finished == [0]:
        seeds = "no seed finished"
    else:
        shown = "-".join(dict.fromkeys(map(str, (finished[0], finished[-1]))))
        seeds = f"{shown} of {wanted} seeds finished"
    return f"{enc.display_name(settings['model'])}, {results['device']}, {seeds}{scope}"


def code_text(results: dict) -> str:
    """The code of the run that wrote `results`: its version, and its commit where the package
    was imported from a git checkout (`records.code_info`; stages taken from records may have
    run with earlier code)."""
    code = results.get("code", {})
    if not code.get("git_commit"):
        return results["code_version"]
    changes = " with uncommitted changes" if code["dirty"] else ""
    return f"{results['code_version']} at {code['git_commit'][:7]}{changes}"


def markdown(results: dict) -> str:
    settings = results["settings"]
    scope = (
        f", **{subset(settings)} training examples only**" if settings["max_train_examples"] else ""
    )
    lrs = ", ".join(f"{lr:g}" for lr in settings["finetune_lrs"])
    lines = [
        "# BERTVision's method vs fine-tuning",
        "",
        f"Encoder {enc.display_name(settings['model'])}, device {results['device']}, "
        f"seeds 0..{settings['seeds'] - 1}, code {code_text(results)}{scope}. "
        f"Fine-tuning at batch {settings['finetune_batch_size']}, lr chosen from {{{lrs}}} on "
        f"held-out TRAIN; sweep of "
        f"{settings['trials']} {settings['sweep_adapter']} trials, top-{settings['top_k']} "
        f"ensembles, on {method_checkpoint_text(settings)}. Dev metrics: mean ± "
        f"sample std over seeds; Δ: per-seed paired difference of the primary metric from "
        f"{settings['reference']}, mean ± std. Seconds: mean over seeds.",
        "",
    ]
    if results.get("stopped"):
        lines += [
            f"**Stopped by --stop-after {settings['stop_after']:g} s, at {results['stopped']}**: "
            "each task shows its seeds finished (`seeds` in results.json's summary); "
            "the same command continues from its records.",
            "",
        ]
    if results.get("running"):
        lines += [
            f"**Written while the run went on, after {results['running']}**: each task shows "
            "the seeds finished by then; if the run was killed, the same command continues "
            "from its records.",
            "",
        ]
    partial = results.get("stopped") or results.get("running")
    for task in dict.fromkeys(row["task"] for row in results["summary"]):
        rows = [r for r in results["summary"] if r["task"] == task]
        scored = [r for r in rows if "dev" in r]
        metrics = list(scored[0]["dev"])
        header = [f"dev {m}" for m in metrics]
        header += [f"Δ {scored[0]['metric']}", "pipeline s", "amortised s", "stage s"]
        header += ["pipeline CPU s"]
        finished = max(r["seeds"] for r in rows)
        lines += [
            f"## {task}"
            + (f" ({finished} of {settings['seeds']} seeds finished)" if partial else ""),
            "",
            "| method | " + " | ".join(header) + " |",
            "|---" * (len(header) + 1) + "|",
        ]
        for row in scored:
            cells = [shown(row["dev"][m]) for m in metrics]
            paired = row["paired"]
            cells.append("" if paired["mean"] is None else shown(paired))
            cells += [
                f"{row[c]['mean']:.1f}"
                for c in ("pipeline_s", "amortised_s", "stage_s", "pipeline_cpu_s")
            ]
            # e.g. ensemble+ft@chosen: no fine-tuned member where the pretrained encoder was chosen
            fewer = f" ({row['seeds']} of {finished} seeds)" if row["seeds"] < finished else ""
            lines.append(f"| {row['method']}{fewer} | " + " | ".join(cells) + " |")
        stages = [r for r in rows if "dev" not in r]
        lines += [
            "",
            "Shared stages: "
            + ", ".join(f"{r['method']} {r['stage_s']['mean']:.1f} s" for r in stages)
            + ".",
            "",
        ]
    lines += [
        "## Choices (held-out TRAIN only)",
        "",
        "| task | seed | fine-tune lr by epochs | checkpoint | "
        "sweep trial | ensemble members | with fine-tuned | the method's result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results["choices"]:
        lrs = ", ".join(f"{e}: {lr:g}" for e, lr in c["finetune_lr"].items())
        members = [
            ", ".join(map(str, c.get(k, []))) for k in ("ensemble_members", "ensemble_ft_members")
        ]
        lines.append(
            f"| {c['task']} | {c['seed']} | {lrs} | "
            f"{c.get('checkpoint', '')} {held_out(c, 'checkpoint_held_out')} | "
            f"{c.get('sweep_trial', '')} | {members[0]} | {members[1]} | "
            f"{c.get('method', '')} {held_out(c, 'method_held_out')} |"
        )
    if results.get("unfinished"):
        lines += [
            "",
            f"## Stages of {results['stopped'].split(', before')[0]} finished before the stop",
            "",
            "| stage | val | dev | stage s |",
            "|---|---|---|---|",
        ]
        for r in results["unfinished"]:
            val, dev = (
                ", ".join(f"{k} {v:.4f}" for k, v in r.get(split, {}).items())
                for split in ("val", "dev")
            )
            lines.append(f"| {r['method']} | {val} | {dev} | {r['stage_s']:.1f} |")
    return "\n".join(lines) + "\n"


def method_checkpoint_text(settings: dict) -> str:
    if settings["method_from"] == CHOSEN:
        return (
            f"the checkpoint where the single {settings['sweep_adapter']} is best on held-out TRAIN"
        )
    return f"the {settings['method_from']:g}-epoch checkpoint"


def held_out(choice: dict, candidates: str) -> str:
    """The held-out metric of each of a choice's `candidates` (a key of `choice`), as the table
    shows it."""
    scores = choice.get(candidates, {})
    shown = (f"{k} {v:.4f}" if v is not None else f"{k} none" for k, v in scores.items())
    return f"(held out: {', '.join(shown)})" if scores else ""


def plot_points(
    summary: list[dict], clock: str = ""
) -> dict[str, list[tuple[str, float, float, float]]]:
    """Per task: (method, mean pipeline seconds of `clock` (CLOCKS), mean primary dev metric,
    its std or 0)."""
    points: dict[str, list] = {}
    for row in summary:
        if "dev" in row:
            value = row["dev"][row["metric"]]
            points.setdefault(f"{row['task']} ({row['metric']})", []).append(
                (
                    row["method"],
                    row[f"pipeline{clock}_s"]["mean"],
                    value["mean"],
                    value["std"] or 0.0,
                )
            )
    return points


def warm_up(device: str) -> None:
    """Pay the one-time costs (CUDA context, cuBLAS, transformers' lazy imports) before the first
    timed stage, so they are not charged to whichever method happens to run first."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification  # noqa: F401

    if device.startswith("cuda"):
        x = torch.randn(512, 512, device=device)
        with enc.autocast(device):
            (x @ x).sum().item()


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{device} ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    run_as_command(main)
