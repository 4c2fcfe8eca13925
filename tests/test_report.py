"""The results report: runs found by what they hold, best trials chosen by val, seeds summarised,
a markdown table and a PNG, published numbers only when given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import killed_staging_name
from fsspec.implementations.local import LocalFileSystem
from typer.testing import CliRunner

from bertvision import squad, storage
from bertvision.cli import app
from bertvision.records import RunRecord
from bertvision.report import ReportConfig, find_results, write_report
from bertvision.sweep import SWEEP_FILE, TRIAL_RECORD, TrialRecord


def run_record(folder: Path, kind: str, settings: dict) -> None:
    """The run record every stage writes (its commit record): what the report reads first."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_commit.json").write_text(RunRecord(kind, "k", settings, {}, {}).to_json())


def finetune_run(folder: Path, task: str, dev: dict, recorded: bool) -> None:
    if recorded:
        storage.write_json(str(folder / "metrics.json"), {"dev": dev, "train": {"steps": 10}})
        run_record(folder, "finetune", {"task": task, "epochs": 1.0})
    else:  # an older run: told apart by the "config" in its metrics.json
        storage.write_json(
            str(folder / "metrics.json"),
            {"dev": dev, "train": {"steps": 10}, "config": {"task": task, "epochs": 1.0}},
        )
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))  # the checkpoint's


def adapter_run(
    folder: Path, task: str, adapter: str, dev: dict, recorded: bool, kind: str = "train"
) -> None:
    storage.write_json(str(folder / "metrics.json"), {"val": dev, "dev": dev})
    if recorded:
        run_record(folder, kind, {"task": task, "adapter": adapter})
    else:  # an older run: told apart by its config.json
        storage.write_json(
            str(folder / "config.json"),
            {"train": {"task": task, "adapter": adapter}, "adapter": {}},
        )


def sweep(
    folder: Path,
    task: str,
    metric: str,
    trials: list[tuple[float, float | dict]],
    recorded: bool,
    adapter: str = "pooler",
) -> None:
    """A sweep whose trial n has (val, dev) = trials[n] (dev: the metric's value, or all dev
    metrics); its trial runs hold metrics.json too."""
    settings = {"task": task, "adapter": adapter}
    storage.write_json(str(folder / SWEEP_FILE), {"config": settings})
    if recorded:
        run_record(folder, "sweep", settings)
    for n, (val, dev) in enumerate(trials):
        run = folder / "trials" / f"{n:04d}"
        dev = dev if isinstance(dev, dict) else {metric: dev}
        adapter_run(run, task, adapter, dev, recorded, kind="trial")
        record = TrialRecord(n, {}, {metric: val}, dev, "ok", f"trials/{n:04d}", 1.0, {}, "now")
        (run / TRIAL_RECORD).write_text(record.to_json())


def ensemble(folder: Path, task: str, metric: str, value: float, recorded: bool) -> None:
    metrics = {"members": [], "ensemble": {metric: value}}
    if recorded:
        storage.write_json(str(folder / "metrics.json"), metrics)
        run_record(folder, "ensemble", {"task": task})
    else:  # an older ensemble: told apart by "members" and the "config" in its metrics.json
        storage.write_json(str(folder / "metrics.json"), metrics | {"config": {"task": task}})


@pytest.fixture(params=["recorded", "older"])
def results(tmp_path, request) -> Path:
    """Runs with run records, or older runs without them: the report finds both alike."""
    recorded = request.param == "recorded"
    root = tmp_path / "runs"
    finetune_run(root / "rte" / "finetune", "rte", {"accuracy": 0.60}, recorded)
    for seed, value in enumerate([0.62, 0.64, 0.66]):
        adapter_run(root / "rte" / f"pooler-{seed}", "rte", "pooler", {"accuracy": value}, recorded)
    adapter_run(root / "rte" / "cls", "rte", "cls", {"accuracy": 0.55}, recorded)
    # the best trial by val (trial 1) is not the best on dev (trial 2)
    trials = [(0.5, 0.58), (0.8, 0.63), (0.7, 0.70)]
    sweep(root / "rte" / "sweep", "rte", "accuracy", trials, recorded)
    ensemble(root / "rte" / "ensemble", "rte", "accuracy", 0.67, recorded)
    finetune_run(root / "stsb" / "finetune", "stsb", {"pearson": 0.80, "spearman": 0.79}, recorded)
    stsb = {"pearson": 0.82, "spearman": 0.8}
    adapter_run(root / "stsb" / "pooler", "stsb", "pooler", stsb, recorded)
    return root


def test_runs_are_found_by_their_records_or_older_ones_by_what_they_hold(results):
    runs, left_out = find_results(str(results))
    assert left_out == []
    found = {(r.task, r.column): r.value for r in runs}
    assert found[("rte", "fine-tuning")] == 0.60
    assert found[("rte", "adapter: cls")] == 0.55
    assert found[("rte", "best trial (pooler)")] == 0.63  # chosen by val, not by dev
    assert found[("rte", "ensemble")] == 0.67
    assert found[("stsb", "adapter: pooler")] == 0.82
    columns = [r.column for r in runs if r.task == "rte"]
    assert columns.count("adapter: pooler") == 3  # seeds; the sweep's trial runs are not counted


def test_the_record_says_what_a_run_is(tmp_path):
    """A trial counts only through its sweep, wherever it sits; a record's kind and settings
    decide, whatever else the folder holds."""
    adapter_run(tmp_path / "moved-trial", "rte", "pooler", {"accuracy": 0.9}, True, kind="trial")
    adapter_run(tmp_path / "probe", "rte", "cls", {"accuracy": 0.5}, True)
    storage.write_json(str(tmp_path / "probe" / "config.json"), {"train": {"task": "cola"}})
    found, _ = find_results(str(tmp_path))
    assert [(r.task, r.column, r.value) for r in found] == [("rte", "adapter: cls", 0.5)]


def test_report_writes_a_table_and_a_plot(results):
    report = write_report(ReportConfig(results=str(results)))
    text = (results / "report.md").read_text()
    assert text == report["text"]
    header = next(line for line in text.splitlines() if line.startswith("| task"))
    assert header == (
        "| task | metric | fine-tuning | adapter: cls | adapter: pooler | best trial (pooler) "
        "| ensemble |"
    )
    rte = next(line for line in text.splitlines() if line.startswith("| rte"))
    assert rte == ("| rte | accuracy | 0.6000 | 0.5500 | 0.6400 ± 0.0200 (n=3) | 0.6300 | 0.6700 |")
    stsb = next(line for line in text.splitlines() if line.startswith("| stsb"))
    assert stsb == "| stsb | pearson | 0.8000 | – | 0.8200 | – | – |"
    assert "No published reference numbers" in text and "![dev metrics](report.png)" in text
    assert (results / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_numbers_appear_only_from_a_given_file(results, tmp_path):
    reference = tmp_path / "published.json"
    reference.write_text(
        json.dumps({"source": "a paper, table 2", "dev": {"rte": {"accuracy": 0.7}}})
    )
    out = tmp_path / "report"
    write_report(ReportConfig(results=str(results), out=str(out), reference=str(reference)))
    text = (out / "report.md").read_text()
    assert text.splitlines()[4].endswith("| ensemble | reference |")
    assert "| 0.7000 |" in next(line for line in text.splitlines() if line.startswith("| rte"))
    assert "Reference column: a paper, table 2." in text
    assert not (results / "report.md").exists()


def test_report_command_and_an_empty_folder(results, tmp_path):
    result = CliRunner().invoke(app, ["report", str(results)])
    assert result.exit_code == 0, result.output
    assert "| rte | accuracy |" in result.output and "report.png" in result.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "no runs, sweeps or ensembles" in empty.output


def assert_left_out_with_a_note(results: Path, broken: Path, why: str) -> None:
    report = write_report(ReportConfig(results=str(results)))
    rte = next(line for line in report["text"].splitlines() if line.startswith("| rte"))
    assert "| 0.6300 ± 0.0141 (n=2) |" in rte  # pooler-0 and pooler-1 only
    assert f"Note: {broken} left out, not stored whole: {why}." in report["text"].splitlines()
    assert (results / "report.md").read_text() == report["text"]


def test_a_run_whose_commit_was_killed_is_left_out_with_a_note_naming_it(results):
    """A commit killed midway leaves its _publishing.json; the metrics.json there may be the old
    run's or the new one's: no run's, so the report leaves it out and says so under the table."""
    broken = results / "rte" / "pooler-2"  # accuracy 0.66
    (broken / "_commit.json").unlink(missing_ok=True)  # the commit's first step
    (broken / "_publishing.json").write_text(json.dumps({"files": ["metrics.json"]}))
    why = "a commit is under way there, or was killed (_publishing.json)"
    assert_left_out_with_a_note(results, broken, why)


@pytest.mark.parametrize("results", ["recorded"], indirect=True)
def test_a_run_whose_commit_was_killed_after_its_record_is_reported(results):
    """The record is written after every file of the run: a _publishing.json left beside it by
    a kill before the clean-up does not make the run less whole."""
    (results / "rte" / "pooler-2" / "_publishing.json").write_text(json.dumps({"files": []}))
    report = write_report(ReportConfig(results=str(results)))
    rte = next(line for line in report["text"].splitlines() if line.startswith("| rte"))
    assert "(n=3)" in rte and "left out" not in report["text"]


@pytest.mark.parametrize("results", ["recorded"], indirect=True)  # older runs list no files
def test_a_run_whose_committed_files_are_gone_is_left_out_with_a_note_naming_it(results):
    broken = results / "rte" / "pooler-2"
    record = json.loads((broken / "_commit.json").read_text())
    (broken / "_commit.json").write_text(json.dumps(record | {"files": ["outputs/dev.pq"]}))
    assert_left_out_with_a_note(results, broken, "it lacks 1 of its files (outputs/dev.pq)")


def test_a_folder_of_runs_none_stored_whole_is_refused_naming_them(tmp_path):
    run = tmp_path / "runs" / "pooler"
    adapter_run(run, "rte", "pooler", {"accuracy": 0.6}, True)
    (run / "_commit.json").unlink(missing_ok=True)
    (run / "_publishing.json").write_text(json.dumps({"files": []}))
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: no runs, sweeps or ensembles with dev metrics under {tmp_path / 'runs'} ({run} "
        "left out, not stored whole: a commit is under way there, or was killed "
        "(_publishing.json))\n"
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["pooler"]


def test_a_report_removes_what_a_report_killed_midway_left(results):
    """The report writes as the folder's only writer (runs.lease), which removes what killed
    BERTVision writes left there, its own and others'; another tool's .tmp file is kept."""
    killed = [killed_staging_name(name) + storage.TMP_SUFFIX for name in ("report.md", "x.md")]
    for name in [*killed, "notes.tmp"]:
        (results / name).write_text("| half a table")
    write_report(ReportConfig(results=str(results)))
    files = sorted(p.name for p in results.iterdir() if p.is_file())
    assert files == ["notes.tmp", "report.md", "report.png"]


def test_the_plot_and_the_table_are_replaced_together_or_not_at_all(results, monkeypatch):
    """A failure while the new pair goes into place leaves the old pair: never a new plot
    beside an old table."""
    write_report(ReportConfig(results=str(results)))
    before = {name: (results / name).read_bytes() for name in ("report.md", "report.png")}
    adapter_run(results / "rte" / "scalarmix", "rte", "scalarmix", {"accuracy": 0.7}, True)
    moves = []

    def rename_fails_for_the_table(self, source, target, **kwargs):
        if target.endswith("report.md"):
            raise PermissionError(13, "Permission denied", target)
        moves.append(target)
        os.replace(source, target)

    monkeypatch.setattr(LocalFileSystem, "mv", rename_fails_for_the_table)
    with pytest.raises(PermissionError):
        write_report(ReportConfig(results=str(results)))
    assert moves == [str(results / "report.png")]  # the new plot went in first, and back out
    assert {name: (results / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in results.iterdir() if p.is_file()) == ["report.md", "report.png"]


# -- SQuAD 2.0 ---------------------------------------------------------------------------------


def official(f1: float, exact: float, has_f1: float, no_f1: float) -> dict:
    """Dev scores with SQuAD 2.0's official keys (HasAns_exact and NoAns_exact equal to f1)."""
    return {
        "exact": exact, "f1": f1, "total": 10, "HasAns_exact": has_f1, "HasAns_f1": has_f1,
        "HasAns_total": 5, "NoAns_exact": no_f1, "NoAns_f1": no_f1, "NoAns_total": 5,
    }  # fmt: skip


@pytest.fixture
def squad_results(tmp_path, squad_dir) -> Path:
    """squad2 runs as `bertvision run` lays them out: the fine-tuned encoder naming its data
    folder, the span adapter and sweep naming their embeddings (whose extraction names it)."""
    data = squad.write_slice(squad_dir, str(tmp_path / "squad"), dev=(("Rhine",), 2))
    root = tmp_path / "runs"
    storage.write_json(
        str(root / "squad2" / "finetune" / "metrics.json"), {"dev": official(30, 25, 20, 40)}
    )
    run_record(root / "squad2" / "finetune", "finetune", {"task": "squad2", "data_dir": data})
    extraction = root / "embeddings" / "squad2" / "train" / "_manifest"
    run_record(extraction, "extract", {"task": "squad2", "data_dir": data})
    (extraction / "_commit.json").rename(extraction / "run.json")
    embeddings = str(root / "embeddings")
    span = root / "squad2" / "span"
    storage.write_json(str(span / "metrics.json"), {"val": {}, "dev": official(50, 45, 40, 60)})
    run_record(span, "train", {"task": "squad2", "adapter": "span", "embeddings": embeddings})
    trials = [(40.0, official(55, 50, 50, 60)), (60.0, official(52, 48, 44, 60))]
    sweep(root / "squad2" / "sweep", "squad2", "f1", trials, True, adapter="span")
    storage.write_json(
        str(root / "squad2" / "ensemble" / "metrics.json"),
        {"members": [], "ensemble": official(58, 54, 56, 60)},
    )
    run_record(root / "squad2" / "ensemble", "ensemble", {"task": "squad2"})
    return root


def test_a_squad2_report_shows_the_official_scores_beside_answering_no_question(
    squad_results, squad_dir, tmp_path
):
    report = write_report(ReportConfig(results=str(squad_results)))
    lines = report["text"].splitlines()
    assert lines[4] == (
        "| task | metric | baseline | fine-tuning | adapter: span | best trial (span) | ensemble |"
    )
    dev = squad.load_split("dev", str(tmp_path / "squad"))
    no_answer = 100 * sum(q.is_impossible for q in dev) / len(dev)  # exact = f1 of ""
    assert lines[6:12] == [  # the best trial by val is trial 1
        f"| squad2 | f1 | {no_answer:.4f} | 30.0000 | 50.0000 | 52.0000 | 58.0000 |",
        f"| squad2 | exact | {no_answer:.4f} | 25.0000 | 45.0000 | 48.0000 | 54.0000 |",
        "| squad2 | HasAns_f1 | 0.0000 | 20.0000 | 40.0000 | 44.0000 | 56.0000 |",
        "| squad2 | HasAns_exact | 0.0000 | 20.0000 | 40.0000 | 44.0000 | 56.0000 |",
        "| squad2 | NoAns_f1 | 100.0000 | 40.0000 | 60.0000 | 60.0000 | 60.0000 |",
        "| squad2 | NoAns_exact | 100.0000 | 40.0000 | 60.0000 | 60.0000 | 60.0000 |",
    ]
    assert "(squad2, no answer to every question)" in report["text"]
    assert (squad_results / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_glue_and_squad2_runs_share_a_report_each_with_its_own_baseline(
    squad_results, glue_dir, tmp_path
):
    rte = squad_results / "rte" / "finetune"
    storage.write_json(str(rte / "metrics.json"), {"dev": {"accuracy": 0.6}})
    run_record(rte, "finetune", {"task": "rte", "data_dir": glue_dir})
    adapter_run(squad_results / "stsb" / "pooler", "stsb", "pooler", {"pearson": 0.8}, True)
    text = write_report(ReportConfig(results=str(squad_results)))["text"]
    rows = [line for line in text.splitlines() if line.startswith("| rte") or "| f1 |" in line]
    # columns: baseline, fine-tuning, adapter: pooler, adapter: span, best trial (span), ensemble
    assert rows[0] == "| rte | accuracy | 0.5271 | 0.6000 | – | – | – | – |"  # RTE: 146 of 277
    assert rows[1].startswith("| squad2 | f1 |")  # GLUE's tasks first
    assert "read (rte, majority class (train); squad2, no answer to every question)." in text
    assert "Note: stsb: no baseline, its runs name no data folder." in text


def test_a_second_report_into_the_folder_while_one_is_written_is_refused(results, monkeypatch):
    """One writer at a time (runs.lease): a report written into the folder while another goes
    into place there stops naming the folder; the first leaves its own plot beside its own
    table. Before, the second went in between the first's plot and table: one report's plot
    beside the other's table."""
    from bertvision.runs import FolderBusy

    other = results.parent / "other-runs"
    adapter_run(other / "rte" / "cls", "rte", "cls", {"accuracy": 0.51}, True)
    alone = results.parent / "alone"
    write_report(ReportConfig(results=str(results), out=str(alone)))
    second = []
    real_mv = LocalFileSystem.mv

    def second_report_meanwhile(self, source, target, **kwargs):
        real_mv(self, source, target, **kwargs)
        if target.endswith("report.png") and not second:
            second.append(target)
            with pytest.raises(FolderBusy, match=str(results)):
                write_report(ReportConfig(results=str(other), out=str(results)))

    monkeypatch.setattr(LocalFileSystem, "mv", second_report_meanwhile)
    write_report(ReportConfig(results=str(results)))
    assert second == [str(results / "report.png")]
    for name in ("report.md", "report.png"):
        assert (results / name).read_bytes() == (alone / name).read_bytes()


@pytest.mark.parametrize(
    "settings, why",
    [
        ({}, "'task'"),  # a sweep's run record that names no task
        ({"task": "bogus", "adapter": "pooler"}, "unknown task 'bogus'"),
        ({"task": "rte", "adapter": "pooler", "embeddings": 5}, "embeddings"),
    ],
)
def test_a_run_record_naming_no_usable_task_is_refused_naming_it(results, settings, why):
    """A run record whose settings the report cannot read is bad input naming that record: one
    error line, not a traceback (a sweep's, or a train run's embeddings), nor an error that
    does not say which of the results' files holds it (an unknown task)."""
    folder = results / "rte" / ("sweep" if "embeddings" not in settings else "pooler-0")
    (folder / "_commit.json").write_text(
        RunRecord(
            "sweep" if "embeddings" not in settings else "train", "k", settings, {}, {}
        ).to_json()
    )
    out = results.parent / "report"
    result = CliRunner().invoke(app, ["report", str(results), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exc_info
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {folder / '_commit.json'}") and why in line, line
    assert not out.exists()


def test_a_data_folder_that_cannot_be_read_leaves_its_task_without_a_baseline(results, tmp_path):
    """A run's data folder whose train.tsv cannot be read (here a folder in its place) gives its
    task no baseline and a note saying why, as a missing one does; the report is still written."""
    unreadable = tmp_path / "glue"
    (unreadable / "RTE" / "train.tsv").mkdir(parents=True)
    finetuned = results / "rte" / "finetune"
    run_record(finetuned, "finetune", {"task": "rte", "data_dir": str(unreadable)})
    text = write_report(ReportConfig(results=str(results)))["text"]
    assert "| task | metric | fine-tuning |" in text  # no baseline column: no task has one
    assert (results / "report.md").read_text() == text
    assert f"Note: rte: no baseline, its data cannot be read ({unreadable}" in text
    assert "Is a directory" in text
