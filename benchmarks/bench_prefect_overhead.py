"""Prefect's overhead on a 200-shard extraction: the same shards extracted directly through the
core library and through the `extract-glue` flow, alternately, in one process.

    python benchmarks/bench_prefect_overhead.py                     # 200 shards of 4 examples
    python benchmarks/bench_prefect_overhead.py --repeats 3 --profile /tmp/flow.prof

The encoder is a tiny random BERT (2 layers, hidden 32; MiniLM's tokenizer) saved to a temporary
folder; the data the first shards x examples-per-shard examples of SST-2 train. "direct" is
`bertvision.extract.extract_hidden_states` (plan, then `extract_shard` per pending shard, then the
final listing: what `bertvision extract` runs); "flow" is `extract_glue(cfg)` (one task run per
shard, the shard table and progress artifacts), run in this process against Prefect's test
harness (`prefect_test_harness`: a temporary API server on 127.0.0.1 with a SQLite database,
results persisted to a temporary folder). Each repeat writes to fresh folders; one warm-up run of
each comes first (imports, the model's first load). Printed: wall seconds of each run, the
medians, flow / direct, and the overhead per shard in ms ((flow - direct) / shards, medians).
`--profile FILE` profiles the last flow run with cProfile (read with `python -m pstats FILE`).
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

from bertvision.config import ExtractConfig  # noqa: E402
from bertvision.encoder import default_model  # noqa: E402
from bertvision.extract import extract_hidden_states  # noqa: E402


def tiny_encoder(folder: Path) -> str:
    """A random BERT of 2 layers, hidden 32, with MiniLM's tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model()).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--examples-per-shard", type=int, default=4)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=str(REPO.parent.parent / "shared/data/glue"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--profile", default="", help="cProfile the last flow run into this file")
    args = parser.parse_args()
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")

    from bertvision_flows.extract_glue import extract_glue
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model = tiny_encoder(work / "tiny-bert")

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

    def direct(out: str) -> float:
        started = time.perf_counter()
        summary = extract_hidden_states(cfg(out), progress=False)
        seconds = time.perf_counter() - started
        assert summary.ok and len(summary.committed[f"{args.task}/train"]) == args.shards
        return seconds

    def flow(out: str, profile: bool = False) -> float:
        profiler = cProfile.Profile() if profile else None
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        shards = extract_glue(cfg(out))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        seconds = time.perf_counter() - started
        assert shards == {f"{args.task}/train": args.shards}
        return seconds

    load = os.getloadavg()
    print(
        f"{args.shards} shards of {args.examples_per_shard} {args.task} train examples; "
        f"load average {load[0]:.2f} {load[1]:.2f} (1, 5 min)"
    )
    with (
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: work / "prefect-results"}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        print(f"warm-up: direct {direct('warm-direct'):.1f} s, flow {flow('warm-flow'):.1f} s")
        times = {"direct": [], "flow": []}
        for repeat in range(args.repeats):
            times["direct"].append(direct(f"direct-{repeat}"))
            last = repeat == args.repeats - 1
            times["flow"].append(flow(f"flow-{repeat}", profile=last and bool(args.profile)))
            print(
                f"repeat {repeat + 1}: direct {times['direct'][-1]:.2f} s, "
                f"flow {times['flow'][-1]:.2f} s"
            )
    d, f = statistics.median(times["direct"]), statistics.median(times["flow"])
    load = os.getloadavg()
    print(
        f"median of {args.repeats}: direct {d:.2f} s, flow {f:.2f} s; flow / direct "
        f"{f / d:.3f} (overhead {100 * (f - d) / d:.1f} %); {1000 * (f - d) / args.shards:.1f} ms "
        f"per shard; load average {load[0]:.2f} {load[1]:.2f}"
    )
    if args.profile:
        print(f"profile of the last flow run: {args.profile} (python -m pstats)")


if __name__ == "__main__":
    main()
