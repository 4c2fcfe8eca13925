"""What a retried flow run does first: close the task runs its killed attempt left Running.

A flow-run process killed mid-task (`kill -9`, a lost node) cannot report its task runs' end, so
they stay Running; after `prefect flow-run retry` the flow run ends Completed around a task run
Running forever. Every flow calls `crash_stale_task_runs()` first: at that point no task run of
the current attempt has started, so every Running task run of the flow run is an earlier
attempt's, and it is set Crashed, as Prefect marks a flow run whose process died.
"""

from __future__ import annotations

from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed


def crash_stale_task_runs() -> list[str]:
    """In a retried flow run, before its first task: set every task run of the flow run still
    Running Crashed, with a message saying why; returns their names."""
    if flow_run.run_count <= 1:
        return []  # a first attempt: nothing ran before it
    with get_client(sync_client=True) as client:
        stale = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[UUID(flow_run.id)]),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])),
            )
        )
        for task_run in stale:
            message = (
                "crashed: still Running when its flow run was retried; the process of an "
                "earlier attempt ended without reporting (killed?)"
            )
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    if stale:
        get_run_logger().warning(
            "set Crashed, left Running by an earlier attempt: %s",
            ", ".join(run.name for run in stale),
        )
    return [run.name for run in stale]
