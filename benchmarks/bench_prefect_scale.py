"""Benchmark of the orchestration at scale: 10,000 small shards through a real Prefect server on
PostgreSQL with process workers on this machine.

    pip install -e '.[bench]'     # psutil, for the processes' memory; and Debian's PostgreSQL
    python benchmarks/bench_prefect_scale.py [--shards 10000] [--workers 4] \
        [--examples-per-shard 4] [--data-dir ../shared/data/glue] [--sample-seconds 5] \
        [--threads 1] [--recorder-batch-size 100] [--shards-per-task 10] \
        [--samples-json samples.json]

The model is a tiny random BERT (hidden 32, 2 layers, MiniLM's tokenizer) saved to a temporary
folder, the data the first shards x examples-per-shard sentences of GLUE SST-2 train: the point is
the orchestration, not the model. It starts a throwaway PostgreSQL cluster (initdb in a temporary
folder, run as the `postgres` user on a free port), `prefect server start` on it, the pools and
deployments (scripts/demo_prefect_workers.py `Demo`), one worker on `bertvision` for the
coordinating flow run and `--workers` workers (`--limit 1`) on `bertvision-shards`, then runs
`prefect deployment run extract-glue/extract-glue -p workers=N [-p shards_per_task=K] --watch`
(K consecutive shards per task run: ceil(shards / K) extraction task runs instead of one per
shard).

Every `--sample-seconds` it samples the RSS of each process kind (the server's process tree,
PostgreSQL's, each worker, the coordinating flow run and the shard flow runs: the processes the
workers start) and times GET /api/health and POST /api/flow_runs/filter. At the end it prints:

- shards committed / expected, and extraction task runs Completed in the API (one per shard,
  or per group of K): the server records task runs from events, so it waits until all show or
  none has come for 2 minutes, and counts the event messages the server dropped (its log);
- example ids stored: each of 0..N-1 exactly once in the committed shards, and stray Parquet
  files in the split folder (a duplicate write would leave one);
- wall time of the flow run (submit to Completed) and the shards' own compute seconds (the sum of
  the commit records' `seconds`: tokenize, forward, write, commit of each shard);
- orchestration overhead per shard = (wall x workers - sum of shard seconds) / shards: the
  worker-seconds each shard cost beyond its own computation (planning, child-run start, the
  model's load in each child, task-run bookkeeping, API calls, the final listing and table);
- RSS at 10 % of the samples (past the processes' start-up) / peak / end per process kind (MiB;
  per kind the largest process, the server and PostgreSQL as whole process trees) and API
  latency p50 / p95 / max (ms);
- the 1-minute load average before, and its mean and max during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_prefect_overhead import tiny_encoder  # noqa: E402  (a sibling script)
from demo_prefect_workers import (  # noqa: E402
    Demo,
    _flow_run_id,
    _free_port,
    _state,
    _stored_once,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shards", type=int, default=10_000, help="shards extracted")
    parser.add_argument("--workers", type=int, default=4, help="workers on bertvision-shards")
    parser.add_argument("--examples-per-shard", type=int, default=4, help="SST-2 sentences")
    parser.add_argument(
        "--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"), help="GLUE folder"
    )
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="RSS and API")
    parser.add_argument("--samples-json", default="", help="write every sample here")
    parser.add_argument(
        "--recorder-batch-size", type=int, default=0,
        help="task-run events the server records per transaction "
        "(PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE and _READ_BATCH_SIZE); "
        "0: Prefect's default (1)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per flow-run process (OMP_NUM_THREADS): 4 processes on 2 cores, "
        "each with as many threads as cores, spend their time spinning on each other",
    )  # fmt: skip
    parser.add_argument(
        "--shards-per-task", type=int, default=1,
        help="consecutive shards per extraction task run (extract-glue's shards_per_task)",
    )  # fmt: skip
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bertvision-scale-") as tmp:
        tmp = Path(tmp)
        model = tiny_encoder(tmp / "tiny-bert")
        demo_args = argparse.Namespace(
            task="sst2",
            split="train",
            data_dir=args.data_dir,
            model=model,
            shard_size=args.examples_per_shard,
            max_train_examples=args.shards * args.examples_per_shard,
        )
        postgres = Postgres(tmp / "pg")
        demo = Demo(tmp, demo_args)
        demo.env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = postgres.url
        demo.env["OMP_NUM_THREADS"] = str(args.threads)
        if args.recorder_batch_size:
            for setting in ("BATCH_SIZE", "READ_BATCH_SIZE"):
                name = f"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_{setting}"
                demo.env[name] = str(args.recorder_batch_size)
        sampler = None
        try:
            postgres.start()
            demo.start_server()
            demo.deploy()
            demo.start_worker("bertvision", "coordinator")
            for n in range(args.workers):
                demo.start_worker("bertvision-shards", f"shards-{n + 1}", limit=1)
            sampler = Sampler(demo, postgres, args.workers, args.sample_seconds)
            sampler.start()
            out = tmp / "emb"
            started = time.perf_counter()
            grouping = {"shards_per_task": args.shards_per_task} if args.shards_per_task > 1 else {}
            log = demo._prefect(
                "deployment", "run", demo.deployment,
                *demo._params(out, workers=args.workers, **grouping), "--watch",
            )  # fmt: skip
            wall = time.perf_counter() - started
            recorded, lag = wait_for_task_runs(demo, args.shards, args.shards_per_task)
            sampler.stop()
            report(demo, out, args, wall, _flow_run_id(log), sampler, load_before)
            print(
                f"extraction task runs Completed in the API when the flow run ended: {recorded}; "
                f"all {expected_task_runs(args.shards, args.shards_per_task)} {lag}"
            )
            if args.samples_json:
                Path(args.samples_json).write_text(json.dumps(sampler.series()))
        finally:
            if sampler is not None:
                sampler.stop()
            demo.stop_all()
            postgres.stop()


class Postgres:
    """A throwaway PostgreSQL 15 cluster in `folder` on a free port, trust auth on 127.0.0.1,
    run as the `postgres` user when this is root (initdb refuses root)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> None:
        self.folder.mkdir()
        if self.as_user:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self.folder.parent, "postgres")  # the socket and log live beside it
        data = self.folder / "data"
        self._run(PG_BIN / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            PG_BIN / "pg_ctl", "-D", data, "-o", options, "-l", self.folder / "log", "-w", "start"
        )
        print(f"postgres up on port {self.port}")

    def pid(self) -> int | None:
        path = self.folder / "data" / "postmaster.pid"
        return int(path.read_text().split()[0]) if path.exists() else None

    def stop(self) -> None:
        if self.pid() is not None:
            self._run(PG_BIN / "pg_ctl", "-D", self.folder / "data", "-m", "fast", "stop")

    def _run(self, *command) -> None:
        subprocess.run(
            [*self.as_user, *map(str, command)], check=True, capture_output=True, text=True
        )


class Sampler(threading.Thread):
    """Every `seconds`: RSS (bytes) per process kind and the API's latency (seconds).

    Kinds: `server` and `postgres` (whole process trees), `worker` (each worker process alone),
    `coordinator flow` (what the `bertvision` worker started), `shard flow` (what the
    `bertvision-shards` workers started). A kind's sample is its largest process."""

    def __init__(self, demo: Demo, postgres: Postgres, workers: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.demo, self.postgres, self.seconds = demo, postgres, seconds
        server, coordinator, *shard_workers = demo.processes
        self.server = psutil.Process(server.pid)
        self.coordinator = psutil.Process(coordinator.pid)
        self.shard_workers = [psutil.Process(p.pid) for p in shard_workers]
        self.rss: dict[str, list[float]] = {}
        self.latency: dict[str, list[float]] = {"GET /api/health": [], "POST flow_runs/filter": []}
        self.failures: list[str] = []
        self.load: list[float] = []  # 1-minute load average
        self.times: dict[str, list[float]] = {}  # seconds since the sampler started, per kind
        self.started = time.monotonic()
        self._done = threading.Event()

    def run(self) -> None:
        """RSS here, the API's latency in a thread of its own: a slow answer delays no sample."""
        probe = threading.Thread(target=self._probe_api, daemon=True)
        probe.start()
        while not self._done.is_set():
            self._sample_rss()
            self.load.append(os.getloadavg()[0])
            self._done.wait(self.seconds)
        probe.join()

    def _probe_api(self) -> None:
        while not self._done.is_set():
            self._time_api()
            self._done.wait(self.seconds)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()

    def _sample_rss(self) -> None:
        kinds = {
            "server": [_tree_rss(self.server)],
            "postgres": [_tree_rss(psutil.Process(pid))] if (pid := self.postgres.pid()) else [],
            "worker": [_rss(p) for p in [self.coordinator, *self.shard_workers]],
            "coordinator flow": [_rss(c) for c in _children(self.coordinator)],
            "shard flow": [_rss(c) for w in self.shard_workers for c in _children(w)],
        }
        for kind, values in kinds.items():
            if values:
                self.rss.setdefault(kind, []).append(max(values))
                self.times.setdefault(kind, []).append(time.monotonic() - self.started)

    def series(self) -> dict:
        """Every sample: RSS (MiB) and its time (s) per kind, latencies (s), load averages."""
        rss = {
            kind: [[t, v / MIB] for t, v in zip(self.times[kind], values, strict=True)]
            for kind, values in self.rss.items()
        }
        return {"rss_mib": rss, "latency_s": self.latency, "load_1min": self.load}

    def _time_api(self) -> None:
        api = self.demo.env["PREFECT_API_URL"]
        calls = {
            "GET /api/health": urllib.request.Request(f"{api}/health"),
            "POST flow_runs/filter": urllib.request.Request(
                f"{api}/flow_runs/filter",
                data=json.dumps({"limit": 10, "sort": "START_TIME_DESC"}).encode(),
                headers={"Content-Type": "application/json"},
            ),
        }
        for name, request in calls.items():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
            except OSError as exc:
                self.failures.append(f"{name}: {exc}")
                continue
            self.latency[name].append(time.perf_counter() - started)


def _rss(process: psutil.Process) -> float:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0.0


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _tree_rss(process: psutil.Process) -> float:
    return _rss(process) + sum(_rss(c) for c in _children(process))


def _count_task_runs(demo: Demo, name_like: str, state: str | None = None) -> int:
    body = {"task_runs": {"name": {"like_": name_like}}}
    if state:
        body["task_runs"]["state"] = {"type": {"any_": [state]}}
    request = urllib.request.Request(
        f"{demo.env['PREFECT_API_URL']}/task_runs/count",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def expected_task_runs(shards: int, shards_per_task: int) -> int:
    """Extraction task runs of a complete run: one per group of `shards_per_task`."""
    return -(-shards // shards_per_task)


def _count_extraction_runs(demo: Demo, shards_per_task: int, state: str | None = None) -> int:
    """Extraction task runs: `sst2-train-shard-0007@...` one per shard, or
    `sst2-train-shards-0000-0009@...` per group, less the coordinator's task runs that wait for
    child runs (`sst2-train-shards-1-of-4@...`)."""
    if shards_per_task == 1:
        return _count_task_runs(demo, "-shard-", state)
    return _count_task_runs(demo, "-shards-", state) - _count_task_runs(demo, "-of-", state)


def wait_for_task_runs(
    demo: Demo, shards: int, shards_per_task: int = 1, quiet_seconds: float = 120
) -> tuple[int, str]:
    """The server records task runs from the events the flow-run processes send, so its count
    may lag behind the flow run's end: wait until all extraction task runs (one per group of
    `shards_per_task` shards) are Completed in the API, or the count has not grown for
    `quiet_seconds`. Returns the count at the flow run's end and how long the rest took to show
    (or that it never did)."""
    expected = expected_task_runs(shards, shards_per_task)
    started = time.perf_counter()
    at_end = last = _count_extraction_runs(demo, shards_per_task, "COMPLETED")
    grew = started
    while last < expected and time.perf_counter() - grew < quiet_seconds:
        time.sleep(5)
        count = _count_extraction_runs(demo, shards_per_task, "COMPLETED")
        if count > last:
            last, grew = count, time.perf_counter()
    if last >= expected:
        return at_end, f"Completed in the API {time.perf_counter() - started:.0f} s later"
    return at_end, f"never: {last} after {quiet_seconds:.0f} s without growth"


def report(
    demo: Demo,
    out: Path,
    args: argparse.Namespace,
    wall: float,
    flow_run_id: str,
    sampler: Sampler,
    load_before: tuple[float, float, float],
) -> None:
    from bertvision.shards import committed_records, load_plan, split_url

    folder = split_url(str(out), "sst2", "train")
    status = demo._status(out)
    plan = load_plan(folder)
    records = committed_records(folder, plan)
    shard_seconds = sum(r.seconds for r in records.values())
    stored, once = _stored_once(out, "sst2", "train", status["examples"])
    runs = _count_extraction_runs(demo, args.shards_per_task)
    completed = _count_extraction_runs(demo, args.shards_per_task, "COMPLETED")
    expected = expected_task_runs(args.shards, args.shards_per_task)
    overhead = (wall * args.workers - shard_seconds) / args.shards
    print(f"\nflow run {flow_run_id}: {_state(demo.env, flow_run_id)}")
    print(f"shards committed / expected: {status['done']} / {args.shards}")
    print(
        f"extraction task runs in the API: {runs} ({completed} Completed) of {expected} "
        f"({args.shards_per_task} shard(s) per task run)"
    )
    print(
        f"example ids stored: {stored} of {status['examples']}, each exactly once: {once}; "
        f"stray files in the split folder: {len(status['strays'])}"
    )
    print(f"wall (submit to Completed): {wall:.1f} s; {args.shards / wall:.1f} shards/s")
    per_shard = shard_seconds / args.shards * 1000
    print(f"sum of shard compute seconds: {shard_seconds:.1f} s ({per_shard:.1f} ms/shard)")
    print(
        f"orchestration overhead per shard: (wall x {args.workers} workers - shard seconds) / "
        f"shards = {overhead * 1000:.0f} ms"
    )
    print("RSS MiB (at 10 % of its samples / peak / end), per kind its largest process:")
    for kind, values in sampler.rss.items():
        print(
            f"  {kind:17s} {values[len(values) // 10] / MIB:7.0f} / {max(values) / MIB:7.0f} / "
            f"{values[-1] / MIB:7.0f}  ({len(values)} samples)"
        )
    print("API latency ms (p50 / p95 / max):")
    for name, values in sampler.latency.items():
        if values:
            p95 = (
                statistics.quantiles(values, n=20, method="inclusive")[-1]
                if len(values) > 1
                else values[0]
            )
            print(
                f"  {name:22s} {statistics.median(values) * 1000:6.0f} / {p95 * 1000:6.0f} / "
                f"{max(values) * 1000:6.0f}  ({len(values)} calls)"
            )
    server_log = (demo.tmp / "server.log").read_text()
    print(
        "event messages the server dropped (its in-memory subscription queue of 10,000 full): "
        f"{server_log.count('Subscription queue is full, dropping message')}; events refused "
        f"as too large: {server_log.count('Refusing to publish event')}"
    )
    if sampler.failures:
        print(f"API calls that failed: {len(sampler.failures)}: {sampler.failures[:3]}")
    print(
        f"load average (1 min) before: {load_before[0]:.2f}; during: mean "
        f"{statistics.mean(sampler.load):.2f}, max {max(sampler.load):.2f}; "
        f"cores: {os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
