"""What a flow checks of its parameters before its first task: a flow run given a bad one (a
deployment run's `-p`) fails at once with one ConfigError naming it, nothing written.

The config classes check their own fields when Prefect builds them from the parameters; what is
left to the flow is what a template may leave empty (`require`) and its plain parameters.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from bertvision import config
from bertvision.config import ConfigError, require


def require_cfg(cfg: Any, *, but: tuple[str, ...] = ()) -> None:
    """ConfigError naming `cfg.<field>` for the first required field of the flow's `cfg` that is
    empty (`task`, `out`, the inputs), those in `but` aside."""
    try:
        require(cfg, but=but)
    except ConfigError as exc:
        raise ConfigError(f"cfg.{exc.field}", exc.message) from None


def check_at_least(minimum: int, **parameters: int) -> None:
    """ConfigError naming the first of the flow's plain `parameters` below `minimum`, as the
    config classes check their fields (config.check_at_least)."""
    config.check_at_least(SimpleNamespace(**parameters), minimum, *parameters)
