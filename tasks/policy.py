"""Retry and cache policy shared by the tasks: retry what may pass next time, cache what is stored.

Prefect's default cache key includes the flow run id, so nothing is reused across runs. Our
tasks key on their inputs and source code instead (`INPUTS + TASK_SOURCE`), and only while the
task's output is still in storage: a cache entry never claims work that storage no longer holds.
Storage stays the record; the cache only saves the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from bertvision import storage


def transient(task, task_run, state) -> bool:
    """Retry condition: retry infrastructure and I/O failures, never bad input.

    Bad input (DataError, ModelError, ShardError and other ValueErrors) fails the same way on
    every try, so retrying it only delays the report.
    """
    try:
        state.result()
    except (ValueError, TypeError, LookupError):
        return False
    except Exception:
        return True
    return False


class WhileStored(CachePolicy):
    """`INPUTS + TASK_SOURCE`, plus the content of the output's commit file, while it exists.

    `commit_file(inputs)` names the file a run writes last (a shard's commit record, a run's
    metrics.json). Missing file: no key, so the task runs. Present: the key also hashes the file,
    so output rewritten since the cache entry was made is not served from the cache.
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
