"""Seeded randomness that does not depend on what other threads do.

torch's global random generator is one per process: two runs on threads of one process (sweep
trials, Prefect's thread task runner) draw from it in an interleaved order that changes from run
to run. So adapter training never draws from it while training: weights are initialised inside
`seeded(seed)`, and dropout draws from a per-run generator (`adapters.Dropout`). Work that
cannot avoid the global generator for long (the dropout of Hugging Face models while
fine-tuning) holds `seeded` for its whole run, so such runs take turns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_GLOBAL_RNG = threading.RLock()


@contextmanager
def seeded(seed: int, device: str = "cpu") -> Iterator[None]:
    """torch's global generator (CPU, and `device` when it is a GPU) seeded with `seed` inside
    the block, with no other `seeded` block running meanwhile; its state before is restored
    after, so the caller's own random draws are left as they were."""
    devices = []
    if device.startswith("cuda"):
        index = torch.device(device).index
        devices = [torch.cuda.current_device() if index is None else index]
    with _GLOBAL_RNG, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def nested_subset(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The seeded `fraction` of `ids` (sorted; at least one): a prefix of one seeded
    permutation, so for one seed the subset of a smaller fraction is part of a larger one's
    (learning curves compare like with like). `fraction` 1 gives all of `ids`."""
    ids = np.sort(np.asarray(ids))
    count = max(1, round(fraction * len(ids)))
    return np.sort(np.random.default_rng(seed).permutation(ids)[:count])
