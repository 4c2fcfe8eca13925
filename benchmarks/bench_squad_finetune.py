"""Benchmark of SQuAD 2.0 fine-tuning: windows/s of training and the dev EM/F1 of a short run.

Writes a slice of a SQuAD data folder (the first PARAGRAPHS paragraphs of the first
TRAIN_ARTICLES train articles and of the first DEV_ARTICLES dev articles) to a temporary
folder, fine-tunes on it with `bertvision.finetune` (the held-out articles choose the
no-answer threshold) and prints the settings, the training windows/s and the official dev
scores. Without slicing (`--paragraphs 0 --train-articles 0 --dev-articles 0`) it is a full run.

    python benchmarks/bench_squad_finetune.py --data-dir ../shared/data/squad/split \
        [--model M] [--device cuda] [--epochs 1] [--max-seq-length 384] [--train-articles 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bertvision import squad
from bertvision.config import FinetuneConfig
from bertvision.finetune import finetune_encoder


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", default="../shared/data/squad/split")
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--train-articles", type=int, default=4)
    parser.add_argument("--dev-articles", type=int, default=1)
    parser.add_argument("--paragraphs", type=int, default=4, help="per article; 0: all")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = squad.write_slice(
            args.data_dir,
            str(Path(tmp, "data")),
            train=(args.train_articles, args.paragraphs),
            dev=(args.dev_articles, args.paragraphs),
        )
        cfg = FinetuneConfig(
            task="squad2",
            data_dir=data,
            model=args.model,
            out=str(Path(tmp, "ckpt")),
            device=args.device,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            max_seq_length=args.max_seq_length,
            doc_stride=args.doc_stride,
            val_fraction=args.val_fraction,
        )
        metrics = finetune_encoder(cfg)
    train, dev, val = metrics["train"], metrics["dev"], metrics["val"]
    print(
        f"model {cfg.model}, device {cfg.device}, windows of {cfg.max_seq_length} tokens, doc "
        f"stride {cfg.doc_stride}, batch {cfg.batch_size}, lr {cfg.lr}, epochs {cfg.epochs}\n"
        f"train: {train['examples']} windows, {train['steps']} steps in {train['seconds']} s: "
        f"{train['examples_per_second']} windows/s\n"
        f"val ({val['total']} questions of the held-out articles): EM {val['exact']:.2f} "
        f"F1 {val['f1']:.2f}; no-answer threshold {metrics['no_answer_threshold']:.3f}\n"
        f"dev ({dev['total']} questions): EM {dev['exact']:.2f} F1 {dev['f1']:.2f}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in dev.items() if k.startswith(("HasAns", "NoAns")))
    )


if __name__ == "__main__":
    main()
