"""Run records: what every stage writes about one run, in one shape.

    {"kind": "train",                        # finetune, extract, train, sweep, trial, ensemble
     "key": "3f0c...",                       # the run's own content key
     "settings": {...},                      # the stage's config, dataclasses.asdict
     "inputs": {"embeddings/train": {"url": "emb/rte/train", "key": "<extraction key>"}, ...},
     "code": {"version": "0.1.0", "git_commit": "9a1b...", "dirty": false},
     "timings": {"started_at": ..., "finished_at": ..., "seconds": ..., "train_seconds": ...},
     "files": [...], "worker": "host:pid", "committed_at": ...,
     "finetuned_encoder": {}}                # see below

Where each stage keeps it:

    run folders (finetune, train, trial, ensemble)  OUT/_commit.json, the commit record written
                                                    last (bertvision.runs.StagedRun.commit)
    sweeps                                          SWEEP/_commit.json, rewritten with trials.jsonl
    extractions, one per task/split                 OUT/<task>/<split>/_manifest/run.json, once
                                                    the split is complete and verified

`inputs` names what the run read, each by URL and by content key (a fingerprint, an extraction
key, another run's key), so a record says where a result came from even after the URLs moved.
`code` says which code made it: never part of any content key, so the same content made by
another commit is still reused.

`finetuned_encoder` describes an encoder that a BERTVision fine-tuning made (bertvision.finetune.
FinetunedEncoder: its fingerprint and what it was fine-tuned on): in a "finetune" record the one
it made, in an "extract" record the one it read (copied from that fine-tuning's record when the
fingerprints agree), so that adapter training can refuse to select on examples the encoder
trained on. Empty in every other record, and in records written before it was kept.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from bertvision import __version__, storage
from bertvision.finite import strict_json

KINDS = ("finetune", "extract", "train", "sweep", "trial", "ensemble")


def now() -> str:
    """The current UTC time, ISO 8601 to the second: the timestamps of every record."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def _code() -> tuple[str, str, bool]:
    source = Path(__file__).resolve().parent.parent  # the folder holding the package
    try:
        found = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        top, commit = found.stdout.splitlines() if found.returncode == 0 else ("", "")
        if not top or Path(top).resolve() != source:  # a venv or an install inside another repo
            return __version__, "", False
        changed = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return __version__, commit, changed.returncode == 0 and bool(changed.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):  # no git, odd output, a hang
        return __version__, "", False


def code_info() -> dict[str, Any]:
    """The code that runs: {"version": the installed package's version (bertvision.__version__),
    "git_commit": the commit of the source checkout the package is imported from ("" when it
    is not one: an installed wheel, no git), "dirty": whether that checkout has uncommitted
    changes to tracked files}. Asked of git once per process; never raises."""
    version, commit, dirty = _code()
    return {"version": version, "git_commit": commit, "dirty": dirty}


def make_timings(started_at: str, finished_at: str, seconds: float, **stage: float) -> dict:
    """started_at, finished_at (ISO UTC), seconds between them, and stage-specific seconds
    (`train_seconds`, `shard_seconds`, ...), rounded to milliseconds."""
    return {
        "started_at": started_at,
        "finished_at": finished_at,
        "seconds": round(seconds, 3),
        **{name: round(value, 3) for name, value in stage.items()},
    }


class Stopwatch:
    """The timings of a run done in this process: started when made."""

    def __init__(self) -> None:
        self.started_at = now()
        self._started = time.perf_counter()

    def timings(self, **stage: float) -> dict:
        return make_timings(self.started_at, now(), time.perf_counter() - self._started, **stage)


def input_of(url: str, key: str) -> dict[str, str]:
    """One entry of `inputs`: where the input was read and its content key."""
    return {"url": url, "key": key}


@dataclass(frozen=True)
class RunRecord:
    """One run of one stage (see the module). `files`, `worker` and `committed_at` are filled
    by whoever writes it (runs.StagedRun.commit for run folders)."""

    kind: str
    key: str
    settings: dict[str, Any]
    inputs: dict[str, dict[str, str]]
    timings: dict[str, Any]
    code: dict[str, Any] = field(default_factory=code_info)
    files: list[str] = field(default_factory=list)
    worker: str = ""
    committed_at: str = ""
    finetuned_encoder: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown run kind {self.kind!r}; expected one of {KINDS}")

    def to_json(self) -> str:
        return strict_json(asdict(self), f"{self.kind} run record", indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], url: str) -> RunRecord:
        """The record in `data` (read from `url`); FileFormatError naming `url` if it is not one."""
        names = {f.name for f in fields(cls)}
        try:
            record = cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as exc:  # a missing field, an unknown kind
            raise storage.FileFormatError(f"{url} is not a run record: {exc}") from None
        for name in ("settings", "inputs", "finetuned_encoder"):
            if not isinstance(getattr(record, name), dict):
                raise storage.FileFormatError(f"{url} is not a run record: {name!r} is no object")
        return record


def write_record(url: str, record: RunRecord) -> None:
    storage.write_text_atomic(url, record.to_json() + "\n")


def read_record(url: str) -> RunRecord | None:
    """The run record at `url`; None when there is none, or when it is a commit record written
    before run records (only "key" and "files", no "kind"). FileFormatError naming `url` when
    it is garbled."""
    if not storage.exists(url):
        return None
    data = storage.read_json(url, keys=("key",))
    return RunRecord.from_dict(data, url) if "kind" in data else None
