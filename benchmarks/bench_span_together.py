"""K span-adapter trials (SQuAD 2.0 windows) trained together over one read of streamed window
embeddings vs the same K trained one after another, each reading for itself. Prints wall and CPU
seconds; never a test.

    python benchmarks/bench_span_together.py --data-dir ../shared/data/squad/split \
        [--ks 1,4] [--paragraphs 4] [--epochs 2] [--model M] [--device cuda]

Writes a slice of a SQuAD data folder (the first PARAGRAPHS paragraphs of the first
TRAIN_ARTICLES train articles and of the first DEV_ARTICLES dev articles), extracts every
window's hidden states of all layers with `bertvision.extract` (MiniLM by default), then streams
them (max_resident_gb 0) to K trials that differ in seed and learning rate and share the sweep's
shard order (shuffle_seed), as a sweep's batch does. The separate trials get the same settings
in other folders.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_sweep_batch import one_by_one, timed

from bertvision import squad
from bertvision.config import ExtractConfig, TrainConfig
from bertvision.extract import extract_hidden_states
from bertvision.span_train import load_span_data
from bertvision.together import train_together


def trials(emb: str, out: str, k: int, args) -> list[TrainConfig]:
    return [
        TrainConfig(
            task="squad2",
            adapter="span",
            embeddings=emb,
            out=f"{out}/trial-{i}",
            adapter_dim=args.adapter_dim,
            seed=i,
            lr=1e-3 * (1 + i % 4),
            epochs=args.epochs,
            patience=0,
            batch_size=32,
            device=args.device,
            shuffle_seed=0,
            shuffle_shards=args.shuffle_shards,
            max_resident_gb=0,
            val_fraction=0.34,
        )  # fmt: skip
        for i in range(k)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data-dir", default="../shared/data/squad/split")
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default="1,4")
    parser.add_argument("--train-articles", type=int, default=3)
    parser.add_argument("--dev-articles", type=int, default=1)
    parser.add_argument("--paragraphs", type=int, default=4, help="per article; 0: all")
    parser.add_argument("--shard-size", type=int, default=50, help="windows a shard")
    parser.add_argument("--shuffle-shards", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--adapter-dim", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        data_dir = squad.write_slice(
            args.data_dir,
            str(Path(root, "data")),
            train=(args.train_articles, args.paragraphs),
            dev=(args.dev_articles, args.paragraphs),
        )
        extract = ExtractConfig(
            task="squad2", data_dir=data_dir, model=args.model, out=str(Path(root, "emb")),
            splits=["train", "dev"], device=args.device, shard_size=args.shard_size,
        )  # fmt: skip
        started = time.perf_counter()
        assert extract_hidden_states(extract, progress=False).ok
        data = load_span_data("squad2", extract.out, args.device, max_resident_gb=0)
        train, dev = data.splits["train"], data.splits["dev"]
        print(
            f"windows: {train.num_windows} train in {len(train.data.shard_urls)} shards, "
            f"{dev.num_windows} dev, extracted in {time.perf_counter() - started:.0f} s; span "
            f"adapter (dim {args.adapter_dim}), {args.epochs} epochs, batch 32, streamed, "
            f"device {args.device}"
        )
        print("wall s (this machine's load inflates them) and CPU s of this process:")
        head = ("K", "together", "separate", "speed-up")
        print(
            f"{head[0]:>3}  "
            + "  ".join(f"{h + ' ' + u:>18}" for h in head[1:] for u in ("wall", "CPU"))
        )
        for k in [int(k) for k in args.ks.split(",")]:
            together = timed(train_together, trials(extract.out, f"{root}/t{k}", k, args), data)
            separate = timed(one_by_one, trials(extract.out, f"{root}/s{k}", k, args), data)
            cells = [*together, *separate, *(separate[j] / together[j] for j in (0, 1))]
            print(f"{k:>3}  " + "  ".join(f"{c:18.2f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
