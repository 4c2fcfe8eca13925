"""Predictions of a run (fine-tuning, adapter, ensemble), in two forms:

    RUN/outputs/<split>.parquet      example_id int64, label, output list<float32>
                                     (class probabilities, or [score] for regression)
    RUN/<split>_predictions.tsv      GLUE submission format: `index<TAB>prediction`

The parquet outputs are what ensembles average; the TSV files are what GLUE's server takes.
Outputs files carry Parquet's page checksums (CRC32), which every reader verifies
(`write_outputs_table`, `read_outputs_table`; SQuAD's per-window logits go the same way).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertvision import storage
from bertvision.finite import require_finite_rows
from bertvision.glue import GlueTask
from bertvision.schema import label_type


def point_predictions(task: GlueTask, outputs: np.ndarray) -> np.ndarray:
    """Class indices (argmax of probabilities) or scores, from (N, C) outputs."""
    return outputs[:, 0] if task.regression else outputs.argmax(-1)


def submission_name(split: str) -> str:
    return f"{split}_predictions.tsv"


def write_predictions(
    run: str,
    task: GlueTask,
    split: str,
    example_ids: Sequence[int],
    labels: Sequence[int | float | None],
    outputs: np.ndarray,
) -> None:
    """Write RUN/outputs/<split>.parquet and the submission file of (N, C) `outputs`.

    Raises ValueError, writing nothing, when the outputs do not match the examples or any is NaN
    or infinite (or beyond float32).
    """
    outputs = np.asarray(outputs, dtype=np.float32)
    ids = np.asarray(example_ids, dtype=np.int64)
    if outputs.ndim != 2 or len(outputs) != len(ids):
        raise ValueError(f"outputs of shape {outputs.shape} do not match {len(ids)} examples")
    require_finite_rows(outputs, f"{run}: {split} outputs, so nothing was written")
    table = pa.table(
        {
            "example_id": pa.array(ids),
            "label": pa.array(list(labels), label_type(task.regression)),
            "output": pa.FixedSizeListArray.from_arrays(
                pa.array(outputs.ravel()), outputs.shape[1]
            ).cast(pa.list_(pa.float32())),
        }
    )
    write_outputs_table(table, run, split)
    predicted = point_predictions(task, outputs)
    lines = ["index\tprediction"]
    for example_id, value in zip(ids, predicted, strict=True):
        shown = f"{value:.3f}" if task.regression else task.labels[int(value)]
        lines.append(f"{example_id}\t{shown}")
    storage.write_text_atomic(storage.join(run, submission_name(split)), "\n".join(lines) + "\n")


def read_outputs(run: str, split: str) -> tuple[np.ndarray, list, np.ndarray]:
    """example_ids, labels and (N, C) outputs of one split of a run, sorted by example_id.
    FileNotFoundError when the run has none; FileFormatError naming the file when it is not an
    outputs file or its bytes are not those written; NonFiniteError naming it when an output
    is NaN or infinite."""
    url, table = read_outputs_table(run, split, ["example_id", "label", "output"])
    table = table.sort_by("example_id")
    outputs = np.stack(table.column("output").to_numpy(zero_copy_only=False)).astype(np.float32)
    require_finite_rows(outputs, f"outputs file {url}")
    return table.column("example_id").to_numpy(), table.column("label").to_pylist(), outputs


def write_outputs_table(table: pa.Table, run: str, split: str) -> None:
    """Write RUN/outputs/<split>.parquet whole or not at all, with page checksums."""
    sink = io.BytesIO()
    pq.write_table(table, sink, write_page_checksum=True)
    storage.write_bytes_atomic(storage.join(run, "outputs", f"{split}.parquet"), sink.getvalue())


def read_outputs_table(
    run: str, split: str, columns: list[str], what: str = "an outputs file"
) -> tuple[str, pa.Table]:
    """The URL of RUN/outputs/<split>.parquet and its `columns`, page checksums verified (files
    written before they had checksums read as before). FileNotFoundError when the run has no
    such file; FileFormatError naming it when it is not `what` (a column missing, not Parquet)
    or a page's bytes are not those written."""
    url = storage.join(run, "outputs", f"{split}.parquet")
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{run} has no {split} outputs (outputs/{split}.parquet)")
    with storage.translate_errors(url):
        # whole: outputs are small, and pyarrow reading a Python file object that fails a page
        # checksum sometimes aborts the process at exit
        data = fs.cat_file(path)
    try:
        table = pq.read_table(
            pa.BufferReader(data), columns=columns, page_checksum_verification=True
        )
    except (pa.ArrowException, KeyError, OSError) as exc:  # OSError: a failed page checksum
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        damaged = "checksum" in reason.lower()
        why = "its bytes changed since it was written" if damaged else f"not {what}"
        raise storage.FileFormatError(f"outputs file {url}: {reason} ({why})") from None
    return url, table


def read_submission(url: str, task: GlueTask) -> dict[int, int | float]:
    """A GLUE submission file back as example_id -> class index (or score)."""
    predictions = {}
    for line in storage.read_text(url).splitlines()[1:]:
        index, value = line.split("\t")
        predictions[int(index)] = float(value) if task.regression else task.labels.index(value)
    return predictions
