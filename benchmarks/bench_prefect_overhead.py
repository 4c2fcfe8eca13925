"""Prefect's overhead on a 200-shard extraction: the same shards extracted directly through the
core library and through the `extract-glue` flow, alternately, in one process.

    python benchmarks/bench_prefect_overhead.py                     # 200 shards of 4 examples
    python benchmarks/bench_prefect_overhead.py --repeats 3 --profile /tmp/flow.prof
    python benchmarks/bench_prefect_overhead.py --examples-per-shard 50 --shards-per-task 10
    python benchmarks/bench_prefect_overhead.py --model minilm --examples-per-shard 10

The encoder is a tiny random BERT (2 layers, hidden 32; MiniLM's tokenizer) saved to a temporary
folder, or `--model` (`minilm`: the bundled all-MiniLM-L6-v2, a real encoder's cost per shard);
the data the first shards x examples-per-shard examples of SST-2 train. "direct" is
`bertvision.extract.extract_hidden_states` (plan, then `extract_shard` per pending shard, then the
final listing: what `bertvision extract` runs); "flow" is `extract_glue(cfg)` (one task run per
`--shards-per-task` shards, the shard table and progress artifacts), run in this process
against Prefect's test harness (`prefect_test_harness`: a temporary API server on 127.0.0.1 with
a SQLite database,
results persisted to a temporary folder). Each repeat writes to fresh folders; one warm-up run of
each comes first (imports, the model's first load). Printed: wall seconds and CPU seconds (this
process and the API server: steadier than wall time on a shared machine) of each run, their
medians, flow / direct, and the overhead per shard in ms ((flow - direct) / shards, medians).
`--profile FILE` profiles one more flow run, after the timed ones, with cProfile (read with
`python -m pstats FILE`). torch runs on `--torch-threads` (1): on a shared machine, idle
threads of a second one spin and make CPU seconds swing with the load.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bertvision.config import ExtractConfig  # noqa: E402
from bertvision.encoder import default_model  # noqa: E402
from bertvision.extract import extract_hidden_states  # noqa: E402


def tiny_encoder(folder: Path) -> str:
    """A random BERT of 2 layers, hidden 32, with MiniLM's tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model()).save_pretrained(folder)
    return str(folder)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its child processes now running
    (the test harness's API server), from /proc: unlike wall time, barely moved by other jobs
    on a shared machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:  # ended meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--examples-per-shard", type=int, default=4)
    parser.add_argument("--shards-per-task", type=int, default=1, help="the flow's task runs")
    parser.add_argument(
        "--model", default="", help="encoder (default: a tiny random BERT; 'minilm': the bundled)"
    )
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/data/glue"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--profile", default="", help="cProfile one more flow run into this file")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch's intra-op threads (both ways)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")

    from bertvision_flows.extract_glue import extract_glue
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model = default_model() if args.model == "minilm" else args.model or tiny_encoder(work / "t")

    def cfg(out: str) -> ExtractConfig:
        return ExtractConfig(
            task=args.task,
            data_dir=args.data_dir,
            splits=["train"],
            model=model,
            out=str(work / out),
            device="cpu",
            shard_size=args.examples_per_shard,
            batch_size=args.examples_per_shard,
            max_train_examples=args.shards * args.examples_per_shard,
        )

    def direct(out: str) -> tuple[float, float]:
        started, cpu = time.perf_counter(), cpu_seconds()
        summary = extract_hidden_states(cfg(out), progress=False)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        assert summary.ok and len(summary.committed[f"{args.task}/train"]) == args.shards
        return seconds, cpu

    def flow(out: str, profile: bool = False) -> tuple[float, float]:
        profiler = cProfile.Profile() if profile else None
        started, cpu = time.perf_counter(), cpu_seconds()
        if profiler is not None:
            profiler.enable()
        shards = extract_glue(cfg(out), shards_per_task=args.shards_per_task)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        assert shards == {f"{args.task}/train": args.shards}
        return seconds, cpu

    load = os.getloadavg()
    print(
        f"{args.shards} shards of {args.examples_per_shard} {args.task} train examples, "
        f"{args.shards_per_task} per task run; "
        f"load average {load[0]:.2f} {load[1]:.2f} (1, 5 min)"
    )
    with (
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: work / "prefect-results"}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        print(
            f"warm-up: direct {direct('warm-direct')[0]:.1f} s, flow {flow('warm-flow')[0]:.1f} s"
        )
        runs = {"direct": [], "flow": []}
        for repeat in range(args.repeats):
            runs["direct"].append(direct(f"direct-{repeat}"))
            runs["flow"].append(flow(f"flow-{repeat}"))
            (dw, dc), (fw, fc) = runs["direct"][-1], runs["flow"][-1]
            print(
                f"repeat {repeat + 1}: direct {dw:.2f} s wall, {dc:.2f} CPU s; "
                f"flow {fw:.2f} s wall, {fc:.2f} CPU s"
            )
        if args.profile:
            flow("flow-profiled", profile=True)
    load = os.getloadavg()
    for i, what in enumerate(("wall", "CPU")):
        d = statistics.median(run[i] for run in runs["direct"])
        f = statistics.median(run[i] for run in runs["flow"])
        print(
            f"{what} seconds, median of {args.repeats}: direct {d:.2f}, flow {f:.2f}; flow / "
            f"direct {f / d:.3f} (overhead {100 * (f - d) / d:.1f} %); "
            f"{1000 * (f - d) / args.shards:.1f} ms per shard"
        )
    print(f"load average {load[0]:.2f} {load[1]:.2f} (1, 5 min)")
    if args.profile:
        print(f"profile of one more flow run (not timed): {args.profile} (python -m pstats)")


if __name__ == "__main__":
    main()
