"""Ensembles of span models (SQuAD 2.0): SquadFamily.ensemble.

    scores = span_ensemble("squad2", [trial_a, trial_b, finetuned], "emb", 0.1, 0, "ENS")

Members are run folders with per-window logits, `outputs/val.parquet` (the windows of the
held-out articles of TRAIN) and `outputs/dev.parquet`, in squad.write_outputs' format (one row
per window: question_id, window_index, start_logits, end_logits over its real tokens): what
span adapters (span_train) and fine-tuned encoders (bertvision.finetune) write, in build_features'
window order. Every member must hold the same windows, window for window (the same questions,
the same number of windows each, of the same lengths): else one ValueError naming two members
that differ.

The ensemble's start and end logit of each token is the members' mean. Then the post-processing
of a single model (squad.best_spans: n-best starts and ends, at most 30 answer tokens, the best
span over each question's windows), with the no-answer threshold that maximises F1 on the
held-out slice (squad.best_threshold), never on dev. The windows' context offsets and the
questions come from the extraction the sweep trained on (span_train.load_span_data, without
the hidden states); the held-out slice is the sweep's (`val_fraction`, `val_seed`).

Written into the ensemble's folder: outputs/{val,dev}.parquet (the mean logits, the same
format: an ensemble can be a member of another), {val,dev}_predictions.json (official format,
every question of the split). Returns {"ensemble": dev metrics, "val": val metrics,
"no_answer_threshold": t}, the official keys (exact, f1, total, HasAns_*, NoAns_*).
"""

from __future__ import annotations

import numpy as np

from bertvision import span_train, squad, storage
from bertvision.finite import require_finite_rows
from bertvision.predictions import read_outputs_table

# The ensemble's splits and the extraction split holding their windows.
EXTRACTION_SPLITS = {"val": "train", "dev": "dev"}

Window = tuple[str, int]  # (question_id, window_index)


def read_window_logits(run: str, split: str) -> tuple[list[Window], list[np.ndarray]]:
    """The windows of RUN/outputs/<split>.parquet in file order and each one's (2, T) float32
    start and end logits. FileNotFoundError when the run has none; FileFormatError naming the
    file when it is not a span outputs file; NonFiniteError naming it when a logit is NaN or
    infinite."""
    columns = ["question_id", "window_index", "start_logits", "end_logits"]
    url, table = read_outputs_table(run, split, columns, "per-window logits")
    windows = list(
        zip(
            table.column("question_id").to_pylist(),
            table.column("window_index").to_pylist(),
            strict=True,
        )
    )
    start = table.column("start_logits").to_pylist()
    end = table.column("end_logits").to_pylist()
    logits = [np.asarray([s, e], dtype=np.float32) for s, e in zip(start, end, strict=True)]
    require_finite_rows(logits, f"outputs file {url}")
    return windows, logits


def average_window_logits(runs: list[str], split: str) -> tuple[list[Window], list[np.ndarray]]:
    """The windows the runs share and the mean of their (2, T) logits, window by window
    (float32, summed in float64). ValueError naming the first run and one that differs from
    it when the runs hold other windows (or the same windows with other lengths)."""
    windows, total = None, None
    for run in runs:
        theirs, logits = read_window_logits(run, split)
        if windows is None:
            windows, total = theirs, [x.astype(np.float64) for x in logits]
            continue
        difference = _first_difference(windows, [x.shape for x in total], theirs, logits)
        if difference:
            raise ValueError(
                f"ensemble members {runs[0]} and {run} hold different {split} windows "
                f"({len(windows)} and {len(theirs)}; {difference}); members must come from "
                "the same windows: the same data and max_seq_length, doc_stride, "
                "max_question_length"
            )
        for mine, x in zip(total, logits, strict=True):
            mine += x
    return windows, [(x / len(runs)).astype(np.float32) for x in total]


def _first_difference(
    windows: list[Window], shapes: list[tuple], theirs: list[Window], logits: list[np.ndarray]
) -> str:
    for w, (ours, other) in enumerate(zip(windows, theirs, strict=False)):  # the shorter's
        if ours != other:
            return f"window {w}: question {ours[0]} window {ours[1]} against {other[0]} {other[1]}"
        if shapes[w] != logits[w].shape:
            tokens = f"{shapes[w][1]} and {logits[w].shape[1]} tokens"
            return f"question {ours[0]} window {ours[1]}: {tokens}"
    return "" if len(windows) == len(theirs) else "one has more windows"


def span_ensemble(
    task: str, runs: list[str], embeddings: str, val_fraction: float, val_seed: int, out: str
) -> dict:
    """Average the member `runs`' window logits on val and dev, post-process, write into `out`
    (see the module); the scores. ValueError when the members' windows differ from each other
    or from the extraction's (naming the embeddings)."""
    data = span_train.load_span_data(task, embeddings, device="cpu", max_resident_gb=0)
    rows = {
        "val": span_train.held_out_rows(data, val_fraction, val_seed),
        "dev": np.arange(data.splits["dev"].num_windows),
    }
    scored = {}
    for name, source in EXTRACTION_SPLITS.items():
        split = data.splits[source]
        _, questions, windows = span_train.asked_windows(split, rows[name], data.questions[source])
        ids, logits = average_window_logits(runs, name)
        expected = list(zip(windows.question_ids, windows.window_index.tolist(), strict=True))
        lengths = [x.shape[1] for x in logits]
        if ids != expected or lengths != windows.lengths.tolist():
            raise ValueError(
                f"the members' {name} windows ({len(ids)}) are not those of the {task} "
                f"extraction under {embeddings} ({len(expected)}, held-out slice "
                f"{val_fraction} seed {val_seed}): members must come from its windows"
            )
        start, end = _padded(logits, split.plan.max_seq_length)
        spans = squad.best_spans(questions, windows, start, end)
        scored[name] = (questions, windows, logits, spans)
    threshold, _ = squad.best_threshold(scored["val"][3], scored["val"][0])
    metrics = {}
    for name, (questions, windows, logits, spans) in scored.items():
        preds = squad.predictions(spans, threshold)
        url = storage.join(out, f"{name}_predictions.json")
        squad.write_predictions(url, preds)
        metrics[name] = squad.evaluate(questions, squad.read_predictions(url))  # as written
        squad.write_outputs(out, name, windows, logits)
    return {"ensemble": metrics["dev"], "val": metrics["val"], "no_answer_threshold": threshold}


def _padded(logits: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, width) start and end logits, -inf beyond each window's tokens."""
    start = np.full((len(logits), width), -np.inf)
    end = np.full((len(logits), width), -np.inf)
    for w, both in enumerate(logits):
        start[w, : both.shape[1]], end[w, : both.shape[1]] = both
    return start, end
