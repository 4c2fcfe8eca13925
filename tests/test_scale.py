"""The orchestration at scale (benchmarks/bench_prefect_scale.py runs 10,000 shards): shard task
run names sort in shard order at any count; the coordinator's recounts of committed shards stay
a small share of its time however many shards there are; groups of shards per task run are the
same wherever they run; the shard table stays small enough for the server's events."""

import json
import pickle
from types import SimpleNamespace

import pytest

pytest.importorskip("prefect")

from bertvision_flows.extract_glue import POLL_SECONDS, poll_seconds, worker_shares  # noqa: E402
from bertvision_tasks.artifacts import shard_rows  # noqa: E402
from bertvision_tasks.extract import (  # noqa: E402
    ShardGroupFailed,
    extract_shard,
    extract_shard_group,
    shard_groups,
)
from bertvision_tasks.names import shard_number  # noqa: E402
from bertvision_tasks.policy import transient  # noqa: E402
from prefect.states import Failed  # noqa: E402

from bertvision.schema import ExtractionPlan, ShardRecord  # noqa: E402


def test_shard_numbers_keep_four_digits_and_widen_past_ten_thousand_shards():
    assert shard_number(7, 20) == "0007"
    assert shard_number(9999, 10_000) == "9999"
    assert shard_number(7, 10_001) == "00007"
    assert shard_number(10_000, 12_000) == "10000"


def test_shard_task_run_names_of_twelve_thousand_shards_sort_in_shard_order():
    cfg = SimpleNamespace(task="sst2", out="runs/emb")
    plan = SimpleNamespace(task="sst2", split="train", num_shards=12_000)
    names = [
        extract_shard.task_run_name({"cfg": cfg, "plan": plan, "index": i})
        for i in (7, 999, 10_000, 11_999)
    ]
    assert names == [
        "sst2-train-shard-00007@runs/emb",
        "sst2-train-shard-00999@runs/emb",
        "sst2-train-shard-10000@runs/emb",
        "sst2-train-shard-11999@runs/emb",
    ]
    assert names == sorted(names)


def test_shard_task_run_names_of_a_small_extraction_keep_four_digits():
    cfg = SimpleNamespace(task="rte", out="runs/emb")
    plan = SimpleNamespace(task="rte", split="train", num_shards=100)
    name = extract_shard.task_run_name({"cfg": cfg, "plan": plan, "index": 7})
    assert name == "rte-train-shard-0007@runs/emb"


def test_recounts_of_committed_shards_wait_ten_times_as_long_as_the_last_one_took():
    assert POLL_SECONDS == 10
    assert poll_seconds(0.0) == 10  # the first wait, before any recount
    assert poll_seconds(0.2) == 10  # a few hundred shards: every 10 s
    assert poll_seconds(3.4) == 34  # 9,500 commit records read on a loaded machine


def test_a_group_task_run_is_named_by_its_first_and_last_shard():
    cfg = SimpleNamespace(task="rte", out="runs/emb")
    plan = SimpleNamespace(task="rte", split="train", num_shards=1000)
    parameters = {"cfg": cfg, "plan": plan, "indices": list(range(100, 110))}
    assert extract_shard_group.task_run_name(parameters) == "rte-train-shards-0100-0109@runs/emb"


def test_shards_are_cut_into_groups_in_order_the_last_one_smaller():
    assert shard_groups([0, 1, 2, 3, 4, 5, 6], 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert shard_groups([1, 4, 5, 9], 2) == [[1, 4], [5, 9]]  # a rerun: only the pending ones
    assert shard_groups([0, 1, 2], 1) == [[0], [1], [2]]


def test_workers_take_whole_groups_round_robin_and_cut_them_the_same_way():
    shares = worker_shares(list(range(23)), workers=2, shards_per_task=5)
    assert shares == [
        [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 20, 21, 22],
        [5, 6, 7, 8, 9, 15, 16, 17, 18, 19],
    ]
    children_groups = [g for share in shares for g in shard_groups(share, 5)]
    assert sorted(children_groups) == shard_groups(list(range(23)), 5)
    assert worker_shares(list(range(7)), workers=3, shards_per_task=1) == [
        [0, 3, 6],
        [1, 4],
        [2, 5],
    ]
    assert worker_shares([0, 1, 2], workers=4, shards_per_task=2) == [[0, 1], [2]]  # 2 children


def test_a_group_failure_names_each_shard_is_retried_when_one_was_transient_and_pickles():
    failures = {"rte/train/3": "ConnectionResetError: storage unreachable", "rte/train/5": "X: y"}
    error = ShardGroupFailed(failures, transient=True)
    assert str(error) == (
        "2 shard(s) failed: rte/train/3: ConnectionResetError: storage unreachable; "
        "rte/train/5: X: y"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.failures, copy.transient) == (str(error), failures, True)
    assert transient(Failed(data=error))
    assert not transient(Failed(data=ShardGroupFailed({"rte/train/5": "DataError: bad"})))


def _plan(num_shards: int, shard_size: int = 4) -> ExtractionPlan:
    return ExtractionPlan(
        "sst2", "train", "m", "f" * 16, "d" * 16, num_shards * shard_size, shard_size, 64,
        "float16", 3, 32, False,
    )  # fmt: skip


def _record(plan: ExtractionPlan, index: int, worker: str) -> ShardRecord:
    start, stop = plan.shard_range(index)
    return ShardRecord(
        index, f"shard-{index:05d}.parquet", start, stop, rows=stop - start, bytes=20_000,
        sha256="0" * 64, key=plan.shard_key(index), seconds=0.02, worker=worker,
        committed_at=f"2026-11-29T20:{index % 60:02d}:00Z",
    )  # fmt: skip


def test_a_table_of_ten_thousand_shards_folds_the_committed_and_lists_every_failed_one():
    plan = _plan(10_000)
    failed = {f"sst2/train/{i}": f"DataError: shard {i} is bad" for i in (7, 5000, 9999)}
    missing = {12, 13}
    records = {
        i: _record(plan, i, f"host:{i % 4}")
        for i in range(10_000)
        if f"sst2/train/{i}" not in failed and i not in missing
    }
    rows = shard_rows([(plan, records, failed)], "runs/emb")
    committed, *listed, total = rows
    assert committed == {
        "split": "sst2/train", "shard": "9,995 shards", "status": "committed", "error": "",
        "examples": "39,980", "rows": 39_980, "size": "199.9 MB", "seconds": 199.9,
        "written by (host:pid)": "4 worker(s)", "committed at": "2026-11-29T20:59:00Z",
    }  # fmt: skip
    assert [(row["shard"], row["status"]) for row in listed] == [
        (7, "failed"), (12, "missing"), (13, "missing"), (5000, "failed"), (9999, "failed")
    ]  # fmt: skip
    assert listed[0]["error"] == "DataError: shard 7 is bad"
    assert total["status"] == "9995 committed, 3 failed, 2 missing"
    assert total["error"] == (
        "9,995 of 10,000 shards not listed one by one (committed shards: one row per split); "
        "the full record: bertvision status runs/emb"
    )
    assert len(json.dumps(rows)) < 5_000  # the event limit is 1.5 MB; 10,000 rows were 2.6 MB


def test_a_table_of_ten_thousand_failed_shards_lists_the_first_five_hundred_cut_short():
    plan = _plan(10_000)
    failed = {f"sst2/train/{i}": "ModelError: " + "x" * 5_000 for i in range(10_000)}
    *listed, total = shard_rows([(plan, {}, failed)], "runs/emb")
    assert [row["shard"] for row in listed] == list(range(500))
    assert {len(row["error"]) for row in listed} == {500}  # errors cut at 500 characters
    assert total["error"].startswith("9,500 of 10,000 shards not listed one by one")
    assert len(json.dumps([*listed, total])) < 400_000


def test_a_table_of_a_few_hundred_shards_lists_every_one():
    plan = _plan(300)
    records = {i: _record(plan, i, "host:1") for i in range(300)}
    *listed, total = shard_rows([(plan, records, {})], "runs/emb")
    assert [row["shard"] for row in listed] == list(range(300))
    assert listed[5]["examples"] == "20-23" and total["error"] == ""
