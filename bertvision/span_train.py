"""Adapter training on span extractions (SQuAD 2.0): span tasks' side of bertvision.train.

    metrics = train_adapter(
        TrainConfig(task="squad2", embeddings="emb", out="run", adapter="span")
    )

`train.train_adapter` runs its one loop (epochs, early stopping, checkpoints, the staged commit)
on a `SpanObjective`: the windows of the train and dev extractions (span_embeddings), BERT's
loss, SQuAD's post-processing and official metrics. A sweep's batch of span runs trains together
over one read of the windows (bertvision.together), each run as it trains alone.

The questions. Shards hold each window's question id, question index and context offsets, not
texts; answers are cut from the contexts and held-out articles chosen by title, so the questions
are read from the SQuAD data that the extraction read: the `data_dir` in the settings of each
split's extraction record (`_manifest/run.json`; none: the Hugging Face hub). A relative folder
is relative to where `train` runs. They must be the questions the extraction read, by content
(their fingerprint against the one its record holds: data changed since is refused, so a run,
keyed on the extraction, never scores other answers than its extraction's), and the windows'
questions: every window's question id is that of its question index, and every question has a
window (ShardError otherwise).

The held-out slice of TRAIN is whole articles (squad.held_out_titles over the train questions,
`val_fraction` of the articles, `val_seed`: the articles fine-tuning left out), all the windows
of their questions; the windows of the other articles are trained on. No article's questions are
both trained on and selected on. The articles are the fine-tuning's only when both read the
same train questions with the same `val_fraction` and `val_seed`: on the windows of an encoder
fine-tuned by BERTVision (the train extraction's record says what it was fine-tuned on), a run
holding out an article that encoder trained on is refused (train.refuse_seen).

Loss: BERT's, the mean of the cross-entropies of the start and of the end position over the
window's real tokens (both 0, the [CLS] position, where the window does not hold the answer).
Validation after each epoch: the held-out questions' best spans over their windows
(squad.best_spans: n-best starts and ends, at most 30 answer tokens), the no-answer threshold
that maximises their F1 (squad.best_threshold), then squad.evaluate; the primary metric is f1.

Outputs under RUN, besides train's adapter/, config.json, curve.json and curve.png (the curve
counts windows: train_windows, val_windows, train_windows_per_second):

    metrics.json             {"val": {...}, "dev": {...}, "no_answer_threshold": t}, the official
                             keys (exact, f1, total, HasAns_*, NoAns_*); t chosen on "val" only
    val_predictions.json     the official format {question_id: answer text, "" for no answer},
    dev_predictions.json     every question of the split, answered with threshold t
    outputs/<split>.parquet  per-window start and end logits over the window's real tokens,
                             squad.write_outputs' format (as a fine-tuned model's), for ensembles
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from bertvision import encoder as enc
from bertvision import records, squad, storage
from bertvision.config import SweepConfig, TrainConfig
from bertvision.embeddings import SHARED_SETTINGS, check_given
from bertvision.finetune import FinetunedEncoder
from bertvision.finite import NonFiniteError, held_out_result
from bertvision.rng import nested_subset
from bertvision.schema import RUN_FILE, ExtractionPlan
from bertvision.shards import ShardError, load_plan, manifest_url, split_url
from bertvision.span_embeddings import SpanSplit, Windows, load_span_split

SPLITS = ("train", "dev")
# Span settings every split of one extraction must share, besides embeddings.SHARED_SETTINGS.
SPAN_SETTINGS = ("schema", "doc_stride", "max_question_length")


def is_span_run(cfg: TrainConfig) -> bool:
    """True when `cfg.task` is stored one row per window (SQuAD 2.0)."""
    from bertvision.families import get_task

    return get_task(cfg.task).family.schema == "span"


@dataclass
class SpanData:
    """The checked train and dev windows of a span extraction, and their questions."""

    task: str
    embeddings: str
    data_dir: str | None  # the SQuAD data the extraction read; None: the hub
    splits: dict[str, SpanSplit]
    questions: dict[str, list[squad.Example]]  # per split, in file order
    # What the encoder was fine-tuned on when BERTVision fine-tuned it on this task, and the
    # articles it trained on (`finetuning`)
    finetuned: FinetunedEncoder | None = None
    trained_titles: frozenset[str] = frozenset()

    @property
    def plan(self) -> ExtractionPlan:
        return self.splits["train"].plan

    def extraction_keys(self) -> dict[str, str]:
        return {name: split.plan.key for name, split in self.splits.items()}


def load_span_data(
    task: str, embeddings: str, device: str = "", max_resident_gb: float = 8.0
) -> SpanData:
    """Check the train and dev windows of `task` under `embeddings` (span_embeddings.
    load_span_split: held on `device` when they fit in `max_resident_gb`, else streamed) and
    read their questions from the data folder their extraction records name (of train, the first
    `max_train_examples` it read, when it was capped).

    ShardError for an incomplete extraction, splits of mixed settings, data changed since the
    extraction read it (naming the file), or questions that are not the windows' (see the
    module); the data's own errors (DataError) for its files.
    """
    device = device or enc.default_device()
    embeddings = embeddings.rstrip("/")
    splits = {
        name: load_span_split(embeddings, name, task, device, max_resident_gb) for name in SPLITS
    }
    _check_same_settings(embeddings, task, splits)
    extractions = {name: _extraction_record(embeddings, task, name) for name in SPLITS}
    settings = {name: record.settings for name, record in extractions.items()}
    data_dirs = {name: settings[name].get("data_dir") for name in SPLITS}
    if len(set(data_dirs.values())) > 1:
        raise ShardError(
            f"the {task} splits under {embeddings} were extracted from different data: "
            + ", ".join(
                f"{name} from {where or squad.HUB_URL}" for name, where in data_dirs.items()
            )
        )
    data_dir = data_dirs["train"]
    questions = {name: squad.load_split(name, data_dir) for name in SPLITS}
    every_train = questions["train"]
    questions["train"] = every_train[: settings["train"].get("max_train_examples")]
    for name in SPLITS:
        folder = split_url(embeddings, task, name)
        _check_unchanged(folder, extractions[name], splits[name].plan, questions[name], data_dir)
        _check_questions(folder, splits[name].windows, questions[name])
    finetuned, trained = finetuning(embeddings, task, extractions["train"], every_train, data_dir)
    return SpanData(task, embeddings, data_dir, splits, questions, finetuned, trained)


def finetuning(
    embeddings: str,
    task: str,
    extraction: records.RunRecord,
    every_train: list[squad.Example],
    data_dir: str | None,
) -> tuple[FinetunedEncoder | None, frozenset[str]]:
    """What the encoder of the train extraction (its run record `extraction`) was fine-tuned on,
    when BERTVision fine-tuned it on `task`, and the articles it trained on (its first
    `train_examples` of `every_train`, the train questions of `data_dir`, less its held-out
    articles); (None, no articles) otherwise. ShardError when those questions changed since it
    was fine-tuned on them; FileFormatError naming the record when it is garbled."""
    url = manifest_url(split_url(embeddings, task, "train"), RUN_FILE)
    finetuned = FinetunedEncoder.from_record(extraction, url)
    if finetuned is None or finetuned.task != task:
        return None, frozenset()
    read = every_train[: finetuned.train_examples]
    if squad.data_fingerprint(read) != finetuned.data_fingerprint:
        raise ShardError(
            f"{squad.split_source('train', data_dir)} changed since the encoder of the {task} "
            f"embeddings under {embeddings} was fine-tuned on its first {len(read)} questions; "
            "restore the data it was fine-tuned on, or fine-tune and extract again"
        )
    titles = squad.trained_titles(read, finetuned.val_fraction, finetuned.val_seed)
    return finetuned, frozenset(titles)


def check_held_out_articles(
    data: SpanData, held_out: list[str], cfg: TrainConfig | SweepConfig
) -> None:
    """train.refuse_seen for a run holding out the articles `held_out` (titles) of `data`'s
    train questions, when an article the encoder was fine-tuned on is among them."""
    from bertvision.train import refuse_seen

    if data.finetuned is None:
        return
    refuse_seen(
        data.finetuned,
        split_url(data.embeddings, data.task, "train"),
        (len(data.questions["train"]), "questions"),
        (len(held_out), "articles"),
        [repr(title) for title in held_out if title in data.trained_titles],
        cfg,
    )


def check_held_out_unseen(cfg: SweepConfig) -> None:
    """check_held_out_articles for `cfg` (a sweep's task, embeddings, val_fraction and val_seed)
    before the windows are loaded: from the train split's run record alone, and, when it names
    an encoder fine-tuned on this task, the train questions of the data it names."""
    embeddings = cfg.embeddings.rstrip("/")
    folder = split_url(embeddings, cfg.task, "train")
    url = manifest_url(folder, RUN_FILE)
    extraction = records.read_record(url)
    plan = load_plan(folder)
    if extraction is None or plan is None or extraction.key != plan.key:
        return  # loading the windows says what is missing
    data_dir = extraction.settings.get("data_dir")
    if FinetunedEncoder.from_record(extraction, url) is None:
        return  # no questions read for an encoder BERTVision did not fine-tune
    every_train = squad.load_split("train", data_dir)
    finetuned, trained = finetuning(embeddings, cfg.task, extraction, every_train, data_dir)
    questions = every_train[: extraction.settings.get("max_train_examples")]
    data = SpanData(cfg.task, embeddings, data_dir, {}, {"train": questions}, finetuned, trained)
    check_held_out_articles(data, held_out_articles(data, cfg.val_fraction, cfg.val_seed), cfg)


def _extraction_record(embeddings: str, task: str, split: str) -> records.RunRecord:
    """The run record of the split's extraction: its settings (its data folder, the train
    questions it read) and inputs (the questions' fingerprint)."""
    url = manifest_url(split_url(embeddings, task, split), RUN_FILE)
    record = records.read_record(url)
    if record is None:
        raise ShardError(
            f"{url} is missing: the {task}/{split} extraction has no run record naming its data; "
            "rerun extract to finish it"
        )
    return record


def _check_unchanged(
    folder: str,
    extraction: records.RunRecord,
    plan: ExtractionPlan,
    questions: list[squad.Example],
    data_dir: str | None,
) -> None:
    """ShardError naming the data file when `questions`, read now, are not the ones the
    extraction in `folder` read: their fingerprint (squad.data_fingerprint) against the one its
    run record holds ("questions/<split>"); for a record written before that was kept, the
    windows rebuilt from them against the plan's data_fingerprint (extract.windows_fingerprint,
    which needs the extraction model's tokenizer)."""
    recorded = extraction.inputs.get(f"questions/{plan.split}")
    if recorded is not None:
        unchanged = recorded["key"] == squad.data_fingerprint(questions)
    else:
        from bertvision.extract import windows_fingerprint

        tokenizer = enc.load_tokenizer(plan.model)
        features = squad.build_features(
            questions, tokenizer, plan.max_seq_length, plan.doc_stride, plan.max_question_length
        )
        unchanged = windows_fingerprint(questions, features) == plan.data_fingerprint
    if not unchanged:
        raise ShardError(
            f"{squad.split_source(plan.split, data_dir)} changed since the extraction in {folder} "
            "read it (its questions or answers differ); re-extract (extract --overwrite)"
        )


def _check_same_settings(embeddings: str, task: str, splits: dict[str, SpanSplit]) -> None:
    train = splits["train"].plan
    for name, split in splits.items():
        for setting in (*SHARED_SETTINGS, *SPAN_SETTINGS):
            ours, theirs = getattr(train, setting), getattr(split.plan, setting)
            if ours != theirs:
                raise ShardError(
                    f"embeddings of {task} under {embeddings} mix settings: train has "
                    f"{setting} {ours}, {name} has {theirs}; extract all splits with the same "
                    "encoder and settings"
                )


def _check_questions(folder: str, windows: Windows, questions: list[squad.Example]) -> None:
    index = windows.example_index
    if len(index) and (index.min() < 0 or index.max() >= len(questions)):
        raise ShardError(
            f"{folder}: windows of question index {int(index.max())}, the data has "
            f"{len(questions)} questions: not the data this split was extracted from"
        )
    wrong = [
        qid
        for qid, i in zip(windows.question_ids, index, strict=True)
        if questions[i].question_id != qid
    ]
    without = len(questions) - len(np.unique(index))
    if wrong or without:
        raise ShardError(
            f"{folder}: its windows are not those of the questions in the data it names "
            f"({len(wrong)} windows of another question, {without} questions without a window); "
            "re-extract from the data at hand"
        )


class SpanObjective:
    """Span tasks' side of train._fit (train.Objective); see the module."""

    rows = "windows"
    primary_metric = "f1"

    def __init__(self, cfg: TrainConfig, data: SpanData | None = None) -> None:
        if data is None:
            data = load_span_data(cfg.task, cfg.embeddings, cfg.device, cfg.max_resident_gb)
        check_given(cfg, data.task, data.embeddings, data.splits["train"].data)
        self.data = data
        self.task = data.task
        self.embeddings = data.embeddings
        self.plan = data.plan
        self.train_split = data.splits["train"].data
        held_out = held_out_articles(data, cfg.val_fraction, cfg.val_seed)
        check_held_out_articles(data, held_out, cfg)
        self.is_val = np.zeros(data.splits["train"].num_windows, dtype=bool)  # storage order
        self.is_val[article_rows(data, held_out)] = True
        self.is_trained = trained_rows(data, ~self.is_val, cfg.train_fraction, cfg.seed)
        self.num_val = int(self.is_val.sum())
        self.num_train = int(self.is_trained.sum())

    def extraction_keys(self) -> dict[str, str]:
        return self.data.extraction_keys()

    def inputs(self) -> dict[str, dict[str, str]]:
        return {
            f"embeddings/{name}": records.input_of(
                split_url(self.embeddings, self.task, name), split.plan.key
            )
            for name, split in self.data.splits.items()
        }

    def batch_loss(self, model: nn.Module, packed, rows, chosen, device: str) -> torch.Tensor:
        windows = self.data.splits["train"].windows
        start, end = model(packed.batch(chosen, device))
        return span_loss(
            start,
            end,
            torch.from_numpy(windows.start_positions[rows[chosen]]).to(device),
            torch.from_numpy(windows.end_positions[rows[chosen]]).to(device),
        )

    @staticmethod
    def validate_together(runs: list) -> list[tuple[dict, float] | NonFiniteError]:
        results: list[tuple[dict, float] | NonFiniteError] = []
        for val in _score_held_out(runs):
            if isinstance(val, NonFiniteError):
                results.append(val)
                continue
            threshold, _ = squad.best_threshold(val.spans, val.questions)
            metrics = squad.evaluate(val.questions, squad.predictions(val.spans, threshold))
            results.append(held_out_result(metrics, val.loss()))
        return results

    @staticmethod
    def predict_together(runs: list) -> list[dict[str, Scored] | NonFiniteError]:
        """Each run's Scored "val" (its held-out windows) and "dev" (every dev window)."""
        data: SpanData = runs[0][0].data
        every = np.arange(data.splits["dev"].num_windows)
        asked = [(model, every, 2 * cfg.batch_size) for _, model, cfg in runs]
        devs = score_together(asked, data.splits["dev"], data.questions["dev"], runs[0][2].device)
        results: list[dict[str, Scored] | NonFiniteError] = []
        for val, dev in zip(_score_held_out(runs), devs, strict=True):
            failed = [scored for scored in (val, dev) if isinstance(scored, NonFiniteError)]
            results.append(failed[0] if failed else {"val": val, "dev": dev})
        return results

    def write_predicted(self, predicted: dict[str, Scored], out: str) -> dict:
        val = predicted["val"]
        threshold, _ = squad.best_threshold(val.spans, val.questions)
        metrics: dict = {}
        for name, split in predicted.items():
            preds = squad.predictions(split.spans, threshold)
            metrics[name] = squad.evaluate(split.questions, preds)
            squad.write_predictions(storage.join(out, f"{name}_predictions.json"), preds)
            squad.write_outputs(out, name, split.windows, split.logits())
        return metrics | {"no_answer_threshold": threshold}


def _score_held_out(runs: list) -> list[Scored | NonFiniteError]:
    """`score_together` of each run's held-out windows (of train), read once for all runs."""
    data: SpanData = runs[0][0].data
    asked = [(model, np.flatnonzero(ours.is_val), 2 * cfg.batch_size) for ours, model, cfg in runs]
    return score_together(asked, data.splits["train"], data.questions["train"], runs[0][2].device)


def span_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
) -> torch.Tensor:
    """BERT's SQuAD loss: (cross-entropy of the start + of the end position) / 2, each the mean
    over the windows. Logits (B, T), -inf at padding; positions (B,)."""
    start = nn.functional.cross_entropy(start_logits, start_positions)
    end = nn.functional.cross_entropy(end_logits, end_positions)
    return (start + end) / 2


@dataclass
class Scored:
    """A set of questions, their windows (in window-id order, `example_index` into
    `questions`), the windows' logits and the questions' best spans."""

    questions: list[squad.Example]
    windows: Windows
    start: np.ndarray  # (W, max_seq_length) float32, -inf beyond each window's tokens
    end: np.ndarray
    spans: list[squad.SpanPrediction]

    def loss(self) -> float:
        return span_loss(
            torch.from_numpy(self.start),
            torch.from_numpy(self.end),
            torch.from_numpy(self.windows.start_positions),
            torch.from_numpy(self.windows.end_positions),
        ).item()

    def logits(self) -> list[np.ndarray]:
        """Each window's (2, T) start and end logits over its real tokens (squad.write_outputs)."""
        return [
            np.stack([self.start[w, :t], self.end[w, :t]])
            for w, t in enumerate(self.windows.lengths)
        ]


def score_together(
    runs: list[tuple[nn.Module, np.ndarray, int]],
    split: SpanSplit,
    questions: list[squad.Example],
    device: str,
) -> list[Scored | NonFiniteError]:
    """For each (span adapter, storage rows of `split`, batch size): the windows at those rows,
    their logits and the best spans of their questions (`questions`: the split's, in file order;
    the result holds those with a window among the rows), or the NonFiniteError of a model whose
    logit of a real token is not finite. The split is read once for all of them."""
    asked = [asked_windows(split, rows, questions) for _, rows, _ in runs]
    in_order = [(run[0], rows, run[2]) for run, (rows, _, _) in zip(runs, asked, strict=True)]
    logits = window_logits_together(in_order, split, device)
    results: list[Scored | NonFiniteError] = []
    for (_, chosen, windows), got in zip(asked, logits, strict=True):
        if isinstance(got, NonFiniteError):
            results.append(got)
            continue
        start, end = got
        results.append(
            Scored(chosen, windows, start, end, squad.best_spans(chosen, windows, start, end))
        )
    return results


def asked_windows(
    split: SpanSplit, rows: np.ndarray, questions: list[squad.Example]
) -> tuple[np.ndarray, list[squad.Example], Windows]:
    """The storage `rows` of `split` in window-id order (build_features' order, as outputs
    files hold them), the questions they ask (file order) and their windows, `example_index`
    renumbered into those questions."""
    rows = rows[np.argsort(split.windows.window_ids[rows], kind="stable")]
    windows = split.windows.take(rows)
    asked = np.unique(windows.example_index)  # sorted: file order
    windows = replace(windows, example_index=np.searchsorted(asked, windows.example_index))
    return rows, [questions[i] for i in asked], windows


def held_out_rows(data: SpanData, fraction: float, seed: int) -> np.ndarray:
    """The storage rows of the train windows whose questions are of the held-out articles
    (squad.held_out_titles); ShardError when the train questions are of one article."""
    return article_rows(data, held_out_articles(data, fraction, seed))


def held_out_articles(data: SpanData, fraction: float, seed: int) -> list[str]:
    """The held-out articles (titles, file order) of `data`'s train questions
    (squad.held_out_titles); ShardError when the train questions are of one article."""
    try:
        return squad.held_out_titles(data.questions["train"], fraction, seed)
    except ValueError:
        raise ShardError(
            f"the {data.task} train windows under {data.embeddings} hold the questions of "
            "one article; holding out whole articles needs at least 2"
        ) from None


def article_rows(data: SpanData, titles: list[str]) -> np.ndarray:
    """The storage rows of the train windows whose questions are of the articles `titles`."""
    chosen = set(titles)
    held = np.asarray([q.title in chosen for q in data.questions["train"]])
    return np.flatnonzero(held[data.splits["train"].windows.example_index])


def trained_rows(data: SpanData, candidates: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(num train windows,) bool: the windows of the seeded `fraction` of the questions that
    have a window among `candidates` (bool, storage order); a question's windows stay together."""
    example_index = data.splits["train"].windows.example_index
    questions = nested_subset(np.unique(example_index[candidates]), fraction, seed)
    return candidates & np.isin(example_index, questions)


@torch.inference_mode()
def window_logits_together(
    runs: list[tuple[nn.Module, np.ndarray, int]], split: SpanSplit, device: str
) -> list[tuple[np.ndarray, np.ndarray] | NonFiniteError]:
    """For each (span adapter, storage rows of `split`, batch size): start and end logits, each
    (len(rows), max_seq_length) float32, -inf beyond each window's real tokens, computed in
    batches of windows of similar length; or the NonFiniteError of a model whose logit of a real
    token is NaN or infinite. The split is read once (pack by pack) for all of them; each model
    sees the batches it would see alone."""
    width = split.plan.max_seq_length
    logits = [
        (
            np.full((len(rows), width), -np.inf, np.float32),
            np.full((len(rows), width), -np.inf, np.float32),
        )
        for _, rows, _ in runs
    ]
    targets = []
    for _, rows, _ in runs:
        target = np.full(split.num_windows, -1)
        target[rows] = np.arange(len(rows))
        targets.append(target)
    for packed, storage_rows in split.data.packs(device):
        for (model, _, batch_size), (start, end), target in zip(runs, logits, targets, strict=True):
            local = np.flatnonzero(target[storage_rows] >= 0)
            local = local[np.argsort(packed.lengths[local], kind="stable")]  # little padding
            for begin in range(0, len(local), batch_size):
                chosen = local[begin : begin + batch_size]
                batch = packed.batch(chosen, device)
                batch_start, batch_end = model(batch)
                at = target[storage_rows[chosen]]
                start[at, : batch.width] = batch_start.float().cpu().numpy()
                end[at, : batch.width] = batch_end.float().cpu().numpy()
    results: list[tuple[np.ndarray, np.ndarray] | NonFiniteError] = []
    for (_, rows, _), (start, end) in zip(runs, logits, strict=True):
        real = np.arange(width)[None, :] < split.windows.lengths[rows][:, None]
        if np.isfinite(start[real]).all() and np.isfinite(end[real]).all():
            results.append((start, end))
        else:
            results.append(
                NonFiniteError(
                    f"the span adapter's logits on {split.data.name} are NaN or infinite: "
                    "training diverged; try a lower lr"
                )
            )
    return results
