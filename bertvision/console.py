"""What long stages show on a terminal: progress bars on request, the libraries' logs on demand,
and how a command ends when stopped (SIGTERM unwinds like Ctrl-C: `terminated_as_exit`).

The core functions take `progress=`; the Prefect tasks pass `progress_wanted()`, true only in a
process whose environment has BERTVISION_PROGRESS=1. `bertvision run` sets it for itself and the
sweep's worker processes (which inherit the environment); a deployment's worker leaves it unset,
so flow runs there draw no bars into their logs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

PROGRESS = "BERTVISION_PROGRESS"
TERMINATED = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """SIGTERM as an exception (`terminated_as_exit`); uncaught, the process exits 143."""


@contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a scheduler stopping the job) raises Terminated inside the
    block, so it unwinds like Ctrl-C does: context managers and `finally` blocks run (a folder's
    lease let go at once rather than when it expires, a server stopped, staging removed), and
    the process exits with 143. A signal handler can only be set from the main thread: in any
    other the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> NoReturn:
        raise Terminated(TERMINATED)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be set back from here
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def progress_wanted() -> bool:
    """Whether this process draws progress bars (BERTVISION_PROGRESS=1)."""
    return os.environ.get(PROGRESS) == "1"


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """os.environ with `values` set, for this process and those it starts; restored at exit."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Only errors from transformers' logging (its weight-loading reports, the MISSING and
    UNEXPECTED tables printed on every load of a checkpoint), none of its progress bars, and no
    Python warnings but BERTVision's own (one line, `warning: ...`, on stderr), in this
    process and, through the environment (TRANSFORMERS_VERBOSITY, PYTHONWARNINGS), in the
    processes it starts; restored at exit."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    try:
        with (
            environment(TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore"),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module="bertvision")
            warnings.showwarning = _one_line
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as BERTVision's commands show one: `warning: ...` on stderr."""
    print(f"warning: {message}", file=file or sys.stderr)
