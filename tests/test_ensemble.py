"""Ensembles: members chosen by validation metric only, outputs averaged exactly, GLUE files
whose metrics can be recomputed, the fine-tuned model as an extra member, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_in_column
from typer.testing import CliRunner

from bertvision import glue, storage
from bertvision.cli import app
from bertvision.config import ConfigError
from bertvision.ensemble import EnsembleConfig, build_ensemble
from bertvision.metrics import compute_metrics
from bertvision.predictions import read_outputs, read_submission, write_predictions
from bertvision.records import RunRecord
from bertvision.sweep import SWEEP_FILE, TRIAL_RECORD, TrialRecord

DEV, TEST, VAL = 30, 12, 20


def probabilities(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    logits = rng.normal(size=(n, classes))
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def fake_sweep(
    root: Path, task: str, vals: list[float], devs: list[float] | None = None, seed: int = 0
) -> tuple[str, dict[int, dict[str, np.ndarray]]]:
    """A sweep folder as run_sweep leaves it, without training: sweep.json, then per trial its
    outputs/<split>.parquet (dev, test and the held-out "val") and trial.json (val metric
    `vals[n]`, dev metric `devs[n]`)."""
    spec = glue.get_task(task)
    rng = np.random.default_rng(seed)
    dev_labels = rng.uniform(0, 5, DEV) if spec.regression else rng.integers(0, 2, DEV)
    val_labels = rng.uniform(0, 5, VAL) if spec.regression else rng.integers(0, 2, VAL)
    storage.write_json(str(root / SWEEP_FILE), {"config": {"task": spec.name, "adapter": "pooler"}})
    outputs = {}
    for n, val in enumerate(vals):
        run = root / "trials" / f"{n:04d}"
        width = 1 if spec.regression else spec.num_labels
        dev_out = rng.uniform(0, 5, (DEV, 1)) if spec.regression else probabilities(rng, DEV, width)
        test_out = (
            rng.uniform(0, 5, (TEST, 1)) if spec.regression else probabilities(rng, TEST, width)
        )
        val_out = rng.uniform(0, 5, (VAL, 1)) if spec.regression else probabilities(rng, VAL, width)
        write_predictions(str(run), spec, "dev", range(DEV), dev_labels.tolist(), dev_out)
        write_predictions(str(run), spec, "test", range(TEST), [None] * TEST, test_out)
        write_predictions(str(run), spec, "val", range(VAL), val_labels.tolist(), val_out)
        outputs[n] = {
            "dev": dev_out.astype(np.float32),
            "test": test_out.astype(np.float32),
            "val": val_out.astype(np.float32),
        }
        dev_metric = devs[n] if devs else 0.5
        record = TrialRecord(
            trial=n,
            params={"lr": 10.0 ** -(n + 1)},
            val={spec.primary_metric: val},
            dev={spec.primary_metric: dev_metric},
            status="ok",
            run=f"trials/{n:04d}",
            seconds=1.0,
            hyperopt_vals={"lr": 10.0 ** -(n + 1)},
            finished_at="now",
        )
        (run / TRIAL_RECORD).write_text(record.to_json())
    return str(root), outputs


def recomputed_dev_metrics(ens: Path, task: str) -> dict[str, float]:
    """What anyone gets from the submission file and the dev labels."""
    ids, labels, _ = read_outputs(str(ens), "dev")
    submitted = read_submission(str(ens / "dev_predictions.tsv"), glue.get_task(task))
    assert sorted(submitted) == ids.tolist()
    return compute_metrics(task, [submitted[i] for i in ids], labels)


def test_members_are_the_best_by_val_and_their_outputs_are_averaged(tmp_path):
    # dev ranks the trials the opposite way: the ensemble must not care
    runs, outputs = fake_sweep(
        tmp_path / "sweep", "rte", vals=[0.6, 0.9, 0.7, 0.8, 0.5], devs=[0.9, 0.1, 0.3, 0.2, 0.8]
    )
    ens = tmp_path / "ens"
    result = build_ensemble(EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=3))

    assert [m["trial"] for m in result["members"]] == [1, 3, 2]
    assert [m["dev"] for m in result["members"]] == [{"accuracy": d} for d in (0.1, 0.2, 0.3)]
    for split in ("dev", "test"):
        _, _, averaged = read_outputs(str(ens), split)
        expected = np.mean([outputs[n][split] for n in (1, 3, 2)], axis=0)
        np.testing.assert_allclose(averaged, expected, rtol=1e-6)
    assert recomputed_dev_metrics(ens, "rte") == result["ensemble"]
    stored = json.loads((ens / "metrics.json").read_text())
    assert stored["ensemble"] == result["ensemble"] and len(stored["members"]) == 3
    assert (ens / "test_predictions.tsv").read_text().splitlines()[1].split("\t")[1] in (
        "entailment",
        "not_entailment",
    )


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_the_ensemble_is_scored_on_the_held_out_slice_from_its_mean_outputs(tmp_path, task):
    """metrics.json's "val": the ensemble's held-out metrics, what compares it with its trials
    (or another ensemble) without a dev label."""
    runs, outputs = fake_sweep(tmp_path / "sweep", task, vals=[0.6, 0.9, 0.7])
    ens = tmp_path / "ens"
    result = build_ensemble(EnsembleConfig(task=task, runs=runs, out=str(ens), top_k=2))

    _, labels, _ = read_outputs(runs + "/trials/0000", "val")
    mean = (outputs[1]["val"] + outputs[2]["val"]) / 2
    spec = glue.get_task(task)
    predicted = mean[:, 0] if spec.regression else mean.argmax(-1)
    assert result["val"] == pytest.approx(compute_metrics(task, predicted, labels))
    assert json.loads((ens / "metrics.json").read_text())["val"] == result["val"]


def test_regression_scores_are_averaged_and_recomputable(tmp_path):
    runs, outputs = fake_sweep(tmp_path / "sweep", "stsb", vals=[0.2, 0.4, 0.3])
    ens = tmp_path / "ens"
    result = build_ensemble(EnsembleConfig(task="stsb", runs=runs, out=str(ens), top_k=2))

    _, _, averaged = read_outputs(str(ens), "dev")
    np.testing.assert_allclose(averaged, (outputs[1]["dev"] + outputs[2]["dev"]) / 2, rtol=1e-6)
    assert recomputed_dev_metrics(ens, "stsb") == result["ensemble"]


def test_the_fine_tuned_model_joins_as_one_more_member(tmp_path):
    runs, outputs = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    finetuned = tmp_path / "finetune"
    rng = np.random.default_rng(5)
    own = probabilities(rng, DEV, 2)
    _, labels, _ = read_outputs(runs + "/trials/0000", "dev")
    write_predictions(str(finetuned), glue.get_task("rte"), "dev", range(DEV), labels, own)
    write_predictions(
        str(finetuned), glue.get_task("rte"), "test", range(TEST), [None] * TEST, own[:TEST]
    )
    storage.write_json(str(finetuned / "metrics.json"), {"dev": {"accuracy": 0.55}})

    ens = tmp_path / "ens"
    cfg = EnsembleConfig(
        task="rte", runs=runs, out=str(ens), top_k=1, with_finetuned=str(finetuned)
    )
    result = build_ensemble(cfg)
    assert [m["trial"] for m in result["members"]] == [1, None]
    assert result["members"][1]["dev"] == {"accuracy": 0.55}
    _, _, averaged = read_outputs(str(ens), "dev")
    np.testing.assert_allclose(averaged, (outputs[1]["dev"] + own) / 2, rtol=1e-6)
    assert recomputed_dev_metrics(ens, "rte") == result["ensemble"]
    assert "val" not in result  # a member without held-out outputs: no held-out score


def test_bad_input_is_refused_and_writes_nothing(tmp_path):
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    ens = tmp_path / "ens"
    with pytest.raises(ValueError, match="top_k 3 is more than the 2 finished trials"):
        build_ensemble(EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=3))
    with pytest.raises(ValueError, match="is a sweep of rte, not of mrpc"):
        build_ensemble(EnsembleConfig(task="mrpc", runs=runs, out=str(ens)))
    with pytest.raises(FileNotFoundError, match="holds no sweep"):
        build_ensemble(EnsembleConfig(task="rte", runs=str(tmp_path / "nowhere"), out=str(ens)))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=0)
    assert not ens.exists()

    other = tmp_path / "sweep" / "trials" / "0000"  # a member made from other embeddings
    spec = glue.get_task("rte")
    write_predictions(
        str(other), spec, "dev", range(DEV + 1), [0] * (DEV + 1), np.ones((DEV + 1, 2))
    )
    with pytest.raises(ValueError, match="must share their embeddings"):
        build_ensemble(EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=2))
    assert not (ens / "metrics.json").exists()


def test_ensemble_command(tmp_path):
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9, 0.7])
    ens = tmp_path / "ens"
    result = CliRunner().invoke(
        app, ["ensemble", "--task", "rte", "--runs", runs, "--top-k", "2", "--out", str(ens)]
    )
    assert result.exit_code == 0, result.output
    assert "trial 1: val" in result.output
    stored = json.loads((ens / "metrics.json").read_text())
    assert f"ensemble: val {json.dumps(stored['val'])} dev " in result.output
    assert "ensemble's" in CliRunner().invoke(app, ["ensemble", "--help"]).output
    bad = CliRunner().invoke(
        app, ["ensemble", "--task", "rte", "--runs", runs, "--top-k", "9", "--out", str(ens)]
    )
    assert bad.exit_code == 2 and "error: --top-k 9 is more than the" in bad.output


def finetuned_run(root: Path, runs: str, val_ids: range | None) -> str:
    """A fine-tuned run with a trial's dev and test examples, and held-out outputs on `val_ids`
    (None: none, as a run made before runs wrote them)."""
    spec, rng = glue.get_task("rte"), np.random.default_rng(7)
    _, labels, _ = read_outputs(runs + "/trials/0000", "dev")
    write_predictions(str(root), spec, "dev", range(DEV), labels, probabilities(rng, DEV, 2))
    write_predictions(
        str(root), spec, "test", range(TEST), [None] * TEST, probabilities(rng, TEST, 2)
    )
    if val_ids is not None:
        n = len(val_ids)
        write_predictions(str(root), spec, "val", val_ids, [0] * n, probabilities(rng, n, 2))
    storage.write_json(str(root / "metrics.json"), {"dev": {"accuracy": 0.5}})
    return str(root)


def test_a_member_with_another_held_out_slice_is_refused_naming_it(tmp_path):
    """A fine-tuned run made with another --val-seed shares the embeddings' dev and test
    examples, not the held-out ones: the error says which split, and why."""
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    ens = tmp_path / "ens"
    messages = []
    for val_ids in (range(5, VAL + 5), range(VAL + 3)):
        finetuned = finetuned_run(tmp_path / f"finetune-{len(val_ids)}", runs, val_ids)
        cfg = EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=1, with_finetuned=finetuned)
        with pytest.raises(ValueError) as refused:
            build_ensemble(cfg)
        message = str(refused.value)
        messages.append(message)
        assert f"{finetuned} has other val (the held-out slice of TRAIN) examples than" in message
        assert "must share their embeddings and their held-out slice" in message
        assert "val_fraction and val_seed" in message
        assert not (ens / "metrics.json").exists()
    assert f"(as many, {VAL}, but not the same ones)" in messages[0]
    assert f"({VAL + 3} against {VAL})" in messages[1]


def test_a_fine_tuned_run_not_stored_whole_is_refused_naming_why(tmp_path):
    """Its commit record lists files that are gone, or a commit into it was killed midway: its
    outputs may be missing or another run's."""
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    finetuned = Path(finetuned_run(tmp_path / "finetune", runs, range(VAL)))
    files = ["metrics.json", "outputs/dev.parquet", "outputs/test.parquet", "outputs/val.parquet"]
    record = RunRecord("finetune", "k", {}, {}, {}, files=files)
    (finetuned / "_commit.json").write_text(record.to_json())
    cfg = EnsembleConfig(
        task="rte", runs=runs, out=str(tmp_path / "ens"), top_k=1, with_finetuned=str(finetuned)
    )
    assert build_ensemble(cfg)["members"][1]["trial"] is None  # whole: a member

    (finetuned / "outputs" / "test.parquet").unlink()
    with pytest.raises(ConfigError, match=r"finetune holds no finished run: it lacks 1 of its fi"):
        build_ensemble(replace(cfg, out=str(tmp_path / "ens2")))
    (finetuned / "_commit.json").unlink()
    (finetuned / "_publishing.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"finetune holds no finished run: a commit is under way"):
        build_ensemble(replace(cfg, out=str(tmp_path / "ens2")))
    assert not (tmp_path / "ens2").exists()


def test_the_ensemble_command_says_why_its_val_is_absent(tmp_path):
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    finetuned = finetuned_run(tmp_path / "finetune", runs, None)
    ens = tmp_path / "ens"
    result = CliRunner().invoke(
        app,
        ["ensemble", "--task", "rte", "--runs", runs, "--top-k", "1", "--out", str(ens)]
        + ["--with-finetuned", finetuned],
    )
    assert result.exit_code == 0, result.output
    assert f"ensemble: val absent ({finetuned} has no held-out outputs" in result.output


def test_a_finished_ensemble_is_kept_until_told_and_then_replaced_whole(tmp_path, monkeypatch):
    """Its members changed (the sweep found a better trial): refused without overwrite; a kill
    while writing the new one leaves the old one whole and finished; overwrite replaces it."""
    from bertvision import ensemble as ensembling
    from bertvision import predictions

    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    ens = tmp_path / "ens"
    cfg = EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=1)
    first = build_ensemble(cfg)
    before = {p: p.read_bytes() for p in ens.rglob("*") if p.is_file()}
    monkeypatch.setattr(ensembling, "_build", lambda *a: pytest.fail("built again"))
    assert build_ensemble(cfg) == first  # same members: returned as stored

    better = json.loads((tmp_path / "sweep/trials/0000" / TRIAL_RECORD).read_text())
    better["val"] = {"accuracy": 0.95}  # trial 0 redone: now the best
    (tmp_path / "sweep/trials/0000" / TRIAL_RECORD).write_text(json.dumps(better))
    with pytest.raises(ValueError, match="holds a finished ensemble of the same settings on other"):
        build_ensemble(cfg)
    monkeypatch.undo()

    real_write = predictions.write_predictions
    calls = []

    def killed_on_test(*args, **kwargs):
        calls.append(args[2])
        if args[2] == "test":
            raise KeyboardInterrupt  # dev written (staged), test not
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ensembling, "write_predictions", killed_on_test)
    again = EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=1, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        build_ensemble(again)
    assert calls == ["dev", "test"]
    assert {p: p.read_bytes() for p in ens.rglob("*") if p.is_file()} == before
    monkeypatch.undo()

    replaced = build_ensemble(again)
    assert [m["trial"] for m in replaced["members"]] == [0]
    assert build_ensemble(cfg) == replaced  # finished now, with these members


def test_an_ensemble_whose_predictions_are_gone_is_built_again(tmp_path):
    """dev_predictions.tsv is among the committed files: with it gone the ensemble is not
    finished; it is built again (a warning says why), whole."""
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    ens = tmp_path / "ens"
    cfg = EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=2)
    first = build_ensemble(cfg)
    submission = (ens / "dev_predictions.tsv").read_bytes()
    (ens / "dev_predictions.tsv").unlink()
    with pytest.warns(UserWarning, match=r"ensemble committed there lacks 1 of its files"):
        again = build_ensemble(cfg)
    assert {k: v for k, v in again.items() if k != "config"} == {
        k: v for k, v in first.items() if k != "config"
    }
    assert (ens / "dev_predictions.tsv").read_bytes() == submission


@pytest.mark.parametrize("split", ["val", "dev"])
def test_flipped_bytes_in_a_members_outputs_are_refused_naming_the_file(tmp_path, split):
    """Outputs files carry page checksums: a member whose outputs are not the bytes its run wrote
    stops the ensemble before it averages anything (the values read as other numbers before)."""
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    flipped = tmp_path / "sweep" / "trials" / "0001" / "outputs" / f"{split}.parquet"
    flip_in_column(flipped, "output")
    ens = tmp_path / "ens"
    with pytest.raises(storage.FileFormatError, match=rf"outputs file {flipped}: .*checksum"):
        build_ensemble(EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=2))
    assert not ens.exists()


def test_a_sweep_and_fine_tuned_run_moved_elsewhere_find_their_finished_ensemble(
    tmp_path, monkeypatch
):
    """The ensemble is identified by its members' content, not by their URLs: the same sweep and
    fine-tuned run read from another folder (moved, copied) find the ensemble finished, returned
    as stored; before, the URLs were in its key and it was refused as one of other inputs."""
    import shutil

    from bertvision import ensemble as ensembling

    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    finetuned = finetuned_run(tmp_path / "finetune", runs, range(VAL))
    ens = tmp_path / "ens"
    first = build_ensemble(
        EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=2, with_finetuned=finetuned)
    )
    shutil.move(runs, tmp_path / "moved-sweep")
    shutil.move(finetuned, tmp_path / "moved-finetune")
    monkeypatch.setattr(ensembling, "_build", lambda *a: pytest.fail("built again"))
    moved = EnsembleConfig(
        task="rte",
        runs=str(tmp_path / "moved-sweep"),
        out=str(ens),
        top_k=2,
        with_finetuned=str(tmp_path / "moved-finetune"),
    )
    assert build_ensemble(moved) == first


def test_an_ensemble_built_before_members_were_keyed_by_role_is_still_finished(
    tmp_path, monkeypatch
):
    """Ensembles committed before named each member by its run's URL in their key: rerun on
    the same members, they are returned as stored, not refused as of other inputs."""
    from bertvision import ensemble as ensembling
    from bertvision.runs import commit_record

    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    cfg = EnsembleConfig(task="rte", runs=runs, out=str(tmp_path / "ens"), top_k=2)
    by_role = ensembling.content_key
    with monkeypatch.context() as earlier_version:
        earlier_version.setattr(
            ensembling, "content_key", lambda c, m=None, by_url=False: by_role(c, m, True)
        )
        first = build_ensemble(cfg)
    assert commit_record(cfg.out)["key"] == by_role(cfg, by_url=True)
    monkeypatch.setattr(ensembling, "_build", lambda *a: pytest.fail("built again"))
    assert build_ensemble(cfg) == first
