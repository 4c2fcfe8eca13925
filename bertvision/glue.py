"""The nine GLUE tasks: what each one reads, predicts and is scored by, and their loaders.

Data come from a local `glue_data` directory (the standard TSV layout) or, when none is given,
from the Hugging Face hub (`nyu-mll/glue`). Both give the same `Example`s: the row index within
the split as `example_id`, one or two text segments, and the label (class index in the hub's
label order, float score for STS-B, None for unlabelled test rows).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from bertvision import storage

# Where the data come from when no data_dir is given, as run records name it (records.input_of).
HUB_URL = "hf://datasets/nyu-mll/glue"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    example_id: int
    texts: tuple[str, ...]  # one segment, or a pair
    label: int | float | None


@dataclass(frozen=True, kw_only=True)
class GlueTask:
    name: str
    dir_name: str  # folder in glue_data
    text_columns: tuple[str, ...]  # TSV header names of the text segments
    label_column: str
    labels: tuple[str, ...] | None  # label strings in class-index order; None = regression
    metrics: tuple[str, ...]  # the official metrics; the first is the one selection maximises
    hub_config: str
    hub_text_columns: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: tuple[str, ...] = ("test",)
    # Columns of a header-less labelled file (CoLA): the header the file would have.
    implicit_header: tuple[str, ...] | None = None

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits, *self.test_splits)

    def is_test(self, split: str) -> bool:
        return split in self.test_splits


_PAIR = ("sentence1", "sentence2")
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            name="cola",
            dir_name="CoLA",
            text_columns=("sentence",),
            label_column="label",
            labels=("0", "1"),
            metrics=("mcc", "accuracy"),
            hub_config="cola",
            hub_text_columns=("sentence",),
            implicit_header=("source", "label", "original_label", "sentence"),
        ),
        GlueTask(
            name="sst2",
            dir_name="SST-2",
            text_columns=("sentence",),
            label_column="label",
            labels=("0", "1"),
            metrics=("accuracy",),
            hub_config="sst2",
            hub_text_columns=("sentence",),
        ),
        GlueTask(
            name="mrpc",
            dir_name="MRPC",
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            labels=("0", "1"),
            metrics=("f1", "accuracy"),
            hub_config="mrpc",
            hub_text_columns=_PAIR,
        ),
        GlueTask(
            name="stsb",
            dir_name="STS-B",
            text_columns=_PAIR,
            label_column="score",
            labels=None,
            metrics=("pearson", "spearman"),
            hub_config="stsb",
            hub_text_columns=_PAIR,
        ),
        GlueTask(
            name="qqp",
            dir_name="QQP",
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            labels=("0", "1"),
            metrics=("f1", "accuracy"),
            hub_config="qqp",
            hub_text_columns=("question1", "question2"),
        ),
        GlueTask(
            name="mnli",
            dir_name="MNLI",
            text_columns=_PAIR,
            label_column="gold_label",
            labels=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            hub_config="mnli",
            hub_text_columns=("premise", "hypothesis"),
            dev_splits=("dev_matched", "dev_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
        ),
        GlueTask(
            name="qnli",
            dir_name="QNLI",
            text_columns=("question", "sentence"),
            label_column="label",
            labels=("entailment", "not_entailment"),
            metrics=("accuracy",),
            hub_config="qnli",
            hub_text_columns=("question", "sentence"),
        ),
        GlueTask(
            name="rte",
            dir_name="RTE",
            text_columns=_PAIR,
            label_column="label",
            labels=("entailment", "not_entailment"),
            metrics=("accuracy",),
            hub_config="rte",
            hub_text_columns=_PAIR,
        ),
        GlueTask(
            name="wnli",
            dir_name="WNLI",
            text_columns=_PAIR,
            label_column="label",
            labels=("0", "1"),
            metrics=("accuracy",),
            hub_config="wnli",
            hub_text_columns=_PAIR,
        ),
    ]
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}
_HUB_SPLITS = {
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def get_task(name: str) -> GlueTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[key]


def expand_splits(task: GlueTask, splits: list[str]) -> list[str]:
    """'dev' and 'test' stand for all of a task's dev/test splits (two each for MNLI)."""
    out: list[str] = []
    for split in splits:
        names = {"dev": task.dev_splits, "test": task.test_splits}.get(split, (split,))
        for name in names:
            if name not in task.splits:
                raise ValueError(
                    f"unknown split {split!r} for {task.name}; "
                    f"expected one of {', '.join(task.splits)}"
                )
            if name not in out:
                out.append(name)
    return out


def load_split(task: GlueTask | str, split: str, data_dir: str | None = None) -> list[Example]:
    task = get_task(task) if isinstance(task, str) else task
    names = expand_splits(task, [split])
    if len(names) != 1:
        raise ValueError(f"{task.name} has several {split} splits ({', '.join(names)}): name one")
    split = names[0]
    if data_dir is None:
        return _load_hub(task, split)
    return _load_tsv(task, split, storage.join(data_dir, task.dir_name, f"{split}.tsv"))


def _load_tsv(task: GlueTask, split: str, url: str) -> list[Example]:
    if not storage.exists(url):
        raise DataError(
            f"missing data file {url} ({task.name} {split}); --data-dir names a folder of GLUE's "
            f"task folders ({task.dir_name}/{split}.tsv ...), or leave it out to read the hub"
        )
    rows = _read_rows(url)
    labelled = not task.is_test(split)
    if labelled and task.implicit_header is not None:
        header, first_line = list(task.implicit_header), 1
    elif rows:
        header, rows, first_line = rows[0], rows[1:], 2
    else:
        raise DataError(f"malformed data file {url}: it is empty")
    wanted = [*task.text_columns, *([task.label_column] if labelled else [])]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(
            f"malformed data file {url}: missing column(s) {missing}; header has {header}"
        )
    text_idx = [header.index(c) for c in task.text_columns]
    label_idx = header.index(task.label_column) if labelled else None
    examples = []
    for i, row in enumerate(rows):
        line = first_line + i
        if len(row) != len(header):
            raise DataError(
                f"malformed data file {url} line {line}: {len(row)} columns, expected {len(header)}"
            )
        label = _parse_label(task, row[label_idx], url, line) if label_idx is not None else None
        examples.append(Example(i, tuple(row[j] for j in text_idx), label))
    if not examples:
        raise DataError(f"malformed data file {url}: no rows")
    return examples


def _read_rows(url: str) -> list[list[str]]:
    """The tab-separated rows of a UTF-8 file, trailing blank lines dropped; DataError naming the
    file and line for bytes that are not UTF-8 or a carriage return inside a field."""
    data = storage.read_bytes(url)
    try:
        text = data.decode("utf-8-sig")  # MRPC's header starts with a byte-order mark
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1  # exc.object: the bytes after the BOM
        raise DataError(
            f"malformed data file {url} line {line}: not UTF-8 text "
            f"(byte {exc.object[exc.start]:#04x})"
        ) from None
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        rows = list(reader)
    except csv.Error as exc:
        reason = (
            "a carriage return inside a field, or CR-only line endings (lines must end in \\n)"
            if "new-line" in str(exc)
            else str(exc)
        )
        raise DataError(f"malformed data file {url} line {reader.line_num}: {reason}") from None
    while rows and not rows[-1]:
        rows.pop()
    return rows


def _parse_label(task: GlueTask, raw: str, url: str, line: int) -> int | float:
    if task.labels is None:
        try:
            score = float(raw)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:
            raise DataError(
                f"malformed data file {url} line {line}: bad label {raw!r} "
                "(expected a score in [0, 5])"
            )
        return score
    if raw not in task.labels:
        raise DataError(
            f"malformed data file {url} line {line}: bad label {raw!r} "
            f"(expected one of {list(task.labels)})"
        )
    return task.labels.index(raw)


def _load_hub(task: GlueTask, split: str) -> list[Example]:
    import datasets  # heavy; only real users without a data directory need it

    hub_split = _HUB_SPLITS.get(split, split)
    try:
        data = datasets.load_dataset("nyu-mll/glue", task.hub_config, split=hub_split)
    except OSError as exc:  # ConnectionError offline; FileNotFoundError when not cached
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load GLUE {task.name} {split} from the Hugging Face hub ({reason}); "
            "pass --data-dir with a glue_data folder"
        ) from exc
    examples = []
    for i, row in enumerate(data):
        label = row["label"]
        if label is None or label == -1:
            label = None
        elif task.regression:
            label = float(label)
        examples.append(Example(i, tuple(row[c] for c in task.hub_text_columns), label))
    return examples


def data_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.example_id, ex.texts, ex.label]).encode())
    return digest.hexdigest()[:16]


def held_out_ids(example_ids: np.ndarray | list[int], fraction: float, seed: int = 0) -> np.ndarray:
    """The seeded slice of TRAIN held out for early stopping and model selection (sorted ids).

    Fine-tuning leaves out the same slice as adapter training, so the encoder whose embeddings
    an adapter learns from has never trained on the examples that select that adapter. The
    slice depends on every id: of other examples (another `max_train_examples`), or with another
    `fraction` or `seed`, it is another slice, which adapter training on a fine-tuned encoder's
    embeddings refuses when it holds examples that encoder trained on (`finetuned_ids`).
    """
    ids = np.sort(np.asarray(example_ids, dtype=np.int64))
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    if count < 1:
        raise ValueError("the train split needs at least 2 examples to hold one out")
    return np.sort(np.random.default_rng(seed).permutation(ids)[:count])


def finetuned_ids(train_examples: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The ids (sorted) of the TRAIN examples a fine-tuning on the first `train_examples` of them
    trained on: ids are row indexes, so 0..train_examples-1 less their held-out slice."""
    read = np.arange(train_examples, dtype=np.int64)
    return np.setdiff1d(read, held_out_ids(read, fraction, seed))


# -- the task family (bertvision.families) -----------------------------------------------------


class GlueFamily:
    """GLUE as a task family: one row per example, a sequence classification (or regression)
    head, GLUE's metrics, the submission TSV and per-example outputs (bertvision.predictions)."""

    name = "glue"
    hub_url = HUB_URL
    max_seq_length = 128
    schema = "glue"
    default_adapter = "pooler"
    baseline_name = "majority class (train)"

    def task_names(self) -> tuple[str, ...]:
        return tuple(TASKS)

    def canonical_name(self, name: str) -> str | None:
        key = _ALIASES.get(name.lower(), name.lower())
        return key if key in TASKS else None

    def load_split(self, task: str, split: str, data_dir: str | None) -> list[Example]:
        return load_split(task, split, data_dir)

    def evaluated_splits(self, task: str, test: bool) -> tuple[str, ...]:
        spec = get_task(task)
        return (*spec.dev_splits, *(spec.test_splits if test else ()))

    def primary_metric(self, task: str) -> str:
        return get_task(task).primary_metric

    def metric_names(self, task: str) -> tuple[str, ...]:
        return get_task(task).metrics

    def report_metrics(self, task: str) -> tuple[str, ...]:
        return (get_task(task).primary_metric,)

    def majority_baseline(self, task: str, data_dir: str | None) -> dict[str, float]:
        from bertvision.metrics import majority_baseline

        return majority_baseline(task, data_dir)

    def load_embeddings(self, task: str, embeddings: str, device: str, max_resident_gb: float):
        from bertvision.embeddings import load_embeddings

        return load_embeddings(task, embeddings, device=device, max_resident_gb=max_resident_gb)

    def ensemble(self, task: str, runs: list[str], sweep: dict, out: str) -> dict:
        from bertvision.ensemble import glue_ensemble

        return glue_ensemble(get_task(task), runs, out)

    def data_fingerprint(self, examples: list[Example]) -> str:
        return data_fingerprint(examples)

    def held_out(
        self, examples: list[Example], fraction: float, seed: int
    ) -> tuple[list[Example], list[Example]]:
        val_ids = set(held_out_ids([ex.example_id for ex in examples], fraction, seed).tolist())
        return (
            [ex for ex in examples if ex.example_id not in val_ids],
            [ex for ex in examples if ex.example_id in val_ids],
        )

    def model_head(self, task: str, model_path: str):
        import torch
        from transformers import AutoModelForSequenceClassification

        spec = get_task(task)
        return AutoModelForSequenceClassification.from_pretrained(
            model_path,
            dtype=torch.float32,
            num_labels=spec.num_labels,
            problem_type="regression" if spec.regression else "single_label_classification",
        )

    def training_set(self, task: str, examples: list[Example], tokenizer, cfg):
        from bertvision.finetune import GlueTrainingSet

        return GlueTrainingSet(get_task(task), examples, tokenizer, cfg.max_seq_length)

    def evaluate(
        self, task: str, model, tokenizer, splits: dict[str, list[Example]], cfg, progress=False
    ):
        from bertvision.finetune import evaluate_glue

        return evaluate_glue(get_task(task), model, tokenizer, splits, cfg, progress)


def _register() -> None:
    from bertvision import families

    families.register(GlueFamily())


_register()
