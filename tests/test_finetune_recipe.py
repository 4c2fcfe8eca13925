"""scripts/finetune_recipe.py, the study of the brief fine-tunings' recipe, at its smallest."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "scripts" / "finetune_recipe.py"
if str(RECIPE.parent) not in sys.path:  # its `from experiment import ...`, as when it is run
    sys.path.insert(0, str(RECIPE.parent))


@pytest.fixture(scope="module")
def recipe(glue_dir, tiny_model, tmp_path_factory):
    """The study on 40 RTE examples (4 held out): half an epoch, 2 batch sizes × 2 lrs."""
    out = tmp_path_factory.mktemp("recipe") / "study"
    argv = ["--data-dir", glue_dir, "--model", tiny_model, "--device", "cpu", "--out", str(out)]
    argv += ["--tasks", "rte", "--epochs", "0.5", "--batch-sizes", "8,4", "--lrs", "5e-5,1e-3"]
    argv += ["--max-train-examples", "40"]
    main = runpy.run_path(str(RECIPE))["main"]
    return main, argv, out, main(argv)


def test_every_setting_of_the_grid_runs_once_and_leaves_its_record_not_its_checkpoint(recipe):
    _, _, out, records = recipe

    assert [(r["batch_size"], r["lr"]) for r in records] == [
        (8, 5e-5),
        (8, 1e-3),
        (4, 5e-5),
        (4, 1e-3),
    ]
    # 36 training examples: 5 batches of 8, 9 of 4 per epoch; half of them, rounded
    assert [r["steps"] for r in records] == [2, 2, 4, 4]
    for r in records:
        assert set(r["val"]) == set(r["dev"]) == {"accuracy"}
        assert set(r["classes"]) == {"val", "dev"} and 1 <= r["classes"]["dev"] <= 2
        assert r["warmup"] == 0.1 and r["cpu_seconds"] > 0
        name = f"e0.5-b{r['batch_size']}-w0.1-lr{r['lr']:g}.json"
        assert json.loads((out / "records" / "rte" / name).read_text()) == r
    assert not list((out / "runs" / "rte").iterdir())


def test_the_table_gives_per_batch_size_the_lr_chosen_on_val_and_reruns_nothing(recipe):
    main, argv, out, records = recipe
    table = (out / "recipe.md").read_text()

    for batch in (8, 4):
        grid = [r for r in records if r["batch_size"] == batch]
        best = max(grid, key=lambda r: r["val"]["accuracy"])  # ties: the first
        row = (
            f"| 0.5 | {batch} | 0.1 | {best['lr']:g}, {best['val']['accuracy']:.3f}, "
            f"{best['dev']['accuracy']:.3f} | {best['val']['accuracy']:.4f} (1 tasks) | "
            f"{best['dev']['accuracy']:.4f} |"
        )
        assert row in table
    assert main(argv) == records  # read back from the records, nothing trained again
    assert main([*argv, "--report"]) == records
    assert main([*argv, "--report", "--batch-sizes", "2"]) == []  # no run of that grid recorded


def test_a_record_holding_a_nan_is_refused_and_not_written(tmp_path):
    main = runpy.run_path(str(RECIPE))["main"]

    def diverged(cfg, progress):  # a run whose held-out metric came out NaN
        Path(cfg.out).mkdir(parents=True)
        return {"val": {"accuracy": float("nan")}, "dev": {"accuracy": 0.5}, "train": {"steps": 1}}

    main.__globals__["finetune_encoder"] = diverged
    main.__globals__["predicted_classes"] = lambda task, run, split: 2
    argv = ["--model", "tiny", "--device", "cpu", "--out", str(tmp_path), "--tasks", "rte"]
    argv += ["--epochs", "0.5", "--batch-sizes", "8", "--lrs", "5e-5"]

    with pytest.raises(ValueError, match=r"e0.5-b8-w0.1-lr5e-05.json: \['val'\]\['accuracy'\]"):
        main(argv)
    assert not (tmp_path / "records" / "rte" / "e0.5-b8-w0.1-lr5e-05.json").exists()


def test_a_record_read_back_holding_a_nan_is_refused_naming_it(tmp_path, capsys):
    main = runpy.run_path(str(RECIPE))["main"]
    path = tmp_path / "records" / "rte" / "e0.5-b8-w0.1-lr5e-05.json"
    path.parent.mkdir(parents=True)
    record = '{"task": "rte", "epochs": 0.5, "batch_size": 8, "warmup": 0.1, "lr": 5e-05, '
    record += '"val": {"accuracy": NaN}, "dev": {"accuracy": 0.5}, '
    record += '"classes": {"val": 2, "dev": 2}, "steps": 1, "seconds": 1.0, "cpu_seconds": 1.0}'
    path.write_text(record)
    argv = ["--model", "tiny", "--out", str(tmp_path), "--tasks", "rte", "--epochs", "0.5"]
    argv += ["--batch-sizes", "8", "--lrs", "5e-5", "--report"]

    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"finetune_recipe.py: error: {path} is not valid JSON: NaN is not a JSON number"
    )


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (
            ["--tasks", "rte,wnil"],
            "--tasks: unknown task 'wnil'; expected one of cola, sst2, mrpc, stsb, qqp, mnli, "
            "qnli, rte, wnli",
        ),
        (["--epochs", "half"], "--epochs must be comma-separated numbers, got 'half'"),
        (["--batch-sizes", "8,2.5"], "--batch-sizes must be whole numbers, got '8,2.5'"),
        (["--lrs", "0"], "--lrs must be positive numbers, got '0'"),
        (["--warmups", "nan"], "--warmups must be finite numbers, got 'nan'"),
    ],
)
def test_a_bad_option_is_refused_in_one_line(options, says, capsys):
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(RECIPE))["parse_args"](["--model", "tiny", *options])
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"finetune_recipe.py: error: {says}"
