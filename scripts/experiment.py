"""The experiment of issue 3: do small adapters on stored embeddings match fine-tuning?

For each task and seed, starting from one pretrained encoder (default: the bundled
all-MiniLM-L6-v2):

    (a) finetune-1   fine-tune 1 epoch, evaluate on dev
    (b) finetune-3   fine-tune 3 epochs, evaluate on dev
        extract      store all-layer train+dev embeddings of the (a) model of this seed
    (c) pooler       AdapterPooler on those embeddings         (bertvision.train, same seed)
    (d) scalarmix    scalar mix over layers on them
    (e) cls          [CLS]-of-last-layer linear probe on them

Adapters select their epoch on a held-out slice of TRAIN, never on dev. Every dev metric is
reported as mean ± sample standard deviation over the seeds, with the wall-clock and training
throughput of each method, measured here with time.perf_counter:

    stage_s      wall-clock of the stage itself (training, evaluation and writing its outputs)
    train_s      training alone, as the stage reports it; train_ex_s = examples trained on / train_s
    pipeline_s   cost of the result from the pretrained encoder: (a) and (b) their stage; (c)-(e)
                 the 1-epoch fine-tune + extraction + loading the embeddings + their stage

One command runs it all (no Prefect; torch, transformers, pyarrow, fsspec, numpy, scipy, tqdm):

    python scripts/experiment.py --data-dir ../shared/data/glue --device cuda --out experiment

and writes OUT/results.json (every measurement and the summary) and OUT/results.md (the table).
Each finished stage leaves OUT/<settings key>/records/<task>/seed-<n>/<stage>.json, so rerunning
the same command after an interruption continues where it stopped; other settings (or another
encoder at the same path) get another key, and nothing of the first run is taken for theirs.
--max-train-examples N runs on the first N training examples (and N test rows, never scored) for
quick checks; dev is always whole.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bertvision import __version__, config, glue, storage
from bertvision import encoder as enc
from bertvision.console import quiet_libraries
from bertvision.embeddings import load_embeddings
from bertvision.extract import ExtractConfig, extract_hidden_states
from bertvision.finetune import FinetuneConfig, finetune_encoder
from bertvision.train import TrainConfig, train_adapter

ADAPTERS = ("pooler", "scalarmix", "cls")
METHODS = ("finetune-1", "finetune-3", *ADAPTERS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="a glue_data folder (default: the Hugging Face hub)")
    parser.add_argument("--model", default="", help="encoder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--tasks", default="rte,mrpc", help="comma-separated GLUE tasks")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--out", default="experiment", help="results folder")
    parser.add_argument("--device", default="", help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--max-train-examples", type=int, default=None, help="quick runs only")
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--finetune-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--adapter-epochs", type=int, default=20)
    parser.add_argument("--adapter-lr", type=float, default=1e-3)
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument(
        "--keep-embeddings", action="store_true", help="keep each seed's embeddings (large)"
    )
    args = parser.parse_args(argv)
    args.tasks = [glue.get_task(t).name for t in args.tasks.split(",") if t.strip()]
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    args.model = args.model or enc.default_model()
    args.device = args.device or enc.default_device()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm_up(args.device)
    records: list[dict] = []
    for task in args.tasks:
        data_dir = sliced_data(args, task, out) if args.max_train_examples else args.data_dir
        for seed in range(args.seeds):
            records.extend(run_seed(args, task, seed, data_dir, out))
    results = {
        "settings": vars(args),
        "code_version": __version__,
        "device": device_name(args.device),
        "summary": summarise(records),
        "records": records,
    }
    storage.write_json(str(out / "results.json"), results)
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


# Settings that do not change what a stage computes: where, which tasks and seeds, what is kept.
NOT_CONTENT = ("out", "tasks", "seeds", "keep_embeddings", "device")


def settings_key(args: argparse.Namespace, not_content: tuple[str, ...] = NOT_CONTENT) -> str:
    """The content key of the settings a stage's result depends on, the encoder by fingerprint
    of its files' listing: runs and records live under it, so a rerun with other settings (or
    another encoder at the same path) never takes the records of the first for its own."""
    content = {k: v for k, v in vars(args).items() if k not in not_content}
    content["model"] = [args.model, enc.model_version(args.model)]
    return config.content_key(content)


def run_seed(args: argparse.Namespace, task: str, seed: int, data_dir: str | None, out: Path):
    """The five methods of one task and seed; a stage whose record exists under these settings'
    key is not run again."""
    keyed = out / settings_key(args)
    runs = keyed / "runs" / task / f"seed-{seed}"
    records_dir = keyed / "records" / task / f"seed-{seed}"

    def finetune(epochs: int) -> dict:
        cfg = FinetuneConfig(
            task=task,
            out=str(runs / f"finetune-{epochs}"),
            model=args.model,
            data_dir=data_dir,
            epochs=float(epochs),
            lr=args.finetune_lr,
            batch_size=args.finetune_batch_size,
            max_seq_length=args.max_seq_length,
            seed=seed,
            device=args.device,
            predict_test=False,  # unscored, and the adapters here predict no test split either
        )
        metrics = finetune_encoder(cfg)
        return {
            "dev": {k: v for k, v in metrics.items() if k.startswith("dev")},
            "train_s": metrics["train"]["seconds"],
            "train_examples": metrics["train"]["examples"],
        }

    ft1 = stage(records_dir, task, seed, "finetune-1", lambda: finetune(1))
    ft3 = stage(records_dir, task, seed, "finetune-3", lambda: finetune(3))
    embeddings = runs / "embeddings"

    def extract() -> dict:
        cfg = ExtractConfig(
            task=task,
            out=str(embeddings),
            model=str(runs / "finetune-1"),
            data_dir=data_dir,
            splits=["train", "dev"],
            max_seq_length=args.max_seq_length,
            batch_size=64,
            device=args.device,
        )
        summary = extract_hidden_states(cfg)
        if not summary.ok:
            raise RuntimeError(f"extraction failed: {summary.failed}")
        splits = ("train", *glue.get_task(task).dev_splits)
        return {"examples": sum(len(glue.load_split(task, s, data_dir)) for s in splits)}

    extracted = stage(records_dir, task, seed, "extract", extract)
    pending = [a for a in ADAPTERS if not (records_dir / f"{a}.json").exists()]
    adapter_records = []
    data, load_s = None, 0.0  # the embeddings, loaded once and shared by the three adapters
    if pending:
        started = time.perf_counter()
        data = load_embeddings(task, str(embeddings), device=args.device)
        load_s = time.perf_counter() - started
    for adapter in ADAPTERS:

        def train(adapter: str = adapter) -> dict:
            cfg = TrainConfig(
                task=task,
                embeddings=str(embeddings),
                out=str(runs / adapter),
                adapter=adapter,
                adapter_dim=args.adapter_dim,
                lr=args.adapter_lr,
                epochs=args.adapter_epochs,
                seed=seed,
                device=args.device,
            )
            metrics = train_adapter(cfg, data=data)
            curve = json.loads((runs / adapter / "curve.json").read_text())
            return {
                "dev": {k: v for k, v in metrics.items() if k.startswith("dev")},
                "val": metrics["val"],
                "train_s": curve["train_seconds"],
                "train_examples": curve["train_examples"] * curve["epochs_run"],
                "best_epoch": curve["best_epoch"],
                "epochs_run": curve["epochs_run"],
                "load_s": round(load_s, 3),
            }

        record = stage(records_dir, task, seed, adapter, train)
        record["pipeline_s"] = round(
            ft1["stage_s"] + extracted["stage_s"] + record["load_s"] + record["stage_s"], 3
        )
        adapter_records.append(record)
    if not args.keep_embeddings and embeddings.exists():
        shutil.rmtree(embeddings)
    for record in (ft1, ft3):
        record["pipeline_s"] = record["stage_s"]
    return [ft1, ft3, extracted, *adapter_records]


def stage(records_dir: Path, task: str, seed: int, name: str, work: Callable[[], dict]) -> dict:
    """Run `work` unless its record exists; the record holds its results and wall-clock."""
    path = records_dir / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    record = {"task": task, "seed": seed, "method": name, **result, "stage_s": round(seconds, 3)}
    if "train_examples" in record:
        record["train_ex_s"] = round(record["train_examples"] / max(record["train_s"], 1e-9), 1)
    if "examples" in record:
        record["examples_per_s"] = round(record["examples"] / seconds, 1)
    storage.write_json(str(path), record)
    return record


def sliced_data(args: argparse.Namespace, task_name: str, out: Path) -> str:
    """A glue_data folder with the first N train (and test) rows of `task_name`; dev is whole."""
    task = glue.get_task(task_name)
    folder = out / "data" / task.dir_name
    folder.mkdir(parents=True, exist_ok=True)
    source = args.data_dir
    if source is None:
        raise SystemExit("--max-train-examples needs --data-dir (a glue_data folder)")
    for split in task.splits:
        fs, path = storage.url_to_fs(storage.join(source, task.dir_name, f"{split}.tsv"))
        lines = fs.cat_file(path).splitlines(keepends=True)
        if split == "train" or task.is_test(split):
            has_header = task.is_test(split) or task.implicit_header is None
            lines = lines[: args.max_train_examples + int(has_header)]
        (folder / f"{split}.tsv").write_bytes(b"".join(lines))
    return str(out / "data")


def summarise(records: list[dict]) -> list[dict]:
    """Mean ± sample std over seeds of every dev metric and timing, per task and method."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        for method in METHODS:
            group = [r for r in records if r["task"] == task and r["method"] == method]
            if not group:
                continue
            row = {"task": task, "method": method, "seeds": len(group), "dev": {}}
            for split in group[0]["dev"]:
                for metric in group[0]["dev"][split]:
                    values = [r["dev"][split][metric] for r in group]
                    row["dev"][f"{split}.{metric}" if split != "dev" else metric] = mean_std(values)
            for timing in ("stage_s", "train_s", "train_ex_s", "pipeline_s"):
                row[timing] = mean_std([r[timing] for r in group])
            rows.append(row)
        extract = [r for r in records if r["task"] == task and r["method"] == "extract"]
        rows.append(
            {
                "task": task,
                "method": "extract",
                "seeds": len(extract),
                "stage_s": mean_std([r["stage_s"] for r in extract]),
                "examples_per_s": mean_std([r["examples_per_s"] for r in extract]),
            }
        )
    return rows


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for a single seed)."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std}


def shown(value: dict[str, float | None]) -> str:
    std = "" if value["std"] is None else f" ± {value['std']:.4f}"
    return f"{value['mean']:.4f}{std}"


def markdown(results: dict) -> str:
    settings = results["settings"]
    scope = (
        f", **first {settings['max_train_examples']} training examples only**"
        if settings["max_train_examples"]
        else ""
    )
    lines = [
        "# Adapters on stored embeddings vs fine-tuning",
        "",
        f"Encoder `{settings['model']}`, device {results['device']}, "
        f"seeds 0..{settings['seeds'] - 1}, code {results['code_version']}{scope}. "
        "Dev metrics: mean ± sample std over seeds. Times in seconds, mean over seeds.",
        "",
    ]
    timings = ("stage_s", "train_s", "train_ex_s", "pipeline_s")
    for task in dict.fromkeys(row["task"] for row in results["summary"]):
        rows = [r for r in results["summary"] if r["task"] == task]
        extract = next(r for r in rows if r["method"] == "extract")
        rows = [r for r in rows if r["method"] != "extract"]
        metrics = list(rows[0]["dev"])
        header = [f"dev {m}" for m in metrics] + ["stage s", "train s", "train ex/s", "pipeline s"]
        lines += [
            f"## {task}",
            "",
            "| method | " + " | ".join(header) + " |",
            "|---" * (len(header) + 1) + "|",
        ]
        for row in rows:
            cells = [shown(row["dev"][m]) for m in metrics]
            cells += [f"{row[t]['mean']:.1f}" for t in timings]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Extraction of the 1-epoch model's train+dev embeddings: "
            f"{extract['stage_s']['mean']:.1f} s, "
            f"{extract['examples_per_s']['mean']:.1f} examples/s.",
            "",
        ]
    return "\n".join(lines)


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
    with quiet_libraries():
        main(sys.argv[1:])
