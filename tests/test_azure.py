"""Azure Blob Storage (az://) against Azurite, the real emulator started by the tests (no mocks).

What it shows: extraction writes to az:// and pyarrow.dataset reads the shards back through
adlfs; a shard is visible only complete; an outage is ridden out inside the storage layer and a
restart mid-extraction still yields every example exactly once; bad credentials and missing
containers end in one line without retries; Prefect's results persist to Azure so a second run
is served from the cache, and no secret reaches the Prefect API.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import adlfs
import pyarrow.dataset as ds
import pytest
from azurite import REPO, Azurite, use_only
from typer.testing import CliRunner

from bertvision import azure, shards, storage
from bertvision.cli import app
from bertvision.storage import StagedWrite, StorageError, StorageUnavailable

pytestmark = pytest.mark.azure

HTTP_LOG = "azure.core.pipeline.policies.http_logging_policy"  # one record per request sent


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Azurite:
    """One Azurite for the session; each test makes its own container."""
    service = Azurite(tmp_path_factory.mktemp("azurite")).start()
    yield service
    service.stop()


@pytest.fixture
def azure_env(azurite, monkeypatch) -> dict[str, str]:
    return use_only(azurite, monkeypatch)


@pytest.fixture(scope="module")
def rte_slice(tmp_path_factory, glue_dir) -> str:
    """A glue_data folder with the first 120 train, 16 dev and 16 test examples of the real RTE."""
    folder = tmp_path_factory.mktemp("glue-slice")
    (folder / "RTE").mkdir()
    for split, rows in (("train", 120), ("dev", 16), ("test", 16)):
        lines = (Path(glue_dir) / "RTE" / f"{split}.tsv").read_text().splitlines(keepends=True)
        (folder / "RTE" / f"{split}.tsv").write_text("".join(lines[: rows + 1]))
    return str(folder)


def _adlfs(azurite: Azurite) -> adlfs.AzureBlobFileSystem:
    """Plain adlfs, as any reader outside BERTVision would use it."""
    return adlfs.AzureBlobFileSystem(
        connection_string=azurite.connection_string(), skip_instance_cache=True
    )


def _four_train_shards(azurite: Azurite, model: str, data_dir: str) -> tuple[str, str, list[str]]:
    """RTE train extracted to a new container as 4 shards: the container, the output URL and
    the extract command's arguments."""
    container = azurite.create_container()
    out = f"az://{container}/emb"
    args = _extract_args(out, model, data_dir, "--splits", "train", "--shard-size", "32")
    assert CliRunner().invoke(app, args).exit_code == 0
    return container, out, args


def _extract_args(out: str, model: str, data_dir: str, *extra: str) -> list[str]:
    return [
        "extract",
        "--task",
        "rte",
        "--out",
        out,
        "--model",
        model,
        "--data-dir",
        data_dir,
        "--max-seq-length",
        "64",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        *extra,
    ]


# Credentials: from the environment only.


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {
                "AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=k",
                "AZURE_STORAGE_ACCOUNT_NAME": "b",
            },
            {"connection_string": "AccountName=a;AccountKey=k"},
        ),
        (
            {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": "a2V5"},
            {"account_name": "acct", "account_key": "a2V5"},
        ),
        (
            {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_SAS_TOKEN": "sv=1&sig=x"},
            {"account_name": "acct", "sas_token": "sv=1&sig=x"},
        ),
        ({"AZURE_STORAGE_ACCOUNT_NAME": "acct"}, {"account_name": "acct", "anon": False}),
    ],
    ids=["connection-string-first", "account-key", "sas-token", "managed-identity"],
)
def test_credentials_come_from_the_environment_first_match_wins(monkeypatch, env, expected):
    for name in list(os.environ):
        if name.startswith("AZURE_STORAGE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = azure.azure_storage_options()
    assert {k: options[k] for k in expected} == expected
    assert options["use_listings_cache"] is False  # other workers add shards meanwhile


def test_no_credentials_at_all_is_a_clear_error(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AZURE_STORAGE_"):
            monkeypatch.delenv(name)
    with pytest.raises(StorageError, match="no Azure credentials: set AZURE_STORAGE_CONNECTION"):
        storage.exists("az://container/x")


def clear_azure_environment(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith(("AZURE_STORAGE_", "BERTVISION_AZURE_")):
            monkeypatch.delenv(name)


# A connection string to nowhere: each case below fails before any request.
SOMEWHERE = (
    "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/a;"
)


@pytest.mark.parametrize(
    "env, line",
    [
        (
            {"BERTVISION_AZURE_RETRIES": "abc"},
            "BERTVISION_AZURE_RETRIES='abc' must be an integer from 0 to 20",
        ),
        (
            {"BERTVISION_AZURE_RETRIES": "-1"},
            "BERTVISION_AZURE_RETRIES='-1' must be an integer from 0 to 20",
        ),
        (
            {"BERTVISION_AZURE_BLOCK_MB": "-1"},
            "BERTVISION_AZURE_BLOCK_MB='-1' must be an integer from 1 to 4000",
        ),
        (
            {"BERTVISION_AZURE_BLOCK_MB": "0"},
            "BERTVISION_AZURE_BLOCK_MB='0' must be an integer from 1 to 4000",
        ),
        (
            {"BERTVISION_AZURE_CONCURRENCY": "0"},
            "BERTVISION_AZURE_CONCURRENCY='0' must be an integer from 1 to 256",
        ),
        (
            {"BERTVISION_AZURE_CONCURRENCY": "1e3"},
            "BERTVISION_AZURE_CONCURRENCY='1e3' must be an integer from 1 to 256",
        ),
    ],
    ids=[
        "retries-text",
        "retries-negative",
        "block-negative",
        "block-zero",
        "concurrency-zero",
        "concurrency-float",
    ],
)
def test_a_bad_transfer_setting_is_named_with_its_range(monkeypatch, env, line):
    clear_azure_environment(monkeypatch)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", SOMEWHERE)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["status", "az://emb/x"])
    assert result.exit_code == 2
    assert result.output == f"error: az://emb/x: environment variable {line}\n"


def test_transfer_settings_come_from_the_environment_when_used(monkeypatch):
    clear_azure_environment(monkeypatch)
    assert [azure.setting(n) for n in (azure.RETRIES, azure.CONCURRENCY, azure.BLOCK_MB)] == [
        5,
        8,
        8,
    ]
    monkeypatch.setenv("BERTVISION_AZURE_RETRIES", "0")
    monkeypatch.setenv("BERTVISION_AZURE_BLOCK_MB", " 4000 ")
    assert (azure.setting(azure.RETRIES), azure.setting(azure.BLOCK_MB)) == (0, 4000)


def test_a_bad_setting_in_the_environment_does_not_break_an_import():
    """Only a command that uses Azure reads the settings: `bertvision train` on a local disk,
    or `import bertvision.azure`, works whatever they hold."""
    env = os.environ | {"BERTVISION_AZURE_RETRIES": "abc", "BERTVISION_AZURE_BLOCK_MB": "-1"}
    done = subprocess.run(
        [sys.executable, "-c", "import bertvision.azure, bertvision.storage, bertvision.cli"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "env, line",
    [
        (
            {"AZURE_STORAGE_CONNECTION_STRING": "garbage"},
            "AZURE_STORAGE_CONNECTION_STRING is malformed: Connection string is either blank or "
            "malformed.",
        ),
        (
            {"AZURE_STORAGE_ACCOUNT_NAME": "bad name!", "AZURE_STORAGE_ACCOUNT_KEY": "a2V5"},
            "AZURE_STORAGE_ACCOUNT_NAME='bad name!' is not a storage account name (3 to 24 "
            "lowercase letters and digits)",
        ),
        (
            {"AZURE_STORAGE_ACCOUNT_NAME": "a/b", "AZURE_STORAGE_SAS_TOKEN": "sv=1&sig=x"},
            "AZURE_STORAGE_ACCOUNT_NAME='a/b' is not a storage account name (3 to 24 "
            "lowercase letters and digits)",
        ),
        (
            {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": "not a key!"},
            "AZURE_STORAGE_ACCOUNT_KEY is malformed: not base64 (copy the key from the storage "
            "account's Access keys)",
        ),
    ],
    ids=["connection-string", "account-name", "account-name-with-sas", "account-key"],
)
def test_a_malformed_credential_is_named_with_the_url(monkeypatch, env, line):
    clear_azure_environment(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["status", "az://emb/x"])
    assert result.exit_code == 2
    assert result.output == f"error: az://emb/x: {line}\n"


# The commit protocol on blob storage.


def test_a_staged_file_appears_only_complete_and_a_discarded_one_never(azure_env, azurite):
    container = azurite.create_container()
    reader = _adlfs(azurite)
    url = f"az://{container}/split/shard-00000.parquet"
    staged = StagedWrite(url, f"az://{container}/split/_incomplete/shard-00000.parquet.x")
    payload = os.urandom(3 << 20)
    for start in range(0, len(payload), 1 << 20):
        staged.file.write(payload[start : start + (1 << 20)])
    assert not reader.exists(f"{container}/split/shard-00000.parquet")
    assert reader.find(container) == []  # nothing listed, not even under _incomplete/
    staged.commit(sha256="abc")
    assert reader.cat_file(f"{container}/split/shard-00000.parquet") == payload
    assert reader.info(f"{container}/split/shard-00000.parquet")["metadata"]["sha256"] == "abc"

    dropped = StagedWrite(f"az://{container}/split/shard-00001.parquet", f"az://{container}/tmp")
    dropped.file.write(b"partial")
    dropped.discard()
    assert reader.find(container) == [f"{container}/split/shard-00000.parquet"]


def test_finishing_a_split_on_azure_has_no_staging_folder_to_remove(azure_env, azurite):
    """A complete extraction removes its empty _incomplete/ on local disks; blob storage has no
    folders (nothing is ever staged there), so there is nothing to do and nothing fails."""
    container = azurite.create_container()
    folder = f"az://{container}/emb/rte/train"
    staged = StagedWrite(f"{folder}/shard-00000.parquet", f"{folder}/_incomplete/shard-00000.x")
    staged.file.write(b"a shard")
    staged.commit()
    assert shards.remove_empty_staging(folder) is False
    assert _adlfs(azurite).find(container) == [f"{container}/emb/rte/train/shard-00000.parquet"]


def test_a_failed_upload_leaves_no_spool_file(azure_env, azurite):
    from azure.storage.blob import BlobServiceClient

    container = azurite.create_container()
    staged = StagedWrite(f"az://{container}/split/shard-00000.parquet", f"az://{container}/x")
    staged.file.write(b"a shard")
    spool = Path(staged._staging)
    assert spool.exists() and spool.name.startswith(f"{storage.SPOOL_PREFIX}~")
    with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
        client.delete_container(container)  # the upload cannot succeed now
    with pytest.raises(StorageError, match="does not exist"):
        staged.commit(sha256="abc")
    assert not spool.exists()


def test_committed_blobs_deleted_behind_the_extraction_fail_it_naming_them(
    azure_env, azurite, tiny_model, rte_slice, monkeypatch
):
    """Storage loses committed blobs before the end (in real life a deleted prefix; Azurite
    killed hard loses recent writes): the extraction must not report success."""
    import bertvision.extract as extract

    container = azurite.create_container()
    out = f"az://{container}/emb"
    reader = _adlfs(azurite)
    real = extract.extract_shard

    def losing_after_the_last(cfg, plan, index, progress=False):
        record = real(cfg, plan, index, progress)
        if index == plan.num_shards - 1:
            reader.rm_file(f"{container}/emb/rte/train/shard-00001.parquet")
            reader.rm_file(f"{container}/emb/rte/train/_manifest/plan.json")
        return record

    monkeypatch.setattr(extract, "extract_shard", losing_after_the_last)
    args = _extract_args(out, tiny_model, rte_slice, "--splits", "train", "--shard-size", "32")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert f"not stored at the end: {out}/rte/train/_manifest/plan.json (missing)" in result.output
    assert f"not stored at the end: {out}/rte/train/shard-00001.parquet (missing)" in result.output

    monkeypatch.setattr(extract, "extract_shard", real)
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert "rte/train: 1 shards written, 3 already there, 0 failed" in rerun.output
    ids = shards.split_dataset(out, "rte", "train").to_table(columns=["example_id"])
    assert sorted(ids.column(0).to_pylist()) == list(range(120))


def test_deciding_compares_the_blobs_stored_sha256_and_verify_reads_every_byte(
    azure_env, azurite, tiny_model, rte_slice
):
    """A blob of the recorded size whose stored sha256 (blob metadata, set by the upload) is not
    the record's is not done: no shard is read to tell. A blob without that metadata (rewritten
    by another tool) passes the metadata check; `verify` reads it and finds it."""
    container, out, args = _four_train_shards(azurite, tiny_model, rte_slice)
    reader = _adlfs(azurite)
    prefix = f"{container}/emb/rte/train"
    for index, metadata in ((1, {}), (2, {"sha256": "0" * 64})):  # same size, other bytes
        data = bytearray(reader.cat_file(f"{prefix}/shard-0000{index}.parquet"))
        data[len(data) // 2] ^= 0xFF
        reader.pipe_file(f"{prefix}/shard-0000{index}.parquet", bytes(data))
        if metadata:
            reader.setxattrs(f"{prefix}/shard-0000{index}.parquet", **metadata)

    status = shards.split_status(f"{out}/rte/train")
    assert (status["done"], status["missing"]) == (3, 1)  # shard 2, by its metadata
    found = CliRunner().invoke(app, ["verify", out, "--redo"])
    assert found.exit_code == 1, found.output
    bad = [line.split(":")[0] for line in found.output.splitlines() if line.startswith("  bad")]
    assert bad == ["  bad shard 1", "  bad shard 2"]

    rerun = CliRunner().invoke(app, args)
    assert "rte/train: 2 shards written, 2 already there, 0 failed" in rerun.output
    assert CliRunner().invoke(app, ["verify", out]).exit_code == 0


def _record_reads(caplog) -> list[str]:
    """The URLs of the commit records that requests fetched (listings are not reads)."""
    urls = [
        r.message.split("Request URL: ", 1)[1].split("\n", 1)[0].strip("'")
        for r in caplog.records
        if r.name == HTTP_LOG and "Request URL: " in r.message
    ]
    return [u for u in urls if "/_manifest/shard-" in u and "comp=list" not in u]


def test_status_and_pending_shards_read_no_commit_record_on_azure(
    azure_env, azurite, tiny_model, rte_slice, caplog
):
    """Each commit record's copy travels as its blob's metadata, which a listing returns:
    deciding what is done is listings alone, however many shards. A record without the copy
    (written by an older version, or rewritten by another tool) is read, and only it."""
    container, out, args = _four_train_shards(azurite, tiny_model, rte_slice)
    folder = f"{out}/rte/train"
    plan = shards.load_plan(folder)

    caplog.set_level(logging.INFO, logger=HTTP_LOG)
    assert shards.split_status(folder)["done"] == 4
    assert sorted(shards.committed_records(folder, plan)) == [0, 1, 2, 3]  # pending_shards'
    assert _record_reads(caplog) == []

    reader = _adlfs(azurite)
    record_blob = f"{container}/emb/rte/train/_manifest/shard-00001.json"
    reader.pipe_file(record_blob, reader.cat_file(record_blob))  # same content, no copy
    caplog.clear()
    assert shards.split_status(folder)["done"] == 4
    reads = _record_reads(caplog)
    assert len(reads) == 1 and reads[0].endswith("/_manifest/shard-00001.json")
    assert shards.load_records(folder, plan)[1] == shards.load_record(folder, plan, 1)

    reader.setxattrs(record_blob, shard_record="{garbled")  # a damaged copy: the content counts
    caplog.clear()
    assert shards.split_status(folder)["done"] == 4
    assert len(_record_reads(caplog)) == 1


def test_a_record_whose_content_and_copy_differ_is_found_by_verify_and_redone(
    azure_env, azurite, tiny_model, rte_slice
):
    """Another tool may change a record's content or its metadata alone. Every reader goes by
    the copy in the metadata; `verify` reads the content too, finds the two differ, and with
    --redo uncommits the shard, which the next extract redoes."""
    container, out, args = _four_train_shards(azurite, tiny_model, rte_slice)
    reader = _adlfs(azurite)
    record_blob = f"{container}/emb/rte/train/_manifest/shard-00002.json"
    copy = reader.info(record_blob)["metadata"]["shard_record"]
    reader.pipe_file(record_blob, b"{garbled")  # the content replaced, the copy put back
    reader.setxattrs(record_blob, shard_record=copy)

    assert shards.split_status(f"{out}/rte/train")["done"] == 4
    found = CliRunner().invoke(app, ["verify", out, "--redo"])
    assert found.exit_code == 1, found.output
    assert "bad shard 2: its commit record's content differs from the copy" in found.output
    assert shards.split_status(f"{out}/rte/train")["done"] == 3
    rerun = CliRunner().invoke(app, args)
    assert "rte/train: 1 shards written, 3 already there, 0 failed" in rerun.output
    assert CliRunner().invoke(app, ["verify", out]).exit_code == 0


def test_a_lease_excludes_a_second_writer_and_a_run_commits_whole_on_azure(azure_env, azurite):
    """The lease is a conditional create (If-None-Match: *) on blob storage: of two writers one
    gets it. A run folder committed there replaces the old one whole."""
    from bertvision import runs
    from bertvision.records import RunRecord

    out = f"az://{azurite.create_container()}/sweep"
    with runs.lease(out), pytest.raises(runs.FolderBusy, match="is being written by"):
        runs.Lease(out).acquire()
    with runs.lease(out):  # released
        pass
    for key, files in (("k0", {"a": "0", "old": "0"}), ("k1", {"a": "1"})):
        with runs.StagedRun(out) as staged:
            for name, text in files.items():
                storage.write_text_atomic(storage.join(staged.url, name), text)
            staged.commit(RunRecord("train", key, {}, {}, {}))
    assert storage.list_names(out) == ["_commit.json", "a"]
    assert storage.read_text(f"{out}/a") == "1" and runs.commit_record(out)["key"] == "k1"


def test_the_pipeline_runs_end_to_end_on_azure_and_pyarrow_reads_the_shards(
    azure_env, azurite, tiny_model, rte_slice, tmp_path
):
    """fine-tune -> extract (from the checkpoint on Azure) -> train -> sweep -> ensemble, every
    input and output an az:// URL; then pyarrow.dataset reads the shards through plain adlfs."""
    container = azurite.create_container()
    az = f"az://{container}"
    space = tmp_path / "space.json"
    space.write_text('{"epochs": 2, "adapter_dim": {"choice": [2, 4]}, "batch_size": 16}')
    data, cpu = ["--data-dir", rte_slice, "--max-seq-length", "64"], ["--device", "cpu"]
    steps = [
        ["finetune", "--task", "rte", "--out", f"{az}/ckpt", "--model", tiny_model, *data,
         "--epochs", "0.5", *cpu],
        ["extract", "--task", "rte", "--out", f"{az}/emb", "--model", f"{az}/ckpt", *data,
         "--shard-size", "32", *cpu],
        ["train", "--task", "rte", "--embeddings", f"{az}/emb", "--out", f"{az}/runs/pooler",
         "--epochs", "2", "--adapter-dim", "4", *cpu],
        ["sweep", "--task", "rte", "--embeddings", f"{az}/emb", "--out", f"{az}/sweeps/rte",
         "--trials", "2", "--space", str(space), *cpu],
        ["ensemble", "--task", "rte", "--runs", f"{az}/sweeps/rte", "--out", f"{az}/ens/rte",
         "--top-k", "2", "--with-finetuned", f"{az}/ckpt"],
    ]  # fmt: skip
    for args in steps:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{args[0]}: {result.output}"

    reader = _adlfs(azurite)
    train = ds.dataset(f"{container}/emb/rte/train", filesystem=reader, format="parquet")
    assert len(train.files) == 4  # the manifest under _manifest/ is not part of the dataset
    ids = [i for b in train.to_batches(columns=["example_id"]) for i in b.column(0).to_pylist()]
    assert sorted(ids) == list(range(120))
    assert not reader.exists(f"{container}/emb/rte/train/_incomplete")
    # The checksum travels with the blob: any download can be checked against it.
    plan = shards.load_plan(f"{az}/emb/rte/train")
    record = shards.load_records(f"{az}/emb/rte/train", plan)[0]
    blob = reader.info(f"{container}/emb/rte/train/{record.file}")
    assert blob["metadata"]["sha256"] == record.sha256 and blob["size"] == record.bytes

    status = CliRunner().invoke(app, ["status", f"{az}/emb"])
    assert (
        "rte/train: 120 examples (float16, format 6), 4 shards: 4 done, 0 failed, 0 missing"
        in status.output
    )
    for run in ("runs/pooler", "sweeps/rte/trials/0001"):
        assert "accuracy" in storage.read_json(f"{az}/{run}/metrics.json")["dev"]
    ensemble = storage.read_json(f"{az}/ens/rte/metrics.json")
    assert "accuracy" in ensemble["ensemble"]
    assert len(ensemble["members"]) == 3  # two trials and the fine-tuned encoder


# Failures: transient ones are retried inside the storage layer, permanent ones are not.


def test_an_outage_is_ridden_out_inside_the_storage_layer(tmp_path, monkeypatch):
    service = Azurite(tmp_path / "azurite").start()
    try:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", service.connection_string())
        container = service.create_container()
        storage.write_json(f"az://{container}/before.json", {"n": 1})
        service.stop()
        restart = threading.Timer(2.0, service.start)
        restart.start()
        storage.write_json(f"az://{container}/during.json", {"n": 2})  # waits, retries, succeeds
        restart.join()
        assert storage.read_json(f"az://{container}/during.json") == {"n": 2}
        assert storage.list_names(f"az://{container}") == ["before.json", "during.json"]
    finally:
        service.stop()


def test_storage_unreachable_through_all_retries_is_one_line(monkeypatch, tmp_path):
    nobody = Azurite(tmp_path / "never-started")  # a free port where nothing listens
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", nobody.connection_string())
    monkeypatch.setenv("BERTVISION_AZURE_RETRIES", "1")
    with pytest.raises(StorageUnavailable) as failure:
        storage.write_json("az://emb/x.json", {})
    assert str(failure.value).startswith("az://emb/x.json: Azure Blob Storage unreachable after 1")
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize("fault", ["missing-container", "wrong-key"])
def test_permanent_failures_exit_with_one_line_and_no_retries(
    fault, azure_env, azurite, tiny_model, rte_slice, monkeypatch, caplog
):
    container = azurite.create_container()
    out = f"az://{container}/emb"
    if fault == "missing-container":
        out = "az://nope/emb"
    else:
        wrong_key = "A" * 86 + "=="
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(wrong_key))
    caplog.set_level(logging.INFO, logger=HTTP_LOG)
    result = CliRunner().invoke(app, _extract_args(out, tiny_model, rte_slice, "--splits", "dev"))

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    expected = {
        "missing-container": "error: az://nope/emb: container 'nope' does not exist",
        "wrong-key": f"error: {out}: authentication failed for account 'devstoreaccount1'",
    }[fault]
    assert result.stderr.startswith(expected)
    requests = [r for r in caplog.records if r.name == HTTP_LOG and "Request URL" in r.message]
    assert 1 <= len(requests) <= 3  # a retried request alone would be 1 + 5
    assert not _adlfs(azurite).find(container)  # nothing written


@pytest.mark.parametrize("fault", ["missing-container", "wrong-key"])
def test_a_model_url_that_cannot_be_read_is_one_line_and_nothing_is_written(
    fault, azure_env, azurite, tiny_model, rte_slice, monkeypatch, tmp_path
):
    container = azurite.create_container()
    _adlfs(azurite).put(tiny_model, f"{container}/model", recursive=True)
    model = f"az://{container}/model"
    if fault == "missing-container":
        model = "az://nope/model"
    else:
        wrong_key = "A" * 86 + "=="
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string(wrong_key))
    out = tmp_path / "emb"
    result = CliRunner().invoke(app, _extract_args(str(out), model, rte_slice, "--splits", "dev"))

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    expected = {
        "missing-container": "error: az://nope/model: container 'nope' does not exist",
        "wrong-key": f"error: {model}: authentication failed for account 'devstoreaccount1'",
    }[fault]
    assert result.stderr.startswith(expected), result.stderr
    assert not out.exists()


def test_azurite_stopped_mid_extraction_every_example_once_no_partial_shard(
    tmp_path, tiny_model, rte_slice
):
    """Azurite goes down mid-run and comes back with its data; the run (or a rerun) completes
    and no listing, at any moment, shows a shard that is not complete."""
    service = Azurite(tmp_path / "azurite").start()
    container = service.create_container()
    seen = _ShardListingWatcher(service, f"{container}/emb/rte/train")
    try:
        out = f"az://{container}/emb"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")},
            "AZURE_STORAGE_CONNECTION_STRING": service.connection_string(),
        }
        command = [
            sys.executable,
            "-m",
            "bertvision.cli",
            *_extract_args(out, tiny_model, rte_slice, "--splits", "train", "--shard-size", "6"),
        ]
        run = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        seen.start()
        seen.wait_for_records(3, process=run)
        service.stop()
        stopped_while_running = run.poll() is None
        time.sleep(2)
        service.start()
        output, _ = run.communicate(timeout=300)
        if run.returncode != 0:  # some shard gave up during the outage: a rerun does the rest
            rerun = subprocess.run(
                command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
            )
            assert rerun.returncode == 0, rerun.stdout + rerun.stderr

        assert stopped_while_running, output.decode()
        reader = _adlfs(service)
        plan = shards.ExtractionPlan.from_json(
            reader.cat_file(f"{container}/emb/rte/train/_manifest/plan.json").decode()
        )
        records = {
            r.file: r
            for r in (
                shards.ShardRecord.from_json(reader.cat_file(p).decode())
                for p in reader.glob(f"{container}/emb/rte/train/_manifest/shard-*.json")
                if ".failed" not in p
            )
        }
        assert len(records) == plan.num_shards == 20
        ids = ds.dataset(
            [f"{container}/emb/rte/train/{name}" for name in sorted(records)],
            filesystem=reader,
            format="parquet",
        ).to_table(columns=["example_id"])
        assert sorted(ids.column(0).to_pylist()) == list(range(120))
        # Every shard ever listed had its complete, committed size; nothing under _incomplete/.
        assert seen.listed, "the watcher saw no listing"
        for name, size in seen.listed:
            assert not name.startswith("_incomplete"), name
            assert name.endswith(".parquet") and size == records[name].bytes, (name, size)
    finally:
        seen.stop()
        service.stop()


class _ShardListingWatcher(threading.Thread):
    """Lists a split folder over and over (as a reader on another host would) and keeps every
    (shard name, size) it ever sees outside _manifest/."""

    def __init__(self, service: Azurite, folder: str) -> None:
        super().__init__(daemon=True)
        from azure.storage.blob import BlobServiceClient

        self.client = BlobServiceClient.from_connection_string(
            service.connection_string(), retry_total=0
        )
        self.container, self.prefix = folder.split("/", 1)
        self.listed: set[tuple[str, int]] = set()
        self.records = 0
        self._done = threading.Event()

    def run(self) -> None:
        container = self.client.get_container_client(self.container)
        while not self._done.is_set():
            try:
                blobs = list(container.list_blobs(name_starts_with=self.prefix + "/"))
            except Exception:  # Azurite is down for a moment: that is the test
                time.sleep(0.05)
                continue
            for blob in blobs:
                name = blob.name[len(self.prefix) + 1 :]
                if name.startswith("_manifest/"):
                    continue
                self.listed.add((name, blob.size))
            self.records = sum(
                1
                for b in blobs
                if b.name.endswith(".json") and "shard-" in b.name and ".failed" not in b.name
            )
            time.sleep(0.02)

    def wait_for_records(self, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.records < count and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()


# Prefect: results on Azure, so a run on any worker finds what another one cached; no secrets.


@pytest.fixture(scope="module")
def prefect_runs_on_azure(prefect_harness, azurite, tiny_model, rte_slice):
    """The train-adapter flow run three times with Prefect's results on Azurite (a
    RemoteFileSystem block over adlfs, stored without credentials), and once failing."""
    from bertvision_flows.train_adapter import train_adapter
    from prefect.filesystems import RemoteFileSystem
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_DEFAULT_RESULT_STORAGE_BLOCK, temporary_settings

    from bertvision.config import ExtractConfig, TrainConfig
    from bertvision.extract import extract_hidden_states

    with pytest.MonkeyPatch.context() as monkeypatch:
        use_only(azurite, monkeypatch)
        container = azurite.create_container()
        block = f"bertvision-results-{container}"
        RemoteFileSystem(basepath=f"az://{container}/prefect-results").save(block)
        embeddings = f"az://{container}/emb"
        extract_hidden_states(
            ExtractConfig(
                task="rte",
                out=embeddings,
                model=tiny_model,
                data_dir=rte_slice,
                max_seq_length=64,
                shard_size=64,
                device="cpu",
            ),
            progress=False,
        )
        cfg = TrainConfig(
            task="rte",
            embeddings=embeddings,
            out=f"az://{container}/runs/pooler",
            epochs=2,
            adapter_dim=4,
            device="cpu",
        )
        with temporary_settings(
            {PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: f"remote-file-system/{block}"}
        ):
            runs = [train_adapter(cfg, return_state=True) for _ in range(3)]
            failed = train_adapter(
                dataclasses.replace(cfg, embeddings="az://nope/emb"), return_state=True
            )
        APILogWorker.drain_all(timeout=30)  # the logs reach the API before we read them
        yield {"container": container, "block": block, "runs": runs, "failed": failed}


def _task_states(flow_state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])
            )
        )
    return [run.state.name for run in runs]


def test_prefect_results_on_azure_serve_a_later_run_from_the_cache(prefect_runs_on_azure, azurite):
    """The train task's cache key hashes its inputs, its code and the run's metrics.json, so
    the first run (nothing stored yet) trains, the second finds the run in storage and records
    the key with its result on Azure, and the third is served from there without running."""
    first, second, third = prefect_runs_on_azure["runs"]
    assert all(run.is_completed() for run in (first, second, third))
    assert [_task_states(run) for run in (first, second, third)] == [
        ["Completed"],
        ["Completed"],
        ["Cached"],  # read from Azure, where a worker on any other host would look too
    ]
    assert third.result() == first.result()
    container = prefect_runs_on_azure["container"]
    assert _adlfs(azurite).find(f"{container}/prefect-results")  # the result records


def test_no_storage_secret_reaches_the_prefect_api(prefect_runs_on_azure, azurite):
    from azurite import KEY
    from prefect.client.orchestration import get_client

    failed = prefect_runs_on_azure["failed"]
    assert failed.is_failed()
    with get_client(sync_client=True) as client:
        logs = client.read_logs()
        answers = [
            *client.read_flow_runs(),  # parameters, state messages
            *client.read_task_runs(),
            *logs,
            *client.read_artifacts(),
            *client.read_block_documents(include_secrets=True),
        ]
    assert any(log.flow_run_id == failed.state_details.flow_run_id for log in logs)
    text = "\n".join(answer.model_dump_json() for answer in answers)
    assert "az://nope/emb" in text and "train-rte-pooler" in text  # the runs are in there
    assert prefect_runs_on_azure["block"] in text
    for secret in (KEY, azurite.connection_string(), "AccountKey="):
        assert secret not in text
