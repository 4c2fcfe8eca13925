"""Benchmark of an adapter epoch: `bertvision train` (a command in its own process) against
`train_adapter` in-process on embeddings loaded beforehand (`data=`, as scripts/experiment.py
trains), against the time to read the same shards once (issue 11).

On embeddings already extracted (e.g. `bertvision extract --task rte --data-dir glue --splits
train,dev --max-train-examples 800 --out emb`) it runs, in one process and one after the other,
each path --repeats times, alternating their order, with the same TrainConfig (a fresh --out each
time), and prints per epoch the training pass's wall-clock seconds and CPU seconds (all threads;
curve.json's `seconds` and `cpu_seconds`), both paths' dev metrics (which must be equal), then
the read rate of the train split's shards (bytes of the shard files read and decoded into one
`Packed`, as training holds them: `embeddings.read_packed`) and the ratio of the median epoch
to that read. The load average (1 minute) is printed before and after: on a shared machine
compare CPU seconds, which waiting does not inflate as it does wall-clock seconds.

    python benchmarks/bench_train_epoch.py --embeddings emb [--task rte] [--adapter pooler]
        [--epochs 3] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertvision import storage
from bertvision.embeddings import load_embeddings, read_packed
from bertvision.train import TrainConfig, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", required=True, help="an extraction's folder or URL")
    parser.add_argument("--task", default="rte")
    parser.add_argument("--adapter", default="pooler")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    settings = {
        "task": args.task,
        "embeddings": args.embeddings,
        "adapter": args.adapter,
        "epochs": args.epochs,
        "device": args.device,
    }
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    epochs: dict[str, list[dict]] = {"cli": [], "in-process": []}
    metrics: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as root:
        data = load_embeddings(args.task, args.embeddings, device=args.device)
        for repeat in range(args.repeats):
            order = ("cli", "in-process") if repeat % 2 == 0 else ("in-process", "cli")
            for path in order:
                out = str(Path(root) / f"{path}-{repeat}")
                if path == "cli":
                    metrics[path] = run_cli(settings, out)
                else:
                    cfg = TrainConfig(**settings, out=out)
                    metrics[path] = train_adapter(cfg, data=data, progress=False)
                curve = json.loads(Path(out, "curve.json").read_text())
                epochs[path] += curve["epochs"]
        print(f"\n{args.task} {args.adapter}, {args.epochs} epochs x {args.repeats} runs a path")
        print(f"{'path':12} {'epoch s (wall)':>40}  {'epoch s (CPU)':>40}")
        for path, rows in epochs.items():
            wall = " ".join(f"{e['seconds']:.2f}" for e in rows)
            cpu = " ".join(f"{e['cpu_seconds']:.2f}" for e in rows)
            print(f"{path:12} {wall:>40}  {cpu:>40}")
        same = metrics["cli"]["dev"] == metrics["in-process"]["dev"]
        print(f"dev metrics: {metrics['cli']['dev']} (paths equal: {same})")

        train = data.splits["train"]
        size = shard_bytes(train.shard_urls)
        started, cpu_started = time.perf_counter(), time.process_time()
        read_packed(train.shard_urls, train.plan, args.device)
        read_s, read_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(
        f"\nreading the {len(train.shard_urls)} train shard(s) once: {size / 1e6:.1f} MB in "
        f"{read_s:.2f} s ({read_cpu:.2f} s CPU), {size / read_s / 1e6:.1f} MB/s"
    )
    for path, rows in epochs.items():
        wall = statistics.median(e["seconds"] for e in rows)
        cpu = statistics.median(e["cpu_seconds"] for e in rows)
        print(
            f"{path:12} median epoch {wall:.2f} s ({cpu:.2f} s CPU): "
            f"{wall / read_s:.2f}x the read ({cpu / read_cpu:.2f}x in CPU); target <= 1.25x"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


def shard_bytes(urls: list[str]) -> int:
    """Bytes of the files at `urls`."""
    total = 0
    for url in urls:
        fs, path = storage.url_to_fs(url)
        total += fs.size(path)
    return total


def run_cli(settings: dict, out: str) -> dict:
    """`bertvision train` with `settings`, in a process of its own (this interpreter); its
    metrics.json."""
    options = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    command = [sys.executable, "-m", "bertvision.cli", "train", *options, f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bertvision train failed:\n{done.stderr}")
    return json.loads(done.stdout)


if __name__ == "__main__":
    main()
