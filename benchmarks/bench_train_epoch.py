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

Streamed input (`--max-resident-gb 0`): every epoch reads the train shards, the next
`--read-ahead` groups of `--shuffle-shards` shards on a reading thread (0: in turn). The read is
then printed twice: the raw bytes fetched (READ_THREADS files at once, no decoding) and
`read_packed`. `--azurite` first copies the embeddings into a container of a fresh Azurite
(tests/azurite.py; needs .tools, scripts/setup) and trains from its az:// URL.

    python benchmarks/bench_train_epoch.py --embeddings emb [--task rte] [--adapter pooler]
        [--epochs 3] [--repeats 2] [--device cpu] [--paths cli,in-process]
        [--max-resident-gb 0 --shuffle-shards 2 --read-ahead 1] [--azurite]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bertvision import storage  # noqa: E402
from bertvision.embeddings import READ_THREADS, load_embeddings, read_packed  # noqa: E402
from bertvision.train import TrainConfig, train_adapter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--embeddings", required=True, help="an extraction's folder or URL")
    parser.add_argument("--task", default="rte")
    parser.add_argument("--adapter", default="pooler")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paths", default="cli,in-process", help="which, comma-separated")
    parser.add_argument("--max-resident-gb", type=float, default=8.0, help="0: streamed")
    parser.add_argument("--shuffle-shards", type=int, default=4)
    parser.add_argument("--read-ahead", type=int, default=1)
    parser.add_argument("--azurite", action="store_true", help="train from a copy on Azurite")
    args = parser.parse_args()
    embeddings = args.embeddings
    service = None
    if args.azurite:
        service, embeddings = copy_to_azurite(args.embeddings, args.task)
    settings = {
        "task": args.task,
        "embeddings": embeddings,
        "adapter": args.adapter,
        "epochs": args.epochs,
        "device": args.device,
        "max_resident_gb": args.max_resident_gb,
        "shuffle_shards": args.shuffle_shards,
        "read_ahead": args.read_ahead,
    }
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    print(f"settings: {settings}")
    paths = args.paths.split(",")
    epochs: dict[str, list[dict]] = {path: [] for path in paths}
    metrics: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as root:
        data = load_embeddings(
            args.task, embeddings, device=args.device, max_resident_gb=args.max_resident_gb
        )
        for repeat in range(args.repeats):
            order = paths if repeat % 2 == 0 else paths[::-1]
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
        dev = {path: metrics[path]["dev"] for path in paths}
        same = all(value == dev[paths[0]] for value in dev.values())
        print(f"dev metrics: {dev[paths[0]]} (paths equal: {same})")

        train = data.splits["train"]
        size = shard_bytes(train.shard_urls)
        started, cpu_started = time.perf_counter(), time.process_time()
        fetch(train.shard_urls)
        raw_s, raw_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        started, cpu_started = time.perf_counter(), time.process_time()
        read_packed(train.shard_urls, train.plan, args.device)
        read_s, read_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if service is not None:
        service.stop()
    print(f"\nthe {len(train.shard_urls)} train shard(s), {size / 1e6:.1f} MB, read once:")
    print(f"  raw bytes  {raw_s:.2f} s ({raw_cpu:.2f} s CPU), {size / raw_s / 1e6:.1f} MB/s")
    print(f"  decoded    {read_s:.2f} s ({read_cpu:.2f} s CPU), {size / read_s / 1e6:.1f} MB/s")
    for path, rows in epochs.items():
        wall = statistics.median(e["seconds"] for e in rows)
        cpu = statistics.median(e["cpu_seconds"] for e in rows)
        print(
            f"{path:12} median epoch {wall:.2f} s ({cpu:.2f} s CPU): {wall / raw_s:.2f}x the raw "
            f"read, {wall / read_s:.2f}x the decoded read ({cpu / read_cpu:.2f}x in CPU); "
            "target <= 1.25x"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


def fetch(urls: list[str]) -> None:
    """Every byte of the files at `urls`, READ_THREADS files at once, nothing decoded."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for _ in pool.map(storage.read_bytes, urls):
            pass


def copy_to_azurite(embeddings: str, task: str):
    """(the Azurite started, the az:// URL of a copy of `embeddings`' `task` folder on it); this
    process's AZURE_STORAGE_CONNECTION_STRING then points to it (the CLI path inherits it)."""
    from azurite import Azurite

    service = Azurite(Path(tempfile.mkdtemp(prefix="bench-azurite-"))).start()
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = service.connection_string()
    url = f"az://{service.create_container()}/emb"
    local = Path(embeddings) / task
    fs, root = storage.url_to_fs(url)
    for file in sorted(local.rglob("*")):
        if file.is_file():
            fs.pipe_file(f"{root}/{task}/{file.relative_to(local).as_posix()}", file.read_bytes())
    print(f"Azurite on 127.0.0.1:{service.port}: {embeddings}/{task} copied to {url}")
    return service, url


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
