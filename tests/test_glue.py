"""GLUE loading: official row counts, labels intact, malformed files named precisely."""

from __future__ import annotations

import pytest

from bertvision import glue

OFFICIAL_DEV_ROWS = {"cola": 1043, "sst2": 872, "mrpc": 408, "stsb": 1500, "rte": 277, "wnli": 71}


@pytest.mark.parametrize("task, rows", OFFICIAL_DEV_ROWS.items())
def test_dev_splits_load_with_official_row_counts(glue_dir, task, rows):
    examples = glue.load_split(task, "dev", glue_dir)
    assert len(examples) == rows
    assert [ex.example_id for ex in examples] == list(range(rows))
    assert all(ex.label is not None for ex in examples)


def test_labels_are_intact(glue_dir):
    rte = glue.load_split("rte", "dev", glue_dir)
    assert rte[0].label == glue.TASKS["rte"].labels.index("not_entailment")  # row 0 of RTE dev
    assert {ex.label for ex in rte} == {0, 1}
    stsb = glue.load_split("stsb", "dev", glue_dir)
    assert stsb[0].texts == (
        "A man with a hard hat is dancing.",
        "A man wearing a hard hat is dancing.",
    )
    assert stsb[0].label == 5.0 and stsb[3].label == pytest.approx(2.4)
    cola = glue.load_split("cola", "dev", glue_dir)
    assert cola[4].texts == ("As you eat the most, you want the least.",) and cola[4].label == 0


def test_mrpc_header_with_byte_order_mark_is_read(glue_dir):
    mrpc = glue.load_split("mrpc", "dev", glue_dir)
    assert mrpc[0].label == 1 and len(mrpc[0].texts) == 2


def test_quotes_do_not_merge_rows(glue_dir):
    """RTE train row 2164 starts with a double quote; default CSV quoting would merge rows."""
    train = glue.load_split("rte", "train", glue_dir)
    assert len(train) == 2490
    assert train[2164].texts[0].startswith('"')


def test_test_splits_are_unlabelled(glue_dir):
    test = glue.load_split("rte", "test", glue_dir)
    assert len(test) == 3000 and all(ex.label is None for ex in test)


def test_all_nine_tasks_are_registered():
    assert set(glue.TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert glue.get_task("SST-2").name == "sst2"
    assert glue.get_task("stsb").regression
    assert glue.expand_splits(glue.get_task("mnli"), ["train", "dev"]) == [
        "train",
        "dev_matched",
        "dev_mismatched",
    ]


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        glue.get_task("nope")


def _write(tmp_path, text: str) -> str:
    folder = tmp_path / "RTE"
    folder.mkdir(exist_ok=True)
    (folder / "dev.tsv").write_text(text)
    return str(tmp_path)


def test_wrong_column_count_names_file_and_line(tmp_path):
    data_dir = _write(tmp_path, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\n")
    with pytest.raises(glue.DataError, match=r"dev.tsv line 3: 2 columns, expected 4"):
        glue.load_split("rte", "dev", data_dir)


def test_bad_label_names_file_and_line(tmp_path):
    data_dir = _write(tmp_path, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(glue.DataError, match=r"line 2: bad label 'maybe'"):
        glue.load_split("rte", "dev", data_dir)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(glue.DataError, match="missing data file"):
        glue.load_split("rte", "dev", str(tmp_path))


def test_data_fingerprint_changes_with_content(glue_dir):
    dev = glue.load_split("wnli", "dev", glue_dir)
    changed = [glue.Example(dev[0].example_id, dev[0].texts, 1 - dev[0].label), *dev[1:]]
    assert glue.data_fingerprint(dev) == glue.data_fingerprint(list(dev))
    assert glue.data_fingerprint(dev) != glue.data_fingerprint(changed)


def test_the_held_out_slice_is_seeded_and_a_tenth():
    ids = glue.held_out_ids(range(2490), 0.1, seed=0)
    assert len(ids) == 249 and list(ids) == sorted(set(ids.tolist()))
    assert list(ids) == list(glue.held_out_ids(list(reversed(range(2490))), 0.1, seed=0))
    assert list(ids) != list(glue.held_out_ids(range(2490), 0.1, seed=1))
