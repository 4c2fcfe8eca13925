"""deployments/prefect.yaml against a real local Prefect server: every deployment registers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prefect")

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
DEPLOYMENTS = {
    "extract-glue/extract-glue",
    "extract-squad/extract-squad",
    "extract-shards/extract-shards",
    "finetune/finetune",
    "train-adapter/train-adapter",
    "sweep/sweep",
    "ensemble/ensemble",
    "pipeline/pipeline",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on 127.0.0.1, a free port and a fresh PREFECT_HOME; yields env."""
    port = _free_port()
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "prefect server start exited"
                assert time.monotonic() < deadline, "prefect server did not start in 90 s"
                time.sleep(0.5)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def _prefect(env: dict, *args: str, cwd: Path = REPO) -> str:
    result = subprocess.run([*PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_prefect_deploy_all_registers_every_deployment(prefect_server):
    env = prefect_server
    _prefect(env, "work-pool", "create", "bertvision", "--type", "process")
    _prefect(env, "work-pool", "create", "bertvision-shards", "--type", "process")
    template = REPO / "deployments" / "aks-gpu-job-template.json"
    _prefect(env, "work-pool", "create", "aks-gpu", "--type", "kubernetes",
             "--base-job-template", str(template))  # fmt: skip  # the server accepts it

    _prefect(env, "--no-prompt", "deploy", "--all", cwd=REPO / "deployments")

    code = (
        "from prefect.client.orchestration import get_client\n"
        "import json\n"
        "with get_client(sync_client=True) as c:\n"
        "    flows = {f.id: f.name for f in c.read_flows()}\n"
        "    print(json.dumps({f'{flows[d.flow_id]}/{d.name}': {\n"
        "        'pool': d.work_pool_name, 'path': d.path, 'pull': d.pull_steps,\n"
        "        'crons': [s.schedule.cron for s in d.schedules if hasattr(s.schedule, 'cron')],\n"
        "        'limit': getattr(d.global_concurrency_limit, 'limit', None),\n"
        "        'collisions': getattr(d.concurrency_options, 'collision_strategy', None),\n"
        "    } for d in c.read_deployments()}))\n"
    )
    deployed = json.loads(subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    assert set(deployed) == DEPLOYMENTS
    assert deployed["sweep/sweep"]["crons"] == ["0 2 * * *"]
    assert (deployed["sweep/sweep"]["limit"], deployed["sweep/sweep"]["collisions"]) == (
        1,
        "ENQUEUE",
    )
    assert deployed["extract-shards/extract-shards"]["pool"] == "bertvision-shards"
    for name, d in deployed.items():
        pull_step = {"bertvision_tasks.deployment.work_in_checkout": {}}
        assert d["pull"] == [pull_step], name  # no absolute path
        assert d["path"] is None, name
        if name not in ("sweep/sweep", "extract-shards/extract-shards"):
            assert d["pool"] == "bertvision" and d["crons"] == [], name
