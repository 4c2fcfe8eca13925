"""Task families behind one interface: GLUE (sentence classification and regression,
bertvision.glue) and SQuAD 2.0 (span annotation, bertvision.squad).

    task = get_task("squad2")                    # Task(name="squad2", family=<the SQuAD family>)
    examples = task.family.load_split(task.name, "dev", data_dir)

A family is one module that implements `TaskFamily` and registers one instance of it when
imported (`register(...)` at its end); `FAMILY_MODULES` names the modules imported before the
first lookup, so a third family is one module and one line here. (PEFT's tuners register their
config and model classes the same way.) Fine-tuning (bertvision.finetune) is written against
this interface only: the family loads the data, holds out its slice of TRAIN, picks the model
head, turns examples into training batches, and scores, predicts and writes the predictions in
its own file formats.

Only the family modules import torch and transformers, and only inside the methods that need
them: looking up a task name (config validation) stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

FAMILY_MODULES = ("bertvision.glue", "bertvision.squad")

_FAMILIES: dict[str, TaskFamily] = {}


class TrainingSet(Protocol):
    """The training rows of a fine-tuning (examples for GLUE, windows for SQuAD)."""

    def __len__(self) -> int: ...

    def batch(self, rows: list[int], device: str) -> dict[str, Any]:
        """The model's keyword arguments for `rows`, the targets included (`labels`, or
        `start_positions` and `end_positions`), as tensors on `device`."""
        ...


@dataclass
class Evaluation:
    """What a fine-tuned model gave on the held-out slice and the dev (and test) splits.

    metrics: metrics.json's entries, {"val": {...}, "dev": {...}, ...} (MNLI adds
        "dev_mismatched"), in the family's official metric names.
    extra: more entries of metrics.json (SQuAD: the no-answer threshold chosen on "val").
    write: writes the predictions and per-example (or per-window) outputs into a run folder URL.
    """

    metrics: dict[str, dict[str, Any]]
    write: Callable[[str], None]
    extra: dict[str, Any] = field(default_factory=dict)


class TaskFamily(Protocol):
    name: str  # "glue", "squad"
    hub_url: str  # where the data come from without a data folder, as run records name it
    max_seq_length: int  # the default tokens per example or window
    schema: str  # of its extractions' shards (bertvision.schema): "glue" a row per example,
    # "span" a row per window
    default_adapter: str  # the adapter trained and swept on the task's rows when none is named
    baseline_name: str  # what `majority_baseline` predicts, as tables label its row

    def task_names(self) -> tuple[str, ...]:
        """The family's tasks, by their canonical names."""
        ...

    def canonical_name(self, name: str) -> str | None:
        """The canonical name of `name` (lower case, aliases such as sst-2), or None if the
        family has no such task."""
        ...

    def load_split(self, task: str, split: str, data_dir: str | None) -> list:
        """The examples of one split; DataError for a missing or malformed file."""
        ...

    def evaluated_splits(self, task: str, test: bool) -> tuple[str, ...]:
        """The splits a fine-tuning scores and predicts besides its held-out slice: the dev
        splits, and with `test` the unlabelled test splits (if the family has any)."""
        ...

    def primary_metric(self, task: str) -> str:
        """The metric that selects (trials, ensemble members); higher is better."""
        ...

    def metric_names(self, task: str) -> tuple[str, ...]:
        """The dev metrics a table shows, in order (GLUE: the task's; SQuAD: exact, f1)."""
        ...

    def report_metrics(self, task: str) -> tuple[str, ...]:
        """The dev metrics `bertvision report` shows, a row each, the primary first (GLUE: the
        primary alone; SQuAD: f1, exact and both for the questions with and without answers)."""
        ...

    def majority_baseline(self, task: str, data_dir: str | None) -> dict[str, float]:
        """The dev metrics of the trivial prediction (GLUE: TRAIN's most frequent label;
        SQuAD: no answer to any question): the floor a model has to beat."""
        ...

    def load_embeddings(
        self, task: str, embeddings: str, device: str, max_resident_gb: float
    ) -> Any:
        """The checked train and dev embeddings of `task`, loaded once and shared by the runs
        of a sweep (train.train_adapter's `data`): a split held on `device` when its states take
        at most `max_resident_gb` GiB, else streamed."""
        ...

    def ensemble(self, task: str, runs: list[str], sweep: dict[str, Any], out: str) -> dict:
        """Average the outputs of the member `runs` (adapter or fine-tuning run folders) and
        write the ensemble's outputs and predictions into the staged folder `out`. `sweep`:
        the settings of the sweep whose trials they are (its embeddings and held-out slice).
        Returns metrics.json's scores: "ensemble" (the dev metrics) and the family's others.
        ValueError naming the runs when members hold different examples or windows."""
        ...

    def data_fingerprint(self, examples: list) -> str:
        """16 hex digits of the examples' content, for run keys and records."""
        ...

    def held_out(self, examples: list, fraction: float, seed: int) -> tuple[list, list]:
        """(train, val): the seeded slice of TRAIN held out for selection, and the rest."""
        ...

    def model_head(self, task: str, model_path: str):
        """The encoder at `model_path` (a local folder or hub name) with the task's head, in
        float32: an AutoModelFor... of transformers."""
        ...

    def training_set(self, task: str, examples: list, tokenizer, cfg) -> TrainingSet:
        """The rows fine-tuning draws its batches from (cfg: bertvision.config.FinetuneConfig)."""
        ...

    def evaluate(
        self, task: str, model, tokenizer, splits: dict[str, list], cfg, progress: bool = False
    ) -> Evaluation:
        """Score and predict `splits` ({"val": held-out examples, "dev": ..., ...}) with the
        fine-tuned `model`, with a progress bar per split if `progress`. NonFiniteError if an
        output is NaN or infinite."""
        ...


@dataclass(frozen=True)
class Task:
    """A task by its canonical name, and its family."""

    name: str
    family: TaskFamily


def register(family: TaskFamily) -> None:
    """Make `family`'s tasks known; ValueError if a task name is taken by another family."""
    for other in _FAMILIES.values():
        if other.name != family.name:
            taken = set(other.task_names()) & set(family.task_names())
            if taken:
                raise ValueError(f"tasks {sorted(taken)} of {family.name} are {other.name}'s")
    _FAMILIES[family.name] = family


def families() -> dict[str, TaskFamily]:
    """The registered families by name, after importing `FAMILY_MODULES`."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return dict(_FAMILIES)


def task_names() -> tuple[str, ...]:
    """Every known task, family after family (GLUE's first)."""
    return tuple(name for family in families().values() for name in family.task_names())


def get_task(name: str) -> Task:
    """The task called `name` (any case, aliases); ValueError listing every known task."""
    for family in families().values():
        canonical = family.canonical_name(name)
        if canonical is not None:
            return Task(canonical, family)
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(task_names())}")
