"""No NaN or infinity passes silently: options, extraction, training, fine-tuning, metrics,
outputs, sweeps; and every JSON file the pipeline writes parses with a strict parser."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_embeddings import synthetic, write_split
from test_ensemble import fake_sweep
from test_train import config
from typer.testing import CliRunner

from bertvision import adapters, shards, squad, storage
from bertvision import sweep as sweeping
from bertvision.cli import app
from bertvision.embeddings import load_embeddings
from bertvision.ensemble import EnsembleConfig, build_ensemble
from bertvision.extract import ExtractConfig, all_finite, check_storable, extract_hidden_states
from bertvision.finetune import FinetuneConfig, finetune_encoder
from bertvision.finite import NonFiniteError
from bertvision.glue import DataError, get_task
from bertvision.metrics import compute_metrics
from bertvision.predictions import write_predictions
from bertvision.report import ReportConfig, write_report
from bertvision.schema import ShardRecord
from bertvision.shards import ShardError, ShardWriter, load_plan, split_url
from bertvision.span_ensemble import average_window_logits
from bertvision.sweep import SweepConfig, TrialRecord, TrialSpec, run_sweep
from bertvision.train import TrainConfig, train_adapter

INF, NAN = float("inf"), float("nan")


def refuse_constant(token: str) -> None:
    raise ValueError(f"non-standard JSON token {token}")


def strict_load(text: str):
    """json.loads that rejects NaN, Infinity and -Infinity, as strict parsers do."""
    return json.loads(text, parse_constant=refuse_constant)


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


# ----------------------------------------------------------------------------------------------
# Options: every numeric option of every config


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ExtractConfig(task="rte", out="o", shard_size=INF), "shard_size"),
        (lambda: ExtractConfig(task="rte", out="o", batch_size=NAN), "batch_size"),
        (lambda: FinetuneConfig(task="rte", out="o", epochs=INF), "epochs"),
        (lambda: FinetuneConfig(task="rte", out="o", lr=NAN), "lr"),
        (lambda: FinetuneConfig(task="rte", out="o", weight_decay=-INF), "weight_decay"),
        (lambda: TrainConfig(task="rte", embeddings="e", out="o", lr=INF), "lr"),
        (lambda: TrainConfig(task="rte", embeddings="e", out="o", dropout=NAN), "dropout"),
        (lambda: TrainConfig(task="rte", embeddings="e", out="o", max_resident_gb=INF), "max_res"),
        (lambda: SweepConfig(task="rte", embeddings="e", out="o", val_fraction=NAN), "val_frac"),
        (lambda: EnsembleConfig(task="rte", runs="r", out="o", top_k=INF), "top_k"),
        (lambda: adapters.make_config("pooler", layers=2, hidden_size=4, num_labels=2,
                                      init_scale=NAN), "init_scale"),
    ],
)  # fmt: skip
def test_non_finite_options_are_refused_by_field_name(make, message):
    with pytest.raises(ValueError, match=f"^{message}.* must be a finite number, got"):
        make()


@pytest.mark.parametrize(
    "entry",
    [
        {"lr": {"loguniform": [1e-4, INF]}},
        {"dropout": {"uniform": [NAN, 0.5]}},
        {"epochs": {"quniform": [1, INF, 1]}},
        {"batch_size": {"choice": [16, INF]}},
        {"dropout": NAN},
    ],
)
def test_non_finite_search_space_entries_are_refused(entry):
    name = next(iter(entry))
    with pytest.raises(ValueError, match=f"search space entry {name}: .*finite number"):
        SweepConfig(task="rte", embeddings="e", out="o", space=entry)


def test_cli_refuses_lr_inf_and_epochs_inf_in_one_line(tmp_path, rte_embeddings_path):
    result = run_cli(
        "train", "--task", "rte", "--embeddings", rte_embeddings_path,
        "--out", str(tmp_path / "run"), "--lr", "inf",
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output == "error: --lr must be a finite number, got inf\n"
    result = run_cli("finetune", "--task", "rte", "--out", str(tmp_path / "ft"), "--epochs", "inf")
    assert result.exit_code == 2  # used to die with OverflowError
    assert result.output == "error: --epochs must be a finite number, got inf\n"
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


@pytest.fixture
def rte_embeddings_path(tmp_path) -> str:
    return synthetic(str(tmp_path / "emb"))


# ----------------------------------------------------------------------------------------------
# Extraction: values the stored dtype cannot hold


@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory, tiny_model) -> str:
    """The tiny BERT with its last LayerNorm weight 1e5: last-layer states ~1e5 > 65504."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(tiny_model)
    with torch.no_grad():
        model.encoder.layer[-1].output.LayerNorm.weight.fill_(1e5)
    folder = tmp_path_factory.mktemp("overflowing-bert")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return str(folder)


def test_extraction_refuses_states_beyond_float16_and_commits_nothing(
    tmp_path, overflowing_model, glue_dir
):
    out = tmp_path / "emb"
    args = ["extract", "--task", "wnli", "--data-dir", glue_dir, "--model", overflowing_model]
    args += ["--splits", "dev", "--shard-size", "40", "--out", str(out), "--device", "cpu"]
    result = run_cli(*args)
    assert result.exit_code == 1
    assert "0 shards written" in result.output and "2 failed" in result.output
    assert "layer(s) [2] (0 = embeddings)" in result.output
    assert "beyond float16's range" in result.output and "--dtype float32" in result.output
    folder = out / "wnli" / "dev"
    assert not list(folder.glob("*.parquet")) and not list(folder.rglob("*.parquet"))
    status = shards.split_status(str(folder))
    assert (status["done"], status["failed"]) == (0, 2)

    result = run_cli(*args, "--dtype", "float32", "--overwrite")  # the remedy named
    assert result.exit_code == 0, result.output
    table = pq.read_table(folder / "shard-00000.parquet")
    states = shards.hidden_arrays(table, load_plan(str(folder)))  # (L, T, H) each
    assert all(np.isfinite(h).all() for h in states)
    assert max(np.abs(h).max() for h in states) > 65504


def test_hidden_states_the_encoder_made_non_finite_are_refused_for_any_dtype():
    hidden = torch.zeros(1, 3, 2, 4)
    hidden[0, 1, 0, 0] = float("nan")
    mask = torch.tensor([[True, True]])
    with pytest.raises(NonFiniteError, match=r"layer\(s\) \[1\] .* model itself is broken"):
        check_storable(hidden, hidden.clone(), mask)
    hidden[0, 1, 0, 0] = 0.0
    hidden[0, 2, 1, 0] = float("inf")  # only on padding: never stored, so no error
    check_storable(hidden, hidden.clone(), torch.tensor([[True, False]]))


# ----------------------------------------------------------------------------------------------
# Adapter training


def test_training_that_diverges_stops_with_a_clear_error_and_reports_nothing(
    tmp_path, rte_embeddings_path
):
    cfg = config(tmp_path, rte_embeddings_path, lr=1e30)
    with pytest.raises(NonFiniteError, match="training diverged in epoch 1: the loss is nan"):
        train_adapter(cfg, progress=False)
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists() and not (run / "outputs").exists()

    result = run_cli(
        "train", "--task", "rte", "--embeddings", rte_embeddings_path,
        "--out", str(tmp_path / "cli"), "--lr", "1e30", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].endswith(  # after the progress bar's first line
        "error: training diverged in epoch 1: the loss is nan; try a lower lr (now 1e+30)"
    )
    assert not (tmp_path / "cli" / "metrics.json").exists()


def test_a_held_out_loss_that_overflows_stops_the_run_as_a_diverged_one(
    tmp_path, rte_embeddings_path, monkeypatch
):
    """Finite outputs too large for the loss: the argmax still scores on the held-out slice, the
    loss there is infinite; the run diverged (a sweep records such a trial as failed)."""
    real = adapters.build_adapter

    def huge_on_val(config):
        model = real(config)
        forward = model.forward

        def overflowing(batch):  # val: 8 examples
            logits = forward(batch)
            if batch.size != 8 or model.training:
                return logits
            return (logits - logits.mean(-1, keepdim=True)).sign() * 3e38  # a margin of 6e38

        model.forward = overflowing
        return model

    monkeypatch.setattr(adapters, "build_adapter", huge_on_val)
    cfg = config(tmp_path, rte_embeddings_path, batch_size=16)
    with pytest.raises(NonFiniteError, match="the held-out loss is inf: the outputs overflowed"):
        train_adapter(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_outputs_that_are_not_finite_stop_the_run_before_anything_is_written(
    tmp_path, rte_embeddings_path, monkeypatch
):
    """A model that diverges on the last step: every loss finite, the chosen outputs NaN."""
    real = adapters.build_adapter

    def nan_on_dev(config):
        model = real(config)
        forward = model.forward

        def diverged_on_dev(batch):  # dev: 30 examples, val: 8
            logits = forward(batch)
            return logits * float("nan") if batch.size == 30 and not model.training else logits

        model.forward = diverged_on_dev
        return model

    monkeypatch.setattr(adapters, "build_adapter", nan_on_dev)
    cfg = config(tmp_path, rte_embeddings_path, batch_size=16)  # eval batches of 32
    with pytest.raises(NonFiniteError, match="outputs on dev are NaN or infinite"):
        train_adapter(cfg, progress=False)
    assert not (tmp_path / "run" / "outputs").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_non_finite_hidden_states_in_a_shard_are_refused(tmp_path, rte_embeddings_path):
    folder = split_url(rte_embeddings_path, "rte", "train")
    plan = load_plan(folder)
    table = pq.read_table(Path(folder) / "shard-00001.parquet")
    hidden = [h.copy() for h in shards.hidden_arrays(table, plan)]  # (L, T, H) each
    hidden[3][1, 0, 5] = np.float16("inf")  # layer 1
    table = table.set_column(
        3, "hidden", pa.array([h.tobytes() for h in hidden], pa.large_binary())
    )
    with ShardWriter(folder, plan, 1) as writer:
        writer.write(table)
        writer.commit()
    with pytest.raises(ShardError, match=r"shard-00001.parquet holds NaN or infinite .*\[1\]"):
        load_embeddings("rte", rte_embeddings_path, device="cpu")
    with pytest.raises(ShardError, match="--dtype float32"):
        train_adapter(config(tmp_path, rte_embeddings_path), progress=False)
    assert not (tmp_path / "run").exists()


def test_non_finite_regression_labels_in_shards_are_refused(tmp_path):
    out = str(tmp_path / "emb")
    labels = np.linspace(0, 5, 40).astype(np.float32)
    labels[7] = np.nan
    write_split(out, "stsb", "train", 40, labels=labels)
    write_split(out, "stsb", "dev", 20, seed=2)
    with pytest.raises(ShardError, match="train labels are NaN or infinite"):
        load_embeddings("stsb", out, device="cpu")


# ----------------------------------------------------------------------------------------------
# Fine-tuning, metrics, outputs


def test_fine_tuning_that_diverges_stops_and_writes_nothing(tmp_path, tiny_model, glue_dir):
    cfg = FinetuneConfig(
        task="wnli", out=str(tmp_path / "ft"), model=tiny_model, data_dir=glue_dir, lr=1e30,
        batch_size=8, max_train_examples=40, max_seq_length=32, device="cpu", predict_test=False,
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match="fine-tuning diverged at step 1: the loss is nan"):
        finetune_encoder(cfg, progress=False)
    assert not (tmp_path / "ft").exists()


def test_compute_metrics_refuses_non_finite_predictions_and_labels():
    with pytest.raises(ValueError, match="stsb: 3 of 3 predictions are NaN or infinite"):
        compute_metrics("stsb", [NAN] * 3, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="rte: 1 of 2 predictions are NaN"):
        compute_metrics("rte", np.array([0.0, NAN]), [0, 1])
    with pytest.raises(ValueError, match="stsb: 1 of 3 labels are NaN or infinite"):
        compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, INF, 3.0])
    with pytest.raises(ValueError, match="pearson of these predictions is nan, not a number"):
        compute_metrics("stsb", [1.7e308, 1.7e308, -1.7e308], [1.0, 2.0, 3.0])


def test_write_predictions_refuses_non_finite_outputs_and_writes_nothing(tmp_path):
    task = get_task("rte")
    outputs = np.array([[0.5, 0.5], [NAN, NAN]], dtype=np.float32)
    with pytest.raises(NonFiniteError, match="dev outputs, so nothing was written: 1 of 2 rows"):
        write_predictions(str(tmp_path / "run"), task, "dev", [0, 1], [0, 1], outputs)
    assert not (tmp_path / "run").exists()


def test_write_outputs_refuses_non_finite_span_logits_and_writes_nothing(tmp_path):
    windows = SimpleNamespace(question_ids=["q1", "q2"], window_index=np.array([0, 0]))
    logits = [np.zeros((2, 3), np.float32), np.array([[0, NAN], [1, 2]], np.float32)]
    with pytest.raises(NonFiniteError, match="start and end logits, so nothing was written: 1 of"):
        squad.write_outputs(str(tmp_path / "run"), "dev", windows, logits)
    assert not (tmp_path / "run").exists()


def _spoil_outputs(url: Path, column: str, value: float) -> None:
    """Set the first value of `column` in an outputs file to `value`, as another tool (or a
    version before outputs were checked) could have written it."""
    table = pq.read_table(url)
    rows = table.column(column).to_pylist()
    rows[0][0] = value
    index = table.schema.get_field_index(column)
    spoiled = pa.array(rows, table.schema.field(column).type)
    pq.write_table(table.set_column(index, column, spoiled), url)


@pytest.mark.parametrize("split", ["val", "dev"])
def test_an_ensemble_refuses_a_member_whose_outputs_are_not_finite_naming_its_file(tmp_path, split):
    """The argmax of NaN is class 0: an average with a NaN member scored 0.57 before."""
    runs, _ = fake_sweep(tmp_path / "sweep", "rte", vals=[0.6, 0.9])
    spoiled = tmp_path / "sweep" / "trials" / "0001" / "outputs" / f"{split}.parquet"
    _spoil_outputs(spoiled, "output", NAN)
    ens = tmp_path / "ens"
    with pytest.raises(NonFiniteError, match=rf"outputs file {spoiled}: 1 of \d+ rows are NaN"):
        build_ensemble(EnsembleConfig(task="rte", runs=runs, out=str(ens), top_k=2))
    assert not ens.exists()


def test_a_span_ensemble_refuses_a_member_whose_logits_are_not_finite_naming_its_file(tmp_path):
    windows = SimpleNamespace(question_ids=["q1", "q2"], window_index=np.array([0, 0]))
    logits = [np.zeros((2, 3), np.float32), np.ones((2, 2), np.float32)]
    for name in "ab":
        squad.write_outputs(str(tmp_path / name), "dev", windows, logits)
    spoiled = tmp_path / "b" / "outputs" / "dev.parquet"
    _spoil_outputs(spoiled, "end_logits", INF)
    with pytest.raises(NonFiniteError, match=rf"outputs file {spoiled}: 1 of 2 rows are NaN"):
        average_window_logits([str(tmp_path / "a"), str(tmp_path / "b")], "dev")


# ----------------------------------------------------------------------------------------------
# JSON writers


def test_json_writers_refuse_non_finite_values_and_write_nothing(tmp_path):
    url = str(tmp_path / "metrics.json")
    with pytest.raises(ValueError, match=r"metrics.json: \['dev'\]\['pearson'\] is nan"):
        storage.write_json(url, {"dev": {"pearson": NAN}})
    assert not Path(url).exists()
    record = ShardRecord(0, "f", 0, 1, 1, 1, "s", "k", INF, "w", "t")
    with pytest.raises(ValueError, match=r"ShardRecord: \['seconds'\] is inf"):
        record.to_json()
    trial = TrialRecord(3, {"lr": NAN}, {}, {}, "ok", "trials/0003", 1.0, {}, "now")
    with pytest.raises(ValueError, match=r"trial 3: \['params'\]\['lr'\] is nan"):
        trial.to_json()


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


TRIAL = '{"trial": 0, "params": {}, "hyperopt_vals": {}, "val": {"accuracy": %s}, "dev": {}, '
TRIAL += '"status": "ok", "run": "trials/0000", "seconds": 1.0, "finished_at": "now"}'
SQUAD = '{"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "a b", "qas": '
SQUAD += '[{"id": "q", "question": "?", "is_impossible": false, "answers": [{"text": "a", '
SQUAD += '"answer_start": %s}]}]}]}]}'


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "[" * 100_000])
@pytest.mark.parametrize(
    "read, text, error",
    [
        (storage.read_json, '{"dev": {"accuracy": %s}}', storage.FileFormatError),
        (sweeping.read_trial, TRIAL, storage.FileFormatError),
        (squad.read_predictions, '{"q": %s}', DataError),
        (squad.load_file, SQUAD, DataError),
        (sweeping.load_space, '{"lr": %s}', ValueError),
    ],
    ids=["read_json", "trial record", "squad predictions", "squad data", "space file"],
)
def test_json_readers_refuse_non_finite_tokens_and_deep_nesting_naming_the_file(
    tmp_path, read, text, error, token
):
    """Python's json reads NaN and Infinity, which no strict parser does, and a trial whose val
    metric is NaN would sort as the best; nesting past the recursion limit is a RecursionError."""
    url = _write(tmp_path / "file.json", text % token)
    with pytest.raises(error, match=r"file\.json.*(not a JSON number|nested too deeply)"):
        read(url)


def test_a_space_on_the_command_line_with_nan_is_refused_by_its_option(tmp_path):
    result = run_cli(
        "sweep", "--task", "rte", "--embeddings", str(tmp_path), "--out", str(tmp_path / "s"),
        "--space", '{"lr": NaN}',
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error: --space is not valid JSON: NaN is not a JSON number" in result.output
    assert not (tmp_path / "s").exists()


def test_a_commit_record_with_a_non_finite_number_is_not_a_record():
    text = ShardRecord(0, "f", 0, 1, 1, 1, "s", "k", 1.0, "w", "t").to_json()
    with pytest.raises(ValueError, match="Infinity is not a JSON number"):
        ShardRecord.from_json(text.replace('"seconds": 1.0', '"seconds": Infinity'))


QUICK = {"adapter_dim": 2, "batch_size": 32, "epochs": 1, "seed": 0, "lr": 1e-2}


def test_a_diverged_sweep_trial_is_recorded_as_failed_and_the_sweep_goes_on(
    tmp_path, rte_embeddings_path
):
    cfg = SweepConfig(
        task="rte", embeddings=rte_embeddings_path, out=str(tmp_path / "sweep"), trials=2,
        device="cpu", space={**QUICK, "lr": {"choice": [1e-2, 1e30]}}, startup_trials=2,
    )  # fmt: skip
    sweeping.prepare_sweep(cfg)
    diverged = sweeping.run_trial(cfg, TrialSpec(0, {**QUICK, "lr": 1e30}, {"lr": 1}))
    assert diverged.status == "fail" and diverged.val == {"accuracy": None}
    assert "training diverged" in diverged.error
    assert sweeping.run_trial(cfg, TrialSpec(1, QUICK, {"lr": 0})).status == "ok"
    summary = run_sweep(cfg, progress=False)  # both finished: nothing crashes, nothing reruns
    assert (summary.ran, summary.failed, summary.best.trial) == (0, 1, 1)
    lines = (tmp_path / "sweep" / "trials.jsonl").read_text().splitlines()
    assert [strict_load(line)["val"]["accuracy"] is None for line in lines] == [True, False]

    everything_diverges = SweepConfig(
        task="rte", embeddings=rte_embeddings_path, out=str(tmp_path / "bad"), trials=2,
        device="cpu", space={**QUICK, "lr": 1e30}, parallel=2,
    )  # fmt: skip
    summary = run_sweep(everything_diverges, progress=False)
    assert (summary.ran, summary.failed, summary.best) == (2, 2, None)


def test_every_json_file_the_pipeline_writes_parses_strictly(tmp_path, tiny_model, glue_dir):
    extract_hidden_states(
        ExtractConfig(task="wnli", out=str(tmp_path / "wnli-emb"), model=tiny_model,
                      data_dir=glue_dir, splits=["dev"], shard_size=40, device="cpu"),
        progress=False,
    )  # fmt: skip
    finetune_encoder(
        FinetuneConfig(task="wnli", out=str(tmp_path / "runs" / "ft"), model=tiny_model,
                       data_dir=glue_dir, batch_size=8, max_train_examples=24,
                       max_seq_length=32, device="cpu", predict_test=False),
        progress=False,
    )  # fmt: skip
    embeddings = synthetic(str(tmp_path / "emb"))
    train_adapter(config(tmp_path, embeddings, run="runs/pooler"), progress=False)
    sweep = SweepConfig(
        task="rte", embeddings=embeddings, out=str(tmp_path / "runs" / "sweep"), trials=2,
        device="cpu", space=QUICK, parallel=2,
    )  # fmt: skip
    run_sweep(sweep, progress=False)
    sweeping.run_trial(sweep, TrialSpec(2, {**QUICK, "lr": 1e30}, {}))  # a diverged trial: val null
    sweeping.record_trials(sweep)
    build_ensemble(EnsembleConfig(task="rte", runs=sweep.out, out=str(tmp_path / "runs" / "ens"),
                                  top_k=2))  # fmt: skip
    write_report(ReportConfig(results=str(tmp_path / "runs")))

    written = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert len(written) > 30
    for path in written:
        text = path.read_text()
        for document in text.splitlines() if path.suffix == ".jsonl" else [text]:
            strict_load(document)  # raises on a bare NaN or Infinity
    nulls = [json.loads(line) for line in (tmp_path / "runs/sweep/trials.jsonl").open()]
    assert [t["status"] for t in nulls] == ["ok", "ok", "fail"] and math.isfinite(
        nulls[0]["val"]["accuracy"]
    )


@pytest.mark.parametrize(
    ("dtype", "bits"), [(torch.float16, torch.int16), (torch.float32, torch.int32)]
)
def test_the_finiteness_check_agrees_with_torch_on_every_kind_of_value(dtype, bits):
    """all_finite reads exponent bits: it must say what torch.isfinite says, on random bit
    patterns (NaNs of every payload, infinities, subnormals, zeros of both signs) and on edges."""
    generator = torch.Generator().manual_seed(0)
    info = torch.iinfo(bits)
    patterns = torch.randint(info.min, info.max, (20000,), generator=generator, dtype=bits)
    values = patterns.view(dtype)
    finite = values[torch.isfinite(values)]
    assert not all_finite(values) and all_finite(finite)
    edges = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, 0.0, -0.0], dtype=dtype)
    assert all_finite(torch.cat([edges, torch.finfo(dtype).tiny * torch.ones(3, dtype=dtype)]))
    for bad in (float("inf"), float("-inf"), float("nan")):
        assert not all_finite(torch.cat([finite, torch.tensor([bad], dtype=dtype)]))
