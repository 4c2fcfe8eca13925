"""Names of flow runs, task runs and artifacts: the work, then `@` and where its output goes.

    extract-rte@runs/emb          the flow run extracting RTE into runs/emb
    rte-train-shard-0007@runs/emb one shard task run of it
    extract-rte-runs-emb-shards   the key of its shard table (keys allow a-z, 0-9 and dashes)

Four extractions of one task into four folders are told apart by name, in the UI and in the
Artifacts page, without opening their parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

OUTPUT_PARTS = 2  # the last folders of an output URL that a name shows


def where(url: str, parts: int = OUTPUT_PARTS) -> str:
    """The last `parts` folders of an output URL: `/data/runs/rte/emb` -> `rte/emb`,
    `az://embeddings/minilm` -> `embeddings/minilm`."""
    path = url.split("://", 1)[-1].rstrip("/")
    return "/".join(path.split("/")[-parts:]) or url


def run_name(work: str, out: str) -> str:
    """`work@where(out)`."""
    return f"{work}@{where(out)}"


def _cfg_out(parameters: dict[str, Any]) -> str:
    return parameters["cfg"].out


def shard_number(index: int, num_shards: int) -> str:
    """Shard `index` zero-padded to at least 4 digits and to the digits of the extraction's last
    shard, so one extraction's names sort in shard order: 7 of 20 -> `0007`, 7 of 12,000 ->
    `00007`, 10,000 of 12,000 -> `10000`."""
    return f"{index:0{max(4, len(str(num_shards - 1)))}d}"


def task_run_name(
    work: str | Callable[[dict[str, Any]], str], out: Callable[[dict[str, Any]], str] = _cfg_out
) -> Callable[..., str]:
    """A `task_run_name`: `work` formatted with the task's parameters (`{cfg.task}`,
    `{index:04d}`), or a function of them, then `@` and the output's last folders (`cfg.out`
    unless `out` says)."""

    def name(parameters: dict[str, Any]) -> str:
        text = work(parameters) if callable(work) else work.format(**parameters)
        return run_name(text, out(parameters))

    return name


def flow_run_name(
    work: str | Callable[[dict[str, Any]], str], out: Callable[[dict[str, Any]], str] = _cfg_out
) -> Callable[[], str]:
    """A `flow_run_name`: like `task_run_name`, from the flow run's validated parameters (the
    config dataclass `cfg`); `work` may also be a function of the parameters."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        text = work(parameters) if callable(work) else work.format(**parameters)
        return run_name(text, out(parameters))

    return name


def artifact_key(*parts: str) -> str:
    """A valid artifact key of `parts`: lowercase letters, digits and single dashes only
    (Prefect's rule), e.g. ("extract", "rte", where("runs/emb"), "shards") ->
    `extract-rte-runs-emb-shards`."""
    text = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
