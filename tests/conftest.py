"""Fixtures shared by the whole suite: the real GLUE and SQuAD data, a tiny random BERT, the
real MiniLM."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect sets up logging once a process, when its API is first imported: a console handler on
# the root logger, writing to the sys.stderr of that moment. Set up here, that is pytest's stream;
# set up first inside a CLI test, it would be that CliRunner's buffer, closed when the test ends,
# and a later log record reaching the root logger would print "--- Logging error ---" into a
# later test's output. (The GPU machine runs the CUDA tests without Prefect.)
with contextlib.suppress(ImportError):
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()

REPO = Path(__file__).resolve().parents[1]
# The real data sit beside the checkout; a GPU machine gets a copy elsewhere, named by these
# variables.
GLUE_DIR = Path(os.environ.get("BERTVISION_TEST_GLUE_DIR", REPO.parent / "shared/data/glue"))
# The article split of SQuAD 2.0 (train-v2.0.json, dev-v2.0.json) beside the GLUE data.
SQUAD_DIR = Path(os.environ.get("BERTVISION_TEST_SQUAD_DIR", GLUE_DIR.parent / "squad/split"))


@pytest.fixture(scope="session")
def glue_dir() -> str:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR}")
    return str(GLUE_DIR)


@pytest.fixture(scope="session")
def squad_dir() -> str:
    if not SQUAD_DIR.is_dir():
        pytest.skip(f"real SQuAD 2.0 data not found at {SQUAD_DIR}")
    return str(SQUAD_DIR)


@pytest.fixture(scope="session")
def minilm() -> str:
    """Folder of the bundled pretrained all-MiniLM-L6-v2 (6 layers, hidden 384)."""
    from bertvision.encoder import default_model

    return os.environ.get("BERTVISION_TEST_MODEL") or default_model()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm) -> str:
    """A tiny random BERT (2 layers, hidden 32) with MiniLM's tokenizer: fast and real."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (a temporary API and database), started once per session.

    Persisted results and cache records go to a temporary folder, so no cache entry outlives the
    session. Yields that folder. Tests that need it skip when Prefect is not installed.
    """
    pytest.importorskip("prefect")
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with (
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}),
            prefect_test_harness(server_startup_timeout=120),
        ):
            yield results


def config_variant(model: str, folder: Path, name: str, **settings) -> str:
    """A copy of `model` in `folder` (other files linked) whose JSON file `name` (config.json,
    tokenizer_config.json) has `settings` changed."""
    import json

    folder.mkdir(parents=True)
    for source in Path(model).iterdir():
        if source.name != name:
            (folder / source.name).symlink_to(source.resolve())
    config = json.loads((Path(model) / name).read_text())
    (folder / name).write_text(json.dumps(config | settings))
    return str(folder)


def tokenizer_variant(model: str, folder: Path, **settings) -> str:
    """A copy of `model` whose tokenizer_config.json has `settings` changed, e.g.
    padding_side="left" or do_lower_case=False."""
    return config_variant(model, folder, "tokenizer_config.json", **settings)


def tree_state(root: str | Path) -> dict[str, tuple]:
    """Every file and folder under `root` as stored now: a file's bytes and modification time,
    a folder's entries and modification time (which any file made or removed in it changes,
    even one removed again). Two equal states: nothing was written in between."""
    import os

    state = {}
    for folder, folders, files in os.walk(root):
        state[f"{folder}/"] = (sorted(folders + files), os.stat(folder).st_mtime_ns)
        for name in files:
            path = Path(folder, name)
            state[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return state


def flip_in_column(path: Path, column: str, count: int = 4) -> None:
    """Flip `count` bytes at the end of the pages of `column` in the Parquet file at `path`: its
    data, not a page header or the footer, so that the file still opens and only the pages'
    checksums can tell."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(
        meta.column(i)
        for i in range(meta.num_columns)
        if meta.column(i).path_in_schema.split(".")[0] == column
    )
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    for at in range(end - 1 - count, end - 1):
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def killed_staging_name(name: str) -> str:
    """A staging file name for `name` (storage.staging_name) as a writer on this host that is
    gone now left it: the pid of a process that has exited."""
    import socket
    import subprocess
    import sys

    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    return f"{name}~{socket.gethostname()}~{pid}~0123456789ab"


def disk_fills_writing(monkeypatch, name: str) -> None:
    """Files whose path holds `name`, opened for writing, fill the disk: their first 10 bytes are
    written, then OSError ENOSPC (as a full disk fails a write midway)."""
    import builtins
    import errno
    import io

    class DiskFills(io.FileIO):
        def write(self, data) -> int:
            super().write((data.encode() if isinstance(data, str) else bytes(data))[:10])
            raise OSError(errno.ENOSPC, "No space left on device", self.name)

    def full_disk(real_open):
        def opening(file, mode="r", *args, **kwargs):
            if name in str(file) and "w" in mode:
                return DiskFills(file, "w")
            return real_open(file, mode, *args, **kwargs)

        return opening

    monkeypatch.setattr(builtins, "open", full_disk(builtins.open))
    monkeypatch.setattr(io, "open", full_disk(io.open))


@contextlib.contextmanager
def outside_handler_fails() -> Iterator[object]:
    """A SIGTERM handler that fails the test, in place of the default that would end pytest:
    a SIGTERM the command under test does not handle itself reaches it."""

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the handler outside the command")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        yield unhandled
    finally:
        signal.signal(signal.SIGTERM, previous)
