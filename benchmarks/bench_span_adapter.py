"""Benchmark of the span adapter on SQuAD 2.0 windows: windows/s of training and the dev EM/F1.

Writes a slice of a SQuAD data folder (the first PARAGRAPHS paragraphs of the first
TRAIN_ARTICLES train articles and of the first DEV_ARTICLES dev articles) to a temporary
folder, extracts every window's hidden states of all layers with `bertvision.extract` (MiniLM
by default: not fine-tuned, which changes the scores, not the speed), trains the span adapter
on them with `bertvision.train` and prints the settings, the extraction's and the adapter's
windows/s (train windows x epochs / training seconds, validation excluded; curve.json) and the
official dev scores. `--max-resident-gb 0` streams the windows from their shards each epoch.

    python benchmarks/bench_span_adapter.py --data-dir ../shared/data/squad/split \
        [--model M] [--device cuda] [--epochs 3] [--max-seq-length 384] [--train-articles 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bertvision import squad
from bertvision.config import ExtractConfig, TrainConfig
from bertvision.extract import extract_hidden_states
from bertvision.train import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", default="../shared/data/squad/split")
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--max-resident-gb", type=float, default=8.0)
    parser.add_argument("--train-articles", type=int, default=3)
    parser.add_argument("--dev-articles", type=int, default=1)
    parser.add_argument("--paragraphs", type=int, default=10, help="per article; 0: all")
    parser.add_argument("--val-fraction", type=float, default=0.34)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = squad.write_slice(
            args.data_dir,
            str(Path(tmp, "data")),
            train=(args.train_articles, args.paragraphs),
            dev=(args.dev_articles, args.paragraphs),
        )
        extract = ExtractConfig(
            task="squad2",
            data_dir=data,
            model=args.model,
            out=str(Path(tmp, "emb")),
            splits=["train", "dev"],
            device=args.device,
            max_seq_length=args.max_seq_length,
            doc_stride=args.doc_stride,
            dtype=args.dtype,
        )
        started = time.perf_counter()
        summary = extract_hidden_states(extract)
        extract_seconds = time.perf_counter() - started
        assert summary.ok, summary.failed
        cfg = TrainConfig(
            task="squad2",
            adapter="span",
            embeddings=extract.out,
            out=str(Path(tmp, "span")),
            device=args.device,
            epochs=args.epochs,
            patience=0,
            batch_size=args.batch_size,
            lr=args.lr,
            adapter_dim=args.adapter_dim,
            max_resident_gb=args.max_resident_gb,
            val_fraction=args.val_fraction,
        )
        metrics = train_adapter(cfg)
        curve = json.loads(Path(cfg.out, "curve.json").read_text())
    windows = curve["train_windows"] + curve["val_windows"]
    dev, val = metrics["dev"], metrics["val"]
    eval_seconds = sum(e["eval_seconds"] for e in curve["epochs"])
    print(
        f"model {extract.model}, device {cfg.device}, windows of {extract.max_seq_length} tokens, "
        f"doc stride {extract.doc_stride}, stored {extract.dtype}, "
        f"{'streamed' if args.max_resident_gb == 0 else 'resident'}\n"
        f"extraction (train + dev): {extract_seconds:.1f} s\n"
        f"span adapter (dim {cfg.adapter_dim}, batch {cfg.batch_size}, lr {cfg.lr}): "
        f"{curve['train_windows']} train windows x {curve['epochs_run']} epochs in "
        f"{curve['train_seconds']} s: {curve['train_windows_per_second']} windows/s; "
        f"validation {eval_seconds:.1f} s in all ({curve['val_windows']} windows an epoch; "
        f"{windows} train windows extracted)\n"
        f"val ({val['total']} questions of the held-out articles): EM {val['exact']:.2f} "
        f"F1 {val['f1']:.2f}; no-answer threshold {metrics['no_answer_threshold']:.3f}\n"
        f"dev ({dev['total']} questions): EM {dev['exact']:.2f} F1 {dev['f1']:.2f}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in dev.items() if k.startswith(("HasAns", "NoAns")))
    )


if __name__ == "__main__":
    main()
