"""Retry and cache policy shared by the tasks: retry what may pass next time, cache what is stored.

Prefect's default cache key includes the flow run id, so nothing is reused across runs. Our
tasks key on their inputs and source code instead (`INPUTS + TASK_SOURCE`), and only while the
task's output is still in storage: a cache entry never claims work that storage no longer holds.
Storage stays the record; the cache only saves the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from bertvision import storage

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
    """Whether a failed state's exception is worth another try."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except Exception:
        return False
    return False


class WhileStored(CachePolicy):
    """`INPUTS + TASK_SOURCE`, plus the content of the output's commit file, while it exists.

    `commit_file(inputs)` names the file a run writes last (a shard's commit record, a run's
    metrics.json). Missing file: no key, so the task runs. Present: the key also hashes the file,
    so output rewritten since the cache entry was made is not served from the cache. The call
    that first writes an output therefore stores no cache entry; the next one (which the core
    answers from storage) does, and later ones are cache hits.
    """

    def __init__(
        self, commit_file: Callable[[dict[str, Any]], str], base: CachePolicy | None = None
    ) -> None:
        self.commit_file = commit_file
        self.base = base or INPUTS + TASK_SOURCE

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        url = self.commit_file(inputs)
        if not storage.exists(url):
            return None
        key = self.base.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return None if key is None else hash_objects(key, storage.read_text(url))
