"""The seams of the codebase: one config declaration per stage, a core without Prefect."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import bertvision
from bertvision import config
from bertvision.config import setting


def test_every_module_of_the_core_imports_with_prefect_unimportable():
    """bertvision/ (its CLI included) runs where Prefect is not installed: GPU machines,
    notebooks. `sys.modules["prefect"] = None` makes every `import prefect` fail."""
    modules = sorted(m.name for m in pkgutil.walk_packages(bertvision.__path__, "bertvision."))
    assert "bertvision.cli" in modules and "bertvision.config" in modules
    script = (
        "import importlib, sys\n"
        "sys.modules['prefect'] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules"
        " if sys.modules[m] is not None)\n"
        "from bertvision.cli import app\n"
        "print(sorted(c.name or c.callback.__name__ for c in app.registered_commands))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "'run'" in done.stdout  # the orchestration's command joins without importing Prefect


@pytest.fixture
def train_config_with_a_new_field(monkeypatch):
    """TrainConfig with one more field, `probe_width`, as a developer would add it; the CLI and
    the flow modules are loaded again on top of it, and restored afterwards."""
    extended = dataclasses.make_dataclass(
        "TrainConfig",
        [("probe_width", int, setting(7, "Width of the new probe"))],
        bases=(config.TrainConfig,),
        kw_only=True,
    )
    modules = ["bertvision.cli", "bertvision_flows.train_adapter"]
    monkeypatch.setattr(config, "TrainConfig", extended)
    yield {name: importlib.reload(importlib.import_module(name)) for name in modules}
    monkeypatch.undo()
    for name in modules:
        importlib.reload(importlib.import_module(name))


def test_a_field_added_to_a_stage_config_is_an_option_a_flow_parameter_and_in_the_deployment(
    train_config_with_a_new_field, tmp_path
):
    pytest.importorskip("prefect")
    from prefect.utilities.callables import parameter_schema

    cli = train_config_with_a_new_field["bertvision.cli"]
    shown = CliRunner().invoke(cli.app, ["train", "--help"], terminal_width=200)
    assert shown.exit_code == 0
    assert "--probe-width" in shown.output and "Width of the new probe" in shown.output

    flow = train_config_with_a_new_field["bertvision_flows.train_adapter"].train_adapter
    flow_schema = json.dumps(parameter_schema(flow).model_dump())
    assert '"probe_width"' in flow_schema

    deployment = flow.to_deployment(name="train-adapter")
    assert '"probe_width"' in json.dumps(deployment._parameter_openapi_schema.model_dump())

    parsed = cli.build_config(
        config.TrainConfig, {"task": "rte", "embeddings": "e", "out": "o", "probe_width": 3}
    )
    assert parsed.probe_width == 3


def test_validation_names_the_field_and_the_cli_names_its_flag(tmp_path):
    from bertvision.cli import app

    with pytest.raises(config.ConfigError, match=r"^shuffle_shards must be >= 1, got 0$"):
        config.TrainConfig(task="rte", embeddings="e", out="o", shuffle_shards=0)
    args = ["train", "--task", "rte", "--embeddings", "e", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--shuffle-shards", "0"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --shuffle-shards must be >= 1, got 0"


def test_the_pipeline_cli_sets_a_stage_field_by_its_prefixed_flag():
    from bertvision.cli import build_config

    cfg = build_config(
        config.PipelineConfig,
        {
            "tasks": "rte,mrpc",
            "finetune__epochs": 0.2,
            "sweep__trials": 3,
            "ensemble__top_k": 2,
            "seed": 4,
        },
    )
    assert cfg.tasks == ["rte", "mrpc"] and cfg.finetune.epochs == 0.2 and cfg.sweep.trials == 3
    stages = cfg.stages("mrpc")
    assert stages["finetune"].seed == stages["train"].seed == stages["sweep"].seed == 4
    assert stages["extract"].model == stages["finetune"].out == f"{cfg.out}/mrpc/finetune"
    assert stages["train"].embeddings == stages["sweep"].embeddings == f"{cfg.out}/embeddings"
    assert stages["ensemble"].runs == stages["sweep"].out
    with pytest.raises(config.ConfigError, match=r"^finetune\.epochs must be > 0"):
        build_config(config.PipelineConfig, {"finetune__epochs": 0.0})


def test_the_pipeline_reads_the_same_train_examples_and_predicts_test_only_when_extracted():
    from bertvision.cli import build_config, option_fields

    cfg = build_config(config.PipelineConfig, {"max_train_examples": 500})
    stages = cfg.stages("rte")
    assert stages["finetune"].max_train_examples == stages["extract"].max_train_examples == 500
    assert stages["extract"].splits == ["train", "dev"]
    assert stages["finetune"].predict_test is False  # test is not extracted: nothing uses it
    tested = build_config(config.PipelineConfig, {"extract__splits": "train,dev,test"})
    assert tested.stages("mnli")["finetune"].predict_test is True
    names = {name for name, *_ in option_fields(config.PipelineConfig)}
    assert "max_train_examples" in names and "verbose" in names
    assert not {"finetune.max_train_examples", "finetune.predict_test"} & names
    # one windowing for fine-tuning and extraction: ensembles of both need the same windows
    assert {"max_seq_length", "doc_stride", "max_question_length"} <= names
    assert not {"finetune.doc_stride", "extract.max_seq_length"} & names
    squad = build_config(config.PipelineConfig, {"tasks": "squad2", "doc_stride": 64})
    windows = [(s.max_seq_length, s.doc_stride) for s in squad.stages("squad2").values()
               if isinstance(s, config.Tokens)]  # fmt: skip
    assert windows == [(384, 64), (384, 64)]  # 0 resolved to the family default


def test_a_stage_without_its_task_or_output_names_the_field():
    from bertvision.finetune import finetune_encoder

    with pytest.raises(config.ConfigError, match="^task is required$"):
        finetune_encoder(config.FinetuneConfig(out="x"))


def test_boolean_options_are_shown_as_flags_not_as_taking_a_value():
    from bertvision.cli import app

    status = CliRunner().invoke(app, ["status", "--help"], terminal_width=100).output
    assert "  --json  Print JSON" in status and "<bool>" not in status
    extract = CliRunner().invoke(app, ["extract", "--help"], terminal_width=100).output
    assert "  --overwrite / --no-overwrite  Replace" in extract and "<bool>" not in extract


def test_the_command_line_starts_without_torch_transformers_or_scipy():
    """`bertvision --help` (and every command's parsing) costs no deep-learning import: building
    the options reads the configs' declared defaults and resolves nothing."""
    heavy = "{'torch', 'transformers', 'scipy'}"
    script = f"import sys, bertvision.cli; print(sorted({heavy} & set(sys.modules)))"
    imported = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert imported.strip() == "[]"
