"""The recipe of the brief fine-tunings (issue 12): batch size × learning rate × warm-up.

The CPU subset run of scripts/experiment.py (docs/experiment.md) saw its brief fine-tunings
(0.25 and 0.5 epoch of 1,000 examples at batch 32: 7 and 14 optimizer steps, a tenth of them
warm-up) predict one class on CoLA, MRPC and WNLI. This study fine-tunes the bundled encoder
briefly on each task for every setting of the grid and reports, per run, the held-out metric
(the seeded `--val-fraction` slice of TRAIN, what every choice reads) and the dev metric (read
only to report), the steps taken, and how many classes the model predicts on val and on dev
(1: a constant predictor, whatever its score; ? where not known). The summary gives, per
fine-tuning length and batch size, the learning rate each task's grid chooses on val, and the
mean over tasks of the chosen runs' val and dev metrics: the recipe is the batch size whose
chosen runs are best on val.

    python scripts/finetune_recipe.py --data-dir ../shared/data/glue --device cpu \\
        --tasks cola,mrpc,rte,wnli --epochs 0.5,0.25 --batch-sizes 32,16,8 \\
        --lrs 5e-5,1e-4,2e-4 --max-train-examples 1000 --out runs/finetune-recipe

Each run is bertvision.finetune.finetune_encoder with FinetuneConfig (seed `--seed`, the first
`--max-train-examples` training examples, dev whole, no test predictions). Its record
(OUT/records/<task>/<name>.json: metrics, classes predicted, steps, wall and CPU seconds) is
written when it ends and its checkpoint deleted, so rerunning the command continues where it
stopped; the runs go in grid order, the first `--epochs` value first. Prints the tables
(markdown) and writes them to OUT/recipe.md; `--report` prints those of the runs of the grid
already recorded, training nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from experiment import OneLineErrors, numbers, refuse, run_as_command

from bertvision import encoder as enc
from bertvision import glue, storage
from bertvision.config import FinetuneConfig
from bertvision.finetune import finetune_encoder
from bertvision.finite import strict_json
from bertvision.predictions import point_predictions, read_outputs

PROG = "finetune_recipe.py"  # as its errors name it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrors(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="a glue_data folder (default: the Hugging Face hub)")
    parser.add_argument("--model", default="", help="encoder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--tasks", default="cola,mrpc,rte,wnli", help="GLUE tasks")
    parser.add_argument("--epochs", default="0.5,0.25", help="fine-tuning lengths, in run order")
    parser.add_argument("--batch-sizes", default="32,16,8")
    parser.add_argument("--lrs", default="5e-5,1e-4,2e-4", help="peak learning rates")
    parser.add_argument("--warmups", default="0.1", help="warm-up fractions of the steps")
    parser.add_argument("--max-train-examples", type=int, default=1000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held out of TRAIN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="", help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--out", default="runs/finetune-recipe", help="records and tables")
    parser.add_argument(
        "--report", action="store_true", help="tables of the grid's runs recorded, train nothing"
    )
    args = parser.parse_args(argv)
    try:
        args.tasks = [glue.get_task(t).name for t in args.tasks.split(",") if t.strip()]
    except ValueError as exc:  # a name that is no GLUE task
        parser.error(f"--tasks: {exc}")
    args.epochs = numbers(parser, "--epochs", args.epochs)
    args.lrs = numbers(parser, "--lrs", args.lrs)
    args.warmups = numbers(parser, "--warmups", args.warmups, zero=True)
    batch_sizes = numbers(parser, "--batch-sizes", args.batch_sizes)
    if not all(size == int(size) for size in batch_sizes):
        parser.error(f"--batch-sizes must be whole numbers, got {args.batch_sizes!r}")
    args.batch_sizes = [int(size) for size in batch_sizes]
    try:
        args.model = args.model or enc.default_model()
    except enc.ModelError as exc:
        parser.error(str(exc))
    args.device = args.device or enc.default_device()
    return args


def grid(args: argparse.Namespace) -> list[dict]:
    """Every run's settings, in run order: by fine-tuning length, then task, batch size, warm-up
    and learning rate."""
    return [
        {"task": t, "epochs": e, "batch_size": b, "warmup": w, "lr": lr}
        for e in args.epochs
        for t in args.tasks
        for b in args.batch_sizes
        for w in args.warmups
        for lr in args.lrs
    ]


def run_name(point: dict) -> str:
    return f"e{point['epochs']:g}-b{point['batch_size']}-w{point['warmup']:g}-lr{point['lr']:g}"


def record_path(args: argparse.Namespace, point: dict) -> Path:
    return Path(args.out, "records", point["task"], f"{run_name(point)}.json")


def run(args: argparse.Namespace, point: dict) -> dict:
    """The record of one fine-tuning (read back if it was run before)."""
    out = Path(args.out)
    path = record_path(args, point)
    if path.exists():
        return storage.read_json(str(path))
    folder = out / "runs" / point["task"] / run_name(point)
    cfg = FinetuneConfig(
        task=point["task"],
        out=str(folder),
        model=args.model,
        data_dir=args.data_dir,
        max_train_examples=args.max_train_examples,
        epochs=point["epochs"],
        lr=point["lr"],
        batch_size=point["batch_size"],
        warmup_fraction=point["warmup"],
        max_seq_length=args.max_seq_length,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=args.device,
        predict_test=False,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    metrics = finetune_encoder(cfg, progress=False)
    task = glue.get_task(point["task"])
    record = {
        **point,
        "val": metrics["val"],
        "dev": metrics["dev"],
        "classes": {
            s: predicted_classes(task, str(folder), s) for s in ("val", task.dev_splits[0])
        },
        "steps": metrics["train"]["steps"],
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    text = strict_json(record, str(path), indent=1)  # a NaN: ValueError, nothing written
    storage.write_text_atomic(str(path), text)
    shutil.rmtree(folder)
    return record


def predicted_classes(task: glue.GlueTask, run_url: str, split: str) -> int | None:
    """How many classes the run predicts on `split` (None for regression)."""
    if task.regression:
        return None
    _, _, outputs = read_outputs(run_url, split)
    return len(np.unique(point_predictions(task, outputs)))


def chosen(records: list[dict]) -> dict:
    """The record a learning-rate grid chooses: best val primary metric, ties the first."""
    metric = glue.get_task(records[0]["task"]).primary_metric

    def value(r: dict) -> float:
        v = r["val"][metric]
        return v if v is not None and np.isfinite(v) else -np.inf

    return max(records, key=value)


def markdown(args: argparse.Namespace, records: list[dict]) -> str:
    lines = [
        "# Brief fine-tuning recipe",
        "",
        f"Encoder `{Path(args.model).name}`, device {args.device}, seed {args.seed}, first "
        f"{args.max_train_examples} training examples ({args.val_fraction:g} of them held out "
        "as val), dev whole. val/dev: the task's primary metric; classes: distinct predicted "
        "classes on val/dev (1 = constant).",
        "",
        "## Every run",
        "",
        "| task | epochs | batch | warm-up | lr | steps | val | dev | classes val/dev | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        metric = glue.get_task(r["task"]).primary_metric
        classes = "/".join("?" if c is None else str(c) for c in r["classes"].values())
        lines.append(
            f"| {r['task']} | {r['epochs']:g} | {r['batch_size']} | {r['warmup']:g} | "
            f"{r['lr']:g} | {r['steps']} | {r['val'][metric]:.4f} | {r['dev'][metric]:.4f} | "
            f"{classes} | {r['cpu_seconds']:.0f} |"
        )
    lines += [
        "",
        "## The learning rate chosen on val, per batch size",
        "",
        "Per fine-tuning length, batch size and warm-up: each task's lr chosen on val (ties: the "
        "first), its val and dev metric, and the mean over the tasks with the whole grid run.",
        "",
        "| epochs | batch | warm-up | "
        + " | ".join(f"{t}: lr, val, dev" for t in args.tasks)
        + " | mean val | mean dev |",
        "|---" * (len(args.tasks) + 5) + "|",
    ]
    for e in args.epochs:
        for b in args.batch_sizes:
            for w in args.warmups:
                cells, vals, devs = [], [], []
                for t in args.tasks:
                    group = [
                        r
                        for r in records
                        if (r["task"], r["epochs"], r["batch_size"], r["warmup"]) == (t, e, b, w)
                    ]
                    if len(group) < len(args.lrs):
                        cells.append("")
                        continue
                    best = chosen(group)
                    metric = glue.get_task(t).primary_metric
                    vals.append(best["val"][metric])
                    devs.append(best["dev"][metric])
                    cells.append(f"{best['lr']:g}, {vals[-1]:.3f}, {devs[-1]:.3f}")
                if not vals:
                    continue
                mean_val, mean_dev = statistics.fmean(vals), statistics.fmean(devs)
                lines.append(
                    f"| {e:g} | {b} | {w:g} | " + " | ".join(cells) + f" | {mean_val:.4f} "
                    f"({len(vals)} tasks) | {mean_dev:.4f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    try:
        return study(args)
    except (storage.FileFormatError, glue.DataError) as exc:  # a garbled record, missing data
        refuse(str(exc), PROG)


def study(args: argparse.Namespace) -> list[dict]:
    """Run the grid's runs not yet recorded (with --report, none), then print the tables."""
    records = []
    if args.report:
        paths = [record_path(args, point) for point in grid(args)]
        records = [storage.read_json(str(path)) for path in paths if path.exists()]
        print(markdown(args, records))
        return records
    for point in grid(args):
        records.append(run(args, point))
        storage.write_text_atomic(str(Path(args.out, "recipe.md")), markdown(args, records))
        print(f"{run_name(point)} {point['task']}: done", file=sys.stderr, flush=True)
    print(markdown(args, records))
    return records


if __name__ == "__main__":
    run_as_command(main)
