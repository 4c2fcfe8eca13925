"""The SQuAD 2.0 experiment of issue #10: a span adapter on stored embeddings vs fine-tuning.

For each seed, starting from one pretrained encoder (default: the bundled all-MiniLM-L6-v2):

    (a) finetune-1   fine-tune 1 epoch, evaluate on dev
    (b) finetune-3   fine-tune 3 epochs, evaluate on dev
        extract      store all-layer train+dev window embeddings of the (a) model of this seed
    (c) span         the span adapter on those embeddings (bertvision.train, same seed)
    (f) span-25      (c) trained on 25% of the training questions (--train-fraction 0.25)
        span-50      ... and on 50% (the 25% questions among them)
    (d) sweep-best   hyperopt over the span adapter's settings: the trial best on held-out TRAIN
    (e) ensemble     the mean window logits of the sweep's top trials and of (a) itself

Every method selects (epochs, no-answer threshold, trials) on the held-out articles of TRAIN,
never on dev. Dev scores are the official SQuAD 2.0 keys (exact, f1, HasAns_*, NoAns_*), mean ±
sample standard deviation over the seeds, with the wall-clock of each stage (time.perf_counter),
training windows/s, extraction windows/s, and stored bytes per window against dense padded
float16 states (max-seq-length x layers x hidden x 2 bytes). Where `pipeline_s` is given, it is
the cost of the result from the pretrained encoder: (a) and (b) their stage; the others (a)'s
stage + extraction + their own stage(s) (the ensemble: + the sweep).

    python scripts/experiment_squad.py --data-dir ../shared/data/squad/split --device cuda

writes OUT/results.json and OUT/results.md; finished stages are kept under OUT/<settings key>/,
so an interrupted run continues where it stopped (scripts/experiment.py's layout and records).
For a CPU run on part of the data, --train-paragraphs / --dev-paragraphs keep the first N
paragraphs of every article (squad.write_slice): the results say so.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from experiment import (
    STAGES,
    OneLineErrors,
    check_settings,
    code_text,
    device_name,
    extracted,
    finite_number,
    folder,
    mean_std,
    one_line,
    only_writer,
    refuse,
    run_as_command,
    settings_key,
    shown,
    space,
    stage,
    stages_line,
    task_data_fingerprint,
    warm_up,
)

from bertvision import __version__, shards, squad, storage
from bertvision import encoder as enc
from bertvision.config import (
    EnsembleConfig,
    ExtractConfig,
    FinetuneConfig,
    SweepConfig,
    TrainConfig,
)
from bertvision.ensemble import build_ensemble
from bertvision.extract import extract_hidden_states
from bertvision.finetune import finetune_encoder
from bertvision.records import code_info
from bertvision.span_train import load_span_data
from bertvision.sweep import run_sweep
from bertvision.train import train_adapter

TASK = "squad2"
METHODS = (
    "finetune-1",
    "finetune-3",
    "span",
    "span-25",
    "span-50",
    "sweep-best",
    "ensemble",
)
FRACTIONS = {"span-25": 0.25, "span-50": 0.5}
SHOWN_METRICS = ("exact", "f1", "HasAns_f1", "NoAns_f1")
# Settings that do not change what a stage computes: where, which seeds and methods, what is kept.
NOT_CONTENT = ("out", "seeds", "methods", "keep_embeddings", "device")
PROG = "experiment_squad.py"  # as its errors name it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrors(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/squad/split")
    parser.add_argument("--model", default="", help="encoder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--out", type=folder, default="experiment-squad", help="results folder")
    parser.add_argument("--device", default="", help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--methods", default=",".join(METHODS), help="a comma-separated subset")
    parser.add_argument("--train-paragraphs", type=int, default=0, help="per article; 0: all")
    parser.add_argument("--dev-paragraphs", type=int, default=0, help="per article; 0: all")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--finetune-lr", type=finite_number, default=5e-5)
    parser.add_argument("--finetune-batch-size", type=int, default=32)
    parser.add_argument("--adapter-epochs", type=int, default=5)
    parser.add_argument("--adapter-lr", type=finite_number, default=1e-3)
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument(
        "--val-fraction", type=finite_number, default=0.1, help="of the train articles"
    )
    parser.add_argument("--trials", type=int, default=8, help="of the sweep")
    parser.add_argument(
        "--space", default="", help="the sweep space's overrides: JSON, or a JSON file"
    )
    parser.add_argument("--top-k", type=int, default=3, help="sweep trials in the ensemble")
    parser.add_argument("--keep-embeddings", action="store_true", help="keep them (large)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    for option in ("train_paragraphs", "dev_paragraphs"):
        if getattr(args, option) < 0:
            name = "--" + option.replace("_", "-")
            parser.error(f"{name} must be >= 0 (0: all), got {getattr(args, option)}")
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    if args.top_k > args.trials:
        parser.error(f"--top-k {args.top_k} is more than --trials {args.trials}")
    args.space = space(parser, args.space)
    try:
        args.model = args.model or enc.default_model()
    except enc.ModelError as exc:
        parser.error(one_line(str(exc)))
    args.device = args.device or enc.default_device()
    check_stage_settings(parser, args)
    return args


def check_stage_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The settings of every stage checked as each stage's config will, and the windows as
    fine-tuning and extraction will cut them (the parser's error)."""
    common = {"task": TASK, "val_fraction": args.val_fraction, "device": args.device}
    finetune = check_settings(
        parser,
        {"lr": "--finetune-lr", "batch_size": "--finetune-batch-size"},
        FinetuneConfig,
        **common,
        out="finetune",
        model=args.model,
        data_dir=args.data_dir,
        lr=args.finetune_lr,
        batch_size=args.finetune_batch_size,
        max_seq_length=args.max_seq_length,
        doc_stride=args.doc_stride,
    )
    check_settings(
        parser,
        {"adapter_dim": "--adapter-dim", "lr": "--adapter-lr", "epochs": "--adapter-epochs"},
        TrainConfig,
        **common,
        embeddings="embeddings",
        out="adapter",
        adapter="span",
        adapter_dim=args.adapter_dim,
        lr=args.adapter_lr,
        epochs=args.adapter_epochs,
    )
    check_settings(
        parser,
        {},
        SweepConfig,
        **common,
        embeddings="embeddings",
        out="sweep",
        trials=args.trials,
        space=args.space,
    )
    check_settings(
        parser, {}, EnsembleConfig, task=TASK, runs="sweep", out="ensemble", top_k=args.top_k
    )
    check_windows(parser, finetune)


def check_windows(parser: argparse.ArgumentParser, cfg: FinetuneConfig) -> None:
    """The parser's error for window lengths that leave no room for the context after the
    question and the doc stride (squad.build_features), or a model without a tokenizer: found
    here, not after a fine-tuning. Cuts one short question's windows with the model's tokenizer."""
    try:
        tokenizer = enc.load_tokenizer(cfg.model)
    except enc.ModelError as exc:
        parser.error(one_line(str(exc)))
    probe = squad.Example("probe", "probe", "A context.", "A question?", (), True)
    try:
        squad.build_features(
            [probe], tokenizer, cfg.max_seq_length, cfg.doc_stride, cfg.max_question_length
        )
    except ValueError as exc:
        parser.error(f"--max-seq-length {cfg.max_seq_length}, --doc-stride {cfg.doc_stride}: {exc}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    sliced = bool(args.train_paragraphs or args.dev_paragraphs)
    with tempfile.TemporaryDirectory() as staging, ExitStack() as writing:  # nothing written
        try:  # before the checks pass
            data_dir = sliced_data(args, Path(staging)) if sliced else args.data_dir
            keyed = out / settings_key(args, task_data_fingerprint(TASK, data_dir), NOT_CONTENT)
        # no such data, a malformed file, or an encoder that cannot be loaded
        except (squad.DataError, enc.ModelError) as exc:
            refuse(str(exc), PROG)
        writing.enter_context(only_writer(out, PROG))
        if sliced:
            shutil.copytree(Path(staging, "data"), out / "data", dirs_exist_ok=True)
        data_dir = str(out / "data") if sliced else args.data_dir
        warm_up(args.device)
        STAGES.clear()
        try:
            seeds = range(args.seeds)
            records = [r for seed in seeds for r in run_seed(args, seed, data_dir, keyed)]
        except storage.FileFormatError as exc:  # a garbled stage record: one line naming it
            refuse(str(exc), PROG)
        results = {
            "settings": vars(args),
            "code_version": __version__,
            "code": code_info(),
            "device": device_name(args.device),
            "questions": {s: len(squad.load_split(s, data_dir)) for s in ("train", "dev")},
            "summary": summarise(records),
            "records": records,
        }
        # together, results.json last: a failure (a full disk) leaves both as they were
        storage.write_together(
            {
                str(out / "results.md"): markdown(results).encode(),
                str(out / "results.json"): storage.json_bytes(results, str(out / "results.json")),
            }
        )
    print(markdown(results))
    print(stages_line(args.out), file=sys.stderr)
    return results


def sliced_data(args: argparse.Namespace, staging: Path) -> str:
    """A SQuAD folder under `staging` holding the first --train-paragraphs and --dev-paragraphs
    of every article (0: all). The files of --data-dir are read first as the stages read them:
    squad.DataError naming the user's file, not the slice's, if one is missing or malformed."""
    for split in ("train", "dev"):
        squad.load_split(split, args.data_dir)
    return squad.write_slice(
        args.data_dir,
        str(staging / "data"),
        train=(0, args.train_paragraphs),
        dev=(0, args.dev_paragraphs),
    )


def run_seed(args: argparse.Namespace, seed: int, data_dir: str, keyed: Path) -> list[dict]:
    """The methods of one seed under `keyed`, the folder of these settings' key (a stage whose
    record exists there is kept)."""
    runs = keyed / "runs" / f"seed-{seed}"
    records_dir = keyed / "records" / f"seed-{seed}"
    tokens = {"max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride}
    wanted = set(args.methods)

    def finetune(epochs: int) -> dict:
        cfg = FinetuneConfig(
            task=TASK,
            out=str(runs / f"finetune-{epochs}"),
            model=args.model,
            data_dir=data_dir,
            epochs=float(epochs),
            lr=args.finetune_lr,
            batch_size=args.finetune_batch_size,
            seed=seed,
            val_fraction=args.val_fraction,
            device=args.device,
            predict_test=False,
            **tokens,
        )
        metrics = finetune_encoder(cfg)
        return {
            "dev": metrics["dev"],
            "train_s": metrics["train"]["seconds"],
            "train_examples": metrics["train"]["examples"],
        }

    done: dict[str, dict] = {}
    # (a) is needed by every method after it: its embeddings, and the ensemble's member
    done["finetune-1"] = stage(records_dir, TASK, seed, "finetune-1", lambda: finetune(1))
    if "finetune-3" in wanted:
        done["finetune-3"] = stage(records_dir, TASK, seed, "finetune-3", lambda: finetune(3))
    adapters_wanted = wanted - {"finetune-1", "finetune-3"}
    if not adapters_wanted:
        return [record for name, record in done.items() if name in wanted]

    embeddings = runs / "embeddings"

    def extract() -> dict:
        cfg = ExtractConfig(
            task=TASK,
            out=str(embeddings),
            model=str(runs / "finetune-1"),
            data_dir=data_dir,
            splits=["train", "dev"],
            device=args.device,
            **tokens,
        )
        summary = extract_hidden_states(cfg, progress=False)
        if not summary.ok:
            raise RuntimeError(f"extraction failed: {summary.failed or summary.missing}")
        return stored_bytes(str(embeddings))

    extraction = stage(records_dir, TASK, seed, "extract", extract)
    data = None  # the embeddings, loaded once for the adapters of this seed

    def shared_data():
        nonlocal data
        if data is None:
            data = load_span_data(TASK, extracted(embeddings, extract), args.device, 8.0)
        return data

    def adapter(name: str, fraction: float) -> dict:
        cfg = TrainConfig(
            task=TASK,
            embeddings=str(embeddings),
            out=str(runs / name),
            adapter="span",
            adapter_dim=args.adapter_dim,
            lr=args.adapter_lr,
            epochs=args.adapter_epochs,
            train_fraction=fraction,
            val_fraction=args.val_fraction,
            seed=seed,
            device=args.device,
        )
        metrics = train_adapter(cfg, data=shared_data(), progress=False)
        curve = storage.read_json(str(runs / name / "curve.json"))
        return {
            "dev": metrics["dev"],
            "train_s": curve["train_seconds"],
            "train_examples": curve["train_windows"] * curve["epochs_run"],
            "train_questions_fraction": fraction,
            "best_epoch": curve["best_epoch"],
        }

    for name, fraction in (("span", 1.0), *FRACTIONS.items()):
        if name in wanted:
            work = partial(adapter, name, fraction)
            done[name] = stage(records_dir, TASK, seed, name, work)

    sweep_out = runs / "sweep"

    def sweep() -> dict:
        cfg = SweepConfig(
            task=TASK,
            embeddings=str(embeddings),
            out=str(sweep_out),
            trials=args.trials,
            space=args.space,
            val_fraction=args.val_fraction,
            seed=seed,
            device=args.device,
        )
        summary = run_sweep(cfg, data=shared_data(), progress=False)
        if summary.best is None:
            raise RuntimeError(f"no trial of {sweep_out} finished")
        return {
            "dev": summary.best.dev,
            "val": summary.best.val,
            "params": summary.best.params,
            "trials": summary.trials,
            "failed": summary.failed,
        }

    if {"sweep-best", "ensemble"} & wanted:
        done["sweep-best"] = stage(records_dir, TASK, seed, "sweep-best", sweep)
    if "ensemble" in wanted:

        def ensemble() -> dict:
            cfg = EnsembleConfig(
                task=TASK,
                runs=str(sweep_out),
                out=str(runs / "ensemble"),
                top_k=args.top_k,
                with_finetuned=str(runs / "finetune-1"),
            )
            result = build_ensemble(cfg)
            return {"dev": result["ensemble"], "val": result["val"], "members": cfg.top_k + 1}

        done["ensemble"] = stage(records_dir, TASK, seed, "ensemble", ensemble)

    base = done["finetune-1"]["stage_s"] + extraction["stage_s"]
    for name, record in done.items():
        if name.startswith("finetune"):
            record["pipeline_s"] = record["stage_s"]
        elif name == "ensemble":
            record["pipeline_s"] = base + done["sweep-best"]["stage_s"] + record["stage_s"]
        else:
            record["pipeline_s"] = base + record["stage_s"]
    if not args.keep_embeddings and embeddings.exists():
        shutil.rmtree(embeddings)
    return [*(r for n, r in done.items() if n in wanted), extraction]


def stored_bytes(embeddings: str) -> dict:
    """Windows, shard seconds and stored bytes of the train+dev extraction under `embeddings`,
    with dense padded float16 (max_seq_length x layers x hidden x 2 bytes a window) beside."""
    windows, seconds, stored, dense = 0, 0.0, 0, 0
    for split in ("train", "dev"):
        plan, _ = shards.committed_shards(embeddings, TASK, split)
        committed = shards.committed_records(shards.split_url(embeddings, TASK, split), plan)
        windows += plan.num_examples
        seconds += sum(r.seconds for r in committed.values())
        stored += sum(r.bytes for r in committed.values())
        dense = plan.max_seq_length * plan.layers * plan.hidden_size * 2
    return {
        "examples": windows,
        "shard_s": round(seconds, 3),
        "windows_per_s_in_shards": round(windows / max(seconds, 1e-9), 1),
        "bytes_per_window": round(stored / windows),
        "dense_fp16_bytes_per_window": dense,
        "stored_vs_dense": round(stored / windows / dense, 4),
    }


def summarise(records: list[dict]) -> list[dict]:
    """Mean ± sample std over seeds of the shown dev metrics and timings, per method."""
    rows = []
    for method in METHODS:
        group = [r for r in records if r["method"] == method]
        if group:
            row = {"method": method, "seeds": len(group)}
            row["dev"] = {m: mean_std([r["dev"][m] for r in group]) for m in SHOWN_METRICS}
            for timing in ("stage_s", "pipeline_s", "train_ex_s"):
                if all(timing in r for r in group):
                    row[timing] = mean_std([r[timing] for r in group])
            rows.append(row)
    extract = [r for r in records if r["method"] == "extract"]
    if not extract:
        return rows
    rows.append(
        {
            "method": "extract",
            "seeds": len(extract),
            **{
                k: mean_std([r[k] for r in extract])
                for k in ("stage_s", "examples_per_s", "bytes_per_window", "stored_vs_dense")
            },
            "dense_fp16_bytes_per_window": extract[0]["dense_fp16_bytes_per_window"],
        }
    )
    return rows


def markdown(results: dict) -> str:
    settings = results["settings"]
    sliced = settings["train_paragraphs"] or settings["dev_paragraphs"]
    scope = (
        f", **part of the data: the first {settings['train_paragraphs'] or 'all'} train and "
        f"{settings['dev_paragraphs'] or 'all'} dev paragraphs of each article**"
        if sliced
        else ""
    )
    questions = results["questions"]
    lines = [
        "# SQuAD 2.0: span adapter on stored embeddings vs fine-tuning",
        "",
        f"Encoder {enc.display_name(settings['model'])}, device {results['device']}, seeds "
        f"0..{settings['seeds'] - 1}, code {code_text(results)}{scope}: "
        f"{questions['train']} train and {questions['dev']} dev questions, windows of "
        f"{settings['max_seq_length']} tokens, doc stride {settings['doc_stride']}. Dev scores "
        "(official keys, %): mean ± sample std over seeds. Times in seconds, mean over seeds.",
        "",
        "| method | " + " | ".join(f"dev {m}" for m in SHOWN_METRICS) + " | stage s | "
        "pipeline s | train windows/s |",
        "|---" * (len(SHOWN_METRICS) + 4) + "|",
    ]
    extract = None
    for row in results["summary"]:
        if row["method"] == "extract":
            extract = row
            continue
        cells = [shown(row["dev"][m]) for m in SHOWN_METRICS]
        timings = ("stage_s", "pipeline_s", "train_ex_s")
        cells += [f"{row[t]['mean']:.1f}" if t in row else "" for t in timings]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    if extract is not None:
        lines += [
            "",
            f"Extraction of (a)'s train+dev windows: {extract['stage_s']['mean']:.1f} s, "
            f"{extract['examples_per_s']['mean']:.1f} windows/s; stored "
            f"{extract['bytes_per_window']['mean']:,.0f} bytes a window, "
            f"{extract['stored_vs_dense']['mean']:.1%} of dense padded float16 "
            f"({extract['dense_fp16_bytes_per_window']:,} bytes).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_as_command(main)
