"""Prefect tasks and flows: tasks through .fn(), flows under the session's test harness."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID

import pyarrow.dataset as ds
import pytest
import torch
from conftest import tree_state

pytest.importorskip("prefect")

from bertvision_flows.ensemble import ensemble  # noqa: E402
from bertvision_flows.extract_glue import (  # noqa: E402
    ShardsFailed,
    extract_glue,
    extract_shards,
    extract_squad,
)
from bertvision_flows.finetune import finetune  # noqa: E402
from bertvision_flows.sweep import sweep  # noqa: E402
from bertvision_flows.train_adapter import train_adapter  # noqa: E402
from bertvision_tasks import artifacts  # noqa: E402
from bertvision_tasks import extract as extract_tasks  # noqa: E402
from bertvision_tasks import sweep as sweep_tasks  # noqa: E402
from bertvision_tasks import train as train_tasks  # noqa: E402
from bertvision_tasks.artifacts import shard_table  # noqa: E402
from bertvision_tasks.policy import transient  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.artifacts import Artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import StateType  # noqa: E402
from prefect.runtime import flow_run as runtime_flow_run  # noqa: E402
from prefect.settings import get_current_settings  # noqa: E402
from prefect.states import Failed, Running  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from bertvision import extract, shards, squad  # noqa: E402
from bertvision import sweep as sweeping  # noqa: E402
from bertvision import train as train_core  # noqa: E402
from bertvision.cli import app  # noqa: E402
from bertvision.config import ConfigError  # noqa: E402
from bertvision.extract import ExtractConfig  # noqa: E402
from bertvision.glue import DataError  # noqa: E402
from bertvision.schema import ExtractionPlan  # noqa: E402
from bertvision.shards import ShardError  # noqa: E402
from bertvision.sweep import SweepConfig  # noqa: E402
from bertvision.train import TrainConfig  # noqa: E402

SMALL = dict(splits=["dev"], max_seq_length=64, shard_size=20, batch_size=8, device="cpu")


def _cfg(out, model, data_dir) -> ExtractConfig:
    return ExtractConfig(task="wnli", out=str(out), model=model, data_dir=data_dir, **SMALL)


def _at(out) -> str:
    """What run names show of an output folder: its last two parts."""
    return f"{out.parent.name}/{out.name}"


def _key(out) -> str:
    """What artifact keys show of an output folder."""
    return re.sub(r"[^a-z0-9]+", "-", _at(out).lower()).strip("-")


def _task_run_names(flow_state, settle_seconds: float = 10.0) -> list[str]:
    """The names of the flow run's task runs, once the API has them all: task runs reach it
    through events, processed after the flow returns (a loaded machine lags), so read until two
    reads a moment apart agree, at most `settle_seconds`."""
    flow_run_id = flow_state.state_details.flow_run_id
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline, names = time.monotonic() + settle_seconds, None
    with get_client(sync_client=True) as client:
        while True:
            read = sorted(run.name for run in client.read_task_runs(flow_run_filter=flow_runs))
            if read == names or time.monotonic() > deadline:
                return read
            names = read
            time.sleep(0.5)


def _example_ids(out, task, split) -> list[int]:
    _, urls = shards.committed_shards(str(out), task, split)
    return sorted(ds.dataset(urls, format="parquet").to_table().column("example_id").to_pylist())


# Tasks, without the engine.


def test_tasks_wrap_one_unit_of_core_work(tmp_path, tiny_model, glue_dir):
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    [plan] = extract_tasks.plan_extraction.fn(cfg)
    assert extract_tasks.pending_shards.fn(cfg, plan) == [0, 1, 2, 3]

    record = extract_tasks.extract_shard.fn(cfg, plan, 2)
    assert (record.index, record.start, record.stop) == (2, 40, 60)
    assert extract_tasks.pending_shards.fn(cfg, plan) == [0, 1, 3]
    assert extract_tasks.extract_shard.fn(cfg, plan, 2) == record  # committed: returned as is
    assert extract_tasks.read_plan.fn(cfg, "dev") == plan


def test_reading_a_plan_that_was_never_made_names_the_folder(tmp_path, tiny_model, glue_dir):
    with pytest.raises(ShardError, match=r"wnli/dev holds no extraction plan"):
        extract_tasks.read_plan.fn(_cfg(tmp_path, tiny_model, glue_dir), "dev")


def test_retries_are_for_transient_failures_only():
    assert transient(Failed(data=ConnectionResetError("storage unreachable")))  # StorageUnavailable
    assert transient(Failed(data=TimeoutError("slow blob")))
    assert transient(Failed(data=torch.OutOfMemoryError("CUDA out of memory")))
    assert not transient(Failed(data=DataError("RTE/dev.tsv line 3: bad label")))
    assert not transient(Failed(data=ShardError("another extraction")))
    assert not transient(Failed(data=RuntimeError("shape mismatch")))  # a bug: fails every time


# Flows, under the test harness.


def test_extract_glue_commits_every_shard_with_named_runs_and_artifacts(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    out = tmp_path / "runs" / "emb"
    state = extract_glue(_cfg(out, tiny_model, glue_dir), return_state=True)
    assert state.is_completed() and state.result() == {"wnli/dev": 4}
    assert _example_ids(out, "wnli", "dev") == list(range(71))
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).name == "extract-wnli@runs/emb"
    names = _task_run_names(state)
    assert [n for n in names if "shard-" in n] == [
        f"wnli-dev-shard-{i:04d}@runs/emb" for i in range(4)
    ]
    assert "wnli-plan@runs/emb" in names and "wnli-dev-finish@runs/emb" in names

    table = Artifact.get("extract-wnli-runs-emb-shards")  # the key names the output
    *rows, total = json.loads(table.data)
    assert table.type == "table" and [row["shard"] for row in rows] == [0, 1, 2, 3]
    assert [row["examples"] for row in rows] == ["0-19", "20-39", "40-59", "60-70"]
    assert {row["status"] for row in rows} == {"committed"}
    assert re.fullmatch(r"\d+(\.\d)? kB", rows[0]["size"])  # not a raw byte count
    assert re.fullmatch(r".+:\d+", rows[0]["written by (host:pid)"])
    assert total["split"] == "all" and total["rows"] == 71
    assert total["status"] == "4 committed, 0 failed, 0 missing"
    assert total["written by (host:pid)"] == "1 worker(s)"
    progress = Artifact.get("extract-wnli-runs-emb-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description.startswith("71 of 71 examples committed (wnli/dev 71 of 71)")


def test_the_progress_artifact_is_updated_at_most_every_few_seconds(tmp_path, monkeypatch):
    """A shard committed updates the artifact only if PUBLISH_SECONDS passed since the last
    update (each update is an API call); the count keeps every shard."""
    clock, updates = [100.0], []
    monkeypatch.setattr(artifacts, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(artifacts, "_progress_artifact", lambda key, percent, text: "id")
    monkeypatch.setattr(
        artifacts,
        "update_progress_artifact",
        lambda artifact_id, percent, description: updates.append((percent, description)),
    )
    plan = ExtractionPlan("rte", "dev", "m", "f" * 16, "d" * 16, 30, 10, 8, "float16", 1, 2, False)
    shards.write_plan(shards.split_url(str(tmp_path), "rte", "dev"), plan)
    progress = artifacts.ExtractionProgress([(SimpleNamespace(out=str(tmp_path)), plan)], "k")
    assert artifacts.ExtractionProgress.PUBLISH_SECONDS == 2.0
    clock[0] = 101.9
    progress.advance(plan, 10)
    assert updates == []
    clock[0] = 102.0
    progress.advance(plan, 10)
    clock[0] = 103.0
    progress.advance(plan, 10)
    assert [percent for percent, _ in updates] == [66.7]
    assert progress.percent == 100.0 and progress.description().startswith("30 of 30 examples")


def _fail_shard_1(monkeypatch):
    """Make WNLI dev's shard 1 (examples 20-39) fail with a DataError; returns the real
    `hidden_state_batches`, to put back for the rerun."""
    real_batches = extract.hidden_state_batches

    def failing_on_shard_1(encoder, examples, plan, batch_size):
        if examples[0].example_id == 20:
            raise DataError("injected: WNLI/dev.tsv line 22 is malformed")
        return real_batches(encoder, examples, plan, batch_size)

    monkeypatch.setattr(extract, "hidden_state_batches", failing_on_shard_1)
    return real_batches


def test_a_failing_shard_fails_the_run_by_name_and_a_rerun_does_only_it(
    prefect_harness, tmp_path, tiny_model, glue_dir, monkeypatch
):
    real_batches = _fail_shard_1(monkeypatch)
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    with pytest.raises(ShardsFailed, match=r"1 shard\(s\) failed: wnli/dev/1: DataError: inj"):
        extract_glue(cfg)
    status = shards.status(str(tmp_path))["wnli/dev"]
    assert (status["done"], status["failed_shards"]) == (3, [1])  # the others went on
    *rows, total = json.loads(Artifact.get(f"extract-wnli-{_key(tmp_path)}-shards").data)
    assert [row["status"] for row in rows] == ["committed", "failed", "committed", "committed"]
    assert rows[1]["error"] == "DataError: injected: WNLI/dev.tsv line 22 is malformed"
    assert list(rows[1])[:4] == ["split", "shard", "status", "error"]  # in view, not scrolled to
    assert total["status"] == "3 committed, 1 failed, 0 missing" and total["rows"] == 51
    assert re.fullmatch(r"\d+(\.\d)? kB", total["size"])  # the three committed, summed

    # A shard with neither a commit nor a failure record (its run was killed) is missing.
    folder = shards.split_url(str(tmp_path), "wnli", "dev")
    shards.clear_failure(folder, 1)
    *rows, total = shard_table(cfg, [shards.load_plan(folder)])
    assert (rows[1]["status"], rows[1]["error"]) == ("missing", "")
    assert total["status"] == "3 committed, 0 failed, 1 missing"

    monkeypatch.setattr(extract, "hidden_state_batches", real_batches)
    state = extract_glue(cfg, return_state=True)
    assert state.is_completed()
    shard_runs = [n for n in _task_run_names(state) if "shard-" in n]
    assert shard_runs == [f"wnli-dev-shard-0001@{_at(tmp_path)}"]
    assert _example_ids(tmp_path, "wnli", "dev") == list(range(71))


def _tables(out, task, split) -> dict[str, list]:
    """The stored rows, by column, in example order."""
    _, urls = shards.committed_shards(str(out), task, split)
    return ds.dataset(urls, format="parquet").to_table().sort_by("example_id").to_pydict()


def test_a_grouped_extraction_stores_what_one_task_per_shard_stores_in_fewer_task_runs(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    one, grouped = tmp_path / "runs" / "one", tmp_path / "runs" / "grouped"
    assert extract_glue(_cfg(one, tiny_model, glue_dir)) == {"wnli/dev": 4}
    state = extract_glue(_cfg(grouped, tiny_model, glue_dir), shards_per_task=3, return_state=True)
    assert state.is_completed() and state.result() == {"wnli/dev": 4}
    assert _tables(grouped, "wnli", "dev") == _tables(one, "wnli", "dev")
    assert [n for n in _task_run_names(state) if "-shards-" in n] == [
        "wnli-dev-shards-0000-0002@runs/grouped",
        "wnli-dev-shards-0003-0003@runs/grouped",
    ]
    *rows, total = json.loads(Artifact.get("extract-wnli-runs-grouped-shards").data)
    assert [row["status"] for row in rows] == ["committed"] * 4
    assert total["status"] == "4 committed, 0 failed, 0 missing" and total["rows"] == 71
    progress = Artifact.get("extract-wnli-runs-grouped-progress")
    assert progress.description.startswith("71 of 71 examples committed (wnli/dev 71 of 71)")


def test_a_group_with_a_bad_shard_commits_the_others_names_it_and_a_rerun_does_only_it(
    prefect_harness, tmp_path, tiny_model, glue_dir, monkeypatch
):
    real_batches = _fail_shard_1(monkeypatch)
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    with pytest.raises(ShardsFailed, match=r"^1 shard\(s\) failed: wnli/dev/1: DataError: inj"):
        extract_glue(cfg, shards_per_task=4)  # one group: shards 0-3
    folder = shards.split_url(str(tmp_path), "wnli", "dev")
    plan = shards.load_plan(folder)
    status = shards.status(str(tmp_path))["wnli/dev"]
    assert (status["done"], status["failed_shards"]) == (3, [1])  # 0, 2 and 3 committed
    *rows, total = json.loads(Artifact.get(f"extract-wnli-{_key(tmp_path)}-shards").data)
    assert [row["status"] for row in rows] == ["committed", "failed", "committed", "committed"]
    assert rows[1]["error"] == "DataError: injected: WNLI/dev.tsv line 22 is malformed"
    progress = Artifact.get(f"extract-wnli-{_key(tmp_path)}-progress")
    assert progress.description.startswith("51 of 71 examples committed")  # the group's three
    before = shards.load_records(folder, plan)

    monkeypatch.setattr(extract, "hidden_state_batches", real_batches)
    state = extract_glue(cfg, shards_per_task=4, return_state=True)
    assert state.is_completed()
    shard_runs = [n for n in _task_run_names(state) if "-shards-" in n]
    assert shard_runs == [f"wnli-dev-shards-0001-0001@{_at(tmp_path)}"]  # only the missing one
    after = shards.load_records(folder, plan)
    assert {i: after[i] for i in (0, 2, 3)} == {i: before[i] for i in (0, 2, 3)}  # not redone
    assert _example_ids(tmp_path, "wnli", "dev") == list(range(71))


def test_shards_per_task_below_one_is_refused_by_name(prefect_harness, tmp_path, tiny_model):
    cfg = _cfg(tmp_path, tiny_model, "unused")
    with pytest.raises(ConfigError, match="shards_per_task"):
        extract_glue(cfg, shards_per_task=0)
    assert not tmp_path.joinpath("wnli").exists()


# A deployment run's parameters (`prefect deployment run ... -p`), as the flow receives them.
STAGE = {"task": "wnli", "out": "o", "device": "cpu"}
BAD_PARAMETERS = {
    "finetune without out": (finetune, {"cfg": STAGE | {"out": ""}}, "cfg.out is required"),
    "extraction without out": (extract_glue, {"cfg": STAGE | {"out": ""}}, "cfg.out is required"),
    "train without embeddings": (
        train_adapter,
        {"cfg": STAGE | {"embeddings": ""}},
        "cfg.embeddings is required",
    ),
    "ensemble without runs": (
        ensemble,
        {"cfg": {"task": "wnli", "out": "o", "runs": ""}},
        "cfg.runs is required",
    ),
    "sweep of no task": (sweep, {"cfg": {"embeddings": "e", "out": "o"}}, "cfg.task is required"),
    "sweep of every task without out": (
        sweep,
        {"cfg": {"embeddings": "e", "out": ""}, "all_tasks": True},
        "cfg.out is required",
    ),
    "negative workers": (
        extract_glue,
        {"cfg": STAGE, "workers": -1},
        "workers must be >= 0, got -1",
    ),
    "no shards per task run of a worker": (
        extract_shards,
        {"cfg": STAGE, "split": "dev", "shards": [0], "shards_per_task": 0},
        "shards_per_task must be >= 1, got 0",
    ),
}


@pytest.mark.parametrize("case", BAD_PARAMETERS)
def test_a_flow_given_a_bad_parameter_fails_before_any_task_naming_it(
    prefect_harness, tmp_path, monkeypatch, case
):
    flow_to_run, parameters, message = BAD_PARAMETERS[case]
    monkeypatch.chdir(tmp_path)

    state = flow_to_run(**parameters, return_state=True)

    assert state.is_failed()
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        state.result()
    assert _task_run_names(state, settle_seconds=2) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ([3, 4, -1], r"shards \[-1, 4\] not in wnli/dev's plan: shards 0 to 3"),
        ([2, 2], r"shards lists \[2\] more than once"),
    ],
)
def test_a_worker_given_shards_its_plan_lacks_extracts_none_and_names_them(
    prefect_harness, tmp_path, tiny_model, glue_dir, shards, message
):
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    extract_tasks.plan_extraction.fn(cfg)
    planned = tree_state(tmp_path)

    state = extract_shards(cfg, "dev", shards, return_state=True)

    with pytest.raises(ConfigError, match=f"^{message}$"):
        state.result()
    assert _task_run_names(state, settle_seconds=2) == ["wnli-dev-read-plan@" + _at(tmp_path)]
    assert tree_state(tmp_path) == planned


def test_a_retry_carries_on_the_progress_artifact_and_crashes_task_runs_left_running(
    prefect_harness, tmp_path, tiny_model, glue_dir, monkeypatch
):
    """The first attempt fails on shard 1 and leaves a task run Running, as a `kill -9` of its
    process would; the retry (the same flow run) sets that one Crashed, extracts shard 1 and
    takes the first attempt's progress artifact to 100 %."""
    real_batches = extract.hidden_state_batches
    left_running = []

    def killed_on_shard_1_once(encoder, examples, plan, batch_size):
        if examples[0].example_id == 20 and not left_running:
            with get_client(sync_client=True) as client:
                left_running.append(
                    client.create_task_run(
                        extract_tasks.extract_shard,
                        flow_run_id=UUID(runtime_flow_run.id),
                        dynamic_key="killed",
                        name="wnli-dev-shard-0001@killed",
                        state=Running(),
                    ).id
                )
            raise DataError("injected: the first attempt's process died here")
        return real_batches(encoder, examples, plan, batch_size)

    monkeypatch.setattr(extract, "hidden_state_batches", killed_on_shard_1_once)
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    state = extract_glue.with_options(retries=1)(cfg, return_state=True)
    assert state.is_completed() and _example_ids(tmp_path, "wnli", "dev") == list(range(71))

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).run_count == 2
        stale = client.read_task_run(left_running[0]).state
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"extract-wnli-{_key(tmp_path)}-progress"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert stale.type == StateType.CRASHED and "when its flow run was retried" in stale.message
    [artifact] = progress  # one for both attempts
    assert float(artifact.data) == 100.0
    assert artifact.description.startswith("71 of 71 examples committed (wnli/dev 71 of 71); ")
    assert re.search(r"; [\d,.]+ examples/s in this attempt$", artifact.description)


def test_an_interrupted_squad2_extraction_retried_reruns_only_the_missing_shards(
    prefect_harness, tmp_path, squad_dir, tiny_model, monkeypatch
):
    """The first attempt dies after committing shards 0 and 1 (every later shard fails, as in a
    process killed there nothing more commits); its retry extracts only the other shards, and
    every window is stored once, by window id and by question id + window index."""
    data_dir = squad.write_slice(squad_dir, str(tmp_path / "squad"), dev=(1, 3))
    real_batches = extract.window_batches
    died = set()

    def killed_after_shard_1(encoder, windows, start, stop, plan, batch_size):
        if start >= 2 * plan.shard_size and start not in died:
            died.add(start)
            raise RuntimeError("injected: the first attempt's process died here")
        return real_batches(encoder, windows, start, stop, plan, batch_size)

    monkeypatch.setattr(extract, "window_batches", killed_after_shard_1)
    out = tmp_path / "runs" / "emb"
    windowing = dict(max_seq_length=96, doc_stride=32, max_question_length=24)
    small = dict(splits=["dev"], shard_size=8, batch_size=8, device="cpu", **windowing)
    cfg = ExtractConfig(task="squad2", out=str(out), model=tiny_model, data_dir=data_dir, **small)
    state = extract_squad.with_options(retries=1)(cfg, return_state=True)
    assert state.is_completed()

    plan, urls = shards.committed_shards(str(out), "squad2", "dev")
    assert plan.num_shards >= 4 and state.result() == {"squad2/dev": plan.num_shards}
    shard_runs = Counter(n for n in _task_run_names(state) if "-shard-" in n)
    assert shard_runs == {
        f"squad2-dev-shard-{i:04d}@runs/emb": 1 if i < 2 else 2 for i in range(plan.num_shards)
    }  # shards 0 and 1 once, in the first attempt; the others in both
    table = ds.dataset(urls, format="parquet").to_table()
    assert sorted(table.column("window_id").to_pylist()) == list(range(plan.num_examples))
    questions, places = (table.column(c).to_pylist() for c in ("question_id", "window_index"))
    assert len(set(zip(questions, places, strict=True))) == plan.num_examples
    *rows, total = json.loads(Artifact.get("extract-squad2-runs-emb-shards").data)
    assert rows[0]["windows"] == "0-7" and total["windows"] == f"{plan.num_examples} planned"
    progress = Artifact.get("extract-squad2-runs-emb-progress")
    n = plan.num_examples
    assert progress.description.startswith(f"{n} of {n} windows committed (squad2/dev {n} of {n})")


def test_storage_losing_committed_files_fails_the_run_naming_them(
    prefect_harness, tmp_path, tiny_model, glue_dir, monkeypatch
):
    real_shard = extract.extract_shard
    folder = tmp_path / "wnli/dev"

    def losing_after_the_last(cfg, plan, index, progress=False):
        record = real_shard(cfg, plan, index, progress)
        if index == 3:  # storage drops earlier writes (a prefix deleted, a crashed server)
            (folder / "shard-00001.parquet").unlink()
            (folder / "_manifest/plan.json").unlink()
        return record

    monkeypatch.setattr(extract, "extract_shard", losing_after_the_last)
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    with pytest.raises(ShardsFailed) as failed:
        extract_glue(cfg)
    assert failed.value.failures == {}
    assert failed.value.missing == [
        f"{folder}/_manifest/plan.json (missing)",
        f"{folder}/shard-00001.parquet (missing)",
    ]
    assert "not stored at the end" in str(failed.value)

    monkeypatch.setattr(extract, "extract_shard", real_shard)
    state = extract_glue(cfg, return_state=True)
    assert state.is_completed()
    shard_runs = [n for n in _task_run_names(state) if "shard-" in n]
    assert shard_runs == [f"wnli-dev-shard-0001@{_at(tmp_path)}"]
    assert _example_ids(tmp_path, "wnli", "dev") == list(range(71))


def test_no_space_stops_the_flow_at_the_first_shard(
    prefect_harness, tmp_path, tiny_model, glue_dir, monkeypatch
):
    import errno

    from bertvision.storage import OutOfSpace

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards._HashingFile, "write", full_disk)
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    state = extract_glue(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(OutOfSpace, match="no space left writing shard 0 of wnli/dev"):
        state.result()
    assert [n for n in _task_run_names(state) if "shard-" in n] == [
        f"wnli-dev-shard-0000@{_at(tmp_path)}"
    ]
    assert not list((tmp_path / "wnli/dev").rglob("*~*"))  # no staging file left


def test_no_space_stops_a_grouped_extraction_at_the_first_shard(
    prefect_harness, tmp_path, tiny_model, glue_dir, monkeypatch
):
    import errno

    from bertvision.storage import OutOfSpace

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards._HashingFile, "write", full_disk)
    state = extract_glue(_cfg(tmp_path, tiny_model, glue_dir), shards_per_task=2, return_state=True)
    assert state.is_failed()
    with pytest.raises(OutOfSpace, match="no space left writing shard 0 of wnli/dev"):
        state.result()
    assert [n for n in _task_run_names(state) if "-shards-" in n] == [
        f"wnli-dev-shards-0000-0001@{_at(tmp_path)}"
    ]  # the first group only, stopped at its first shard
    assert shards.status(str(tmp_path))["wnli/dev"]["failed_shards"] == [0]


@flow
def shard_zero(cfg: ExtractConfig) -> str:
    """The extract_shard task of shard 0 in a flow of its own: its final state's name."""
    [plan] = extract_tasks.plan_extraction(cfg)
    return extract_tasks.extract_shard(cfg, plan, 0, return_state=True).name


def test_the_cache_serves_a_shard_only_while_storage_holds_it(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    # The first run stores the shard; from the second on, flow runs share a cache entry for it.
    assert [shard_zero(cfg) for _ in range(3)] == ["Completed", "Completed", "Cached"]

    shutil.rmtree(tmp_path / "wnli")  # storage lost: the cache must not claim the shard
    assert shard_zero(cfg) == "Completed"
    assert shards.status(str(tmp_path))["wnli/dev"]["done"] == 1


def test_the_cache_serves_a_shard_only_while_its_file_is_stored_as_committed(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    """The cache key exists only while the shard's commit record is there AND its file is
    stored as committed (size, and the hash blob metadata keeps), judged by metadata alone: the
    file alone gone (its record left), the task runs and the shard is written again."""

    cfg = _cfg(tmp_path, tiny_model, glue_dir)
    assert [shard_zero(cfg) for _ in range(3)] == ["Completed", "Completed", "Cached"]
    shard = tmp_path / "wnli" / "dev" / "shard-00000.parquet"
    written = shard.read_bytes()

    shard.unlink()  # the commit record stays
    assert (tmp_path / "wnli" / "dev" / "_manifest" / "shard-00000.json").exists()
    assert shard_zero(cfg) == "Completed"
    assert shard.read_bytes() == written
    assert shards.status(str(tmp_path))["wnli/dev"]["done"] == 1

    shard.write_bytes(written[:-1])  # a file of another size than its record's
    assert shard_zero(cfg) == "Completed"
    assert shard.read_bytes() == written


def wnli_train_and_dev(out: Path, model: str, glue_dir: str, **changes) -> str:
    """WNLI's train and dev embeddings under `out`, one shard each; returns its URL."""
    settings = dict(task="wnli", out=str(out), data_dir=glue_dir, splits=["train", "dev"],
                    max_seq_length=64, shard_size=400, batch_size=32, device="cpu")  # fmt: skip
    cfg = ExtractConfig(model=model, **settings | changes)
    extract.extract_hidden_states(cfg, progress=False)
    return str(out)


@flow
def train_once(cfg: TrainConfig) -> str:
    """The train task in a flow of its own: its final state's name (Completed, Cached)."""
    return train_tasks.train_adapter(cfg, return_state=True).name


def test_the_train_task_is_not_served_from_the_cache_once_a_committed_file_is_gone(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    """A run folder's cache key exists only while every file its commit record lists is
    stored: the adapter gone, the task runs and the core trains the run again."""
    emb = wnli_train_and_dev(tmp_path / "emb", tiny_model, glue_dir)

    cfg = TrainConfig(task="wnli", embeddings=emb, out=str(tmp_path / "run"), epochs=1,
                      adapter_dim=4, device="cpu")  # fmt: skip
    assert [train_once(cfg) for _ in range(3)] == ["Completed", "Completed", "Cached"]
    weights = tmp_path / "run" / "adapter" / "adapter.safetensors"
    stored = weights.read_bytes()

    shutil.rmtree(weights.parent)
    assert train_once(cfg) == "Completed"
    assert weights.read_bytes() == stored


def test_a_trial_is_not_served_from_the_cache_once_its_run_lost_a_file(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    """The trial's cache key exists only while its trial.json and every file of its run are
    stored: the adapter gone, the task runs and the core trains the trial again, the same."""
    emb = wnli_train_and_dev(tmp_path / "emb", tiny_model, glue_dir)
    cfg = SweepConfig(task="wnli", embeddings=emb, out=str(tmp_path / "sweep"), trials=1,
                      space={"epochs": 1, "adapter_dim": 4}, device="cpu")  # fmt: skip
    sweeping.prepare_sweep(cfg)
    (spec,) = sweeping.suggest_trials(cfg)

    @flow
    def trial_once() -> str:
        return sweep_tasks.run_trial(cfg, spec, return_state=True).name

    assert [trial_once() for _ in range(3)] == ["Completed", "Completed", "Cached"]
    weights = tmp_path / "sweep" / "trials" / "0000" / "adapter" / "adapter.safetensors"
    stored = weights.read_bytes()

    shutil.rmtree(weights.parent)
    with pytest.warns(
        UserWarning, match=r"trial 0.s run lacks 2 of its files \(adapter/adapter.safetensors"
    ):
        sweeping.prepare_sweep(cfg)  # as the flow does first: the trial is uncommitted
    assert trial_once() == "Completed"
    assert weights.read_bytes() == stored


class Records(logging.Handler):
    """Every record a logger passes on, whatever its level."""

    def __init__(self) -> None:
        super().__init__(level=0)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_run_command_goes_through_the_whole_pipeline_and_prints_a_table_of_the_stages(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    out = tmp_path / "run"
    space = tmp_path / "space.json"
    space.write_text('{"epochs": 2}')
    args = ["run", "--tasks", "wnli", "--data-dir", glue_dir, "--out", str(out)]
    args += ["--model", tiny_model, "--finetune-epochs", "0.1", "--max-seq-length", "64"]
    args += ["--extract-shard-size", "300"]
    args += ["--train-epochs", "2", "--sweep-trials", "1", "--sweep-space", str(space)]
    transformers_logs = Records()
    logging.getLogger("transformers").addHandler(transformers_logs)
    try:
        result = CliRunner().invoke(app, [*args, "--ensemble-top-k", "1", "--device", "cpu"])
    finally:
        logging.getLogger("transformers").removeHandler(transformers_logs)
    assert result.exit_code == 0, result.output
    # WNLI train: 323 of 635 are label 0; dev: 40 of 71 are 0.
    assert re.search(r"^majority class \(train\) +0\.563 *$", result.stdout, re.M)
    time = r"\d+ s|\d+ min \d\d s"
    for label in ("fine-tuned encoder", "pooler adapter", "best of 1 sweep trials", "ensemble"):
        assert re.search(rf"^{label}.* [01]\.\d{{3}} +({time})$", result.stdout, re.M), label
    assert re.search(rf"^extraction .*  +({time})$", result.stdout, re.M)
    assert re.search(rf"^total +({time})$", result.stdout, re.M)
    assert f"Everything is under {out}" in result.stdout
    assert f"bertvision report {out}" in result.stdout
    ui = get_current_settings().api.url.rstrip("/").removesuffix("/api")
    assert f"task runs and artifacts are on the Prefect server: {ui}" in result.stdout
    # transformers reported nothing: not the weights the extraction's encoder leaves unused
    assert not [m for m in transformers_logs.messages if "LOAD REPORT" in m]
    assert (out / "wnli" / "finetune" / "config.json").is_file()
    # nothing predicted that is not extracted: the ensemble has no test split to join
    assert not list((out / "wnli" / "finetune").glob("**/test*"))
    assert _example_ids(out / "embeddings", "wnli", "train") == list(range(635))
    assert json.loads((out / "wnli" / "ensemble" / "metrics.json").read_text())["members"]
    # the adapters' held-out slice was checked against what the encoder was fine-tuned on
    extracted = json.loads((out / "embeddings/wnli/train/_manifest/run.json").read_text())
    tuned = json.loads((out / "wnli" / "finetune" / "_commit.json").read_text())
    assert extracted["finetuned_encoder"] == tuned["finetuned_encoder"]
    assert extracted["finetuned_encoder"]["train_examples"] == 635

    # Runs are named after their work and output, artifact keys too.
    with get_client(sync_client=True) as client:
        flow_runs = {run.name for run in client.read_flow_runs()}
        task_runs = {run.name for run in client.read_task_runs()}
    assert {
        f"pipeline-wnli@{_at(out)}",
        "finetune-wnli@wnli/finetune",
        "extract-wnli@run/embeddings",
        "train-wnli-pooler@wnli/pooler",
        "sweep-wnli-pooler@wnli/sweep",
        "ensemble-wnli-top-1@wnli/ensemble",
    } <= flow_runs
    assert {"wnli-finetune@wnli/finetune", "wnli-pooler-trial-0000@wnli/sweep"} <= task_runs
    compared = Artifact.get(f"pipeline-wnli-{_key(out)}-metrics").data
    assert "| wnli | majority class (train) | 0.5634 |  |" in compared  # WNLI dev: 40 of 71
    assert re.search(
        r"^\| wnli \| ensemble \| [01]\.\d{4} \| [+-]0\.\d{4} accuracy \|$", compared, re.M
    )
    assert "| finetune | dev |" in Artifact.get("finetune-wnli-wnli-finetune-metrics").data
    assert "| pooler | val |" in Artifact.get("train-wnli-pooler-wnli-pooler-metrics").data

    # A rerun finds every stage finished: each says so, with the time it took when it ran, and
    # the times and the total are the rerun's own. Nothing is written.
    stored = tree_state(out)
    again = CliRunner().invoke(app, [*args, "--ensemble-top-k", "1", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    done = rf"({time})  done before \(took ({time})\)"
    for label in ("fine-tuned encoder", "pooler adapter", "best of 1 sweep trials", "ensemble"):
        assert re.search(rf"^{label}.* [01]\.\d{{3}} +{done}$", again.stdout, re.M), label
    assert re.search(rf"^extraction .*  +{done}$", again.stdout, re.M)
    assert re.search(rf"^total +({time})$", again.stdout, re.M)
    assert tree_state(out) == stored


def test_the_stage_table_marks_stages_found_finished_and_totals_this_runs_time():
    from bertvision_flows.cli import stage_table

    from bertvision.config import PipelineConfig

    def row(dev, seconds, took=None, done_before=True):
        return {"dev": dev, "seconds": seconds, "done_before": done_before, "took": took}

    rows = {
        "majority baseline": row({"accuracy": 0.5634}, 0.0, done_before=False),
        "finetune": row({"accuracy": 0.6}, 1.2, took=125.0),
        "extract": row(None, 0.4, took=61.0),
        "pooler": row({"accuracy": 0.55}, 0.3, took=12.3),
        "best trial": row({"accuracy": 0.57}, 30.0, done_before=False),  # ran now
        "ensemble": row({"accuracy": 0.58}, 0.2),  # a record without timings
    }
    table = stage_table(PipelineConfig(tasks=["wnli"], out="runs"), "wnli", rows)
    time = r"\d+ s|\d+ min \d\d s"
    assert re.search(r"^fine-tuned encoder.* 0\.600 +1 s  done before \(took 2 min 05 s\)$",
                     table, re.M)  # fmt: skip
    assert re.search(r"^extraction .* +0 s  done before \(took 1 min 01 s\)$", table, re.M)
    assert re.search(r"^pooler adapter.* 0\.550 +0 s  done before \(took 12 s\)$", table, re.M)
    assert re.search(r"^best of .* 0\.570 +30 s$", table, re.M)  # ran now: its time alone
    assert re.search(r"^ensemble .* 0\.580 +0 s  done before$", table, re.M)
    assert re.search(r"^total +32 s$", table, re.M)  # this run's seconds, not the stored ones
    assert not re.search(rf"^majority class \(train\).*({time})", table, re.M)


def test_the_train_task_is_not_served_from_the_cache_once_the_embeddings_changed(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    """Identity by content: the embeddings under the same URL re-extracted with another encoder
    make the cached result stale; the task runs and the core refuses (other inputs)."""
    from transformers import BertConfig, BertModel

    emb = wnli_train_and_dev(tmp_path / "emb", tiny_model, glue_dir)

    cfg = TrainConfig(task="wnli", embeddings=emb, out=str(tmp_path / "run"), epochs=1,
                      adapter_dim=4, device="cpu")  # fmt: skip
    assert [train_once(cfg) for _ in range(3)] == ["Completed", "Completed", "Cached"]

    other = tmp_path / "other-encoder"
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(tiny_model)).save_pretrained(other)
    shutil.copy(f"{tiny_model}/tokenizer.json", other)
    shutil.copy(f"{tiny_model}/tokenizer_config.json", other)
    wnli_train_and_dev(tmp_path / "emb", str(other), glue_dir, overwrite=True)
    assert train_once(cfg) == "Failed"  # refused: "holds a finished run of the same ..."
    with pytest.raises(ValueError, match="holds a finished run of the same settings on other inp"):
        train_core.train_adapter(cfg, progress=False)

    assert train_once(dataclasses.replace(cfg, overwrite=True)) == "Completed"
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    plan, _ = shards.committed_shards(emb, "wnli", "train")
    assert stored["extraction_keys"]["train"] == plan.key
    assert stored["model_fingerprint"] == plan.model_fingerprint


def test_run_command_takes_squad2_through_the_pipeline_with_em_and_f1_per_stage(
    prefect_harness, tmp_path, tiny_model, squad_dir
):
    from bertvision import squad

    data = squad.write_slice(
        squad_dir, str(tmp_path / "squad"), train=(("Normans", "Sky_(United_Kingdom)"), 2),
        dev=(("Rhine",), 1),
    )  # fmt: skip
    out = tmp_path / "run"
    space = tmp_path / "space.json"
    space.write_text('{"epochs": 1, "adapter_dim": 8}')
    windowing = ["--max-seq-length", "128", "--doc-stride", "32", "--max-question-length", "32"]
    args = [
        "run",
        "--tasks",
        "squad2",
        "--data-dir",
        data,
        "--out",
        str(out),
        "--model",
        tiny_model,
    ]
    args += ["--finetune-epochs", "0.2", "--val-fraction", "0.5", "--device", "cpu"]
    args += windowing  # one windowing for fine-tuning and extraction
    args += ["--train-epochs", "1", "--sweep-trials", "1", "--sweep-space", str(space)]
    result = CliRunner().invoke(app, [*args, "--ensemble-top-k", "1"])
    assert result.exit_code == 0, result.output
    time = r"\d+ s|\d+ min \d\d s"
    assert re.search(r"^squad2 dev +exact +f1 +time$", result.stdout, re.M)
    dev = squad.load_split("dev", data)
    no_answer = 100.0 * sum(q.is_impossible for q in dev) / len(dev)
    baseline = rf"^no answer to every question +{no_answer:.3f} +{no_answer:.3f} *$"
    assert re.search(baseline, result.stdout, re.M)
    for label in ("fine-tuned encoder", "span adapter", "best of 1 sweep trials", "ensemble"):
        assert re.search(rf"^{label}.* \d+\.\d{{3}} +\d+\.\d{{3}} +({time})$", result.stdout, re.M)
    ensemble = json.loads((out / "squad2" / "ensemble" / "metrics.json").read_text())
    assert [m["trial"] for m in ensemble["members"]] == [0, None]  # the trial, the fine-tuned
    preds = json.loads((out / "squad2" / "ensemble" / "dev_predictions.json").read_text())
    assert sorted(preds) == sorted(q.question_id for q in dev)
    assert (out / "squad2" / "span" / "metrics.json").is_file()
    compared = Artifact.get(f"pipeline-squad2-{_key(out)}-metrics").data
    baseline = (
        rf"^\| squad2 \| no answer to every question \|.* \| {no_answer:.4f} \| {no_answer:.4f} \|"
    )
    assert re.search(baseline, compared, re.M)  # exact, f1 (metrics in name order)

    # What the run suggests next: the report of every stage, beside the no-answer baseline.
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert re.search(
        r"^\| task \| metric \| baseline \| fine-tuning \| adapter: span \| "
        r"best trial \(span\) \| ensemble \|$",
        report.output,
        re.M,
    )
    f1 = rf"^\| squad2 \| f1 \| {no_answer:.4f}( \| \d+\.\d{{4}}){{4}} \|$"
    assert re.search(f1, report.output, re.M)
    no_answer_f1 = ensemble["ensemble"]["NoAns_f1"]  # the ensemble: the last column
    assert re.search(
        rf"^\| squad2 \| NoAns_f1 \| 100\.0000 \|.* {no_answer_f1:.4f} \|$", report.output, re.M
    )


def test_a_shard_group_for_a_deployment_the_server_lacks_names_it(prefect_harness):
    with pytest.raises(RuntimeError, match=r"deployment extract-shards/nope is not on the Prefect"):
        extract_tasks.run_shard_group.fn("extract-shards/nope", {}, "rte-train-shards-1-of-2")


def test_ctrl_c_reaches_the_run_command_alone_not_the_server_it_starts():
    """Ctrl-C signals the terminal's whole process group; the ephemeral API server, started
    with SIGINT held, outlives it, so the command can still send its logs there and stop it."""
    import os
    import signal
    import subprocess
    import sys

    from bertvision_flows.cli import _interrupts_held

    survives = "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    survives += (
        "try:\n    time.sleep(2); print('ran on')\nexcept KeyboardInterrupt:\n    print('stopped')"
    )
    with _interrupts_held():
        server = subprocess.Popen([sys.executable, "-c", survives], stdout=subprocess.PIPE)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # ours again
    time.sleep(0.5)
    os.kill(server.pid, signal.SIGINT)
    assert server.communicate(timeout=30)[0].decode().strip() == "ran on"
