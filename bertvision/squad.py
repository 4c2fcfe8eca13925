"""SQuAD 2.0: loading, BERT's question/context windows, span post-processing and the official
evaluation.

    examples = load_split("dev", "data/squad")               # train-v2.0.json / dev-v2.0.json
    features = build_features(examples, load_tokenizer(model))
    spans = best_spans(examples, features, start_logits, end_logits)   # logits: (W, T)
    threshold, _ = best_threshold(spans_on_held_out_train, held_out_train_examples)
    preds = predictions(spans, threshold)                      # {question_id: text or ""}
    evaluate(examples, preds)                                  # the official dict, 0-100

The task-family seam: GLUE (bertvision.glue, metrics, predictions) and SQuAD offer the same
five things, so a later step can make both implement one protocol:

    load_split(split, data_dir=None) -> list[Example]   local folder or fsspec URL, else the hub
    build features(examples, tokenizer, ...)             model inputs plus what maps them back
                                                         (GLUE: one row per example; SQuAD: one
                                                         row per window, several per question)
    metrics(examples, predictions) -> dict[str, float]   GLUE: compute_metrics; SQuAD: evaluate
    predictions from model outputs                       GLUE: argmax / score per example;
                                                         SQuAD: best_spans + predictions
    a prediction file format                             GLUE: `index<TAB>label` TSV; SQuAD:
                                                         the official `{question_id: text}` JSON

Sources: the data format and the evaluation are those of the official SQuAD 2.0 files and
evaluation script (Rajpurkar, Jia and Liang 2018); the windows and the post-processing follow
Google's BERT `run_squad.py` (null score, n-best, maximum answer length, null-score threshold)
as written with a fast tokenizer in transformers' `run_qa.py` (overflowing tokens, offsets).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import string
import unicodedata
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bertvision import storage
from bertvision.finite import require_finite_rows, strict_loads
from bertvision.glue import DataError

# The official file of each split in a SQuAD data directory, and the hub's name for the split.
SPLIT_FILES = {"train": "train-v2.0.json", "dev": "dev-v2.0.json"}
HUB_NAME = "rajpurkar/squad_v2"
HUB_URL = f"hf://datasets/{HUB_NAME}"
_HUB_SPLITS = {"train": "train", "dev": "validation"}


@dataclass(frozen=True)
class Answer:
    text: str
    answer_start: int  # character index of `text` in the context


@dataclass(frozen=True)
class Example:
    """One question on one paragraph; `answers` is empty exactly when `is_impossible`."""

    question_id: str
    title: str  # the article's
    context: str
    question: str
    answers: tuple[Answer, ...]
    is_impossible: bool


# -- loading -----------------------------------------------------------------------------------


def load_split(split: str, data_dir: str | None = None) -> list[Example]:
    """The questions of `split` ("train" or "dev"), in file order.

    With `data_dir` (a local folder or fsspec URL) read from its official file
    (`train-v2.0.json`, `dev-v2.0.json`, see `load_file`); without, from the Hugging Face hub
    (`rajpurkar/squad_v2`, its "validation" split as "dev").
    Errors: ValueError for an unknown split; DataError for a missing or malformed file, or the
    hub unreachable.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown SQuAD split {split!r}; expected one of {', '.join(SPLIT_FILES)}")
    if data_dir is None:
        return _load_hub(split)
    url = split_source(split, data_dir)
    if not storage.exists(url):
        raise DataError(
            f"missing data file {url} (SQuAD 2.0 {split}); --data-dir names a folder holding "
            f"{' and '.join(SPLIT_FILES.values())}, or leave it out to read the hub"
        )
    return load_file(url)


def split_source(split: str, data_dir: str | None) -> str:
    """Where `load_split` reads `split`: its official file under `data_dir`, else the hub."""
    return HUB_URL if data_dir is None else storage.join(data_dir, SPLIT_FILES[split])


def load_file(url: str) -> list[Example]:
    """The questions of a SQuAD 2.0 JSON file (`{"data": [article, ...]}`), in file order.

    DataError naming the file and the problem for bytes that are not UTF-8, text that is not
    JSON, a JSON that is not SQuAD 2.0 (a missing or mistyped field, SQuAD 1.1's questions
    without `is_impossible`, answers that contradict `is_impossible`), an `answer_start` that
    does not point at the answer's text in the context, a blank context or answer text (white
    space and invisible characters only, `is_blank`), or a question id blank or used twice. A
    question is named by its place, `data[i].paragraphs[j].qas[k]`, and its id.
    """
    data = storage.read_bytes(url)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise DataError(
            f"malformed data file {url} line {line}: not UTF-8 text "
            f"(byte {exc.object[exc.start]:#04x})"
        ) from None
    try:
        document = strict_loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed data file {url}: not JSON: {exc.msg} (line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(f"malformed data file {url}: not SQuAD JSON (no 'data' list of articles)")
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for i, article in enumerate(document["data"]):
        where = f"data[{i}]"
        _require(article, where, url, title=str, paragraphs=list)
        for j, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{i}].paragraphs[{j}]"
            _require(paragraph, where, url, context=str, qas=list)
            for k, qa in enumerate(paragraph["qas"]):
                place = f"data[{i}].paragraphs[{j}].qas[{k}]"
                if isinstance(qa, dict) and "is_impossible" not in qa and "answers" in qa:
                    raise DataError(
                        f"malformed data file {url}: {place} has no 'is_impossible': "
                        "SQuAD 1.1, not SQuAD 2.0"
                    )
                _require(qa, place, url, id=str, question=str, answers=list, is_impossible=bool)
                if is_blank(qa["id"]):  # no id to key its prediction on
                    raise DataError(
                        f"malformed data file {url}: {place} has a blank 'id' {qa['id']!r}"
                    )
                where = f"{place} (id {qa['id']})"
                if qa["id"] in seen:
                    raise DataError(
                        f"malformed data file {url}: {where}: duplicate question id, "
                        f"already at {seen[qa['id']]}"
                    )
                seen[qa["id"]] = place
                answers = []
                for n, answer in enumerate(qa["answers"]):
                    _require(answer, f"{where} answers[{n}]", url, text=str, answer_start=int)
                    answers.append(Answer(answer["text"], answer["answer_start"]))
                example = Example(
                    question_id=qa["id"],
                    title=article["title"],
                    context=paragraph["context"],
                    question=qa["question"],
                    answers=tuple(answers),
                    is_impossible=qa["is_impossible"],
                )
                _check_answers(example, f"malformed data file {url}: {where}")
                examples.append(example)
    if not examples:
        raise DataError(f"malformed data file {url}: no questions")
    return examples


Articles = int | tuple[str, ...]


def write_slice(data_dir: str, out: str, **splits: tuple[Articles, int]) -> str:
    """A SQuAD data folder at `out` holding part of the one at `data_dir`, for quick runs:

        write_slice("squad/split", "small", train=(2, 5), dev=(("Rhine",), 3))

    per split given, `(articles, paragraphs)`: its first `articles` articles (0: all), or the
    articles of those titles, and of each its first `paragraphs` paragraphs (0: all). Returns
    `out`; DataError if a named article is not there."""
    for split, (articles, paragraphs) in splits.items():
        name = SPLIT_FILES[split]
        document = strict_loads(storage.read_text(storage.join(data_dir, name)))
        data = document["data"]
        if isinstance(articles, tuple):
            data = [a for a in data if a["title"] in articles]
            found = tuple(a["title"] for a in data)
            if found != articles:
                raise DataError(f"{data_dir}/{name}: articles {articles} not all there ({found})")
        elif articles:
            data = data[:articles]
        kept = [a | {"paragraphs": a["paragraphs"][: paragraphs or None]} for a in data]
        storage.write_text_atomic(
            storage.join(out, name), json.dumps({"version": document["version"], "data": kept})
        )
    return out


def _require(value: object, where: str, url: str, **fields: type) -> None:
    if not isinstance(value, dict):
        raise DataError(
            f"malformed data file {url}: {where} is a JSON {type(value).__name__}, not an object"
        )
    for name, kind in fields.items():
        if name not in value:
            raise DataError(f"malformed data file {url}: {where} has no {name!r}")
        # JSON true/false are Python bools, and bool is an int: an answer_start must not be one.
        ok = isinstance(value[name], kind) and (kind is bool or not isinstance(value[name], bool))
        if not ok:
            raise DataError(
                f"malformed data file {url}: {where} {name!r} is "
                f"{json.dumps(value[name])[:40]}, expected {_JSON_TYPES[kind]}"
            )


_JSON_TYPES = {str: "a string", list: "a list", int: "an integer", bool: "true or false"}


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: only white space and invisible characters (Unicode
    controls and format characters, e.g. a zero-width space), which tokenizers drop."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def _check_answers(example: Example, where: str) -> None:
    if example.is_impossible and example.answers:
        raise DataError(f"{where}: is_impossible is true but it has answers")
    if not example.is_impossible and not example.answers:
        raise DataError(f"{where}: is_impossible is false but it has no answers")
    for n, answer in enumerate(example.answers):
        if is_blank(answer.text):
            raise DataError(
                f"{where} answers[{n}]: the answer text {answer.text!r} is blank (white space "
                "or invisible characters only)"
            )
        found = example.context[answer.answer_start : answer.answer_start + len(answer.text)]
        if answer.answer_start < 0 or found != answer.text:
            raise DataError(
                f"{where} answers[{n}]: answer_start {answer.answer_start} does not point at "
                f"the answer text {answer.text!r} (the context there reads {found!r})"
            )
    if is_blank(example.context):  # unanswerable: an answer would be blank too
        raise DataError(f"{where}: its context {example.context!r} is blank")


def _load_hub(split: str) -> list[Example]:
    import datasets  # heavy; only real users without a data directory need it

    try:
        data = datasets.load_dataset(HUB_NAME, split=_HUB_SPLITS[split])
    except OSError as exc:  # ConnectionError offline; FileNotFoundError when not cached
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load SQuAD 2.0 {split} from the Hugging Face hub ({reason}); "
            f"pass --data-dir with a folder holding {SPLIT_FILES[split]}"
        ) from exc
    examples = []
    for n, row in enumerate(data):
        answers = tuple(
            Answer(text, start)
            for text, start in zip(
                row["answers"]["text"], row["answers"]["answer_start"], strict=True
            )
        )
        example = Example(
            question_id=row["id"],
            title=row["title"],
            context=row["context"],
            question=row["question"],
            answers=answers,
            is_impossible=not answers,
        )
        _check_answers(example, f"{HUB_URL} {split} row {n} (id {row['id']})")
        examples.append(example)
    return examples


# -- features: windows over the context --------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """The model inputs of W windows of T tokens (`[CLS] question [SEP] context part [SEP]`,
    padded on the right) and what maps them back to the questions.

    input_ids, attention_mask: (W, T) int64.
    token_type_ids: (W, T) int64, or None for a tokenizer that has none (RoBERTa).
    offsets: (W, T, 2) int32, [start, end) character offsets of each token in its question's
        context; -1 for question, special and padding tokens.
    start_positions, end_positions: (W,) int64, the token positions of the first answer within
        the window; both 0 (the CLS position) for an unanswerable question and for a window that
        does not hold the whole answer.
    example_index: (W,) int64, the index of the window's question in the examples given.
    window_index: (W,) int64, 0, 1, ... the window's place among its question's windows.
    question_ids: the W question ids (`examples[example_index[w]].question_id`).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    offsets: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    example_index: np.ndarray
    window_index: np.ndarray
    question_ids: list[str]

    def __len__(self) -> int:
        return len(self.question_ids)


def build_features(
    examples: list[Example],
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_question_length: int = 64,
) -> Features:
    """Split each question's context into windows of `max_length` tokens, BERT's recipe.

    A window holds `[CLS] question [SEP] context tokens [SEP]`, the question cut to its first
    `max_question_length` tokens. `doc_stride` is the number of context tokens consecutive
    windows share, as the fast tokenizer's `stride` (transformers' run_qa.py); Google's BERT
    took it for the step between window starts instead. The training target is the first
    answer. `tokenizer` is a fast tokenizer (offset mappings) padding on the right, as
    `bertvision.encoder.load_tokenizer` gives; its first token must be its CLS token.
    Errors: ValueError for a slow tokenizer, left padding, or lengths that leave no room for
    the context; DataError naming the question whose context gives no token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD features need a fast tokenizer (offset mappings)")
    if tokenizer.padding_side != "right":
        raise ValueError("SQuAD features need a tokenizer padding on the right (load_tokenizer)")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_length - max_question_length - specials
    if room <= doc_stride:
        raise ValueError(
            f"max_length {max_length} leaves {room} context tokens after a question of "
            f"{max_question_length} tokens; it must be more than doc_stride {doc_stride}"
        )
    questions = _truncated_questions(examples, tokenizer, max_question_length)
    encoded = tokenizer(
        questions,
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    example_index = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    if not np.all(input_ids[:, 0] == tokenizer.cls_token_id):
        raise ValueError("SQuAD features need a tokenizer whose first token is its CLS token")
    windows = len(example_index)
    offsets = np.full((windows, max_length, 2), -1, dtype=np.int32)
    starts = np.zeros(windows, dtype=np.int64)
    ends = np.zeros(windows, dtype=np.int64)
    window_index = np.zeros(windows, dtype=np.int64)
    for w in range(windows):
        if w > 0 and example_index[w] == example_index[w - 1]:
            window_index[w] = window_index[w - 1] + 1
        in_context = np.asarray([s == 1 for s in encoded.sequence_ids(w)])
        example = examples[example_index[w]]
        if not in_context.any():
            raise DataError(
                f"question {example.question_id}: its context tokenizes to nothing (no token "
                "the tokenizer keeps); a window needs at least one context token"
            )
        offsets[w][in_context] = np.asarray(encoded["offset_mapping"][w])[in_context]
        if example.answers:
            starts[w], ends[w] = _answer_tokens(offsets[w], in_context, example.answers[0])
    token_type_ids = encoded.get("token_type_ids")
    return Features(
        input_ids=input_ids,
        attention_mask=np.asarray(encoded["attention_mask"], dtype=np.int64),
        token_type_ids=None if token_type_ids is None else np.asarray(token_type_ids, np.int64),
        offsets=offsets,
        start_positions=starts,
        end_positions=ends,
        example_index=example_index,
        window_index=window_index,
        question_ids=[examples[i].question_id for i in example_index],
    )


def _truncated_questions(examples: list[Example], tokenizer, max_tokens: int) -> list[str]:
    """Each question up to the end of its `max_tokens`-th token; leading white space dropped
    (a few SQuAD questions start with a long run of it)."""
    questions = [ex.question.lstrip() for ex in examples]
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [
        q if len(spans) <= max_tokens else q[: spans[max_tokens - 1][1]]
        for q, spans in zip(questions, encoded["offset_mapping"], strict=True)
    ]


def _answer_tokens(offsets: np.ndarray, in_context: np.ndarray, answer: Answer) -> tuple[int, int]:
    """(start, end) token positions of `answer` in one window, (0, 0) if the window does not
    hold all of it. offsets: (T, 2), in_context: (T,) bool."""
    start_char, end_char = answer.answer_start, answer.answer_start + len(answer.text)
    context = np.flatnonzero(in_context)
    if offsets[context[0], 0] > start_char or offsets[context[-1], 1] < end_char:
        return 0, 0
    # The last token starting at or before the answer, the first one ending at or after it.
    start = context[np.flatnonzero(offsets[context, 0] <= start_char)[-1]]
    end = context[np.flatnonzero(offsets[context, 1] >= end_char)[0]]
    return int(start), int(end)


# -- post-processing: from logits to answers ---------------------------------------------------


@dataclass(frozen=True)
class SpanPrediction:
    """A question's best answer span over all its windows and its no-answer score.

    best_score: start + end logit of the best span; -inf when no window holds a valid span.
    null_score: start + end logit at the CLS position, the minimum over the windows (BERT's).
    """

    question_id: str
    best_text: str
    best_score: float
    null_score: float

    @property
    def null_margin(self) -> float:
        """null_score - best_score: the question is predicted unanswerable above a threshold."""
        return self.null_score - self.best_score


def best_spans(
    examples: list[Example],
    features: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[SpanPrediction]:
    """The best span of each question (in the order of `examples`), BERT's post-processing.

    features: squad.Features, or any windows with `example_index` (W,) and `offsets` (W, T, 2)
    (span_embeddings.Windows: stored windows). start_logits, end_logits: (W, T), one row per
    window of `features`, -inf where a window has no token. In each window the
    `n_best` highest start and end logits are paired; a pair counts if both tokens are context
    tokens, the end is not before the start and the span has at most `max_answer_length`
    tokens. Its score is start + end logit and its text the context between the start token's
    first and the end token's last character.
    Errors: ValueError for logits whose shape is not the features' (W, T).
    """
    shape = features.offsets.shape[:2]
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    for name, logits in (("start_logits", start_logits), ("end_logits", end_logits)):
        if logits.shape != shape:
            raise ValueError(f"{name} have shape {logits.shape}; the features' windows are {shape}")
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for w in range(len(features)):
        i = int(features.example_index[w])
        null[i] = min(null.get(i, np.inf), start_logits[w, 0] + end_logits[w, 0])
        span = _best_in_window(
            start_logits[w], end_logits[w], features.offsets[w], n_best, max_answer_length
        )
        if span is not None and span[0] > best.get(i, (-np.inf, ""))[0]:
            score, first, last = span
            best[i] = (score, examples[i].context[first:last])
    spans = []
    for i, example in enumerate(examples):
        if i not in null:
            raise ValueError(f"question {example.question_id} has no window in the features")
        score, text = best.get(i, (-np.inf, ""))
        spans.append(SpanPrediction(example.question_id, text, float(score), float(null[i])))
    return spans


def _best_in_window(
    start: np.ndarray, end: np.ndarray, offsets: np.ndarray, n_best: int, max_answer_length: int
) -> tuple[float, int, int] | None:
    """(score, first char, end char) of the window's best valid span among its n-best starts and
    ends; None if there is none. start, end: (T,) logits; offsets: (T, 2)."""
    starts = np.argsort(-start, kind="stable")[:n_best]
    ends = np.argsort(-end, kind="stable")[:n_best]
    s, e = np.meshgrid(starts, ends, indexing="ij")  # (n, n) candidate pairs
    valid = (
        (offsets[s, 0] >= 0) & (offsets[e, 0] >= 0) & (e >= s) & (e - s + 1 <= max_answer_length)
    )
    if not valid.any():
        return None
    scores = np.where(valid, start[s] + end[e], -np.inf)
    k = np.unravel_index(np.argmax(scores), scores.shape)
    return float(scores[k]), int(offsets[s[k], 0]), int(offsets[e[k], 1])


def predictions(spans: list[SpanPrediction], threshold: float = 0.0) -> dict[str, str]:
    """The official prediction format, {question_id: answer text}: "" (no answer) where
    null_score - best_score > threshold, the best span's text elsewhere."""
    return {s.question_id: "" if s.null_margin > threshold else s.best_text for s in spans}


def best_threshold(spans: list[SpanPrediction], examples: list[Example]) -> tuple[float, float]:
    """(threshold, F1 in percent): the no-answer threshold of `predictions` that maximises the
    official F1 on a labelled set, for the held-out slice of TRAIN (never dev).

    Sorting the questions by null margin, the thresholds between consecutive distinct margins
    are all the distinct choices; the one returned lies midway between the two margins it
    separates (below the smallest or at the largest at the ends). Of equal F1, the one answering
    fewest questions is taken. `spans` and `examples` hold the same questions.
    """
    gold = {ex.question_id: _gold_texts(ex) for ex in examples}
    if sorted(gold) != sorted(s.question_id for s in spans):
        raise ValueError("best_threshold needs a span prediction for exactly the examples' ids")
    margins = np.asarray([s.null_margin for s in spans])
    answered = np.asarray(
        [max(compute_f1(g, s.best_text) for g in gold[s.question_id]) for s in spans]
    )
    unanswered = np.asarray([max(compute_f1(g, "") for g in gold[s.question_id]) for s in spans])
    order = np.argsort(margins, kind="stable")
    margins = margins[order]
    # totals[k]: the F1 sum when the k questions of smallest margin are answered.
    totals = unanswered.sum() + np.concatenate([[0.0], np.cumsum((answered - unanswered)[order])])
    splittable = np.ones(len(totals), dtype=bool)
    splittable[1:-1] = margins[:-1] < margins[1:]
    k = int(np.argmax(np.where(splittable, totals, -np.inf)))
    finite = margins[np.isfinite(margins)]
    if k == 0:
        threshold = margins[0] - 1.0 if np.isfinite(margins[0]) else 0.0
    elif k == len(margins):
        threshold = finite[-1] if finite.size else 0.0
    elif np.isfinite(margins[k]):
        threshold = (margins[k - 1] + margins[k]) / 2.0
    else:
        threshold = margins[k - 1]
    return float(threshold), float(100.0 * totals[k] / len(spans))


def write_predictions(url: str, preds: Mapping[str, str]) -> None:
    """Write predictions as the official evaluation reads them: one JSON object of question id
    to answer text ("" for no answer)."""
    storage.write_json(url, dict(preds))


def read_predictions(url: str) -> dict[str, str]:
    """A prediction file: a JSON object of question id to answer text; DataError naming the file
    when it is not UTF-8 JSON of that shape."""
    try:
        preds = strict_loads(storage.read_text(url))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed prediction file {url}: not JSON: {exc.msg} (line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None
    if not isinstance(preds, dict):
        raise DataError(
            f"malformed prediction file {url}: a JSON {type(preds).__name__}, not an object of "
            "question id to answer text"
        )
    bad = [qid for qid, text in preds.items() if not isinstance(text, str)]
    if bad:
        raise DataError(
            f"malformed prediction file {url}: the prediction of {_some(bad)} is not a string"
        )
    return preds


# -- the official evaluation -------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, drop ASCII punctuation, drop the articles a, an,
    the (whole words), collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def compute_exact(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    """Token F1 of the normalised texts; 1 if both are empty, 0 if only one is."""
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(example: Example) -> list[str]:
    """The references a prediction is scored against: the answers that do not normalise to
    nothing, or [""] (only "no answer" is right) when none is left, as the official script."""
    return [a.text for a in example.answers if normalize_answer(a.text)] or [""]


def evaluate(examples: list[Example], preds: Mapping[str, str]) -> dict[str, float | int]:
    """The official SQuAD 2.0 scores of `preds` ({question_id: text, "" for no answer}).

    Each question scores the maximum exact match and F1 over its references (`_gold_texts`);
    the result has the official script's keys and order: exact, f1, total, then HasAns_* and
    NoAns_* for the questions with and without answers (each group only if it has questions),
    exact and f1 in percent. Unlike the official script, which prints "Missing prediction" and
    skips the question in `total` (and fails on the HasAns/NoAns subsets), predictions must be
    given for exactly the examples' questions: DataError naming unknown and missing ids.
    """
    known = {ex.question_id for ex in examples}
    unknown = [qid for qid in preds if qid not in known]
    missing = [ex.question_id for ex in examples if ex.question_id not in preds]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown question id(s) ({_some(unknown)})")
        if missing:
            parts.append(f"{len(missing)} question(s) without a prediction ({_some(missing)})")
        raise DataError(f"predictions do not match the questions: {'; '.join(parts)}")
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    for ex in examples:
        gold = _gold_texts(ex)
        exact[ex.question_id] = max(compute_exact(g, preds[ex.question_id]) for g in gold)
        f1[ex.question_id] = max(compute_f1(g, preds[ex.question_id]) for g in gold)
    result: dict[str, float | int] = _scores(exact, f1, [ex.question_id for ex in examples])
    for prefix, has_answer in (("HasAns", True), ("NoAns", False)):
        ids = [ex.question_id for ex in examples if bool(ex.answers) == has_answer]
        if ids:
            result |= {f"{prefix}_{k}": v for k, v in _scores(exact, f1, ids).items()}
    return result


def _scores(exact: dict[str, int], f1: dict[str, float], ids: list[str]) -> dict:
    return {
        "exact": 100.0 * sum(exact[k] for k in ids) / len(ids),
        "f1": 100.0 * sum(f1[k] for k in ids) / len(ids),
        "total": len(ids),
    }


def evaluate_files(gold_url: str, predictions_url: str) -> dict[str, float | int]:
    """`evaluate` of a prediction file against a SQuAD 2.0 data file; DataError naming the file
    for a malformed one, and the prediction file for unknown or missing ids."""
    examples = load_file(gold_url)
    preds = read_predictions(predictions_url)
    try:
        return evaluate(examples, preds)
    except DataError as exc:
        raise DataError(f"prediction file {predictions_url}: {exc}") from None


def _some(ids: list[str], shown: int = 5) -> str:
    more = f", ... {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


# -- the held-out slice of TRAIN ---------------------------------------------------------------


def held_out_titles(examples: list[Example], fraction: float, seed: int = 0) -> list[str]:
    """The articles (titles) of TRAIN held out for selection, in file order: whole articles, so
    that no article's questions are both trained on and selected on.

    `fraction` is of the articles (at least one, never all), in order of first appearance,
    drawn as glue.held_out_ids draws examples. ValueError for fewer than 2 articles; a
    UserWarning when the held-out articles hold more than twice `fraction` of the questions
    (few articles: one of three is a third of the questions).
    """
    from bertvision.glue import held_out_ids

    titles = list(dict.fromkeys(ex.title for ex in examples))
    if len(titles) < 2:
        raise ValueError(
            f"the SQuAD train questions ({len(examples)}) span {len(titles)} article(s); "
            "at least 2 are needed to hold one out (raise --max-train-examples)"
        )
    held_out = [titles[i] for i in held_out_ids(range(len(titles)), fraction, seed)]
    held = set(held_out)
    questions = sum(ex.title in held for ex in examples)
    if questions > 2 * fraction * len(examples):
        warnings.warn(
            f"--val-fraction {fraction:g} holds out {len(held_out)} of {len(titles)} articles: "
            f"{questions} of {len(examples)} train questions ({questions / len(examples):.0%}); "
            "with so few articles, raise --max-train-examples",
            stacklevel=1,  # the data's warning, attributed here, not to the caller's code
        )
    return held_out


def trained_titles(examples: list[Example], fraction: float, seed: int = 0) -> set[str]:
    """The articles (titles) that fine-tuning on the train questions `examples` trained on: those
    not held out (`held_out_titles`; its warning about few articles is the fine-tuning's, not
    repeated here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        held_out = set(held_out_titles(examples, fraction, seed))
    return {ex.title for ex in examples} - held_out


def data_fingerprint(examples: list[Example]) -> str:
    """16 hex digits of the questions' content (ids, texts, answers), in order."""
    digest = hashlib.sha256()
    for ex in examples:
        answers = [[a.text, a.answer_start] for a in ex.answers]
        fields = [ex.question_id, ex.title, ex.context, ex.question, answers, ex.is_impossible]
        digest.update(json.dumps(fields).encode())
    return digest.hexdigest()[:16]


# -- the task family (bertvision.families) -----------------------------------------------------

TASK_NAME = "squad2"


class SquadFamily:
    """SQuAD 2.0 as a task family: one training row per window, a span (start/end) head, the
    no-answer threshold chosen on the held-out articles of TRAIN, the official metrics.

    A fine-tuning run writes, besides the checkpoint:
        <split>_predictions.json    the official format, {question_id: text, "" for no answer}
        outputs/<split>.parquet     one row per window: question_id string, window_index int64,
                                    start_logits, end_logits list<float32> (its real tokens')
    for the splits "val" (the held-out articles) and "dev"; metrics.json has "val" and "dev"
    with the official keys (exact, f1, total, HasAns_*, NoAns_*) and "no_answer_threshold".
    """

    name = "squad"
    schema = "span"
    hub_url = HUB_URL
    max_seq_length = 384
    default_adapter = "span"
    baseline_name = "no answer to every question"

    def task_names(self) -> tuple[str, ...]:
        return (TASK_NAME,)

    def canonical_name(self, name: str) -> str | None:
        return TASK_NAME if name.lower() in (TASK_NAME, "squad_v2") else None

    def load_split(self, task: str, split: str, data_dir: str | None) -> list[Example]:
        return load_split(split, data_dir)

    def evaluated_splits(self, task: str, test: bool) -> tuple[str, ...]:
        return ("dev",)  # SQuAD 2.0's test set is hidden

    def primary_metric(self, task: str) -> str:
        return "f1"

    def metric_names(self, task: str) -> tuple[str, ...]:
        return ("exact", "f1")

    def report_metrics(self, task: str) -> tuple[str, ...]:
        return ("f1", "exact", "HasAns_f1", "HasAns_exact", "NoAns_f1", "NoAns_exact")

    def majority_baseline(self, task: str, data_dir: str | None) -> dict[str, float]:
        dev = load_split("dev", data_dir)
        return evaluate(dev, {ex.question_id: "" for ex in dev})  # the official keys, all

    def load_embeddings(self, task: str, embeddings: str, device: str, max_resident_gb: float):
        from bertvision.span_train import load_span_data

        return load_span_data(task, embeddings, device, max_resident_gb)

    def ensemble(self, task: str, runs: list[str], sweep: dict, out: str) -> dict:
        from bertvision.span_ensemble import span_ensemble

        return span_ensemble(
            task, runs, sweep["embeddings"], sweep["val_fraction"], sweep["val_seed"], out
        )

    def data_fingerprint(self, examples: list[Example]) -> str:
        return data_fingerprint(examples)

    def held_out(
        self, examples: list[Example], fraction: float, seed: int
    ) -> tuple[list[Example], list[Example]]:
        titles = set(held_out_titles(examples, fraction, seed))
        return (
            [ex for ex in examples if ex.title not in titles],
            [ex for ex in examples if ex.title in titles],
        )

    def model_head(self, task: str, model_path: str):
        import torch
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(model_path, dtype=torch.float32)

    def training_set(self, task: str, examples: list[Example], tokenizer, cfg) -> Windows:
        return Windows(_features(examples, tokenizer, cfg, "train"))

    def evaluate(
        self, task: str, model, tokenizer, splits: dict[str, list[Example]], cfg, progress=False
    ):
        from bertvision.families import Evaluation

        features = {
            s: _features(ex, tokenizer, cfg, "train" if s == "val" else s)
            for s, ex in splits.items()
        }
        logits = {
            s: window_logits(
                model, f, cfg.batch_size * 2, cfg.device, f"predict {s}" if progress else None
            )
            for s, f in features.items()
        }
        spans = {
            s: best_spans(splits[s], features[s], *_padded(logits[s], features[s])) for s in splits
        }
        threshold, _ = best_threshold(spans["val"], splits["val"])
        preds = {s: predictions(spans[s], threshold) for s in splits}
        metrics = {s: evaluate(splits[s], preds[s]) for s in splits}

        def write(url: str) -> None:
            for s in splits:
                write_outputs(url, s, features[s], logits[s])
                write_predictions(storage.join(url, f"{s}_predictions.json"), preds[s])

        return Evaluation(metrics, write, extra={"no_answer_threshold": threshold})


def _features(examples: list[Example], tokenizer, cfg, split: str) -> Features:
    """build_features of `examples`, read from `split` (a DataError names its file)."""
    try:
        return build_features(
            examples, tokenizer, cfg.max_seq_length, cfg.doc_stride, cfg.max_question_length
        )
    except DataError as exc:
        raise DataError(f"data file {split_source(split, cfg.data_dir)}: {exc}") from None


class Windows:
    """The windows of `features` as fine-tuning's training rows; a batch is cut after its
    longest window's last real token (padding is on the right, so nothing moves)."""

    def __init__(self, features: Features) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, rows: list[int], device: str) -> dict:
        import torch

        inputs = _window_inputs(self.features, np.asarray(rows), device)
        for name in ("start_positions", "end_positions"):
            inputs[name] = torch.from_numpy(getattr(self.features, name)[rows]).to(device)
        return inputs


def _window_inputs(features: Features, rows: np.ndarray, device: str) -> dict:
    import torch

    length = int(features.attention_mask[rows].sum(axis=1).max())
    arrays = {"input_ids": features.input_ids, "attention_mask": features.attention_mask}
    if features.token_type_ids is not None:
        arrays["token_type_ids"] = features.token_type_ids
    return {k: torch.from_numpy(v[rows, :length]).to(device) for k, v in arrays.items()}


def window_logits(
    model, features: Features, batch_size: int, device: str, bar: str | None = None
) -> list[np.ndarray]:
    """Each window's (2, length) start and end logits over its real tokens, float32, by a
    question-answering `model` in batches of `batch_size` windows; with a progress bar named
    `bar` if given. NonFiniteError if any is NaN or infinite."""
    import torch
    from tqdm.auto import tqdm

    from bertvision import encoder as enc
    from bertvision.finite import NonFiniteError

    lengths = features.attention_mask.sum(axis=1)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        batches = range(0, len(features), batch_size)
        for begin in tqdm(batches, desc=bar, unit="batch", disable=bar is None, leave=False):
            rows = np.arange(begin, min(begin + batch_size, len(features)))
            with enc.autocast(device):
                result = model(**_window_inputs(features, rows, device))
            both = torch.stack([result.start_logits, result.end_logits], 1).float().cpu().numpy()
            out.extend(both[i, :, : lengths[r]] for i, r in enumerate(rows))
    if not all(np.isfinite(x).all() for x in out):
        raise NonFiniteError(
            "the fine-tuned model's span logits are NaN or infinite; try a lower --lr"
        )
    return out


def _padded(logits: list[np.ndarray], features: Features) -> tuple[np.ndarray, np.ndarray]:
    """(W, T) start and end logits, -inf at the padding, as best_spans takes them."""
    start = np.full(features.input_ids.shape, -np.inf)
    end = np.full(features.input_ids.shape, -np.inf)
    for w, both in enumerate(logits):
        start[w, : both.shape[1]], end[w, : both.shape[1]] = both
    return start, end


def write_outputs(run: str, split: str, features: Features, logits: list[np.ndarray]) -> None:
    """RUN/outputs/<split>.parquet: question_id, window_index, start_logits, end_logits of each
    window (what ensembles of span models average). `features`: squad.Features, or stored
    windows (span_embeddings.Windows), one per (2, T) array of `logits`. NonFiniteError,
    writing nothing, when a logit is NaN or infinite."""
    import pyarrow as pa

    from bertvision.predictions import write_outputs_table

    require_finite_rows(logits, f"{run}: {split} start and end logits, so nothing was written")
    table = pa.table(
        {
            "question_id": pa.array(features.question_ids, pa.string()),
            "window_index": pa.array(features.window_index, pa.int64()),
            "start_logits": pa.array([x[0] for x in logits], pa.list_(pa.float32())),
            "end_logits": pa.array([x[1] for x in logits], pa.list_(pa.float32())),
        }
    )
    write_outputs_table(table, run, split)


def _register() -> None:
    from bertvision import families

    families.register(SquadFamily())


_register()
