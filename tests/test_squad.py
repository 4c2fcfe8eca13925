"""SQuAD 2.0: the real files load with their counts, malformed files are named precisely, the
windows and their offsets hold the answers, post-processing picks BERT's span, and the
evaluation agrees with the official script's."""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bertvision import squad
from bertvision.cli import app
from bertvision.encoder import default_model, load_tokenizer
from bertvision.glue import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model())


@pytest.fixture(scope="module")
def dev(squad_dir) -> list[squad.Example]:
    return squad.load_split("dev", squad_dir)


# -- the official evaluation, as the oracle -----------------------------------------------------
# The functions of the official SQuAD 2.0 evaluation script (evaluate-v2.0.py, Rajpurkar et al.,
# CC BY-SA 4.0), with the same names and logic: the reference the module's `evaluate` must match.


def official_make_qid_to_has_ans(dataset):
    return {
        qa["id"]: bool(qa["answers"])
        for article in dataset
        for p in article["paragraphs"]
        for qa in p["qas"]
    }


def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_get_tokens(s):
    if not s:
        return []
    return official_normalize_answer(s).split()


def official_compute_exact(a_gold, a_pred):
    return int(official_normalize_answer(a_gold) == official_normalize_answer(a_pred))


def official_compute_f1(a_gold, a_pred):
    gold_toks = official_get_tokens(a_gold)
    pred_toks = official_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def official_get_raw_scores(dataset, preds):
    exact_scores, f1_scores = {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [
                    a["text"] for a in qa["answers"] if official_normalize_answer(a["text"])
                ]
                if not gold_answers:
                    gold_answers = [""]
                if qid not in preds:
                    continue
                a_pred = preds[qid]
                exact_scores[qid] = max(official_compute_exact(a, a_pred) for a in gold_answers)
                f1_scores[qid] = max(official_compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def official_make_eval_dict(exact_scores, f1_scores, qid_list=None):
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict(
            [
                ("exact", 100.0 * sum(exact_scores.values()) / total),
                ("f1", 100.0 * sum(f1_scores.values()) / total),
                ("total", total),
            ]
        )
    total = len(qid_list)
    return collections.OrderedDict(
        [
            ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
            ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
            ("total", total),
        ]
    )


def official_evaluate(dataset, preds):
    """The official script's main() without a no-answer probability file."""
    qid_to_has_ans = official_make_qid_to_has_ans(dataset)
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = official_get_raw_scores(dataset, preds)
    out_eval = official_make_eval_dict(exact_raw, f1_raw)
    for prefix, qids in (("HasAns", has_ans_qids), ("NoAns", no_ans_qids)):
        if qids:
            sub = official_make_eval_dict(exact_raw, f1_raw, qid_list=qids)
            out_eval.update({f"{prefix}_{k}": v for k, v in sub.items()})
    return out_eval


def assert_same_scores(ours: dict, official: dict) -> None:
    assert list(ours) == list(official)
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


# -- loading ------------------------------------------------------------------------------------


def test_the_article_split_loads_with_its_counts(squad_dir):
    train = squad.load_split("train", squad_dir)
    dev = squad.load_split("dev", squad_dir)
    assert (len(train), sum(ex.is_impossible for ex in train)) == (9005, 4556)
    assert (len(dev), sum(ex.is_impossible for ex in dev)) == (2868, 1389)
    assert len({ex.question_id for ex in train + dev}) == 9005 + 2868
    assert {ex.title for ex in train}.isdisjoint({ex.title for ex in dev})  # split by article
    first = train[0]
    assert first.title == "Normans"
    assert first.question_id == "56ddde6b9a695914005b9628"
    assert first.question == "In what country is Normandy located?"
    assert first.answers[0] == squad.Answer("France", 159) and not first.is_impossible
    assert all(bool(ex.answers) != ex.is_impossible for ex in train + dev)


def test_a_data_dir_at_an_fsspec_url_is_read(squad_dir):
    local = squad.load_split("dev", squad_dir)
    assert squad.load_split("dev", f"file://{squad_dir}") == local


def test_without_a_data_dir_the_unreachable_hub_says_pass_data_dir(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"SQuAD 2.0 dev from the Hugging Face hub .*--data-dir"):
        squad.load_split("dev")


def test_an_unknown_split_and_a_missing_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown SQuAD split 'test'"):
        squad.load_split("test", str(tmp_path))
    with pytest.raises(DataError, match=r"missing data file .*train-v2.0.json"):
        squad.load_split("train", str(tmp_path))


CONTEXT = "The Normans gave their name to Normandy, a region in France."


def qa(qid="q1", answers=(("Normandy", 31),), **override) -> dict:
    """A question on CONTEXT; an answer is (text, answer_start), or its text (first occurrence)."""
    answers = [
        {"text": a, "answer_start": CONTEXT.index(a)}
        if isinstance(a, str)
        else {"text": a[0], "answer_start": a[1]}
        for a in answers
    ]
    return {"id": qid, "question": "Which region?", "answers": answers,
            "is_impossible": not answers} | override  # fmt: skip


def squad_json(*qas: dict, context: str = CONTEXT) -> dict:
    paragraph = {"context": context, "qas": list(qas)}
    return {"version": "v2.0", "data": [{"title": "Normans", "paragraphs": [paragraph]}]}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


BAD_FILES = {
    "not-utf8": (b'{"data": [{"title": "Caf\xe9"}]}', r"line 1: not UTF-8 text \(byte 0xe9\)"),
    "not-json": (b'{"data": [', r"not JSON: Expecting value \(line 1, column 11\)"),
    "no-data-list": ([squad_json()], r"not SQuAD JSON \(no 'data' list of articles\)"),
    "squad-1.1": (
        squad_json(without(qa(), "is_impossible")),
        r"data\[0\]\.paragraphs\[0\]\.qas\[0\] has no 'is_impossible': SQuAD 1.1, not SQuAD 2.0",
    ),
    "no-context": (
        {"data": [{"title": "T", "paragraphs": [{"qas": [qa()]}]}]},
        r"data\[0\]\.paragraphs\[0\] has no 'context'",
    ),
    "no-question": (squad_json(without(qa(), "question")), r"qas\[0\] has no 'question'"),
    "empty-id": (squad_json(qa("")), r"qas\[0\] has a blank 'id' ''"),
    "blank-id": (squad_json(qa(" ")), r"qas\[0\] has a blank 'id' ' '"),
    "answer-start-not-a-number": (
        squad_json(qa(answers=(("Normandy", "31"),))),
        r"qas\[0\] \(id q1\) answers\[0\] 'answer_start' is \"31\", expected an integer",
    ),
    "answer-start-off": (
        squad_json(qa(answers=(("Normandy", 30),))),
        r"qas\[0\] \(id q1\) answers\[0\]: answer_start 30 does not point at the answer text "
        r"'Normandy' \(the context there reads ' Normand'\)",
    ),
    "answer-beyond-context": (
        squad_json(qa(answers=(("France", 90),))),
        r"answer_start 90 does not point at the answer text 'France'",
    ),
    "duplicate-id": (
        squad_json(qa("q1"), qa("q1")),
        r"qas\[1\] \(id q1\): duplicate question id, "
        r"already at data\[0\]\.paragraphs\[0\]\.qas\[0\]",
    ),
    "impossible-with-answers": (
        squad_json(qa(is_impossible=True)),
        r"\(id q1\): is_impossible is true but it has answers",
    ),
    "possible-without-answers": (
        squad_json(qa(answers=(), is_impossible=False)),
        r"\(id q1\): is_impossible is false but it has no answers",
    ),
    "no-questions": ({"version": "v2.0", "data": []}, r"no questions"),
    "invisible-answer": (
        squad_json(
            {
                "id": "q1",
                "question": "What?",
                "is_impossible": False,
                "answers": [{"text": "\u200b", "answer_start": 1}],
            },
            context=" \u200b ",
        ),  # fmt: skip
        r"qas\[0\] \(id q1\) answers\[0\]: the answer text '\\u200b' is blank",
    ),
    "blank-answer": (
        squad_json(qa(answers=((" ", 3),))),
        r"qas\[0\] \(id q1\) answers\[0\]: the answer text ' ' is blank",
    ),
    "blank-context": (
        squad_json(qa(answers=()), context="\t\ufeff "),
        r"\(id q1\): its context '\\t\\ufeff ' is blank",
    ),
}


@pytest.mark.parametrize("content, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_malformed_file_is_named_with_its_problem(tmp_path, content, message):
    path = tmp_path / "dev-v2.0.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(DataError, match=rf"^malformed data file {re.escape(str(path))}.*{message}"):
        squad.load_split("dev", str(tmp_path))


# -- features: windows ------------------------------------------------------------------------


FILLER = "The cat sat on the mat and looked at the garden. " * 16
LONG_CONTEXT = FILLER + "The treasure lies in Marseille harbour. " + "The end came."


def long_example(answered: bool = True) -> squad.Example:
    answer = squad.Answer("Marseille harbour", LONG_CONTEXT.index("Marseille harbour"))
    return squad.Example(
        question_id="long",
        title="Treasure",
        context=LONG_CONTEXT,
        question="Where is the treasure?",
        answers=(answer,) if answered else (),
        is_impossible=not answered,
    )


def context_tokens(features: squad.Features, w: int) -> np.ndarray:
    """The (start, end) character offsets of window w's context tokens."""
    offsets = features.offsets[w]
    return offsets[offsets[:, 0] >= 0]


def test_a_long_context_gives_windows_that_share_doc_stride_tokens(tokenizer):
    features = squad.build_features([long_example()], tokenizer, max_length=128, doc_stride=32)
    assert len(features) == 2
    assert features.input_ids.shape == features.attention_mask.shape == (2, 128)
    assert features.token_type_ids.shape == (2, 128) and features.offsets.shape == (2, 128, 2)
    assert features.window_index.tolist() == [0, 1]
    assert features.example_index.tolist() == [0, 0]
    assert features.question_ids == ["long", "long"]
    first, second = context_tokens(features, 0), context_tokens(features, 1)
    assert first[0, 0] == 0 and second[-1, 1] == len(LONG_CONTEXT)  # the whole context, once
    np.testing.assert_array_equal(first[-32:], second[:32])  # doc_stride tokens shared
    # Each window is [CLS] question [SEP] context [SEP]; only the last one is padded.
    question_tokens = len(
        tokenizer("Where is the treasure?", add_special_tokens=False)["input_ids"]
    )
    assert len(first) == 128 - question_tokens - 3
    assert features.attention_mask[0].all() and not features.attention_mask[1].all()
    assert features.input_ids[:, 0].tolist() == [tokenizer.cls_token_id] * 2


def test_an_answer_only_the_second_window_holds_is_there_and_cls_in_the_first(tokenizer):
    features = squad.build_features([long_example()], tokenizer, max_length=128, doc_stride=32)
    assert (features.start_positions[0], features.end_positions[0]) == (0, 0)
    start, end = features.start_positions[1], features.end_positions[1]
    assert 0 < start <= end
    offsets = features.offsets[1]
    assert LONG_CONTEXT[offsets[start, 0] : offsets[end, 1]] == "Marseille harbour"


def test_an_unanswerable_question_points_at_cls_in_every_window(tokenizer):
    features = squad.build_features([long_example(answered=False)], tokenizer, 128, 32)
    assert features.start_positions.tolist() == features.end_positions.tolist() == [0, 0]


def test_offsets_are_minus_one_outside_the_context(tokenizer):
    features = squad.build_features([long_example()], tokenizer, max_length=128, doc_stride=32)
    for w in range(len(features)):
        is_context = features.offsets[w, :, 0] >= 0
        assert (features.offsets[w][~is_context] == -1).all()
        assert (features.token_type_ids[w][is_context] == 1).all()
        real = features.attention_mask[w].sum()
        # [CLS] question [SEP] before the context, [SEP] and padding after it
        assert not is_context[0] and not is_context[real - 1 :].any()


def test_a_long_question_is_cut_to_max_question_length_tokens(tokenizer):
    example = squad.Example(
        "q", "T", "Paris is in France.", "  " + "why " * 100 + "?", (), is_impossible=True
    )
    features = squad.build_features([example], tokenizer, max_length=64, max_question_length=10,
                                    doc_stride=8)  # fmt: skip
    assert len(features) == 1
    real = features.attention_mask[0] == 1
    assert (features.token_type_ids[0][real] == 0).sum() == 10 + 2  # [CLS] 10 tokens [SEP]
    assert tokenizer.decode(features.input_ids[0, 1:11]) == " ".join(["why"] * 10)


def test_a_context_that_tokenizes_to_nothing_is_refused_naming_the_question(tokenizer):
    """U+FFFD is not blank (load_file keeps it) but BERT's tokenizers drop it: no window may
    have no context token (the answer's token positions need one)."""
    kept = squad.Example("kept", "T", "Paris is in France.", "Where?", (), is_impossible=True)
    dropped = squad.Example(
        "q-fffd", "T", " \ufffd ", "What?", (squad.Answer("\ufffd", 1),), is_impossible=False
    )
    with pytest.raises(DataError, match=r"^question q-fffd: its context tokenizes to nothing"):
        squad.build_features([kept, dropped], tokenizer, max_length=64, doc_stride=8,
                             max_question_length=16)  # fmt: skip


def test_lengths_that_leave_no_room_for_the_context_are_refused(tokenizer):
    with pytest.raises(ValueError, match="max_length 100 leaves 33 context tokens"):
        squad.build_features([long_example()], tokenizer, max_length=100, doc_stride=64)


def test_token_spans_map_back_to_the_answer_text(dev, tokenizer):
    """For every answerable question of a sample, the window holding the answer points at it:
    exactly its text when it is whole words, else the fewest whole tokens around it (the
    rebuilt file's answer_start is the first occurrence, sometimes inside a longer word)."""
    sample = [ex for ex in dev if ex.answers][:400]
    features = squad.build_features(sample, tokenizer)
    held = set()
    for w in range(len(features)):
        start, end = features.start_positions[w], features.end_positions[w]
        if start == 0:
            continue
        example = sample[features.example_index[w]]
        answer = example.answers[0]
        text = example.context[features.offsets[w, start, 0] : features.offsets[w, end, 1]]
        first, last = answer.answer_start, answer.answer_start + len(answer.text)
        whole_words = (first == 0 or not example.context[first - 1].isalnum()) and (
            last == len(example.context) or not example.context[last].isalnum()
        )
        if whole_words:
            assert text == answer.text, example.question_id
        else:
            assert answer.text in text, example.question_id
        held.add(example.question_id)
    assert held == {ex.question_id for ex in sample}


# -- post-processing -------------------------------------------------------------------------


PARIS = "Paris is the capital and largest city of France, on the Seine."


def paris_features(tokenizer):
    example = squad.Example("p", "France", PARIS, "What is the capital of France?",
                            (squad.Answer("Paris", 0),), is_impossible=False)  # fmt: skip
    features = squad.build_features(
        [example], tokenizer, max_length=48, doc_stride=8, max_question_length=16
    )
    return example, features


def token_of(features: squad.Features, context: str, word: str, w: int = 0) -> int:
    """The position of the first context token of window w that starts `word`."""
    first = context.index(word)
    return int(np.flatnonzero(features.offsets[w, :, 0] == first)[0])


def logits_for(features, *pairs: tuple[int, int, float]):
    """Start and end logits of one window: 0 at CLS, -100 elsewhere but at each pair's start and
    end, which get half its score each."""
    start, end = (
        np.full(features.input_ids.shape, -100.0),
        np.full(features.input_ids.shape, -100.0),
    )
    start[0, 0] = end[0, 0] = 0.0
    for s, e, score in pairs:
        start[0, s] = score / 2
        end[0, e] = score / 2
    return start, end


def test_the_best_scoring_context_span_is_picked(tokenizer):
    example, features = paris_features(tokenizer)
    t = lambda word: token_of(features, PARIS, word)  # noqa: E731
    start, end = logits_for(
        features, (t("Paris"), t("Paris"), 8.0), (t("France"), t("France"), 6.0)
    )
    [span] = squad.best_spans([example], features, start, end)
    assert (span.question_id, span.best_text, span.best_score) == ("p", "Paris", 8.0)
    assert span.null_score == 0.0


def test_spans_outside_the_context_or_ending_before_they_start_are_skipped(tokenizer):
    example, features = paris_features(tokenizer)
    t = lambda word: token_of(features, PARIS, word)  # noqa: E731
    question_token = 3  # inside "What is the capital of France?"
    assert features.offsets[0, question_token, 0] == -1
    start, end = logits_for(
        features,
        (question_token, question_token, 20.0),  # the question: not an answer
        (t("France"), t("capital"), 15.0),  # ends before it starts
        (t("largest"), t("city"), 5.0),
    )
    [span] = squad.best_spans([example], features, start, end)
    assert span.best_text == "largest city"


def test_spans_longer_than_max_answer_length_are_skipped(tokenizer):
    example, features = paris_features(tokenizer)
    t = lambda word: token_of(features, PARIS, word)  # noqa: E731
    start, end = logits_for(
        features, (t("capital"), t("city"), 10.0), (t("Seine"), t("Seine"), 2.0)
    )
    [long] = squad.best_spans([example], features, start, end, max_answer_length=4)
    assert long.best_text == "capital and largest city"  # 4 tokens
    [short] = squad.best_spans([example], features, start, end, max_answer_length=3)
    assert short.best_text == "Seine"


def test_only_the_n_best_starts_and_ends_are_paired(tokenizer):
    example, features = paris_features(tokenizer)
    start, end = np.zeros(features.input_ids.shape), np.zeros(features.input_ids.shape)
    start[0, 2] = 9.0  # the best start and end are question tokens
    end[0, 2] = 9.0
    start[0, token_of(features, PARIS, "Paris")] = 1.0
    end[0, token_of(features, PARIS, "Paris")] = 1.0
    [one] = squad.best_spans([example], features, start, end, n_best=1)
    assert (one.best_text, one.best_score) == ("", float("-inf"))
    [two] = squad.best_spans([example], features, start, end, n_best=2)
    assert (two.best_text, two.best_score) == ("Paris", 2.0)


def test_the_best_span_over_windows_and_the_minimum_null_score(tokenizer):
    example = long_example()
    features = squad.build_features([example], tokenizer, max_length=128, doc_stride=32)
    start, end = np.zeros((2, 128)), np.zeros((2, 128))
    start[:, 0], end[:, 0] = [3.0, 1.0], [2.0, 0.5]  # null scores 5 and 1.5
    s, e = features.start_positions[1], features.end_positions[1]
    start[1, s], end[1, e] = 4.0, 4.0
    cat = token_of(features, LONG_CONTEXT, "cat")
    start[0, cat], end[0, cat] = 3.0, 3.0
    [span] = squad.best_spans([example], features, start, end)
    assert (span.best_text, span.best_score, span.null_score) == ("Marseille harbour", 8.0, 1.5)


def test_logits_of_another_shape_are_refused(tokenizer):
    example, features = paris_features(tokenizer)
    with pytest.raises(ValueError, match=r"start_logits have shape \(1, 47\)"):
        squad.best_spans([example], features, np.zeros((1, 47)), np.zeros((1, 48)))


def test_the_threshold_decides_no_answer():
    spans = [
        squad.SpanPrediction("a", "Paris", best_score=5.0, null_score=6.0),  # margin 1
        squad.SpanPrediction("b", "Rome", best_score=5.0, null_score=3.0),  # margin -2
        squad.SpanPrediction("c", "", best_score=float("-inf"), null_score=0.0),  # no span
    ]
    assert squad.predictions(spans) == {"a": "", "b": "Rome", "c": ""}
    assert squad.predictions(spans, threshold=1.0) == {"a": "Paris", "b": "Rome", "c": ""}
    assert squad.predictions(spans, threshold=-3.0) == {"a": "", "b": "", "c": ""}


def test_the_chosen_threshold_maximises_f1(dev):
    """On labelled questions with random span texts and margins, no other threshold scores a
    higher official F1 than the one chosen, and the F1 it reports is the official one."""
    rng = np.random.default_rng(0)
    sample = dev[:300]
    texts = [ex.answers[0].text for ex in sample if ex.answers]
    spans = [
        squad.SpanPrediction(
            ex.question_id,
            str(rng.choice(texts)) if rng.random() < 0.5 or not ex.answers else ex.answers[0].text,
            best_score=0.0,
            null_score=float(np.round(rng.normal() + (0.0 if ex.answers else 1.0), 1)),  # ties
        )
        for ex in sample
    ]
    threshold, f1 = squad.best_threshold(spans, sample)
    assert squad.evaluate(sample, squad.predictions(spans, threshold))["f1"] == pytest.approx(f1)
    margins = sorted({s.null_margin for s in spans})
    candidates = [margins[0] - 1, *margins, *(np.add(margins[1:], margins[:-1]) / 2)]
    others = [squad.evaluate(sample, squad.predictions(spans, t))["f1"] for t in candidates]
    assert f1 == pytest.approx(max(others))
    assert f1 > squad.evaluate(sample, squad.predictions(spans, 0.0))["f1"]


def test_predictions_are_written_in_the_official_format(tmp_path):
    preds = {"q1": "Normandy", "q2": ""}
    squad.write_predictions(str(tmp_path / "p.json"), preds)
    assert json.loads((tmp_path / "p.json").read_text()) == preds
    assert squad.read_predictions(str(tmp_path / "p.json")) == preds


# -- the official evaluation ---------------------------------------------------------------------


EDGE_CASES = squad_json(
    qa("plain", ("Normandy",)),
    qa("several", ("France", "a region in France", "region")),
    qa("impossible", ()),
    qa("article-only", ("The",)),  # normalises to nothing: only "" is right
    qa("punctuation", ("Normandy,",)),
    qa("twice", ("Normandy", "Normandy")),
)
EDGE_PREDICTIONS = [
    {
        "plain": "Normandy",
        "several": "region",
        "impossible": "",
        "article-only": "",
        "punctuation": "normandy",
        "twice": "the Normandy!",
    },  # fmt: skip
    {
        "plain": "in Normandy",
        "several": "a region",
        "impossible": "France",
        "article-only": "the",
        "punctuation": "",
        "twice": "Normandy region France",
    },  # fmt: skip
    {
        "plain": "",
        "several": "France, a region",
        "impossible": "",
        "article-only": "Normans",
        "punctuation": "Normandy , .",
        "twice": "An Normandy",
    },  # fmt: skip
]


@pytest.mark.parametrize("preds", EDGE_PREDICTIONS, ids=["right", "partial", "mixed"])
def test_evaluation_agrees_with_the_official_script_on_edge_cases(tmp_path, preds):
    (tmp_path / "gold.json").write_text(json.dumps(EDGE_CASES))
    examples = squad.load_file(str(tmp_path / "gold.json"))
    assert_same_scores(
        squad.evaluate(examples, preds), official_evaluate(EDGE_CASES["data"], preds)
    )


def perturbed_predictions(examples: list[squad.Example], seed: int) -> dict[str, str]:
    """Predictions of every kind: a reference as it is or with its case, punctuation, articles
    and white space changed, cut short, lengthened, another question's answer, or empty."""
    rng = np.random.default_rng(seed)
    others = [a.text for ex in examples for a in ex.answers]
    preds = {}
    for ex in examples:
        text = str(rng.choice([a.text for a in ex.answers])) if ex.answers else ""
        kind = rng.integers(8)
        if kind == 1:
            text = f"The {text.upper()}."
        elif kind == 2:
            text = "  " + text.replace(" ", " ,  ") + " an"
        elif kind == 3:
            text = " ".join(text.split()[: max(1, len(text.split()) // 2)])
        elif kind == 4:
            text = f"{text} and {rng.choice(others)}"
        elif kind == 5:
            text = str(rng.choice(others))
        elif kind == 6:
            text = ""
        preds[ex.question_id] = text
    return preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluation_agrees_with_the_official_script_on_the_dev_file(squad_dir, dev, seed):
    dataset = json.loads(Path(squad_dir, "dev-v2.0.json").read_text())["data"]
    preds = perturbed_predictions(dev, seed)
    ours = squad.evaluate(dev, preds)
    assert_same_scores(ours, official_evaluate(dataset, preds))
    assert 0 < ours["HasAns_f1"] < 100 and 0 < ours["NoAns_exact"] < 100


def test_gold_answers_score_100_and_empty_predictions_only_the_unanswerable(dev):
    gold = {ex.question_id: ex.answers[0].text if ex.answers else "" for ex in dev}
    assert squad.evaluate(dev, gold) == {
        "exact": 100.0,
        "f1": 100.0,
        "total": 2868,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 2868 - 1389,
        "NoAns_exact": 100.0,
        "NoAns_f1": 100.0,
        "NoAns_total": 1389,
    }
    empty = squad.evaluate(dev, dict.fromkeys(gold, ""))
    assert (empty["NoAns_exact"], empty["NoAns_f1"]) == (100.0, 100.0)
    assert (empty["HasAns_exact"], empty["HasAns_f1"]) == (0.0, 0.0)
    assert empty["exact"] == pytest.approx(100.0 * 1389 / 2868)


def test_unknown_and_missing_ids_are_named(dev):
    preds = {ex.question_id: "" for ex in dev[1:]} | {"nope": "x"}
    with pytest.raises(DataError, match=rf"1 unknown question id\(s\) \(nope\); 1 question\(s\) "
                       rf"without a prediction \({dev[0].question_id}\)"):  # fmt: skip
        squad.evaluate(dev, preds)


# -- the command ---------------------------------------------------------------------------------


def test_evaluate_squad_prints_the_official_keys(tmp_path, squad_dir, dev):
    preds = perturbed_predictions(dev, 0)
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    gold = str(Path(squad_dir, "dev-v2.0.json"))
    result = CliRunner().invoke(app, ["evaluate-squad", gold, str(tmp_path / "pred.json")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == squad.evaluate(dev, preds)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"q1": "x", "plain": "Normandy"}', r"1 unknown question id\(s\) \(q1\)"),
        ("{}", r"1 question\(s\) without a prediction \(plain\)"),
        ('["Normandy"]', "a JSON list, not an object of question id to answer text"),
        ('{"plain": null}', "the prediction of plain is not a string"),
        ('{"plain": ', "not JSON"),
    ],
    ids=["unknown-id", "missing-id", "not-an-object", "not-a-string", "not-json"],
)
def test_evaluate_squad_names_a_bad_prediction_file(tmp_path, content, message):
    from test_bad_input import assert_one_error

    (tmp_path / "gold.json").write_text(json.dumps(squad_json(qa("plain"))))
    (tmp_path / "pred.json").write_text(content)
    args = ["evaluate-squad", str(tmp_path / "gold.json"), str(tmp_path / "pred.json")]
    line = assert_one_error(CliRunner().invoke(app, args), "pred.json")
    assert re.search(message, line), line


def test_evaluate_squad_names_a_bad_gold_file(tmp_path):
    from test_bad_input import assert_one_error

    (tmp_path / "gold.json").write_text(json.dumps(squad_json(qa(answers=(("Normandy", 3),)))))
    (tmp_path / "pred.json").write_text('{"q1": ""}')
    args = ["evaluate-squad", str(tmp_path / "gold.json"), str(tmp_path / "pred.json")]
    assert_one_error(CliRunner().invoke(app, args), "gold.json", "answer_start 3")
