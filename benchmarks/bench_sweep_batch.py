"""K trials trained together over one read of streamed embeddings vs the same K trained one
after another, each reading for itself. Prints wall times; never a test.

    python benchmarks/bench_sweep_batch.py [--ks 1,4,16] [--examples 600] [--epochs 2] [--azurite]

The embeddings are a synthetic shard set the shape of all-MiniLM-L6-v2's (7 stored layers of
384, float16, 16 to 128 tokens an example), written with the real ShardWriter to a local folder
and streamed (max_resident_gb 0): every pass decodes the shards as a sweep over embeddings too
large to hold does. Trials differ in seed and learning rate and share the sweep's shard order
(shuffle_seed), as a sweep's batch does. `--azurite` writes the shards to a container of a fresh
Azurite on 127.0.0.1 (tests/azurite.py; scripts/setup installs it) and streams them from its
az:// URL, the regime a sweep over embeddings in Azure Blob Storage is in: every pass a download.

The table, a row per K, wall and CPU seconds each: "together" (train_together, one read of the
shards for the K trials), "separate" (train_adapter K times, each reading for itself; "-" above
--skip-separate-above), "speed-up" (separate / together) and "/ one trial" (together / one
trial alone: K = 1's separate time, or K = 1's together time where separate is skipped for it;
"-" while K = 1 has not run, so put 1 first in --ks): 3.0 at K = 16 says that 16 trials
together took 3 times as long as one trial alone.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bertvision import glue
from bertvision.config import TrainConfig
from bertvision.embeddings import load_embeddings
from bertvision.schema import ExtractionPlan, shard_schema
from bertvision.shards import ShardWriter, split_url, write_plan
from bertvision.together import train_together
from bertvision.train import train_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LAYERS, HIDDEN = 7, 384  # all-MiniLM-L6-v2: embeddings + 6 layers


def write_split(out: str, split: str, n: int, shard_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    lengths = rng.integers(16, 129, n)
    plan = ExtractionPlan(
        task="rte", split=split, model="synthetic-minilm-shape", model_fingerprint="b" * 16,
        data_fingerprint=hashlib.sha256(f"{split}{seed}{n}".encode()).hexdigest()[:16],
        num_examples=n, shard_size=shard_size, max_seq_length=128, dtype="float16",
        layers=LAYERS, hidden_size=HIDDEN, regression=False,
    )  # fmt: skip
    folder = split_url(out, "rte", split)
    write_plan(folder, plan)
    label_type = shard_schema(regression=False).field("label").type
    for index in range(plan.num_shards):
        rows = range(*plan.shard_range(index))
        hidden = []
        for i in rows:
            h = rng.normal(size=(LAYERS, lengths[i], HIDDEN)).astype(np.float16)
            h[-1, :, labels[i]] += np.float16(0.5)
            hidden.append(h.tobytes())
        table = pa.table(
            {
                "example_id": pa.array(list(rows), pa.int64()),
                "label": pa.array([int(labels[i]) for i in rows], label_type),
                "length": pa.array([int(lengths[i]) for i in rows], pa.int32()),
                "hidden": pa.array(hidden, pa.large_binary()),
            }
        )
        with ShardWriter(folder, plan, index) as writer:
            writer.write(table)
            writer.commit()


def trials(emb: str, out: str, k: int, args) -> list[TrainConfig]:
    return [
        TrainConfig(
            task="rte",
            embeddings=emb,
            out=f"{out}/trial-{i}",
            adapter=args.adapter,
            adapter_dim=args.adapter_dim,
            seed=i,
            lr=1e-3 * (1 + i % 4),
            epochs=args.epochs,
            patience=0,
            batch_size=32,
            device="cpu",
            shuffle_seed=0,
            shuffle_shards=args.shuffle_shards,
            max_resident_gb=0,
        )  # fmt: skip
        for i in range(k)
    ]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default, and this docstring as written (the table's columns)."""


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__)
    parser.add_argument(
        "--ks", default="1,4,16", help="comma-separated batch sizes K, a table row each, in order"
    )
    parser.add_argument("--examples", type=int, default=600, help="train examples (dev: 1/6)")
    parser.add_argument("--shard-size", type=int, default=100, help="examples per shard")
    parser.add_argument(
        "--shuffle-shards",
        type=int,
        default=2,
        help="shards whose examples are shuffled together (TrainConfig.shuffle_shards)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every trial")
    parser.add_argument("--adapter", default="pooler", help="the adapter every trial trains")
    parser.add_argument("--adapter-dim", type=int, default=16, help="the adapter's width")
    parser.add_argument(
        "--skip-separate-above",
        type=int,
        default=16,
        help='K above which the trials are not also trained one after another ("separate": -)',
    )
    parser.add_argument(
        "--azurite",
        action="store_true",
        help="stream the shards from a fresh Azurite's az:// URL instead of a local folder",
    )
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as root:
        if not args.azurite:
            measure(f"{root}/emb", root, ks, args)
            return
        from azurite import Azurite

        service = Azurite(Path(root) / "azurite").start()
        try:
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = service.connection_string()
            measure(f"az://{service.create_container()}/emb", root, ks, args)
        finally:
            service.stop()


def measure(emb: str, root: str, ks: list[int], args: argparse.Namespace) -> None:
    """Write the synthetic shards to `emb`, then print the table of K trials together vs apart."""
    started = time.perf_counter()
    write_split(emb, "train", args.examples, args.shard_size, seed=1)
    write_split(emb, "dev", max(args.examples // 6, 2), args.shard_size, seed=2)
    data = load_embeddings(glue.get_task("rte"), emb, device="cpu", max_resident_gb=0)
    gib = sum(s.num_tokens for s in data.splits.values()) * LAYERS * HIDDEN * 2 / 2**30
    print(
        f"shards: {args.examples} train examples, {gib:.2f} GiB of float16 states, written in "
        f"{time.perf_counter() - started:.0f} s; {args.adapter} (dim {args.adapter_dim}), "
        f"{args.epochs} epochs, batch 32, streamed from {emb}"
    )
    print("wall s (this machine's load inflates them) and CPU s of this process;")
    alone = args.skip_separate_above >= 1
    print(
        "speed-up: separate / together; / one trial: together / K = 1 "
        + ("alone (separate)" if alone else "together (separate skipped)")
    )
    head = ("K", "together", "separate", "speed-up", "/ one trial")
    print(
        f"{head[0]:>3}  "
        + "  ".join(f"{h + ' ' + u:>18}" for h in head[1:] for u in ("wall", "CPU"))
    )
    # untimed: the first training pays the process's one-time costs (imports, thread pools, the
    # storage client's session), which would otherwise be charged to whichever K runs first
    one_by_one(trials(emb, f"{root}/warm-up", 1, args), data)
    one_trial: tuple[float, float] | None = None
    for k in ks:
        together = timed(train_together, trials(emb, f"{root}/together-{k}", k, args), data)
        separate = None
        if k <= args.skip_separate_above:
            separate = timed(one_by_one, trials(emb, f"{root}/separate-{k}", k, args), data)
        if k == 1:
            one_trial = separate or together
        cells = [*together, *(separate or (None, None))]
        cells += [separate[j] / together[j] if separate else None for j in (0, 1)]
        cells += [together[j] / one_trial[j] if one_trial else None for j in (0, 1)]
        print(
            f"{k:>3}  " + "  ".join(f"{c:18.2f}" if c is not None else f"{'-':>18}" for c in cells),
            flush=True,
        )


def one_by_one(cfgs: list[TrainConfig], data) -> list[dict]:
    return [train_adapter(cfg, data=data, progress=False) for cfg in cfgs]


def timed(work, *args) -> tuple[float, float]:
    """Wall and CPU seconds (time.process_time: every thread of this process) of `work(*args)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = work(*args)
    assert all(isinstance(r, dict) for r in results), results
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
