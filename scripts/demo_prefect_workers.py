"""Extraction through Prefect deployments and process workers, against a real local server.

    python scripts/demo_prefect_workers.py [--model M] [--data-dir D] [--shard-size N]
    python scripts/demo_prefect_workers.py --task squad2 --data-dir ../shared/data/squad/split \
        --split train --max-train-examples 120 --shard-size 16

Starts `prefect server start` (127.0.0.1, a free port, a temporary PREFECT_HOME), creates the
process pools `bertvision` and `bertvision-shards`, registers the deployments from
deployments/prefect.yaml, then shows and checks, printing what it measured:

1. a worker on the process pool runs `prefect deployment run extract-glue/extract-glue ... --watch`
   (`extract-squad/extract-squad` for squad2) to completion: every shard in storage, the progress
   and shard-table artifacts in the API;
2. kill -9 of the flow-run processes mid-extraction, then `prefect flow-run retry`: the retry
   runs only the shards that were not committed, and every row is stored exactly once (a GLUE
   example by its id; a SQuAD window by its id, and by question id + window index); it
   sets Crashed the shard task run the kill left Running, and carries on the first attempt's
   progress artifact (one for both, at 100 %);
3. two workers (`--limit 1` each) on `bertvision-shards` share one extraction (`-p workers=2`).

Everything it starts it stops; everything it writes is under a temporary folder. `Demo` is
also what scripts/ui_screenshots.py drives (with the UI on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="default: the bundled MiniLM")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--task", default="rte")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--shard-size", type=int, default=25, help="examples (squad2: windows)")
    parser.add_argument(
        "--max-train-examples", type=int, default=None, help="of train: the first N (questions)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bertvision-demo-") as tmp:
        demo = Demo(Path(tmp), args)
        try:
            demo.start_server()
            demo.deploy()
            demo.one_worker_runs_a_deployment()
            demo.kill_9_then_retry()
            demo.two_workers_share_an_extraction()
        finally:
            demo.stop_all()


class Demo:
    """A throwaway Prefect server, its pools, deployments and workers, under `tmp`.

    `args` holds the extraction's task, split, data_dir, model and shard_size; `ui` serves the
    Prefect UI beside the API (at `ui_url`)."""

    def __init__(self, tmp: Path, args: argparse.Namespace, ui: bool = False) -> None:
        self.tmp = tmp
        self.args = args
        port = _free_port()
        self.env = os.environ | {
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": str(ui).lower(),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.port = port
        self.ui_url = f"http://127.0.0.1:{port}"
        self.processes: list[subprocess.Popen] = []
        from bertvision.extract import is_span_task

        span = is_span_task(args.task)
        self.deployment = "extract-squad/extract-squad" if span else "extract-glue/extract-glue"
        self.rows = "windows" if span else "examples"

    # -- infrastructure ---------------------------------------------------------------------

    def start_server(self) -> None:
        started = time.perf_counter()
        self._spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.env['PREFECT_API_URL']}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("prefect server did not start in 120 s")
                time.sleep(0.5)
        print(f"server up on port {self.port} in {time.perf_counter() - started:.1f} s")

    def deploy(self) -> None:
        started = time.perf_counter()
        for pool in ("bertvision", "bertvision-shards"):
            self._prefect("work-pool", "create", pool, "--type", "process")
        self._prefect("--no-prompt", "deploy", "--all", cwd=REPO / "deployments")
        print(f"pools created, deploy --all done in {time.perf_counter() - started:.1f} s")

    def start_worker(self, pool: str, name: str, limit: int | None = None) -> None:
        extra = ["--limit", str(limit)] if limit else []
        self._spawn(name, "worker", "start", "--pool", pool, "--name", name, *extra, cwd=self.tmp)

    def stop_all(self) -> None:
        """Workers first, the server last: a worker stops quickly only while the API answers."""
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _spawn(self, log: str, *args: str, cwd: Path = REPO) -> None:
        out = open(self.tmp / f"{log}.log", "w")  # noqa: SIM115 - open for the process's life
        self.processes.append(
            subprocess.Popen([*PREFECT, *args], env=self.env, cwd=cwd, stdout=out, stderr=out)
        )

    def _prefect(self, *args: str, cwd: Path = REPO, check: bool = True) -> str:
        result = subprocess.run(
            [*PREFECT, *args], env=self.env, cwd=cwd, capture_output=True, text=True
        )
        if check and result.returncode != 0:
            sys.exit(f"prefect {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr

    # -- the three checks -------------------------------------------------------------------

    def _params(self, out: Path, cfg: dict | None = None, **extra) -> list[str]:
        """`-p` options of an extract-glue run into `out`; `cfg` overrides the args' settings."""
        cfg = {
            "task": self.args.task,
            "splits": [self.args.split],
            "data_dir": self.args.data_dir,
            "model": self.args.model,
            "out": str(out),
            "shard_size": self.args.shard_size,
            "max_train_examples": self.args.max_train_examples,
        } | (cfg or {})
        params = {"cfg": cfg, **extra}
        return [item for k, v in params.items() for item in ("-p", f"{k}={json.dumps(v)}")]

    def _artifact_key(self, out: Path, task: str | None = None) -> str:
        """The extraction's artifact key, less its suffix (bertvision_tasks.names)."""
        task = task or self.args.task
        return re.sub(r"[^a-z0-9]+", "-", f"extract-{task}-{out.parent.name}-{out.name}".lower())

    def one_worker_runs_a_deployment(self) -> str:
        """Returns the flow run's id."""
        print("\n1. one worker on the process pool, prefect deployment run ... --watch")
        self.start_worker("bertvision", "local-1")
        out = self.tmp / "emb-1"
        started = time.perf_counter()
        log = self._prefect("deployment", "run", self.deployment, *self._params(out), "--watch")
        seconds = time.perf_counter() - started
        flow_run_id = _flow_run_id(log)
        status = self._status(out)
        print(f"   flow run {_state(self.env, flow_run_id)} in {seconds:.1f} s; storage: {status}")
        assert status["done"] == status["shards"], status
        key = self._artifact_key(out)
        table = _artifact(self.env, f"{key}-shards")
        progress = _artifact(self.env, f"{key}-progress")
        *rows, total = json.loads(table["data"])
        print(f"   artifacts: progress {progress['data']}% ({progress['description']})")
        print(f"   table of {len(rows)} shards: {rows[0]}; totals: {total}")
        assert len(rows) == status["shards"] and float(progress["data"]) == 100.0
        return flow_run_id

    def kill_9_then_retry(self, out: Path | None = None) -> str:
        """Returns the flow run's id; its output goes to `out` (default: emb-2)."""
        print("\n2. kill -9 of the flow-run processes mid-extraction, then flow-run retry")
        out = out or self.tmp / "emb-2"
        log = self._prefect("deployment", "run", self.deployment, *self._params(out))
        flow_run_id = _flow_run_id(log)
        while self._status(out, missing_ok=True).get("done", 0) < 3:
            time.sleep(0.2)
        killed = _kill_flow_run_processes(flow_run_id)
        committed = self._status(out)["done"]
        print(f"   killed pids {killed} with {committed} shards committed")
        _wait_for(self.env, flow_run_id, ("CRASHED", "FAILED"))
        print(f"   the worker reported the flow run {_state(self.env, flow_run_id)}")

        retry_at = datetime.now(UTC)
        started = time.perf_counter()
        runs_before = _run_count(self.env, flow_run_id)
        # The flow-run runner reports the crash at once, and the worker may again when it sees the
        # process gone, seconds later, setting Crashed a retry asked for in between: ask again.
        for _ in range(3):
            print("   " + self._prefect("flow-run", "retry", flow_run_id).strip().splitlines()[0])
            _wait_for(self.env, flow_run_id, ("COMPLETED", "FAILED", "CRASHED"), timeout=900)
            if _run_count(self.env, flow_run_id) > runs_before:
                break
        seconds = time.perf_counter() - started
        status = self._status(out)
        rerun = _shard_task_runs(self.env, flow_run_id, since=retry_at)
        missing = status["shards"] - committed
        state = _state(self.env, flow_run_id)
        print(f"   retry {state} in {seconds:.1f} s; {missing} shards were missing; it ran")
        print(f"   {len(rerun)} shard task runs: {', '.join(rerun)}")
        assert len(rerun) == missing, rerun
        running = _task_runs(self.env, flow_run_id, "RUNNING")
        crashed = _task_runs(self.env, flow_run_id, "CRASHED")
        print(f"   task runs left Running: {running}; set Crashed by the retry: {crashed}")
        assert not running, running
        progress = _client_call(
            self.env,
            "result = [a.data for a in c.read_artifacts(artifact_filter=ArtifactFilter("
            f"key=ArtifactFilterKey(any_=['{self._artifact_key(out)}-progress'])))]",
        )
        print(f"   progress artifacts of the extraction: {progress} (one, for both attempts)")
        assert progress == [100.0], progress
        stored, once = _stored_once(out, self.args.task, self.args.split, status["examples"])
        print(f"   {stored} {self.rows} stored, each exactly once: {once}")
        assert once
        return flow_run_id

    def two_workers_share_an_extraction(self) -> None:
        print("\n3. two workers (--limit 1 each) on bertvision-shards share one extraction")
        for name in ("gpu-1", "gpu-2"):
            self.start_worker("bertvision-shards", name, limit=1)
        out = self.tmp / "emb-3"
        started = time.perf_counter()
        log = self._prefect(
            "deployment", "run", self.deployment,
            *self._params(out, workers=2), "--watch",
        )  # fmt: skip
        seconds = time.perf_counter() - started
        state = _state(self.env, _flow_run_id(log))
        manifest = out / self.args.task / self.args.split / "_manifest"
        by_process = Counter(json.loads(r.read_text())["worker"] for r in manifest.glob("shard-*"))
        by_worker = {name: _submitted(self.tmp / f"{name}.log") for name in ("gpu-1", "gpu-2")}
        print(f"   {state} in {seconds:.1f} s; shards per flow-run process: {dict(by_process)}")
        print(f"   child flow runs per worker: {by_worker}")
        assert len(by_process) == 2 and all(by_worker.values())

    def _status(self, out: Path, missing_ok: bool = False) -> dict:
        from bertvision.shards import status

        result = status(str(out))
        key = f"{self.args.task}/{self.args.split}"
        if key not in result and missing_ok:
            return {}
        return result[key]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flow_run_id(log: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", log).group(1)


def _client_call(env: dict, code: str):
    """Runs `code` (which sets `result`) with a sync Prefect client `c` against env's server."""
    program = (
        "import json\nfrom prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import *\n"
        f"with get_client(sync_client=True) as c:\n    {code}\nprint(json.dumps(result))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def _state(env: dict, flow_run_id: str) -> str:
    return _client_call(env, f"result = c.read_flow_run('{flow_run_id}').state.type.value")


def _run_count(env: dict, flow_run_id: str) -> int:
    return _client_call(env, f"result = c.read_flow_run('{flow_run_id}').run_count")


def _wait_for(env: dict, flow_run_id: str, states: tuple[str, ...], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _state(env, flow_run_id) not in states:
        if time.monotonic() > deadline:
            sys.exit(f"flow run {flow_run_id} did not reach {states} in {timeout} s")
        time.sleep(2)


def _artifact(env: dict, key: str) -> dict:
    return _client_call(
        env,
        "result = c.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter("
        f"key=ArtifactCollectionFilterKey(any_=['{key}'])))[0].model_dump(mode='json')",
    )


def _shard_task_runs(env: dict, flow_run_id: str, since: datetime) -> list[str]:
    runs = _client_call(
        env,
        "result = [[r.name, r.start_time.isoformat() if r.start_time else None] for r in "
        "c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId("
        f"any_=['{flow_run_id}'])))]",
    )
    return sorted(
        name
        for name, start in runs
        if "-shard-" in name and start and datetime.fromisoformat(start) >= since
    )


def _task_runs(env: dict, flow_run_id: str, state: str) -> list[str]:
    return _client_call(
        env,
        "result = sorted(r.name for r in c.read_task_runs(task_run_filter=TaskRunFilter("
        f"flow_run_id=TaskRunFilterFlowRunId(any_=['{flow_run_id}']), state=TaskRunFilterState("
        f"type=TaskRunFilterStateType(any_=['{state}'])))))",
    )


def _kill_flow_run_processes(flow_run_id: str) -> list[int]:
    """kill -9 every process started for this flow run (it carries the id in its environment)."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    if not killed:
        sys.exit(f"no process of flow run {flow_run_id} found")
    return killed


def _stored_once(out: Path, task: str, split: str, planned: int) -> tuple[int, bool]:
    """Rows stored, and whether they are the `planned` rows each exactly once: ids 0..planned-1
    (a GLUE example's, a SQuAD window's), and for windows `planned` distinct pairs of question
    id and window index (the window's place in its question's context)."""
    from bertvision.shards import committed_shards, split_dataset

    plan, _ = committed_shards(str(out), task, split)
    span = plan.schema == "span"
    names = ["window_id", "question_id", "window_index"] if span else ["example_id"]
    table = split_dataset(str(out), task, split).to_table(columns=names)  # page checksums read
    ids = sorted(table.column(names[0]).to_pylist())
    columns = [table.column(name).to_pylist() for name in names[1:] or names]
    identities = set(zip(*columns, strict=True))
    return len(ids), ids == list(range(planned)) and len(identities) == planned


def _submitted(worker_log: Path) -> list[str]:
    return re.findall(r"Flow run '([^']+)' submitted to infrastructure", worker_log.read_text())


if __name__ == "__main__":
    main()
