"""Bad input through the `bertvision` command, one case per kind of file or option a user hands
it: exit code 2, one `error: ...` line on stderr naming the file or option, no traceback, and
nothing written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import outside_handler_fails
from test_embeddings import synthetic
from test_ensemble import fake_sweep
from typer.testing import CliRunner

from bertvision import glue, storage
from bertvision.cli import app
from bertvision.schema import (
    MANIFEST_DIR,
    PLAN_FILE,
    ShardFailure,
    ShardRecord,
    shard_failure_name,
    shard_record_name,
)
from bertvision.shards import ManifestError, read_manifest
from bertvision.sweep import SWEEP_FILE, TRIAL_RECORD

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
RTE_ROW = "{i}\tA man walks.\tSomeone walks.\tentailment\n"


def assert_one_error(result, *named: str) -> str:
    """The CLI exited 2 with one `error:` line that names each of `named`; returns the line."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exc_info  # no traceback
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def file_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def rte_dir(root: Path, dev: bytes | str) -> Path:
    """A glue_data folder whose RTE dev split holds `dev`."""
    (root / "glue" / "RTE").mkdir(parents=True)
    path = root / "glue" / "RTE" / "dev.tsv"
    path.write_bytes(dev.encode() if isinstance(dev, str) else dev)
    return root / "glue"


def extract(tmp_path: Path, data_dir: Path | None, model: str, *extra: str):
    args = ["extract", "--task", "rte", "--splits", "dev", "--model", model]
    args += ["--max-seq-length", "32", "--device", "cpu", "--out", str(tmp_path / "out")]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return CliRunner().invoke(app, [*args, *extra])


@pytest.fixture
def offline(monkeypatch):
    """The Hugging Face hub is unreachable (as on a machine without network)."""
    import datasets.config

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# -- GLUE data files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, where, message",
    [
        (
            RTE_HEADER + "0\tA man\rwalks.\tSomeone walks.\tentailment\n",
            "line 2",
            "carriage return",
        ),
        ((RTE_HEADER + RTE_ROW.format(i=0)).replace("\n", "\r"), "line 1", "CR-only"),
        (
            (RTE_HEADER + RTE_ROW.format(i=0)).encode() + b"1\tA caf\xe9\tx\tentailment\n",
            "line 3",
            "not UTF-8",
        ),
        (RTE_HEADER + RTE_ROW.format(i=0) + "\n" + RTE_ROW.format(i=1), "line 3", "0 columns"),
    ],
    ids=["cr-in-field", "cr-only-endings", "not-utf8", "blank-line-inside"],
)
def test_malformed_tsv_names_file_and_line(tmp_path, tiny_model, content, where, message):
    data_dir = rte_dir(tmp_path, content)
    line = assert_one_error(extract(tmp_path, data_dir, tiny_model), "RTE/dev.tsv", where, message)
    assert line.startswith("error: malformed data file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_trailing_blank_line_is_tolerated(tmp_path, ending):
    rows = RTE_HEADER + RTE_ROW.format(i=0) + RTE_ROW.format(i=1)
    data_dir = rte_dir(tmp_path, (rows + "\n").replace("\n", ending))
    examples = glue.load_split("rte", "dev", str(data_dir))
    assert [(ex.example_id, ex.texts, ex.label) for ex in examples] == [
        (i, ("A man walks.", "Someone walks."), 0) for i in (0, 1)
    ]


def test_no_data_dir_while_the_hub_is_unreachable_says_pass_data_dir(tmp_path, tiny_model, offline):
    assert_one_error(extract(tmp_path, None, tiny_model), "rte dev", "pass --data-dir")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_data_file_is_named(tmp_path, tiny_model):
    data_dir = rte_dir(tmp_path, RTE_HEADER + RTE_ROW.format(i=0))
    (data_dir / "RTE" / "dev.tsv").chmod(0)
    assert_one_error(extract(tmp_path, data_dir, tiny_model), "dev.tsv", "Permission denied")


# -- models ------------------------------------------------------------------------------------


def model_copy(tmp_path: Path, source: str, without: tuple[str, ...] = (), **replace: str) -> str:
    folder = tmp_path / "model"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(*without))
    for name, text in replace.items():
        (folder / name.replace("_", ".")).write_text(text)
    return str(folder)


@pytest.mark.parametrize(
    "without, replace, message",
    [
        (("model.safetensors",), {}, "'s weights cannot be loaded: Error no file named"),
        (("vocab.txt", "tokenizer*"), {}, "has no tokenizer"),
        ((), {"config_json": '{"model_type": "bert", '}, "cannot be loaded"),
        (("config.json",), {}, "cannot be loaded"),
    ],
    ids=["no-weights", "no-tokenizer", "garbled-config", "no-config"],
)
def test_a_broken_model_folder_is_named_by_extract_and_finetune(
    tmp_path, tiny_model, glue_dir, without, replace, message
):
    model = model_copy(tmp_path, tiny_model, without, **replace)
    assert_one_error(extract(tmp_path, glue_dir, model), f"model {model}", message)
    assert not (tmp_path / "out").exists()

    ckpt = tmp_path / "ckpt" / "run"
    args = ["finetune", "--task", "wnli", "--data-dir", glue_dir, "--model", model]
    args += ["--max-seq-length", "32", "--device", "cpu", "--out", str(ckpt)]
    assert_one_error(CliRunner().invoke(app, args), f"model {model}", message)
    assert not (tmp_path / "ckpt").exists()


def test_a_hub_name_while_the_hub_is_unreachable_names_the_model_and_the_remedy(
    tmp_path, glue_dir, offline
):
    result = extract(tmp_path, glue_dir, "someone/no-such-model")
    assert_one_error(result, "model someone/no-such-model", "pass --model a local folder")
    assert not (tmp_path / "out").exists()


# -- extraction manifests ----------------------------------------------------------------------


@pytest.fixture
def extracted(tmp_path, tiny_model, glue_dir) -> Path:
    """WNLI dev (71 examples) extracted with the tiny BERT into tmp_path/emb."""
    args = ["extract", "--task", "wnli", "--splits", "dev", "--data-dir", glue_dir]
    args += ["--model", tiny_model, "--max-seq-length", "32", "--shard-size", "40"]
    args += ["--device", "cpu", "--out", str(tmp_path / "emb")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp_path / "emb"


def test_a_garbled_plan_is_named_by_extract_and_status(extracted, tiny_model, glue_dir):
    plan = extracted / "wnli" / "dev" / MANIFEST_DIR / PLAN_FILE
    plan.write_text(plan.read_text()[:40])
    before = file_tree(extracted)
    args = ["extract", "--task", "wnli", "--splits", "dev", "--data-dir", glue_dir]
    args += ["--model", tiny_model, "--max-seq-length", "32", "--shard-size", "40"]
    args += ["--device", "cpu", "--out", str(extracted)]
    for result in (
        CliRunner().invoke(app, args),
        CliRunner().invoke(app, ["status", str(extracted)]),
    ):
        line = assert_one_error(result, plan, "not a valid extraction plan")
        assert "Unterminated string" in line
    assert file_tree(extracted) == before


@pytest.mark.parametrize(
    "record, name", [(ShardRecord, shard_record_name(0)), (ShardFailure, shard_failure_name(0))]
)
@pytest.mark.parametrize("garbled", ['{"index": 0, "file": "sh', "[]", '{"index": 0}', b"\xff"])
def test_a_garbled_shard_record_raises_one_catchable_error_naming_it(
    tmp_path, record, name, garbled
):
    path = tmp_path / MANIFEST_DIR / name
    path.parent.mkdir()
    path.write_bytes(garbled.encode() if isinstance(garbled, str) else garbled)
    with pytest.raises(ManifestError) as failure:
        read_manifest(str(path), record)
    assert str(failure.value).startswith(f"{path} is not a valid ")
    assert "\n" not in str(failure.value)


# -- run folders, sweeps, ensembles, reports ---------------------------------------------------


def train_args(embeddings: str, out: Path) -> list[str]:
    return ["train", "--task", "rte", "--embeddings", embeddings, "--out", str(out)]


@pytest.mark.parametrize("name", ["_commit.json", "_checkpoint/last.pt"])
def test_a_garbled_run_file_is_named_by_train(tmp_path, name):
    """The commit record of a finished run, or the checkpoint of an unfinished one."""
    embeddings = synthetic(str(tmp_path / "emb"), n_train=20, n_dev=8)
    run = tmp_path / "run"
    (run / "_checkpoint").mkdir(parents=True)
    (run / name).write_text('{"run_key": "0123')
    before = file_tree(run)
    assert_one_error(CliRunner().invoke(app, train_args(embeddings, run)), run / name)
    assert file_tree(run) == before


@pytest.mark.parametrize(
    ("stop", "code", "how"),
    [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated")],
)
def test_ctrl_c_or_sigterm_ends_a_command_in_one_line(tmp_path, monkeypatch, stop, code, how):
    from bertvision import report

    def stopped(cfg):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # not reached: the handler raises as os.kill returns
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(report, "write_report", stopped)
    with outside_handler_fails() as outside:
        result = CliRunner().invoke(app, ["report", str(tmp_path)])
        assert signal.getsignal(signal.SIGTERM) is outside  # set for the command only
    assert result.exit_code == code
    assert result.stderr == f"\n{how}: what was committed is kept; the same command resumes\n"


def test_a_garbled_sweep_record_is_named_by_sweep(tmp_path):
    embeddings = synthetic(str(tmp_path / "emb"), n_train=20, n_dev=8)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / SWEEP_FILE).write_text('{"key": "abc", "config": {"task": "rte"}}')
    args = ["sweep", "--task", "rte", "--embeddings", embeddings, "--out", str(out)]
    assert_one_error(CliRunner().invoke(app, args), out / SWEEP_FILE, "task or the adapter")
    assert file_tree(out) == {SWEEP_FILE: b'{"key": "abc", "config": {"task": "rte"}}'}


@pytest.mark.parametrize(
    "space, name, message",
    [
        ('{"lr": {"uniform": [0.1, ', "space.json", "not valid JSON"),
        ("lr: {uniform: [0.1, 0.2\n", "space.yaml", "not valid YAML"),
    ],
)
def test_a_garbled_space_file_is_named(tmp_path, space, name, message):
    (tmp_path / name).write_text(space)
    args = ["sweep", "--task", "rte", "--embeddings", str(tmp_path / "emb")]
    args += ["--out", str(tmp_path / "sweep"), "--space", str(tmp_path / name)]
    assert_one_error(CliRunner().invoke(app, args), tmp_path / name, message)
    assert not (tmp_path / "sweep").exists()


def test_a_folder_given_as_space_file_is_named(tmp_path):
    (tmp_path / "space.json").mkdir()
    args = ["sweep", "--task", "rte", "--embeddings", str(tmp_path / "emb")]
    args += ["--out", str(tmp_path / "sweep"), "--space", str(tmp_path / "space.json")]
    assert_one_error(CliRunner().invoke(app, args), tmp_path / "space.json", "Is a directory")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    "space, named",
    [
        ('{"lr": {"choice": ["fast", 0.01]}}', "'fast'"),  # text where a number goes
        ('{"dropout": {"choice": [0.1, null]}}', "None"),
        ('{"batch_size": {"uniform": [16, 64]}}', "batch_size"),  # would give 23.7 examples
        ('{"epochs": {"loguniform": [1, 8]}}', "epochs"),
        ('{"epochs": 2.5}', "2.5"),
        ('{"batch_size": true}', "True"),
    ],
)
def test_a_space_entry_of_the_wrong_type_is_refused_before_the_sweep_writes(tmp_path, space, named):
    """A search-space entry that would give a trial a value of the wrong type for its training
    option (text for a number, a fraction of an epoch or of an example) is refused at once, as
    the command line refuses `--batch-size 23.7`: not as a traceback, nor at the first trial
    once sweep.json is written."""
    embeddings = synthetic(str(tmp_path / "emb"), n_train=20, n_dev=8)
    args = ["sweep", "--task", "rte", "--embeddings", embeddings, "--trials", "1"]
    args += ["--out", str(tmp_path / "sweep"), "--space", space, "--device", "cpu"]
    assert_one_error(CliRunner().invoke(app, args), "--space", named)
    assert not (tmp_path / "sweep").exists()


def ensemble_args(runs: str, out: Path, *extra: str) -> list[str]:
    return ["ensemble", "--task", "rte", "--runs", runs, "--out", str(out), "--top-k", "2", *extra]


def test_a_garbled_trial_record_is_named_by_ensemble(tmp_path):
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.7, 0.8])
    record = tmp_path / "sweep" / "trials" / "0001" / TRIAL_RECORD
    record.write_text(record.read_text()[:30])
    result = CliRunner().invoke(app, ensemble_args(runs, tmp_path / "ens"))
    assert_one_error(result, record, "not valid JSON")
    assert not (tmp_path / "ens").exists()


def test_a_trial_record_copied_into_another_trials_folder_is_named_by_ensemble(tmp_path):
    """Trial 2's record copied over trial 1's would make the ensemble read trial 2's outputs
    (its `run`) twice, as two members."""
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.7, 0.8])
    trials = tmp_path / "sweep" / "trials"
    (trials / "0001" / TRIAL_RECORD).write_bytes((trials / "0002" / TRIAL_RECORD).read_bytes())
    result = CliRunner().invoke(app, ensemble_args(runs, tmp_path / "ens"))
    assert_one_error(result, trials / "0001" / TRIAL_RECORD, "is the record of trial 2")
    assert not (tmp_path / "ens").exists()


def test_a_garbled_outputs_file_is_named_and_an_older_ensemble_kept(tmp_path):
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.7, 0.8])
    ens = tmp_path / "ens"
    assert CliRunner().invoke(app, ensemble_args(runs, ens)).exit_code == 0
    before = file_tree(ens)
    outputs = tmp_path / "sweep" / "trials" / "0001" / "outputs" / "test.parquet"
    outputs.write_bytes(outputs.read_bytes()[:100])
    rebuild = ensemble_args(runs, ens, "--top-k", "3", "--overwrite")  # another ensemble
    assert_one_error(CliRunner().invoke(app, rebuild), outputs)
    assert file_tree(ens) == before


@pytest.mark.parametrize("metrics", [None, '{"val": {"accuracy": 0.5}, "dev": {"acc', "{}"])
def test_a_bad_with_finetuned_folder_is_named(tmp_path, metrics):
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.7, 0.8])
    finetuned = tmp_path / "ckpt"
    finetuned.mkdir()
    if metrics is not None:
        (finetuned / "metrics.json").write_text(metrics)
    result = CliRunner().invoke(
        app, ensemble_args(runs, tmp_path / "ens", "--with-finetuned", str(finetuned))
    )
    assert_one_error(result, finetuned)
    assert not (tmp_path / "ens").exists()


@pytest.mark.parametrize(
    "reference", ['{"source": "paper", "dev": {"rte": ', '{"dev": {}}', '{"source": "x", "dev": 1}']
)
def test_a_bad_reference_file_is_named_by_report(tmp_path, reference):
    fake_sweep(tmp_path / "runs" / "sweep", "rte", vals=[0.6])
    (tmp_path / "reference.json").write_text(reference)
    args = ["report", str(tmp_path / "runs"), "--reference", str(tmp_path / "reference.json")]
    assert_one_error(CliRunner().invoke(app, args), tmp_path / "reference.json")
    assert not (tmp_path / "runs" / "report.md").exists()


@pytest.mark.parametrize(
    "reference, why",
    [
        (
            '{"source": "x", "dev": {"wnli": {"accuracy": "0.6"}}}',
            "wnli/accuracy must be a number, got '0.6'",
        ),
        (
            '{"source": "x", "dev": {"rte": {"accuracy": true}}}',
            "rte/accuracy must be a number, got True",
        ),
        (
            '{"source": "x", "dev": {"rte": {"accuracy": null}}}',
            "rte/accuracy must be a number, got None",
        ),
        ('{"source": ["a", "b"], "dev": {}}', "'source' must be text, got ['a', 'b']"),
    ],
    ids=["text", "bool", "null", "source"],
)
def test_a_reference_value_that_is_no_number_is_named_and_nothing_written(tmp_path, reference, why):
    """Checked when the file is read, before any rendering: neither report.md nor report.png
    is written (the plot was written before the table failed to render)."""
    fake_sweep(tmp_path / "runs" / "sweep", "rte", vals=[0.6])
    (tmp_path / "ref.json").write_text(reference)
    before = file_tree(tmp_path / "runs")
    args = ["report", str(tmp_path / "runs"), "--reference", str(tmp_path / "ref.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output == f"error: reference file {tmp_path / 'ref.json'}: {why}\n"
    assert file_tree(tmp_path / "runs") == before


@pytest.mark.parametrize("metrics", ['{"dev": {"accuracy": 0.', '{"members": [], "config": 3}'])
def test_a_garbled_run_is_named_by_report(tmp_path, metrics):
    fake_sweep(tmp_path / "runs" / "sweep", "rte", vals=[0.6])
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "metrics.json").write_text(metrics)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs")])
    assert_one_error(result, tmp_path / "runs" / "other" / "metrics.json")
    assert not (tmp_path / "runs" / "report.md").exists()


# -- the operating system ----------------------------------------------------------------------


def test_a_full_disk_names_the_output(tmp_path, monkeypatch):
    fake_sweep(tmp_path / "runs" / "sweep", "rte", vals=[0.6])

    def onto_full_disk(url: str, data: bytes) -> None:
        with open("/dev/full", "wb") as f:  # every write fails with ENOSPC
            f.write(data)

    monkeypatch.setattr(storage, "write_bytes_atomic", onto_full_disk)
    out = tmp_path / "reports"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out)])
    line = assert_one_error(result, f"writing under {out}", "No space left on device")
    assert "Errno" not in line


def test_a_file_vanishing_under_the_output_names_it_and_the_likely_cause(tmp_path, monkeypatch):
    """What a second process working in the same folder does: a temporary file disappears."""
    fake_sweep(tmp_path / "runs" / "sweep", "rte", vals=[0.6])
    out = tmp_path / "reports"

    def replace_vanished(url: str, data: bytes) -> None:
        os.replace(f"{url}.tmp", url)  # the .tmp was removed by someone else

    monkeypatch.setattr(storage, "write_bytes_atomic", replace_vanished)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out)])
    line = assert_one_error(result, out / "report.png~", ".tmp", "No such file or directory")
    assert line.endswith(f"is another process writing to {out} at the same time?")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "args, named",
    [
        (
            ["train", "--task", "rte", "--embeddings", "e", "--out", "o", "--epochs", "abc"],
            "--epochs",
        ),
        (["train", "--task", "rte", "--out", "o"], "--embeddings"),
        (["trian"], "trian"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_option(args, named):
    """Click's usage errors (a value an option cannot take, a missing option, an unknown
    command) end like all bad input: one line, exit 2, as the installed command prints them."""
    done = subprocess.run(
        [sys.executable, "-m", "bertvision.cli", *args], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert named in done.stderr


@pytest.mark.parametrize(
    "args, line",
    [
        (["finetune", "--task", "rte", "--lr", "0"], "error: --lr must be > 0, got 0.0"),
        (
            ["finetune", "--task", "rte", "--weight-decay", "-1"],
            "error: --weight-decay must be >= 0, got -1.0",
        ),
        (
            ["finetune", "--task", "rte", "--device", "gpu"],
            "error: --device 'gpu' is not a device: cpu, cuda or cuda:N",
        ),
        (
            ["extract", "--task", "rte", "--device", "cuda:99"],
            "error: --device 'cuda:99' is not here",
        ),
        (
            ["run", "--tasks", "rte", "--shards-per-task", "0"],
            "error: --shards-per-task must be >= 1, got 0",
        ),
        (
            ["run", "--tasks", "rte", "--extract-splits", "trian"],
            "error: --extract-splits unknown split 'trian' for rte",
        ),
        (["run", "--sweep-space", "{bad"], "error: --sweep-space is not valid JSON"),
        (
            ["run", "--tasks", "rte", "--sweep-trials", "2"],
            "error: --ensemble-top-k 5 is more than the sweep's 2 trials",
        ),
        (
            ["run", "--tasks", "rte,squad2", "--data-dir", "glue_data"],
            "error: --tasks mix 2 task families (glue, squad), whose data one data folder",
        ),
    ],
)
def test_settings_are_checked_before_anything_runs(tmp_path, args, line):
    """Each of these is refused while the config is built: no model loaded, no Prefect started,
    nothing written; a pipeline's stage setting is named by its prefixed flag."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.startswith(line) and result.output.count("\n") == 1, result.output
    assert not out.exists()


def test_run_with_workers_and_no_prefect_server_is_refused_before_anything_runs(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = tmp_path / "out"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server, whatever ran before
        result = CliRunner().invoke(app, ["run", "--workers", "2", "--out", str(out)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(
        "error: --workers 2 needs a Prefect server (PREFECT_API_URL) with the extract-shards"
    )
    assert not out.exists()


def test_a_training_option_given_to_sweep_points_to_its_space(tmp_path):
    args = ["sweep", "--task", "rte", "--embeddings", str(tmp_path), "--out", str(tmp_path / "s")]
    result = CliRunner().invoke(app, [*args, "--epochs", "2"])
    assert result.exit_code == 2 and not (tmp_path / "s").exists()
    assert result.output == (
        "error: No such option: --epochs; a sweep's training options are set in its space: "
        """--space '{"epochs": VALUE}'\n"""
    )
    other = CliRunner().invoke(app, [*args, "--bogus", "2"])
    assert other.exit_code == 2 and "space" not in other.output


# -- seeds, sizes and URLs, refused while the config is built ----------------------------------


def refused_in(tmp_path: Path, monkeypatch, args: list[str], line: str) -> None:
    """`args`, run in `tmp_path` beside an empty folder emb/, end in exactly `line` and exit
    code 2, having written nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emb").mkdir()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output == f"{line}\n", result.output
    assert [p.name for p in tmp_path.iterdir()] == ["emb"] and not any((tmp_path / "emb").iterdir())


SEED_RANGE = "must be an integer in [0, 2**32-1 = 4294967295]"
TRAIN = ["train", "--task", "rte", "--embeddings", "emb", "--out", "run"]


@pytest.mark.parametrize(
    "args, line",
    [
        ([*TRAIN, "--seed", "-1"], f"error: --seed {SEED_RANGE}, got -1"),
        (
            [*TRAIN, "--seed", "100000000000000000000000"],
            f"error: --seed {SEED_RANGE}, got 100000000000000000000000",
        ),
        ([*TRAIN, "--val-seed", "-1"], f"error: --val-seed {SEED_RANGE}, got -1"),
        (
            [*TRAIN, "--shuffle-seed", "4294967296"],
            f"error: --shuffle-seed {SEED_RANGE}, got 4294967296",
        ),
        (
            ["finetune", "--task", "rte", "--out", "run", "--seed", "-1"],
            f"error: --seed {SEED_RANGE}, got -1",
        ),
        (
            ["finetune", "--task", "rte", "--out", "run", "--val-seed", "-1"],
            f"error: --val-seed {SEED_RANGE}, got -1",
        ),
        (
            ["sweep", "--task", "rte", "--embeddings", "emb", "--out", "sweep", "--seed", "-1"],
            f"error: --seed {SEED_RANGE}, got -1",
        ),
        (["run", "--out", "pipeline", "--seed", "-1"], f"error: --seed {SEED_RANGE}, got -1"),
        (
            ["run", "--out", "pipeline", "--val-seed", "-1"],
            f"error: --val-seed {SEED_RANGE}, got -1",
        ),
    ],
    ids=[
        "train",
        "train-overflow",
        "val-seed",
        "shuffle-seed",
        "finetune",
        "finetune-val-seed",
        "sweep",
        "run",
        "run-val-seed",
    ],
)
def test_a_seed_out_of_range_is_named(tmp_path, monkeypatch, args, line):
    refused_in(tmp_path, monkeypatch, args, line)


@pytest.mark.parametrize(
    "space, line",
    [
        ('{"seed": -1}', "entry seed: -1; seed takes integers from 0 to 4294967295"),
        (
            '{"seed": {"randint": [-5, 10]}}',
            'entry seed: {"randint": [-5, 10]} can give -5; seed takes integers from 0 to '
            "4294967295",
        ),
        (
            '{"seed": {"uniform": [0, 10]}}',
            'entry seed: {"uniform": [0, 10]} can give non-integers; seed takes integers from 0 '
            "to 4294967295",
        ),
        (
            '{"adapter_dim": {"choice": [8, 10000000000000]}}',
            'entry adapter_dim: {"choice": [8, 10000000000000]} can give 10000000000000; '
            "adapter_dim takes integers from 1 to 4096",
        ),
    ],
    ids=["seed", "seed-randint", "seed-uniform", "adapter-dim-choice"],
)
def test_a_search_space_giving_a_seed_or_width_out_of_range_is_refused_before_the_sweep(
    tmp_path, monkeypatch, space, line
):
    """Before, the sweep wrote its records and failed at its first trial, naming --seed."""
    args = ["sweep", "--task", "rte", "--embeddings", "emb", "--out", "sweep", "--space", space]
    refused_in(tmp_path, monkeypatch, args, f"error: --space {line}")


def test_the_largest_seed_is_taken():
    from bertvision.config import SEED_MAX, TrainConfig

    cfg = TrainConfig(task="rte", embeddings="e", out="o", seed=SEED_MAX, val_seed=SEED_MAX)
    assert (cfg.seed, cfg.val_seed) == (2**32 - 1, 2**32 - 1)


UNKNOWN = "unknown storage protocol 'bar' (a local path, memory://, az://, abfs:// or abfss://)"


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["train", "--task", "rte", "--embeddings", "bar://emb", "--out", "run"],
            f"error: --embeddings bar://emb: {UNKNOWN}",
        ),
        (
            ["train", "--task", "rte", "--embeddings", "emb", "--out", "bar://run"],
            f"error: --out bar://run: {UNKNOWN}",
        ),
        (["status", "bar://emb"], f"error: bar://emb: {UNKNOWN}"),
        (["verify", "bar://emb"], f"error: OUT bar://emb: {UNKNOWN}"),
        (["report", "bar://runs"], f"error: RESULTS bar://runs: {UNKNOWN}"),
        (
            ["report", "runs", "--reference", "bar://ref.json"],
            f"error: --reference bar://ref.json: {UNKNOWN}",
        ),
        (["report", "runs", "--out", "bar://reports"], f"error: --out bar://reports: {UNKNOWN}"),
        (
            ["ensemble", "--task", "rte", "--runs", "bar://sweep", "--out", "ens"],
            f"error: --runs bar://sweep: {UNKNOWN}",
        ),
        (
            [
                "ensemble",
                "--task",
                "rte",
                "--runs",
                "sweep",
                "--out",
                "ens",
                "--with-finetuned",
                "bar://ft",
            ],
            f"error: --with-finetuned bar://ft: {UNKNOWN}",
        ),
        (
            ["extract", "--task", "rte", "--data-dir", "bar://glue", "--out", "emb2"],
            f"error: --data-dir bar://glue: {UNKNOWN}",
        ),
        (
            ["finetune", "--task", "rte", "--model", "bar://model", "--out", "ft"],
            f"error: --model bar://model: {UNKNOWN}",
        ),
        (
            [
                "sweep",
                "--task",
                "rte",
                "--embeddings",
                "emb",
                "--out",
                "sweep",
                "--space",
                "bar://space.json",
            ],
            f"error: bar://space.json: {UNKNOWN}",
        ),
        (["run", "--out", "bar://pipeline"], f"error: --out bar://pipeline: {UNKNOWN}"),
        (
            ["train", "--task", "rte", "--embeddings", "s3://bucket/emb", "--out", "run"],
            "error: --embeddings s3://bucket/emb: storage protocol 's3' needs a package not "
            "installed here (Install s3fs to access S3)",
        ),
    ],
    ids=[
        "train-embeddings",
        "train-out",
        "status",
        "verify",
        "report",
        "report-reference",
        "report-out",
        "ensemble-runs",
        "ensemble-with-finetuned",
        "extract-data-dir",
        "finetune-model",
        "sweep-space",
        "run-out",
        "not-installed",
    ],
)
def test_a_url_of_an_unknown_storage_protocol_is_named(tmp_path, monkeypatch, args, line):
    refused_in(tmp_path, monkeypatch, args, line)


@pytest.mark.parametrize(
    "args, line",
    [
        (["run", "--out", ""], "error: --out must not be empty (omit it for runs/pipeline)"),
        (
            ["train", "--task", "rte", "--embeddings", "emb", "--out", ""],
            "error: --out must not be empty",
        ),
        (
            ["train", "--task", "rte", "--embeddings", "", "--out", "run"],
            "error: --embeddings must not be empty",
        ),
        (
            ["extract", "--task", "rte", "--data-dir", "", "--out", "emb2"],
            "error: --data-dir must not be empty (omit it instead)",
        ),
        (
            ["run", "--data-dir", "", "--out", "pipeline"],
            "error: --data-dir must not be empty (omit it instead)",
        ),
        (
            [
                "ensemble",
                "--task",
                "rte",
                "--runs",
                "sweep",
                "--out",
                "ens",
                "--with-finetuned",
                "",
            ],
            "error: --with-finetuned must not be empty (omit it instead)",
        ),
        (["report", ""], "error: RESULTS must not be empty"),
        (
            ["report", "runs", "--reference", ""],
            "error: --reference must not be empty (omit it instead)",
        ),
        (["verify", ""], "error: OUT must not be empty"),
        (["status", ""], "error: an empty URL names no file or folder"),
    ],
    ids=[
        "run-out",
        "train-out",
        "train-embeddings",
        "extract-data-dir",
        "run-data-dir",
        "ensemble-with-finetuned",
        "report",
        "report-reference",
        "verify",
        "status",
    ],
)
def test_an_empty_url_is_refused_never_taken_for_the_filesystem_root(
    tmp_path, monkeypatch, args, line
):
    """Joined to a name, an empty URL would be a path at the root: `run --out ""` wrote its
    whole pipeline under /."""
    refused_in(tmp_path, monkeypatch, args, line)


def test_storage_never_joins_a_name_to_an_empty_url():
    with pytest.raises(storage.StorageError, match="no URL to put wnli/finetune under"):
        storage.join("", "wnli", "finetune")
    with pytest.raises(storage.StorageError, match="an empty URL names no file or folder"):
        storage.exists("")
    assert storage.join("/", "wnli") == "/wnli"  # the root, when named as such


@pytest.mark.parametrize(
    "args, line",
    [
        (
            [
                "train",
                "--task",
                "rte",
                "--embeddings",
                "emb",
                "--out",
                "run",
                "--adapter-dim",
                "10000000000000",
            ],
            "error: --adapter-dim must be <= 4096, got 10000000000000",
        ),
        (
            [
                "train",
                "--task",
                "rte",
                "--embeddings",
                "emb",
                "--out",
                "run",
                "--adapter-dim",
                "100000000000000000000000",
            ],
            "error: --adapter-dim must be <= 4096, got 100000000000000000000000",
        ),
        (
            ["run", "--out", "pipeline", "--train-adapter-dim", "10000000000000"],
            "error: --train-adapter-dim must be <= 4096, got 10000000000000",
        ),
    ],
    ids=["train", "train-overflow", "run"],
)
def test_an_adapter_too_wide_to_allocate_is_refused_naming_the_option(
    tmp_path, monkeypatch, args, line
):
    """The adapter's width alone sizes its weights (hidden size x width): no data clips it, as
    the data clips a batch or shard size larger than itself."""
    refused_in(tmp_path, monkeypatch, args, line)


def test_a_pipeline_setting_a_stage_refuses_is_named_by_the_pipeline_option(tmp_path):
    """max_train_examples is the pipeline's own option, passed to fine-tuning and extraction:
    there is no --finetune-max-train-examples."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--max-train-examples", "0", "--out", str(out)])
    assert result.exit_code == 2
    assert result.output == "error: --max-train-examples must be >= 1, got 0\n"
    assert not out.exists()
