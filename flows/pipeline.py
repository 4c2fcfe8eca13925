"""Flow `pipeline`: fine-tune -> extract -> train -> sweep -> ensemble, for each task.

Every stage is a child flow run (each visible in the UI on its own) with the stage config that
`PipelineConfig.stages` links to the others; its docstring gives the layout under `cfg.out`.
A rerun redoes only what storage lacks; each stage's row says whether it was found finished
(its run records there before and unchanged), and then how long it took when it ran.
"""

from __future__ import annotations

import time

from bertvision_flows.ensemble import ensemble
from bertvision_flows.extract_glue import extract_glue
from bertvision_flows.finetune import finetune
from bertvision_flows.sweep import sweep
from bertvision_flows.train_adapter import train_adapter
from bertvision_tasks.artifacts import baseline_markdown
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.names import artifact_key, flow_run_name, where
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bertvision import runs, storage
from bertvision.config import PIPELINE_STAGES, PipelineConfig
from bertvision.families import get_task
from bertvision.schema import RUN_FILE
from bertvision.shards import manifest_url, split_url


class StageRows(dict):
    """{stage: {"dev": metrics or None, "seconds": wall-clock time of this run, "done_before":
    whether this run found the stage finished, "took": then the seconds its run records say it
    took when it ran (None if they do not say)}}, in order; each stage is timed from the end of
    the one before. Starts with the majority baseline (0 s): GLUE's most frequent label, SQuAD
    2.0's "no answer" to every question."""

    def __init__(self, baseline: dict[str, float]) -> None:
        super().__init__(
            {"majority baseline": {"dev": baseline, "seconds": 0.0, "done_before": False}}
        )
        self.clock = time.perf_counter()

    def add(self, stage: str, dev: dict[str, float] | None, before: Finished | None = None) -> None:
        """The row of `stage`, just run; `before`: its run records as stored before it ran."""
        now = time.perf_counter()
        done = before is not None and before.unchanged()
        self[stage] = {
            "dev": dev,
            "seconds": round(now - self.clock, 1),
            "done_before": done,
            **({"took": before.took()} if done else {}),
        }
        self.clock = now


class Finished:
    """The run records of one stage (each stage's commit record; an extraction's run record of
    each split) as stored when made: after the stage ran, `unchanged()` says whether it found
    the stage finished (every record there before, and none rewritten)."""

    def __init__(self, stage: str, cfg) -> None:
        self.urls = _record_urls(stage, cfg)
        self.records = self._read()

    def _read(self) -> list[dict | None]:
        return [_record(url) for url in self.urls]

    def unchanged(self) -> bool:
        return None not in self.records and self._read() == self.records

    def took(self) -> float | None:
        """The seconds the stage's runs took when they ran, from their records' timings; None
        when a record has none (a commit record older than run records)."""
        seconds = [(r.get("timings") or {}).get("seconds") for r in self.records]
        return None if None in seconds else round(sum(seconds), 1)


def _record(url: str) -> dict | None:
    """The record at `url`; None when there is none, or a garbled one (the stage says so)."""
    try:
        return storage.read_json(url) if storage.exists(url) else None
    except ValueError:
        return None


def _record_urls(stage: str, cfg) -> list[str]:
    if stage == "extract":
        from bertvision.extract import planned_splits

        return [
            manifest_url(split_url(cfg.out, cfg.task, split), RUN_FILE)
            for split in planned_splits(cfg.task, cfg.splits)
        ]
    return [storage.join(cfg.out, runs.COMMIT_RECORD)]


@flow(
    name="pipeline",
    flow_run_name=flow_run_name(lambda p: "pipeline-" + "-".join(p["cfg"].tasks)),
    log_prints=True,
)
def pipeline(cfg: PipelineConfig) -> dict[str, dict[str, dict]]:
    """The whole pipeline for each of `cfg.tasks`. Returns, per task, one row per stage in order:
    "majority baseline" (dev metrics of always predicting TRAIN's most frequent label; SQuAD
    2.0: no answer),
    "finetune", "extract" (no metrics), the adapter's name, "best trial", "ensemble"; each
    {"dev": metrics or None, "seconds": the stage's wall-clock time in this run, stored results
    included, "done_before": whether the stage was found finished (its run records unchanged),
    and then "took": the seconds it took when it ran} (see StageRows).
    Its artifact compares each stage's dev metrics with the majority baseline."""
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    results = {}
    for name in cfg.tasks:
        stage = cfg.stages(name)
        rows = StageRows(get_task(name).family.majority_baseline(name, cfg.data_dir))
        before = {step: Finished(step, stage[step]) for step in PIPELINE_STAGES}  # done before?
        dev = finetune(stage["finetune"])["dev"]  # partial fine-tune of the encoder
        rows.add("finetune", dev, before["finetune"])
        extract_glue(  # all-layer states -> Parquet shards
            stage["extract"], workers=cfg.workers, shards_per_task=cfg.shards_per_task
        )
        rows.add("extract", None, before["extract"])
        dev = train_adapter(stage["train"])["dev"]  # one adapter
        rows.add(stage["train"].adapter, dev, before["train"])
        dev = sweep(stage["sweep"])[name]["best"]["dev"]  # hyperopt trials
        rows.add("best trial", dev, before["sweep"])
        dev = ensemble(stage["ensemble"])["ensemble"]  # best trials + fine-tuned
        rows.add("ensemble", dev, before["ensemble"])
        results[name] = dict(rows)
    title = "Dev metrics per task and stage, against each task's baseline"
    scored = {
        name: {stage: row["dev"] for stage, row in rows.items() if stage != "majority baseline"}
        for name, rows in results.items()
    }
    baselines = {name: rows["majority baseline"]["dev"] for name, rows in results.items()}
    for stages in scored.values():
        stages.pop("extract")
    create_markdown_artifact(
        baseline_markdown(title, scored, baselines),
        key=artifact_key("pipeline", *cfg.tasks, where(cfg.out), "metrics"),
        description=title,
    )
    return results
