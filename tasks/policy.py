"""Retry and cache policy shared by the tasks: retry what may pass next time, cache what is stored.

Prefect's default cache key includes the flow run id, so nothing is reused across runs. Our
tasks key on their inputs and source code instead (`INPUTS + TASK_SOURCE`), on the content of
what their inputs name by URL (the model's weights, the embeddings, the sweep's trials), and only
while the task's output is still in storage: a cache entry never claims work that storage no
longer holds, nor a result made from other content at the same URLs. Storage stays the record;
the cache only saves the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from bertvision import runs, shards

# Failures that may pass on the next try: storage or network unreachable (StorageUnavailable is a
# ConnectionError), a call that timed out, a GPU shared with another process running out of
# memory. Bad input (DataError, ModelError, ShardError, ValueError) and bugs fail the same way
# every time, so retrying them only delays the report.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, torch.OutOfMemoryError)

# Storage hiccups pass in seconds; a node coming back takes a minute.
RETRY = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),  # 10 s, 20 s, 40 s
    retry_jitter_factor=0.5,
    retry_condition_fn=lambda task, task_run, state: transient(state),
)


def transient(state) -> bool:
    """Whether a failed state's exception is worth another try: one of TRANSIENT_ERRORS, or an
    error that says it is (`transient` True: a shard group in which such an error failed a
    shard)."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except Exception as exc:
        return getattr(exc, "transient", False) is True
    return False


class WhileStored(CachePolicy):
    """`INPUTS + TASK_SOURCE`, plus what identifies the task's output while storage holds it
    whole, plus the content key of the inputs.

    `stored(inputs)` is the output's commit record while the output is stored in full, judged by
    metadata alone (a shard: its record and its file of the recorded size and hash,
    `committed_shard`; a run folder: its commit record and every file it lists, `committed_run`;
    a trial: its trial.json while its run is stored whole, `sweep.stored_trial`), and None
    otherwise. None: no key, so the task runs
    and the core redoes what is gone. Otherwise the key also hashes the record, so output
    rewritten since the cache entry was made is not served from the cache. The call that first
    writes an output therefore stores no cache entry; the next one (which the core answers from
    storage) does, and later ones are cache hits.

    `content_key(inputs)` is the stage's own content identity of its inputs as stored now (the
    core's key of a run, e.g. `train.content_key`): the inputs name embeddings or a model by URL,
    and the same URL may hold other content since. Other content, another cache key: the task
    runs, and the core refuses (other inputs need overwrite) or redoes the work. None where the
    inputs already carry their content (an extraction plan holds its key).
    """

    def __init__(
        self,
        stored: Callable[[dict[str, Any]], Any],
        content_key: Callable[[dict[str, Any]], str] | None = None,
        base: CachePolicy | None = None,
    ) -> None:
        self.stored = stored
        self.content_key = content_key
        self.base = base or INPUTS + TASK_SOURCE

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        record = self.stored(inputs)
        if record is None:
            return None
        key = self.base.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        if key is None:
            return None
        content = self.content_key(inputs) if self.content_key is not None else None
        return hash_objects(key, record, content)


def committed_shard(inputs: dict[str, Any]) -> str | None:
    """The commit record (JSON: its file's size and sha256 among the rest) of shard
    `inputs["index"]` of `inputs["plan"]` under `inputs["cfg"].out` while that shard is committed
    in full (shards.is_committed: its file's size, and the sha256 its blob's metadata keeps);
    None otherwise. Metadata only: no shard is read."""
    cfg, plan = inputs["cfg"], inputs["plan"]
    folder = shards.split_url(cfg.out, plan.task, plan.split)
    record = shards.load_record(folder, plan, inputs["index"])
    return record.to_json() if shards.is_committed(folder, record) else None


def committed_run(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The commit record of the run folder `inputs["cfg"].out` while every file it lists is
    stored (runs.stored_record: one listing); None otherwise."""
    return runs.stored_record(inputs["cfg"].out)
