"""`bertvision status` on an extraction of 10,000 committed shards, on the local disk and on
Azure Blob Storage (Azurite), in seconds.

    python benchmarks/bench_status.py                        # 10,000 shards, local and Azurite
    python benchmarks/bench_status.py --shards 1000 --where local

The shards are written through the real commit protocol (shards.ShardWriter: the staged file, then
the commit record), one row each of a 1-layer, 2-wide float16 state, by --threads threads, so that
building them does not dominate. Then `bertvision status URL --json` runs as a subprocess
--repeats times (the figures: the best and the median of its wall seconds, the least CPU
seconds; on a shared machine CPU seconds are the steadier figure), beside the same
command on a 1-shard extraction (the interpreter's start and imports, which every command pays),
and `shards.status` called in this process (what the command does, without the start-up).
Azurite is started on 127.0.0.1 with its data in a temporary folder (tests/azurite.py);
`--reuse FOLDER` times an earlier run's shards again (another version of the code, say).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bertvision.schema import ExtractionPlan, shard_schema  # noqa: E402
from bertvision.shards import ShardWriter, split_url, status, write_plan  # noqa: E402


def tiny_plan(shards: int) -> ExtractionPlan:
    """An SST-2 train extraction of `shards` one-row shards of a 1-layer, 2-wide encoder."""
    return ExtractionPlan(
        task="sst2",
        split="train",
        model="bench-status",
        model_fingerprint="f" * 16,
        data_fingerprint="d" * 16,
        num_examples=shards,
        shard_size=1,
        max_seq_length=8,
        dtype="float16",
        layers=1,
        hidden_size=2,
        regression=False,
    )


def write_extraction(out: str, shards: int, threads: int) -> float:
    """Plan and commit `shards` shards under `out` with the real ShardWriter; seconds taken."""
    plan = tiny_plan(shards)
    folder = split_url(out, plan.task, plan.split)
    write_plan(folder, plan)
    schema = shard_schema(regression=False)

    def commit(index: int) -> None:
        table = pa.table(
            {
                "example_id": pa.array([index], pa.int64()),
                "label": pa.array([index % 2], pa.int64()),
                "length": pa.array([1], pa.int32()),
                "hidden": pa.array(
                    [np.array([0.5, -0.5], np.float16).tobytes()], pa.large_binary()
                ),
            },
            schema=schema,
        )
        with ShardWriter(folder, plan, index) as writer:
            writer.write(table)
            writer.commit()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for done, _ in enumerate(pool.map(commit, range(shards)), 1):
            if done % 1000 == 0:
                print(f"  {done} shards committed ({time.perf_counter() - started:.0f} s)")
    return time.perf_counter() - started


def time_status(url: str, repeats: int, env: dict[str, str]) -> tuple[list[float], float, str]:
    """Wall seconds of each `bertvision status URL --json` subprocess, the least CPU seconds
    (user + system) one took, and its last output."""
    command = [sys.executable, "-m", "bertvision.cli", "status", url, "--json"]
    seconds, cpu, output = [], [], ""
    for _ in range(repeats):
        started, used = time.perf_counter(), _children_cpu()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        seconds.append(time.perf_counter() - started)
        cpu.append(_children_cpu() - used)
        output = done.stdout
    return seconds, min(cpu), output


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(where: str, out: str, shards: int, args, env: dict[str, str]) -> None:
    baseline = f"{out}-one"
    if not args.reuse:
        print(f"{where}: writing {shards:,} shards to {out} ({args.threads} threads)")
        built = write_extraction(out, shards, args.threads)
        print(f"{where}: {shards:,} shards committed in {built:.1f} s")
        write_extraction(baseline, 1, 1)
    base, base_cpu, _ = time_status(baseline, args.repeats, env)
    wall, cpu, output = time_status(out, args.repeats, env)
    inside, inside_cpu = [], []
    for _ in range(args.repeats):
        started, used = time.perf_counter(), time.process_time()
        status(out)
        inside.append(time.perf_counter() - started)
        inside_cpu.append(time.process_time() - used)
    counts = json.loads(output)["sst2/train"]
    print(
        f"{where}: bertvision status on {shards:,} shards: best {min(wall):.2f} s "
        f"({cpu:.2f} CPU s), median {statistics.median(wall):.2f} s of {args.repeats}; on 1 "
        f"shard (start-up): best {min(base):.2f} s ({base_cpu:.2f} CPU s); in this process "
        f"(shards.status, no start-up): best {min(inside):.2f} s ({min(inside_cpu):.2f} CPU s); "
        f"reports {counts['done']:,} done, {counts['missing']} missing, {counts['failed']} failed"
    )
    assert counts["done"] == shards, counts


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--where", default="local,azurite", help="local, azurite or both")
    parser.add_argument("--threads", type=int, default=16, help="threads writing shards")
    parser.add_argument("--repeats", type=int, default=3, help="runs of bertvision status")
    parser.add_argument(
        "--reuse", default="", help="the folder of an earlier run (printed): time its shards again"
    )
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min)")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    work = Path(args.reuse or tempfile.mkdtemp(prefix="bench-status-"))
    print(f"data in {work}")
    wanted = args.where.split(",")
    if "local" in wanted:
        measure("local", str(work / "emb"), args.shards, args, env)
    if "azurite" in wanted:
        from azurite import Azurite

        service = Azurite(work / "azurite").start()
        try:
            if args.reuse:
                container = (work / "container").read_text()
            else:
                container = service.create_container()
                (work / "container").write_text(container)
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = service.connection_string()
            env = {k: v for k, v in env.items() if not k.startswith("AZURE_STORAGE_")}
            env["AZURE_STORAGE_CONNECTION_STRING"] = service.connection_string()
            print(f"Azurite on 127.0.0.1:{service.port} (data in {service.location})")
            measure("azurite", f"az://{container}/emb", args.shards, args, env)
        finally:
            service.stop()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min)")


if __name__ == "__main__":
    main()
