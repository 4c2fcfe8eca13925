"""Non-finite numbers (NaN, +-inf) never pass silently: results and JSON files (options: see
bertvision.config.check_finite).

    text = strict_json(data, indent=2)  # ValueError naming where a NaN sits, never a bare NaN
    data = strict_loads(text)           # json.JSONDecodeError at a bare NaN or Infinity

`NonFiniteError` is what a computation that produced NaN or infinity raises (a training run
that diverged, hidden states that overflow the stored dtype); callers that can carry on without
the result (a sweep trial) catch it.
"""

from __future__ import annotations

import json
import math
import re
from numbers import Real
from typing import Any

import numpy as np


class NonFiniteError(ValueError):
    """A computation produced NaN or infinity: training diverged, or values overflowed."""


def is_non_finite(value: Any) -> bool:
    """True for a real number (not a bool) that is NaN or infinite."""
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isfinite(value)


def require_finite_rows(rows: np.ndarray | list[np.ndarray], what: str) -> None:
    """NonFiniteError saying how many of `rows` (the rows of an array, or a list of arrays, one
    per example or window) hold a NaN or an infinity, and `what` they are: one such row makes an
    average, an argmax or a span search meaningless without a word."""
    bad = sum(not np.isfinite(row).all() for row in rows)
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {len(rows)} rows are NaN or infinite")


def held_out_result(metrics: dict, loss: float) -> tuple[dict, float] | NonFiniteError:
    """An epoch's validation (metrics, loss) on the held-out slice, or the NonFiniteError of a
    run whose loss there is NaN or infinite (outputs that overflow the loss while their argmax
    or correlation still scores): such a run diverged, as one whose training loss is."""
    if math.isfinite(loss):
        return metrics, loss
    return NonFiniteError(f"the held-out loss is {loss}: the outputs overflowed; try a lower lr")


def non_finite_path(data: Any, path: str = "") -> tuple[str, Any] | None:
    """Where the first NaN or infinity sits in nested dicts and lists: (path, value), or None."""
    if is_non_finite(data):
        return path or "the value", data
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list | tuple):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = non_finite_path(value, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def strict_json(data: Any, what: str = "JSON", **kwargs: Any) -> str:
    """`json.dumps(data, **kwargs)` that never writes the non-standard tokens NaN or Infinity,
    which strict parsers reject: a non-finite number is a ValueError naming `what` and where."""
    found = non_finite_path(data)
    if found is not None:
        raise ValueError(f"{what}: {found[0]} is {found[1]}; JSON holds only finite numbers")
    return json.dumps(data, allow_nan=False, **kwargs)


# The non-standard tokens Python's json module reads by default, outside strings.
_NON_FINITE_TOKEN = re.compile(r'(?<![\w"])(?:NaN|-?Infinity)(?![\w"])')


def strict_loads(text: str) -> Any:
    """`json.loads(text)` that refuses the non-standard tokens NaN, Infinity and -Infinity
    (which `json.loads` accepts) with a `json.JSONDecodeError` at the token, as for any other
    text that is not JSON: what the project reads is what strict parsers read. Nesting deeper
    than Python's recursion limit is a `json.JSONDecodeError` too, not a RecursionError."""

    def refuse(token: str) -> None:
        found = _NON_FINITE_TOKEN.search(text)
        raise json.JSONDecodeError(
            f"{token} is not a JSON number (JSON holds only finite numbers)",
            text,
            found.start() if found else 0,
        )

    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
