"""The orchestration at scale (benchmarks/bench_prefect_scale.py runs 10,000 shards): shard task
run names sort in shard order at any count; the coordinator's recounts of committed shards stay
a small share of its time however many shards there are."""

from types import SimpleNamespace

import pytest

pytest.importorskip("prefect")

from bertvision_flows.extract_glue import POLL_SECONDS, poll_seconds  # noqa: E402
from bertvision_tasks.extract import extract_shard  # noqa: E402
from bertvision_tasks.names import shard_number  # noqa: E402


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
