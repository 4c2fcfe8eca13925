"""SQuAD 2.0 sweeps and ensembles: TPE over the span adapter selected on the held-out articles'
F1, resumable; ensembles average the members' per-window start and end logits, choose the
no-answer threshold on the held-out slice and predict every dev question; members of other
windows are refused; the fine-tuned encoder joins as one more member."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import flip_in_column
from test_sweep import write_split
from typer.testing import CliRunner

from bertvision import runs, squad, storage, sweep
from bertvision.cli import app
from bertvision.config import EnsembleConfig, ExtractConfig, FinetuneConfig, SweepConfig
from bertvision.ensemble import build_ensemble
from bertvision.extract import extract_hidden_states
from bertvision.finetune import finetune_encoder
from bertvision.shards import split_dataset
from bertvision.span_ensemble import average_window_logits, read_window_logits

TRAIN_ARTICLES, DEV_ARTICLES = ("Normans", "Sky_(United_Kingdom)"), ("Rhine",)
WINDOWING = dict(max_seq_length=128, doc_stride=32, max_question_length=32)
SPACE = {"epochs": 1, "adapter_dim": 8, "batch_size": 16, "lr": {"loguniform": [1e-3, 1e-2]}}
OFFICIAL = {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"}


@pytest.fixture(scope="module")
def small_squad(squad_dir, tmp_path_factory) -> str:
    """2 train articles (3 paragraphs each), 1 dev article (2 paragraphs)."""
    folder = tmp_path_factory.mktemp("squad") / "data"
    return squad.write_slice(
        squad_dir, str(folder), train=(TRAIN_ARTICLES, 3), dev=(DEV_ARTICLES, 2)
    )


@pytest.fixture(scope="module")
def embeddings(small_squad, tiny_model, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("emb")
    cfg = ExtractConfig(
        task="squad2", model=tiny_model, data_dir=small_squad, out=str(out), batch_size=16,
        device="cpu", **WINDOWING,
    )  # fmt: skip
    assert extract_hidden_states(cfg, progress=False).ok
    return str(out)


def _sweep_args(embeddings: str, out: Path, trials: int) -> list[str]:
    return [
        "sweep", "--task", "squad2", "--embeddings", embeddings, "--out", str(out),
        "--trials", str(trials), "--space", json.dumps(SPACE), "--startup-trials", "1",
        "--val-fraction", "0.5", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def swept(embeddings, tmp_path_factory) -> Path:
    """A finished sweep of 2 trials, run from the command line without naming the adapter."""
    out = tmp_path_factory.mktemp("sweeps") / "squad2"
    result = CliRunner().invoke(app, _sweep_args(embeddings, out, 2))
    assert result.exit_code == 0, result.output
    return out


def _ensemble(swept: Path, out: Path, **changes) -> dict:
    cfg = EnsembleConfig(task="squad2", runs=str(swept), out=str(out), **({"top_k": 2} | changes))
    return build_ensemble(cfg)


# -- sweeps ------------------------------------------------------------------------------------


def test_a_squad2_sweep_trains_the_span_adapter_and_records_f1_on_the_held_out_articles(swept):
    plan = json.loads((swept / "sweep.json").read_text())
    assert plan["config"]["adapter"] == "span" and plan["metric"] == "f1"
    assert plan["space"]["adapter_dim"] == 8 and set(plan["extraction_keys"]) == {"train", "dev"}
    trials = sweep.load_trials(str(swept))
    assert [t.trial for t in trials] == [0, 1] and all(t.status == "ok" for t in trials)
    for trial in trials:
        assert set(trial.val) >= OFFICIAL and set(trial.dev) >= OFFICIAL
        metrics = json.loads((swept / trial.run / "metrics.json").read_text())
        assert metrics["val"] == trial.val and metrics["dev"] == trial.dev
    lines = (swept / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["trial"] for line in lines] == [0, 1]
    best = sweep.best_trials(trials, "f1", 1)[0]
    assert best.val["f1"] == max(t.val["f1"] for t in trials)


def test_a_squad2_sweep_resumes_at_its_first_unfinished_trial(swept, embeddings, tmp_path):
    before = {t.trial: t.finished_at for t in sweep.load_trials(str(swept))}
    again = CliRunner().invoke(app, _sweep_args(embeddings, swept, 2))
    assert again.exit_code == 0, again.output
    assert "2 of 2 trials finished (0 now, 2 before, 0 failed)" in again.output
    cfg = SweepConfig(
        task="squad2", embeddings=embeddings, out=str(tmp_path / "copy"), trials=3, space=SPACE,
        startup_trials=1, val_fraction=0.5, device="cpu",
    )  # fmt: skip
    shutil.copytree(swept, tmp_path / "copy")
    summary = sweep.run_sweep(cfg, progress=False)
    assert (summary.done_before, summary.ran) == (2, 1)
    after = {t.trial: t.finished_at for t in sweep.load_trials(cfg.out)}
    assert {n: after[n] for n in before} == before and set(after) == {0, 1, 2}


def test_the_nightly_sweep_finds_every_extracted_task_of_every_family(embeddings, tmp_path):
    mixed = tmp_path / "emb"
    shutil.copytree(Path(embeddings) / "squad2", mixed / "squad2")
    for split, seed in (("train", 1), ("dev", 2)):
        write_split(str(mixed), split, 20, seed=seed)  # synthetic RTE
    assert sweep.extracted_tasks(str(mixed)) == ["rte", "squad2"]
    assert sweep.extracted_tasks(str(mixed), "span") == ["squad2"]  # the tasks it reads
    assert sweep.extracted_tasks(str(mixed), "pooler") == ["rte"]
    shutil.rmtree(mixed / "squad2" / "dev")
    assert sweep.extracted_tasks(str(mixed)) == ["rte"]  # squad2's dev is not extracted


def test_the_all_tasks_sweep_flow_sweeps_squad2_with_the_span_adapter_beside_glue(
    prefect_harness, embeddings, tmp_path
):
    from bertvision_flows.sweep import sweep as sweep_flow

    mixed = tmp_path / "emb"
    shutil.copytree(Path(embeddings) / "squad2", mixed / "squad2")
    for split, seed in (("train", 1), ("dev", 2)):
        write_split(str(mixed), split, 20, seed=seed)
    cfg = SweepConfig(
        embeddings=str(mixed), out=str(tmp_path / "runs"), trials=1, space=SPACE,
        startup_trials=1, val_fraction=0.5, device="cpu",
    )  # fmt: skip
    result = sweep_flow(cfg, all_tasks=True)
    assert list(result) == ["rte", "squad2"]
    for task, adapter, metric in (("rte", "pooler", "accuracy"), ("squad2", "span", "f1")):
        plan = json.loads((tmp_path / "runs" / task / "sweep" / "sweep.json").read_text())
        assert (plan["config"]["adapter"], plan["metric"]) == (adapter, metric)
        assert result[task]["finished"] == 1 and metric in result[task]["best"]["dev"]
    assert set(result["squad2"]["best"]["dev"]) >= OFFICIAL


# -- ensembles: the average --------------------------------------------------------------------


def _write_member(run: Path, windows: list[tuple[str, int]], logits: list[list[list[float]]]):
    features = SimpleNamespace(
        question_ids=[q for q, _ in windows], window_index=np.array([w for _, w in windows])
    )
    squad.write_outputs(str(run), "dev", features, [np.asarray(x, np.float32) for x in logits])


def test_the_ensemble_logits_are_the_members_mean_window_by_window(tmp_path):
    windows = [("q1", 0), ("q1", 1), ("q2", 0)]
    _write_member(tmp_path / "a", windows, [[[1, 2, 3], [0, 0, 4]], [[2, 2], [2, 2]], [[-1], [5]]])
    _write_member(tmp_path / "b", windows, [[[3, 2, 1], [4, 0, 0]], [[0, 4], [1, 1]], [[1], [6]]])
    ids, mean = average_window_logits([str(tmp_path / "a"), str(tmp_path / "b")], "dev")
    assert ids == windows
    expected = [[[2, 2, 2], [2, 0, 2]], [[1, 3], [1.5, 1.5]], [[0], [5.5]]]
    for got, want in zip(mean, expected, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_flipped_bytes_in_a_members_logits_are_refused_naming_the_file(tmp_path):
    windows = [("q1", 0), ("q2", 0)]
    _write_member(tmp_path / "a", windows, [[[1.0, 2.0], [3.0, 4.0]], [[1.0], [2.0]]])
    _write_member(tmp_path / "b", windows, [[[1.0, 2.0], [3.0, 4.0]], [[1.0], [2.0]]])
    flipped = tmp_path / "b" / "outputs" / "dev.parquet"
    flip_in_column(flipped, "start_logits")
    with pytest.raises(storage.FileFormatError, match=rf"outputs file {flipped}: .*checksum"):
        average_window_logits([str(tmp_path / "a"), str(tmp_path / "b")], "dev")


def test_members_of_other_windows_are_refused_naming_both(tmp_path):
    logits = [[[1.0, 2.0], [3.0, 4.0]], [[1.0], [2.0]]]
    _write_member(tmp_path / "a", [("q1", 0), ("q2", 0)], logits)
    _write_member(tmp_path / "b", [("q1", 0), ("q3", 0)], logits)
    _write_member(tmp_path / "c", [("q1", 0), ("q2", 0)], [[[1.0], [3.0]], [[1.0], [2.0]]])
    runs = [str(tmp_path / name) for name in "abc"]
    with pytest.raises(ValueError, match=rf"members {runs[0]} and {runs[1]} hold different dev"):
        average_window_logits(runs[:2], "dev")
    with pytest.raises(ValueError, match=rf"{runs[2]} hold different .*2 and 1 tokens"):
        average_window_logits([runs[0], runs[2]], "dev")


# -- ensembles: of a sweep ---------------------------------------------------------------------


def test_an_ensemble_of_two_span_members_averages_their_logits_and_answers_every_dev_question(
    swept, small_squad, tmp_path
):
    result = _ensemble(swept, tmp_path / "ens")
    members = [
        str(swept / t.run) for t in sweep.best_trials(sweep.load_trials(str(swept)), "f1", 2)
    ]
    assert [m["run"] for m in result["members"]] == members
    for split in ("val", "dev"):
        windows, mean = read_window_logits(str(tmp_path / "ens"), split)
        (first_ids, first), (second_ids, second) = (read_window_logits(m, split) for m in members)
        assert windows == first_ids == second_ids
        for got, a, b in zip(mean, first, second, strict=True):
            np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6)
    dev = squad.load_split("dev", small_squad)
    preds = squad.read_predictions(str(tmp_path / "ens" / "dev_predictions.json"))
    assert sorted(preds) == sorted(q.question_id for q in dev)
    assert result["metric"] == "f1" and set(result["ensemble"]) >= OFFICIAL
    assert result["ensemble"] == squad.evaluate(dev, preds)
    assert result["ensemble"]["total"] == len(dev) and set(result["val"]) >= OFFICIAL
    threshold = result["no_answer_threshold"]
    assert json.loads((tmp_path / "ens" / "metrics.json").read_text())["no_answer_threshold"] == (
        threshold
    )


def test_the_ensemble_command_takes_squad2(swept, small_squad, tmp_path):
    out = tmp_path / "ens"
    args = ["ensemble", "--task", "squad2", "--runs", str(swept), "--top-k", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("trial ") == 2 and '"f1"' in result.output.splitlines()[-1]
    # The official scores of its predictions, recomputed from the file: the ensemble's.
    gold = str(Path(small_squad) / "dev-v2.0.json")
    scored = CliRunner().invoke(app, ["evaluate-squad", gold, str(out / "dev_predictions.json")])
    assert scored.exit_code == 0, scored.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(scored.output) == pytest.approx(metrics["ensemble"])


def test_status_counts_the_windows_and_shards_of_a_squad2_extraction(embeddings):
    result = CliRunner().invoke(app, ["status", embeddings, "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert set(status) == {"squad2/train", "squad2/dev"}
    windows = {s: split_dataset(embeddings, "squad2", s).count_rows() for s in ("train", "dev")}
    for split, count in windows.items():
        one = status[f"squad2/{split}"]
        assert (one["examples"], one["examples_done"], one["rows"]) == (count, count, "windows")
        assert one["done"] == one["shards"] >= 1 and one["failed"] == one["missing"] == 0
    text = CliRunner().invoke(app, ["status", embeddings]).output
    assert f"squad2/dev: {windows['dev']} windows (float16, format 7), " in text


def test_the_fine_tuned_encoder_joins_the_ensemble_with_its_window_logits(
    swept, small_squad, tiny_model, tmp_path
):
    finetuned = tmp_path / "finetune"
    cfg = FinetuneConfig(
        task="squad2", model=tiny_model, data_dir=small_squad, out=str(finetuned), epochs=0.2,
        batch_size=16, val_fraction=0.5, device="cpu", **WINDOWING,
    )  # fmt: skip
    finetune_encoder(cfg, progress=False)
    result = _ensemble(swept, tmp_path / "ens", top_k=1, with_finetuned=str(finetuned))
    assert [m["trial"] for m in result["members"]][1] is None
    trial = result["members"][0]["run"]
    for split in ("val", "dev"):
        windows, mean = read_window_logits(str(tmp_path / "ens"), split)
        ids, tuned = read_window_logits(str(finetuned), split)
        _, adapter = read_window_logits(trial, split)
        assert ids == windows
        for got, a, b in zip(mean, adapter, tuned, strict=True):
            np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6)
    assert set(result["ensemble"]) >= OFFICIAL


# -- the experiment script ---------------------------------------------------------------------

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiment_squad.py"
# The experiment at its smallest: windows of 128 tokens, one-epoch adapters, a sweep of 2 trials.
SCRIPT_ARGS = [
    *("--seeds", "1", "--max-seq-length", "128", "--doc-stride", "32", "--val-fraction", "0.5"),
    *("--adapter-epochs", "1", "--trials", "2", "--top-k", "2", "--device", "cpu"),
    *("--finetune-batch-size", "8", "--space", json.dumps(SPACE)),
]


def script_main():
    """The script's main, run in this process (its `from experiment import ...` needs scripts/
    on the path, as when it is run)."""
    import runpy
    import sys

    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    return runpy.run_path(str(SCRIPT))["main"]


def error_line(err: str) -> str:
    """The one error line of a refusal on stderr."""
    [line] = [line for line in err.splitlines() if "error:" in line]
    return line


def test_the_squad_experiment_script_runs_every_method_resumes_and_needs_no_prefect(
    small_squad, tiny_model, tmp_path
):
    import subprocess
    import sys

    script = SCRIPT
    out = tmp_path / "exp"
    argv = ["--data-dir", small_squad, "--model", tiny_model, "--out", str(out), *SCRIPT_ARGS]
    run = (
        "import runpy, sys; "
        f"sys.path.insert(0, {str(script.parent)!r}); "
        f"sys.argv = {[str(script), *argv]!r}; "
        f"runpy.run_path({str(script)!r}, run_name='__main__'); "
        "assert 'prefect' not in sys.modules, 'the experiment imported prefect'"
    )
    subprocess.run([sys.executable, "-c", run], check=True, capture_output=True)
    results = json.loads((out / "results.json").read_text())

    summary = {row["method"]: row for row in results["summary"]}
    assert list(summary) == [
        "finetune-1", "finetune-3", "span", "span-25", "span-50", "sweep-best", "ensemble",
        "extract",
    ]  # fmt: skip
    for method, row in summary.items():
        if method != "extract":
            assert set(row["dev"]) == {"exact", "f1", "HasAns_f1", "NoAns_f1"}
            assert 0.0 <= row["dev"]["f1"]["mean"] <= 100.0
            assert row["pipeline_s"]["mean"] >= row["stage_s"]["mean"] > 0
    records = {r["method"]: r for r in results["records"]}
    assert records["span-25"]["train_questions_fraction"] == 0.25
    assert records["span-25"]["train_examples"] < records["span-50"]["train_examples"]
    assert records["ensemble"]["dev"]["total"] == len(squad.load_split("dev", small_squad))
    extract = summary["extract"]
    assert 0 < extract["stored_vs_dense"]["mean"] < 1  # padding is not stored
    assert "| ensemble | " in (out / "results.md").read_text()

    subprocess.run([sys.executable, "-c", run], check=True, capture_output=True)
    assert json.loads((out / "results.json").read_text())["records"] == results["records"]


@pytest.fixture(scope="module")
def span_run(small_squad, tiny_model, tmp_path_factory) -> tuple[Path, list[str]]:
    """The experiment with (a) and (c) only: its output folder and its arguments."""
    out = tmp_path_factory.mktemp("experiment-squad") / "exp"
    argv = ["--data-dir", small_squad, "--model", tiny_model, "--out", str(out), *SCRIPT_ARGS]
    argv += ["--methods", "finetune-1,span"]
    script_main()(argv)
    return out, argv


def test_the_squad_experiment_extracts_again_embeddings_a_later_method_needs_once_removed(
    span_run, tmp_path
):
    """A seed's embeddings are removed once its methods are done. A method asked for later
    (span-25 here) on the recorded extraction extracts them again, charged to it; the recorded
    stages are kept."""
    out, argv = span_run
    original = {r["method"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    argv = [*argv[: argv.index("--out")], "--out", str(copy), *argv[argv.index("--out") + 2 :]]

    results = script_main()([*argv, "--methods", "finetune-1,span,span-25"])

    records = {r["method"]: r for r in results["records"]}
    assert list(records) == ["finetune-1", "span", "span-25", "extract"]
    for kept in ("finetune-1", "span", "extract"):
        assert records[kept]["stage_s"] == original[kept]["stage_s"]  # not run again
    assert records["span-25"]["train_questions_fraction"] == 0.25
    assert 0.0 <= records["span-25"]["dev"]["f1"] <= 100.0
    assert not list(copy.glob("*/runs/seed-0/embeddings"))


def test_the_squad_experiment_refuses_a_garbled_stage_record_naming_it(span_run, tmp_path, capsys):
    """A stage record cut short (a full disk) is refused in one line naming its file and saying
    how to run that stage again."""
    out, argv = span_run
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    [record] = copy.glob("*/records/seed-0/span.json")
    record.write_text('{"task": "squad2", "se')
    argv = [*argv[: argv.index("--out")], "--out", str(copy), *argv[argv.index("--out") + 2 :]]

    with pytest.raises(SystemExit) as refused:
        script_main()(argv)
    assert refused.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"experiment_squad.py: error: {record} is not valid JSON: ")
    assert line.endswith("; delete it to run that stage again")


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--finetune-lr", "nan"], "argument --finetune-lr: must be a finite number, got 'nan'"),
        (["--adapter-lr", "inf"], "argument --adapter-lr: must be a finite number, got 'inf'"),
        (["--val-fraction", "nan"], "argument --val-fraction: must be a finite number"),
        (
            ["--max-seq-length", "96", "--doc-stride", "32"],
            "--max-seq-length 96, --doc-stride 32: max_length 96 leaves 29 context tokens after "
            "a question of 64 tokens; it must be more than doc_stride 32",
        ),
        (["--space", "{bad"], "--space must be a JSON object or a JSON file, got '{bad'"),
        (["--space", '{"bogus": 1}'], "--space search space entries ['bogus'] are not training"),
        (["--top-k", "3"], "--top-k 3 is more than --trials 2"),
        (["--adapter-epochs", "0"], "--adapter-epochs must be >= 1, got 0"),
        (["--finetune-lr", "-1"], "--finetune-lr must be > 0, got -1.0"),
        (["--train-paragraphs", "-1"], "--train-paragraphs must be >= 0 (0: all), got -1"),
        (["--trials", "0"], "--trials must be >= 1, got 0"),
        (["--out", ""], "argument --out: must name a folder, got ''"),
        (["--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
    ],
)
def test_the_squad_experiment_refuses_bad_options_before_any_work(
    options, says, tiny_model, tmp_path, capsys
):
    """Options a stage would refuse after the stages before it ran (a fine-tuning, an
    extraction) are refused in one line while parsing; nothing is written. (The data folder
    named does not exist: it is not read.)"""
    out = tmp_path / "exp"
    argv = ["--data-dir", str(tmp_path / "squad"), "--model", tiny_model, "--out", str(out)]
    with pytest.raises(SystemExit) as refused:
        script_main()([*argv, *SCRIPT_ARGS, *options])
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.splitlines()  # no usage above it
    assert line.startswith("experiment_squad.py: error: ")
    assert says in line
    assert not out.exists()


def test_the_squad_experiment_refuses_an_out_under_a_file_in_one_line(
    squad_dir, tiny_model, tmp_path, capsys
):
    (tmp_path / "a-file").write_text("mine")
    out = tmp_path / "a-file" / "exp"
    argv = ["--data-dir", squad_dir, "--model", tiny_model, "--out", str(out), *SCRIPT_ARGS]
    with pytest.raises(SystemExit) as refused:
        script_main()([*argv, "--train-paragraphs", "2"])
    assert refused.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"experiment_squad.py: error: --out {out}: cannot make the folder")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_second_squad_experiment_into_the_same_out_stops_in_one_line(
    squad_dir, tiny_model, tmp_path, capsys
):
    out = tmp_path / "exp"
    argv = ["--data-dir", squad_dir, "--model", tiny_model, "--out", str(out), *SCRIPT_ARGS]
    with runs.lease(str(out)), pytest.raises(SystemExit) as refused:
        script_main()([*argv, "--train-paragraphs", "2"])
    assert refused.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"experiment_squad.py: error: {out} is being written by ")
    assert not out.exists()  # nothing written: the holder, leaving it empty, removed it


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "train-paragraphs"])
def test_the_squad_experiment_refuses_data_it_cannot_read_in_one_line(
    sliced, tiny_model, tmp_path, capsys
):
    """A --data-dir without SQuAD's files, or with one that is not UTF-8, is refused in one line
    naming the file as the user gave it (not the slice --train-paragraphs cuts from it);
    nothing is written."""
    data = tmp_path / "squad"
    out = tmp_path / "exp"
    argv = ["--data-dir", str(data), "--model", tiny_model, "--out", str(out), *SCRIPT_ARGS]
    argv += ["--train-paragraphs", "2"] if sliced else []
    main = script_main()

    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    says = f"missing data file {data / 'train-v2.0.json'} (SQuAD 2.0 train); --data-dir names a "
    says += "folder holding train-v2.0.json and dev-v2.0.json, or leave it out to read the hub"
    assert error_line(capsys.readouterr().err) == f"experiment_squad.py: error: {says}"

    data.mkdir()
    (data / "train-v2.0.json").write_bytes(b'\xff{"version": "v2.0", "data": []}')
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    says = f"malformed data file {data / 'train-v2.0.json'} line 1: not UTF-8"
    assert error_line(capsys.readouterr().err).startswith(f"experiment_squad.py: error: {says}")
    assert not out.exists()


def test_the_squad_experiment_refuses_an_encoder_it_cannot_load_in_one_line(
    small_squad, tiny_model, tmp_path, capsys
):
    """A --model that does not exist, or holds a tokenizer but no weights, is refused in one
    line naming it; nothing is written."""
    main = script_main()
    out = tmp_path / "exp"
    argv = ["--data-dir", small_squad, "--out", str(out), *SCRIPT_ARGS]
    missing = tmp_path / "no-model"
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--model", str(missing)])
    assert refused.value.code == 2
    assert error_line(capsys.readouterr().err).startswith(
        f"experiment_squad.py: error: model {missing}'s tokenizer cannot be loaded"
    )

    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model) / name, tokenizer_only / name)
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--model", str(tokenizer_only)])
    assert refused.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"experiment_squad.py: error: model {tokenizer_only} cannot be loaded")
    assert not out.exists()


def test_a_span_ensemble_whose_window_logits_are_gone_is_built_again(swept, tmp_path):
    """outputs/dev.parquet of the ensemble (what another ensemble reads) is among its committed
    files: with it gone the span ensemble is not finished and is built again, whole."""
    first = _ensemble(swept, tmp_path / "ens")
    (tmp_path / "ens" / "outputs" / "dev.parquet").unlink()
    with pytest.warns(UserWarning, match=r"lacks 1 of its files \(outputs/dev.parquet\)"):
        assert _ensemble(swept, tmp_path / "ens") == first
    assert (tmp_path / "ens" / "outputs" / "dev.parquet").exists()


def test_a_full_disk_while_the_squad_experiment_writes_its_results_leaves_them_as_they_were(
    span_run, tmp_path, monkeypatch
):
    """results.md and results.json are written together, the record last: a write that fails
    midway (a full disk) leaves both as they were. Before, results.json was replaced first and
    results.md was cut off where the disk filled, beside it."""
    from conftest import disk_fills_writing

    out, argv = span_run
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    (copy / "results.md").write_text("the table of an earlier run\n")
    (copy / "results.json").write_text('{"records": "of an earlier run"}\n')
    before = {name: (copy / name).read_bytes() for name in ("results.md", "results.json")}
    argv = [*argv[: argv.index("--out")], "--out", str(copy), *argv[argv.index("--out") + 2 :]]

    disk_fills_writing(monkeypatch, "results.md")
    with pytest.raises(OSError, match="No space left"):
        script_main()(argv)
    monkeypatch.undo()
    assert {name: (copy / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith("results")) == [
        "results.json",
        "results.md",
    ]  # no staging file left
