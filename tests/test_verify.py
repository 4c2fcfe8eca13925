"""`bertvision verify`: the full audit of committed shards (every byte against the commit
record), and `--redo`, which uncommits exactly the bad shards so that the next extract redoes
them. Deciding what is done stays metadata only (tests/test_extract.py)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from test_extract import _config as extract_config
from typer.testing import CliRunner

from bertvision import shards, squad
from bertvision.cli import app
from bertvision.config import ExtractConfig, VerifyConfig
from bertvision.extract import extract_hidden_states


def _flip(path: Path, at: int, count: int = 16) -> None:
    """Invert `count` bytes of the file at offset `at`; same size."""
    data = bytearray(path.read_bytes())
    data[at : at + count] = bytes(b ^ 0xFF for b in data[at : at + count])
    path.write_bytes(bytes(data))


def _verify(*args: str):
    return CliRunner().invoke(app, ["verify", *args])


def _table(output: str) -> dict[str, list[str]]:
    """The verify table's rows by split: [shards, checked, bad, pending, MB read, seconds]."""
    lines = output.splitlines()
    assert lines[0].split() == [
        "split",
        "shards",
        "checked",
        "bad",
        "pending",
        "MB",
        "read",
        "seconds",
    ]
    return {line.split()[0]: line.split()[1:] for line in lines[1:] if not line.startswith(" ")}


def test_flipped_bytes_are_reported_and_redo_makes_extract_redo_only_that_shard(
    tmp_path, tiny_model, glue_dir
):
    cfg = extract_config(tmp_path, tiny_model, glue_dir)
    extract_hidden_states(cfg, progress=False)
    folder = tmp_path / "wnli/dev"
    stored = sum(p.stat().st_size for p in folder.glob("shard-*.parquet"))

    clean = _verify(str(tmp_path))
    assert clean.exit_code == 0, clean.output
    assert _table(clean.output)["wnli/dev"][:5] == ["4", "4", "0", "0", f"{stored / 1e6:.1f}"]

    path = folder / "shard-00002.parquet"
    _flip(path, path.stat().st_size // 2)  # inside the hidden states' pages
    found = _verify(str(tmp_path))
    assert found.exit_code == 1, found.output
    assert _table(found.output)["wnli/dev"][:4] == ["4", "4", "1", "0"]
    (bad,) = [line for line in found.output.splitlines() if line.startswith("  bad")]
    assert bad.startswith(
        "  bad shard 2: its sha256 is not the one recorded at commit; unreadable:"
    )
    assert "CRC checksum verification failed" in bad  # the page checksum caught it too
    assert shards.split_status(str(folder))["done"] == 4  # without --redo nothing changes

    others = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet") if p != path}
    redo = _verify(str(tmp_path), "--redo")
    assert redo.exit_code == 1, redo.output
    assert (
        "bad shard 2: " in redo.output and "uncommitted, the next extract redoes it" in redo.output
    )
    status = shards.split_status(str(folder))
    assert (status["done"], status["failed_shards"]) == (3, [2])
    assert "found by verify" in shards.load_failures(str(folder))[2].error

    summary = extract_hidden_states(cfg, progress=False)
    assert summary.committed == {"wnli/dev": [2]} and summary.skipped == {"wnli/dev": [0, 1, 3]}
    assert {n: (folder / n).stat().st_mtime_ns for n in others} == others
    again = _verify(str(tmp_path), "--redo")
    assert again.exit_code == 0, again.output
    assert _table(again.output)["wnli/dev"][:4] == ["4", "4", "0", "0"]


SHA256 = "its sha256 is not the one recorded at commit"


@pytest.mark.parametrize("damage", ["footer", "other shard", "deleted"])
def test_each_kind_of_damage_is_named(tmp_path, tiny_model, glue_dir, damage):
    extract_hidden_states(extract_config(tmp_path, tiny_model, glue_dir), progress=False)
    folder = tmp_path / "wnli/dev"
    path = folder / "shard-00001.parquet"
    size = path.stat().st_size
    if damage == "footer":  # it still decodes: no page checksum covers the footer
        _flip(path, size - 40)
        expected = SHA256
    elif damage == "other shard":  # a valid shard of this extraction, as many rows, misplaced
        path.write_bytes((folder / "shard-00000.parquet").read_bytes())
        expected = (
            f"{path.stat().st_size} bytes, its record says {size}; {SHA256}; "
            "its row ids are not exactly 20..39"
        )
    else:
        path.unlink()
        expected = "missing"

    (check,) = shards.verify(VerifyConfig(out=str(tmp_path))).values()
    assert (check.checked, check.bad) == (4, {1: expected})


def test_span_shards_on_a_memory_url(tiny_model, squad_dir, tmp_path):
    data = squad.write_slice(squad_dir, str(tmp_path / "squad"), train=(1, 2), dev=(2, 2))
    out = "memory://bv-test-verify"
    cfg = ExtractConfig(
        task="squad2",
        out=out,
        model=tiny_model,
        data_dir=data,
        splits=["dev"],
        max_seq_length=96,
        doc_stride=32,
        max_question_length=24,
        shard_size=16,
        batch_size=8,
        device="cpu",
    )
    fs = fsspec.filesystem("memory")
    try:
        assert extract_hidden_states(cfg, progress=False).ok
        (check,) = shards.verify(VerifyConfig(out=out)).values()
        assert (check.task, check.split, check.bad) == ("squad2", "dev", {})
        assert check.checked == check.shards > 1 and check.pending == 0

        shard = "/bv-test-verify/squad2/dev/shard-00001.parquet"
        data = bytearray(fs.cat_file(shard))
        data[len(data) // 2] ^= 0xFF
        fs.pipe_file(shard, bytes(data))
        result = _verify(out, "--task", "squad2", "--split", "dev", "--redo")
        assert result.exit_code == 1, result.output
        assert "bad shard 1: its sha256 is not the one recorded at commit" in result.output
        assert extract_hidden_states(cfg, progress=False).committed == {"squad2/dev": [1]}
        assert _verify(out).exit_code == 0
    finally:
        fs.rm("/bv-test-verify", recursive=True)


def test_an_incomplete_extraction_counts_its_uncommitted_shards_as_pending(
    tmp_path, tiny_model, glue_dir
):
    extract_hidden_states(extract_config(tmp_path, tiny_model, glue_dir), progress=False)
    (tmp_path / "wnli/dev/_manifest/shard-00003.json").unlink()
    result = _verify(str(tmp_path))
    assert result.exit_code == 0, result.output
    assert _table(result.output)["wnli/dev"][:4] == ["4", "3", "0", "1"]


def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, tiny_model, glue_dir):
    missing = _verify(str(tmp_path / "nowhere"))
    assert (missing.exit_code, missing.output) == (2, f"error: {tmp_path}/nowhere does not exist\n")
    empty = _verify(str(tmp_path))
    assert (empty.exit_code, empty.output) == (
        2,
        f"error: {tmp_path} holds no extraction (no TASK/SPLIT/_manifest/plan.json under it)\n",
    )
    extract_hidden_states(extract_config(tmp_path, tiny_model, glue_dir), progress=False)
    other = _verify(str(tmp_path), "--task", "rte")
    assert (other.exit_code, other.output) == (
        2,
        f"error: {tmp_path} holds no extraction of rte/*; it holds wnli/dev\n",
    )
    unknown = _verify(str(tmp_path), "--task", "nope")
    assert unknown.exit_code == 2 and unknown.output.startswith("error: --task 'nope' is unknown")


@pytest.mark.parametrize("name", ["sha256", "SHA256", "Sha256"])
def test_blob_metadata_is_read_in_any_case_by_the_metadata_check(name):
    """Azure's metadata names are case-insensitive, and copying tools may capitalise them: a
    blob of the recorded size whose stored sha256 differs is not the committed shard."""
    record = shards.ShardRecord(
        0, "shard-00000.parquet", 0, 4, 4, 100, "a" * 64, "k", 1.0, "w", "t"
    )
    blob = {"type": "file", "size": 100, "metadata": {name: "b" * 64}}
    assert shards.stored_mismatch(blob, record) == (
        f"its blob's stored sha256 {'b' * 64} is not its record's {'a' * 64}"
    )
    assert shards.stored_mismatch({**blob, "metadata": {name: "a" * 64}}, record) is None
    listed = {"type": "file", "size": 9, "metadata": {"Shard_Record": record.to_json()}}
    assert shards._listed_record(listed) == record
