"""Benchmark of the shard format: `hidden` as raw bytes (formats 6, 7) against a list of floats
(formats 2, 3), writing and reading the same states, in one run.

Extracts a task/split once with the bundled all-MiniLM-L6-v2 (bertvision.extract, float16), then
writes its states again through the real ShardWriter (Parquet options, sha256, commit) as a
format-6 shard and as a format-2 shard, and reads each back the way training does
(shards.read_shard + shards.hidden_arrays), `--repeats` times, alternating. Prints, per format,
the median CPU seconds (this process, all threads) and wall seconds of writing (building the
`hidden` column from the host states, Parquet encoding and zstd, sha256, the commit) and of
reading (read_shard: the file with its page checksums, and hidden_arrays: each row's (L, T, H)
states), MB/s of float16 states, and the bytes stored against dense padded float16
(max_seq_length x layers x hidden size x 2 bytes an example) and against the states' own bytes.

    python benchmarks/bench_shard_format.py --task rte --split dev --data-dir ../shared/data/glue
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_extract import split_parser

from bertvision import shards
from bertvision.extract import ExtractConfig, HostStates, extract_hidden_states
from bertvision.schema import HIDDEN_DTYPES, LIST_FORMATS, ExtractionPlan, plan_schema

FORMATS = {6: "raw bytes (format 6)", 2: "large_list<float16> (format 2)"}


def main() -> None:
    parser = split_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="rows a row group")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of each format")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        cfg = ExtractConfig(
            task=args.task,
            out=str(Path(root) / "extracted"),
            data_dir=args.data_dir,
            splits=[args.split],
            max_seq_length=args.max_seq_length,
            device="cpu",
        )
        assert extract_hidden_states(cfg, progress=False).ok
        plan, urls = shards.committed_shards(cfg.out, args.task, args.split)
        table = pa.concat_tables(shards.read_shard(url)[1] for url in urls)
        states = shards.hidden_arrays(table, plan)  # (L, T, H) float16 each
        raw = sum(s.nbytes for s in states)
        dense = plan.num_examples * plan.max_seq_length * plan.layers * plan.hidden_size * 2
        print(
            f"{args.task}/{args.split}: {plan.num_examples} examples, {plan.layers} layers x "
            f"{plan.hidden_size}, {raw / 1e6:.1f} MB of float16 states (dense padded: "
            f"{dense / 1e6:.1f} MB), row groups of {args.batch_size}, median of {args.repeats}"
        )
        timings: dict[int, dict[str, list[float]]] = {v: {} for v in FORMATS}
        stored = {}
        for repeat in range(args.repeats):
            for version in FORMATS:
                folder = str(Path(root) / f"format-{version}-{repeat}")
                written = replace(plan, format_version=version, shard_size=len(states))
                shards.write_plan(folder, written)
                with _clock(timings[version], "write"):
                    record = _write(folder, written, table, states, args.batch_size)
                with _clock(timings[version], "read"):
                    _, back = shards.read_shard(str(Path(folder) / record.file))
                    decoded = shards.hidden_arrays(back, written)
                assert all(np.array_equal(a, b) for a, b in zip(decoded, states, strict=True))
                stored[version] = record.bytes
        for version, name in FORMATS.items():
            line = [f"{name:32s} {stored[version] / 1e6:6.1f} MB stored"]
            ratios = stored[version] / dense, stored[version] / raw
            line.append(f"{ratios[0]:.3f}x dense, {ratios[1]:.3f}x states")
            for step in ("write", "read"):
                cpu = statistics.median(timings[version][f"{step} cpu"])
                wall = statistics.median(timings[version][f"{step} wall"])
                line.append(f"{step} {cpu:.3f} CPU s / {wall:.3f} s = {raw / 1e6 / wall:.0f} MB/s")
            print(" | ".join(line))
        for step in ("write", "read"):
            ratio = statistics.median(timings[2][f"{step} cpu"]) / statistics.median(
                timings[6][f"{step} cpu"]
            )
            print(f"{step}: format 2 / format 6 CPU seconds = {ratio:.1f}x")


def _write(
    folder: str, plan: ExtractionPlan, table: pa.Table, states: list[np.ndarray], batch: int
) -> shards.ShardRecord:
    """Write `states` as one shard of `plan`, a row group per `batch` rows, as extraction does."""
    schema = plan_schema(plan)
    with shards.ShardWriter(folder, plan, 0) as writer:
        for begin in range(0, len(states), batch):
            rows = slice(begin, begin + batch)
            host = HostStates.of_examples(states[rows])
            as_list = plan.format_version in LIST_FORMATS
            hidden = host.hidden_columns(HIDDEN_DTYPES[plan.dtype], as_list)
            columns = [table.column(name).slice(begin, batch) for name in schema.names[:3]]
            writer.write(pa.Table.from_arrays([*columns, *hidden], schema=schema))
        return writer.commit()


@contextmanager
def _clock(into: dict[str, list[float]], name: str) -> Iterator[None]:
    """Appends the CPU seconds (process_time, all threads) and wall seconds of the block to
    `into`."""
    cpu, wall = time.process_time(), time.perf_counter()
    yield
    into.setdefault(f"{name} cpu", []).append(time.process_time() - cpu)
    into.setdefault(f"{name} wall", []).append(time.perf_counter() - wall)


if __name__ == "__main__":
    main()
