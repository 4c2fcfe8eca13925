"""Names of runs at scale: a shard task run's number sorts in shard order at any count."""

from types import SimpleNamespace

import pytest

pytest.importorskip("prefect")

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
