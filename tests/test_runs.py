"""Run folders committed whole (staged, commit record last) and one writer per folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import killed_staging_name

from bertvision import runs, storage
from bertvision.records import RunRecord
from bertvision.runs import FolderBusy, Lease, StagedRun


def write_run(out, files: dict[str, str], key: str) -> None:
    with StagedRun(str(out)) as staged:
        for name, text in files.items():
            storage.write_text_atomic(storage.join(staged.url, name), text)
        staged.commit(RunRecord("train", key, {}, {}, {}), last=("metrics.json",))


def run_files(out) -> dict[str, str]:
    return {
        str(p.relative_to(out)): p.read_text()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith("_")
    }


def test_a_commit_replaces_the_old_run_whole(tmp_path):
    out = tmp_path / "run"
    write_run(out, {"a.bin": "old a", "test.tsv": "old test", "metrics.json": "old"}, "k0")
    assert runs.finished(str(out), "k0", overwrite=False)["files"] == [
        "a.bin",
        "test.tsv",
        "metrics.json",
    ]
    with pytest.raises(ValueError, match="holds a finished run with other settings or inputs"):
        runs.finished(str(out), "k1", overwrite=False)
    assert runs.finished(str(out), "k1", overwrite=True) is None

    write_run(out, {"a.bin": "new a", "metrics.json": "new"}, "k1")
    assert run_files(out) == {"a.bin": "new a", "metrics.json": "new"}  # no old test.tsv
    assert runs.finished(str(out), "k1", overwrite=False)["key"] == "k1"
    assert sorted(p.name for p in out.iterdir()) == ["_commit.json", "a.bin", "metrics.json"]


def test_a_failure_before_the_commit_leaves_the_old_run_finished(tmp_path):
    out = tmp_path / "run"
    write_run(out, {"weights.bin": "seed 0", "metrics.json": "seed 0"}, "seed0")
    with pytest.raises(RuntimeError, match="killed"), StagedRun(str(out)) as staged:
        storage.write_text_atomic(storage.join(staged.url, "weights.bin"), "seed 1")
        raise RuntimeError("killed after the weights were written")
    assert run_files(out) == {"weights.bin": "seed 0", "metrics.json": "seed 0"}
    assert runs.finished(str(out), "seed0", overwrite=False)["key"] == "seed0"
    assert not (out / "_staging").exists()


def test_a_kill_mid_commit_leaves_no_finished_run_and_the_next_commit_cleans_up(
    tmp_path, monkeypatch
):
    out = tmp_path / "run"
    write_run(out, {"weights.bin": "seed 0", "old.tsv": "seed 0", "metrics.json": "0"}, "seed0")
    real_mv = type(storage.url_to_fs(str(out))[0]).mv
    moved = []

    def dying_mv(fs, source, target, **kwargs):
        if moved:
            raise KeyboardInterrupt  # killed after the first file went in
        moved.append(target)
        return real_mv(fs, source, target, **kwargs)

    monkeypatch.setattr(type(storage.url_to_fs(str(out))[0]), "mv", dying_mv)
    with pytest.raises(KeyboardInterrupt):
        write_run(out, {"weights.bin": "seed 1", "new.tsv": "seed 1", "metrics.json": "1"}, "s1")
    monkeypatch.undo()
    assert runs.commit_record(str(out)) is None  # neither run counts as finished
    assert runs.finished(str(out), "seed0", overwrite=False) is None
    assert "metrics.json" not in run_files(out)

    write_run(out, {"weights.bin": "seed 2", "metrics.json": "2"}, "seed2")
    assert run_files(out) == {"weights.bin": "seed 2", "metrics.json": "2"}  # nothing left over


def test_a_second_writer_is_excluded_while_the_first_holds_the_lease(tmp_path):
    out = str(tmp_path / "sweep")
    with runs.lease(out):
        with pytest.raises(FolderBusy, match=r"sweep is being written by .*; wait for it"):
            Lease(out).acquire()
        threads_busy = []
        thread = threading.Thread(
            target=lambda: threads_busy.append(_busy(out)),
        )
        thread.start()
        thread.join()
        assert threads_busy == [True]
    with runs.lease(out):  # released: the next writer gets it
        pass
    assert not (tmp_path / "sweep").exists()  # a lease leaves no trace in a folder it made


def _busy(out: str) -> bool:
    try:
        Lease(out).acquire()
    except FolderBusy:
        return True
    return False


def test_a_lease_of_a_dead_or_expired_holder_is_taken_over(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    owner = f"{runs.worker_name().split(':')[0]}:{dead.stdout.strip()}:x"
    lease = {"owner": owner, "pid": int(dead.stdout), "expires": time.time() + 600}
    (out / runs.LEASE).write_text(json.dumps(lease))
    with runs.lease(str(out)) as held:  # its holder no longer runs on this host
        assert json.loads((out / runs.LEASE).read_text())["owner"] == held.owner

    other_host = {"owner": "elsewhere:1:x", "pid": 1, "expires": time.time() - 1}
    (out / runs.LEASE).write_text(json.dumps(other_host))
    with runs.lease(str(out)):  # expired
        pass
    other_host["expires"] = time.time() + 600
    (out / runs.LEASE).write_text(json.dumps(other_host))
    with pytest.raises(FolderBusy, match="elsewhere:1:x"):
        Lease(str(out)).acquire()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stop_while_the_lease_is_being_taken_leaves_it_free(tmp_path, monkeypatch, stop):
    """Ctrl-C or SIGTERM (a SystemExit) after the lease file is written but before `lease()`
    holds it: the file is removed, not left for others to wait out."""

    def stopped(self):
        assert (tmp_path / "out" / runs.LEASE).exists()
        raise stop

    monkeypatch.setattr(Lease, "_remove_stale_tmp", stopped)
    with pytest.raises(stop), runs.lease(str(tmp_path / "out")):
        pass
    assert not (tmp_path / "out" / runs.LEASE).exists()


def test_a_terminated_command_lets_go_of_its_folder_at_once(tmp_path):
    """`kill` (SIGTERM) of a training run: exit status 143 and one line, its lease removed, so a
    rerun on another host need not wait for the lease to expire; nothing committed."""
    from test_embeddings import synthetic

    embeddings = synthetic(str(tmp_path / "emb"))
    out = tmp_path / "run"
    train = ["train", "--task", "rte", "--embeddings", embeddings, "--out", str(out)]
    # --patience 0: no early stop, so it is still training when stopped
    train += ["--epochs", "100000", "--patience", "0", "--device", "cpu"]
    command = [sys.executable, "-m", "bertvision.cli", *train]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / runs.LEASE).exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the lease was never taken"
            time.sleep(0.05)
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    finally:  # never left training on the shared cores
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.splitlines()[-1] == (
        "terminated: what was committed is kept; the same command resumes"
    )
    assert not (out / runs.LEASE).exists()
    assert runs.commit_record(str(out)) is None


@pytest.mark.parametrize("text", ['{"pid": 1}', '{"owner": 1, "expires": 9e99}', "[]", "{"])
def test_a_lease_file_that_is_no_lease_holds_nothing_and_is_taken_over(tmp_path, text):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / runs.LEASE).write_text(text)
    with runs.lease(str(out)) as held:
        assert json.loads((out / runs.LEASE).read_text())["owner"] == held.owner
    assert not (out / runs.LEASE).exists()


def test_a_held_lease_is_renewed(tmp_path):
    out = str(tmp_path / "run")
    with runs.lease(out, ttl_s=0.3) as held:
        first = json.loads((tmp_path / "run" / runs.LEASE).read_text())["expires"]
        deadline = time.monotonic() + 10
        while json.loads((tmp_path / "run" / runs.LEASE).read_text())["expires"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        assert json.loads((tmp_path / "run" / runs.LEASE).read_text())["owner"] == held.owner


def test_a_run_whose_committed_files_are_gone_is_not_finished(tmp_path):
    """Finished means committed and stored whole: one listing must find every file the commit
    record lists, nested ones included; otherwise the run is not finished (a warning names what
    is gone) and its caller redoes it, whose commit makes it finished again."""
    out = tmp_path / "run"
    files = {"adapter/weights.bin": "w", "outputs/dev.parquet": "o", "metrics.json": "m"}
    write_run(out, files, "k0")
    assert runs.stored_record(str(out))["key"] == "k0"

    (out / "adapter" / "weights.bin").unlink()
    assert runs.missing_files(str(out), runs.commit_record(str(out))) == ["adapter/weights.bin"]
    assert runs.stored_record(str(out)) is None
    with pytest.warns(UserWarning, match=r"lacks 1 of its files \(adapter/weights.bin\)"):
        assert runs.finished(str(out), "k0", overwrite=False) is None
    # another key is still refused: the folder holds another run's record
    with pytest.raises(ValueError, match="holds a finished run with other settings or inputs"):
        runs.finished(str(out), "k1", overwrite=False)

    write_run(out, files, "k0")
    assert runs.finished(str(out), "k0", overwrite=False)["files"] == [
        "adapter/weights.bin",
        "outputs/dev.parquet",
        "metrics.json",
    ]


def killed_after_its_record(out, monkeypatch) -> None:
    """Commit a run at `out` and die just after its record is written, before the clean-up,
    with a checkpoint left from training and files staged by a writer killed before."""
    storage.write_text_atomic(storage.join(str(out), runs.SCRATCH, "last.pt"), "epoch 3")
    storage.write_text_atomic(storage.join(str(out), runs.STAGING, "dead", "metrics.json"), "x")
    real_remove = runs._remove

    def dying_remove(fs, path):
        if path.endswith(runs.PUBLISHING):
            raise KeyboardInterrupt
        real_remove(fs, path)

    monkeypatch.setattr(runs, "_remove", dying_remove)
    with pytest.raises(KeyboardInterrupt), StagedRun(str(out)) as staged:
        storage.write_text_atomic(storage.join(staged.url, "metrics.json"), "m")
        staged.commit(RunRecord("train", "k0", {}, {}, {}), last=("metrics.json",))
    monkeypatch.undo()


def test_a_commit_killed_after_its_record_leaves_a_finished_run_and_the_next_caller_tidies(
    tmp_path, monkeypatch
):
    out = tmp_path / "run"
    killed_after_its_record(out, monkeypatch)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("_")) == [
        "_checkpoint",
        "_commit.json",
        "_publishing.json",
        "_staging",
    ]
    assert runs.not_whole(str(out)) is None  # its record was written after all its files
    assert runs.finished(str(out), "k0", overwrite=False)["key"] == "k0"

    with runs.lease(str(out)):  # another writer holds the folder: its files are left alone
        assert runs.tidy(str(out)) == []
    assert runs.once(str(out), lambda: "as stored", lambda: "redone") == "as stored"
    # a checkpoint may be another run's under way (--overwrite): its owner decides (test_train)
    assert sorted(p.name for p in out.iterdir()) == ["_checkpoint", "_commit.json", "metrics.json"]
    assert (out / "metrics.json").read_text() == "m"
    assert runs.tidy(str(out)) == []  # nothing more to remove


def test_a_finished_run_on_storage_it_cannot_write_is_returned_with_its_leftovers(
    tmp_path, monkeypatch
):
    """Read-only storage (EROFS; on Azure a 403): tidying is skipped, the run still returned."""
    out = tmp_path / "run"
    write_run(out, {"metrics.json": "m"}, "k0")
    (out / runs.PUBLISHING).write_text("{}")

    def read_only(self):
        raise OSError(30, "Read-only file system", self.url)

    monkeypatch.setattr(Lease, "acquire", read_only)
    assert runs.once(str(out), lambda: "as stored", lambda: "redone") == "as stored"
    assert (out / runs.PUBLISHING).exists()


def test_a_commit_removes_the_runs_checkpoint_with_its_staging(tmp_path):
    out = tmp_path / "run"
    storage.write_text_atomic(storage.join(str(out), runs.SCRATCH, "last.pt"), "epoch 3")
    write_run(out, {"metrics.json": "m"}, "k0")
    assert sorted(p.name for p in out.iterdir()) == ["_commit.json", "metrics.json"]


def test_the_tmp_files_of_writes_killed_midway_go_when_the_folder_is_next_leased(tmp_path):
    """A small write killed midway leaves `<name>~<host>~<pid>~<id>.tmp` beside its target; the
    next writer of the folder removes those whose writer is gone, and keeps a live one's."""
    out = tmp_path / "run"
    write_run(out, {"metrics.json": "m"}, "k0")
    killed = killed_staging_name("_commit.json") + storage.TMP_SUFFIX
    live = storage.staging_name("metrics.json") + storage.TMP_SUFFIX
    (out / killed).write_text("{")
    (out / live).write_text("{")

    assert runs.once(str(out), lambda: "as stored", lambda: "redone") == "as stored"
    assert sorted(p.name for p in out.iterdir()) == ["_commit.json", "metrics.json", live]

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "notes.tmp").write_text("another tool's")  # not a staging name: kept, however old
    os.utime(sweep / "notes.tmp", (0, 0))
    killed = killed_staging_name("trials.jsonl") + storage.TMP_SUFFIX
    (sweep / killed).write_text("{")
    with runs.lease(str(sweep)) as held:
        assert held.removed == [killed]
    assert [p.name for p in sweep.iterdir()] == ["notes.tmp"]
