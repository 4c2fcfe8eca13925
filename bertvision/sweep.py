"""Hyperparameter sweeps of an adapter with hyperopt's TPE, resumable from storage.

Layout of one sweep under its URL (any fsspec URL):

    SWEEP/sweep.json               what this sweep is: settings, resolved search space, key
    SWEEP/trials/0003/             trial 3's run folder (what `train_adapter` writes)
    SWEEP/trials/0003/trial.json   trial 3's record, written last: the trial's commit point
    SWEEP/trials.jsonl             every finished trial, one JSON object a line, sorted
    SWEEP/_commit.json             the sweep's run record (bertvision.records), kind "sweep",
                                   rewritten with trials.jsonl when the trials changed; each
                                   trial's run folder has its own, kind "trial", naming the
                                   sweep among its inputs

The loop, which `run_sweep` runs and the `sweep` flow spells out with Prefect tasks:

    prepare_sweep(cfg)                               # validate; write or check sweep.json
    while batch := suggest_trials(cfg):              # TPE's next K points
        for spec in batch:                           # in parallel
            run_trial(cfg, spec)                     # train; commit trial.json
        record_trials(cfg)                           # rewrite trials.jsonl if it changed

Honest selection: TPE minimises minus the primary metric on the validation slice held out from
TRAIN (one slice for every trial, `val_seed`); the dev metrics are recorded for the report and
never read by TPE or by the ensemble. On the embeddings of an encoder fine-tuned by BERTVision,
a slice holding examples that encoder trained on (another `val_fraction` or `val_seed` than the
fine-tuning's, or embeddings of other train examples) is refused before anything is written
(train.check_held_out_unseen).

One writer: `run_sweep` (and the sweep flow) hold the sweep folder's lease (bertvision.runs)
while they run trials, so a second sweep on the same folder stops at once with FolderBusy.

Resuming: storage is the record. A trial with a trial.json of this sweep's key (the content
identity of its settings and embeddings) is finished and never run again; each
suggestion is made from the finished trials (hyperopt's history is rebuilt from their records),
so a sweep killed at any point continues at its first unfinished trial and TPE still learns from
everything done before. Trials are suggested in batches of K = `parallel`, each batch from the
trials before it (K draws of TPE's candidates, seeded per trial), which is what lets K trials
run at once, and what makes a trial's point the same however the sweep was interrupted. A sweep
whose trials are all finished, run again with the same settings, is only read: its summary
comes from storage and nothing is written, not even the lease (`finished_sweep`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from functools import lru_cache, partial
from typing import Any

import numpy as np

from bertvision import __version__, records, runs, storage
from bertvision.config import SweepConfig, require
from bertvision.families import get_task
from bertvision.finite import NonFiniteError, is_non_finite, strict_json, strict_loads

SWEEP_FILE = "sweep.json"
TRIALS_FILE = "trials.jsonl"
TRIALS_DIR = "trials"
TRIAL_RECORD = "trial.json"

# Search spaces: parameter name -> a constant, or {kind: arguments}. Names are TrainConfig fields.
#   {"loguniform": [low, high]}   log-uniform between low and high
#   {"uniform": [low, high]}
#   {"quniform": [low, high, q]}  uniform rounded to a multiple of q (an int when all are ints)
#   {"randint": [low, high]}      an integer in [low, high)
#   {"choice": [a, b, ...]}
DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "randint", "choice")

COMMON_SPACE: dict[str, Any] = {  # what every adapter is trained with
    "lr": {"loguniform": [1e-4, 1e-2]},
    "weight_decay": {"loguniform": [1e-6, 1e-1]},
    "dropout": {"uniform": [0.0, 0.5]},
    "batch_size": {"choice": [16, 32, 64]},
    "epochs": {"choice": [5, 10, 20]},  # at most: training stops early on a flat val metric
    "seed": {"randint": [0, 10_000]},
}
ADAPTER_SPACES: dict[str, dict[str, Any]] = {  # what only some adapters have
    "pooler": {"adapter_dim": {"choice": [8, 16, 32, 64]}},
    # SQuAD 2.0's train has ~130k windows of up to 384 tokens: few epochs (early stopping on
    # the held-out articles' F1 anyway), a wider adapter per token
    "span": {"adapter_dim": {"choice": [16, 32, 64]}, "epochs": {"choice": [2, 3, 5]}},
}


def default_space(adapter: str) -> dict[str, Any]:
    """The search space of a registered adapter: the common part plus its own entries."""
    from bertvision.adapters import config_class

    config_class(adapter)  # raises for an unknown adapter
    return {**COMMON_SPACE, **ADAPTER_SPACES.get(adapter, {})}


@dataclass(frozen=True)
class TrialSpec:
    """One suggested point: the trial's number, its parameters and hyperopt's raw values."""

    trial: int
    params: dict[str, Any]
    hyperopt_vals: dict[str, float | int]  # choice index, not the option: what TPE models


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial, SWEEP/trials/NNNN/trial.json and one line of SWEEP/trials.jsonl."""

    trial: int
    params: dict[str, Any]
    val: dict[str, float | None]  # metrics on the validation slice of TRAIN: the objective
    dev: dict[str, Any]  # dev metrics, reported only
    status: str  # "ok", or "fail" when the trial gave no finite objective (val metric null)
    run: str  # the trial's run folder, relative to the sweep
    seconds: float
    hyperopt_vals: dict[str, float | int]
    finished_at: str
    error: str = ""
    worker: str = ""  # host:pid of the process that ran it
    key: str = ""  # the sweep's key (SweepConfig.key) when the trial ran

    def objective(self, metric: str) -> float:
        """What TPE minimises: minus the validation metric (inf for a failed trial)."""
        return -self.val[metric] if self.status == "ok" else math.inf

    def to_json(self) -> str:
        return strict_json(asdict(self), f"trial {self.trial}")


@dataclass
class SweepSummary:
    out: str
    trials: int  # finished trials wanted
    done_before: int  # finished before this call
    ran: int  # finished by this call
    failed: int  # trials with status "fail", of all finished
    best: TrialRecord | None  # by validation metric

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "sweep": self.out,
            "finished": self.done_before + self.ran,
            "ran": self.ran,
            "failed": self.failed,
            "best": None
            if best is None
            else {"trial": best.trial, "params": best.params, "val": best.val, "dev": best.dev},
        }


# -- search spaces -------------------------------------------------------------------------------


def load_space(url: str) -> dict[str, Any]:
    """A search-space override file: JSON, or YAML when the name ends in .yaml/.yml."""
    if not storage.exists(url):
        raise FileNotFoundError(f"search space file {url} does not exist")
    text = storage.read_text(url)
    if url.endswith((".yaml", ".yml")):
        import yaml  # only space files written in YAML need it

        try:
            space = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())
            raise ValueError(f"search space file {url} is not valid YAML: {reason}") from None
    else:
        try:
            space = strict_loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"search space file {url} is not valid JSON: {exc}") from None
    if not isinstance(space, dict):
        raise ValueError(f"search space file {url} must hold a mapping of parameter -> spec")
    return space


# TrainConfig fields a trial takes from the sweep itself, never from the space.
SWEEP_OWNED = (
    "task",
    "embeddings",
    "out",
    "adapter",
    "device",
    "val_fraction",
    "val_seed",
    "shuffle_seed",
    "overwrite",
    "max_resident_gb",  # one copy of the embeddings serves every trial
)


def check_space(space: dict[str, Any]) -> None:
    """Each entry names a training option and is a constant or one well-formed distribution."""
    from bertvision.train import TrainConfig

    options = sorted({f.name for f in fields(TrainConfig)} - set(SWEEP_OWNED))
    owned = sorted(set(space) & set(SWEEP_OWNED))
    if owned:
        raise ValueError(
            f"search space entries {owned} are the sweep's own settings, the same for every "
            "trial: set them as the sweep's options, not in its space"
        )
    unknown = sorted(set(space) - set(options))
    if unknown:
        raise ValueError(
            f"search space entries {unknown} are not training options; "
            f"expected some of {', '.join(options)}"
        )
    for name, spec in space.items():
        if not isinstance(spec, dict):
            if is_non_finite(spec):
                raise ValueError(f"search space entry {name}: {spec} is not a finite number")
            continue
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(
                f"search space entry {name}: {spec!r} must be a constant or one of "
                f"{{{', '.join(DISTRIBUTIONS)}: [...]}}"
            )
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ValueError(f"search space entry {name}: {kind} needs a list, got {args!r}")
        if any(is_non_finite(a) for a in args):
            raise ValueError(f"search space entry {name}: {kind} needs finite numbers, got {args}")
        if kind == "choice":
            continue
        wanted = 3 if kind == "quniform" else 2
        if len(args) != wanted or not all(isinstance(a, int | float) for a in args):
            raise ValueError(
                f"search space entry {name}: {kind} needs {wanted} numbers, got {args!r}"
                " (YAML reads 1e-4 as text: write 1.0e-4 or 0.0001)"
            )
        if not args[0] < args[1]:
            raise ValueError(f"search space entry {name}: {kind} needs low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"search space entry {name}: loguniform needs low > 0, got {args}")


def hyperopt_space(space: dict[str, Any]) -> dict[str, Any]:
    """The searched (non-constant) entries as hyperopt expressions, labelled by name."""
    from hyperopt import hp

    expressions = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            continue
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            expressions[name] = hp.loguniform(name, math.log(args[0]), math.log(args[1]))
        elif kind == "uniform":
            expressions[name] = hp.uniform(name, args[0], args[1])
        elif kind == "quniform":
            expressions[name] = hp.quniform(name, *args)
        elif kind == "randint":
            expressions[name] = hp.randint(name, args[0], args[1])
        else:
            expressions[name] = hp.choice(name, args)
    return expressions


def decode(space: dict[str, Any], vals: dict[str, float | int]) -> dict[str, Any]:
    """Trial parameters from hyperopt's raw values (choice index -> option), constants added."""
    params = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            params[name] = spec
            continue
        kind, args = next(iter(spec.items()))
        raw = vals[name]
        if kind == "choice":
            params[name] = args[int(raw)]
        elif kind == "randint" or (kind == "quniform" and all(isinstance(a, int) for a in args)):
            params[name] = int(round(raw))
        else:
            params[name] = float(raw)
    return params


# -- the sweep, step by step ---------------------------------------------------------------------


def trial_url(out: str, trial: int) -> str:
    return storage.join(out, TRIALS_DIR, f"{trial:04d}")


def swept_splits(task: str) -> tuple[str, ...]:
    """The extracted splits a sweep's trials read: train and the task's dev splits."""
    family = get_task(task).family
    return ("train", *family.evaluated_splits(task, False))


def primary_metric(task: str) -> str:
    """What the sweep selects on, in the validation metrics of its trials."""
    return get_task(task).family.primary_metric(task)


def content_key(cfg: SweepConfig) -> str:
    """`cfg.key` of the embeddings stored now, from their plans alone (a few small reads): the
    content identity of every trial's inputs. A ShardError when a split has no plan."""
    from bertvision.shards import ShardError, load_plan, pipeline_hint, split_url

    keys = {}
    for split in swept_splits(cfg.task):
        plan = load_plan(split_url(cfg.embeddings, cfg.task, split))
        if plan is None:
            raise ShardError(
                f"no {cfg.task}/{split} embeddings under {cfg.embeddings}"
                + pipeline_hint(cfg.embeddings)
            )
        keys[split] = plan.key
    return cfg.key(keys)


def prepare_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Check the embeddings (a held-out slice holding examples their encoder was fine-tuned on:
    ShardError, train.check_held_out_unseen) and the sweep folder; write sweep.json on first use.

    A folder holding a sweep with other settings (another task, adapter, space or seed) or on
    other embeddings is an error: resuming it would mix two searches. With `cfg.overwrite` that
    sweep (its trials and records) is removed and this one starts in its place. A trial whose run
    lost files since it finished is uncommitted (`uncommit_lost_trials`): it runs again.
    """
    require(cfg)
    from bertvision.shards import committed_shards
    from bertvision.train import check_held_out_unseen

    plans = {
        split: committed_shards(cfg.embeddings, cfg.task, split)[0]  # raises if incomplete
        for split in swept_splits(cfg.task)
    }
    check_held_out_unseen(cfg)
    extraction_keys = {split: plan.key for split, plan in plans.items()}
    key = cfg.key(extraction_keys)
    url = storage.join(cfg.out, SWEEP_FILE)
    if storage.exists(url):
        stored = load_sweep(cfg.out)
        if stored.get("key") == key:
            _make_trials_folder(cfg)
            uncommit_lost_trials(cfg.out)
            return stored
        if not cfg.overwrite:
            raise ValueError(
                f"{cfg.out} holds another sweep (task {stored['config']['task']}, adapter "
                f"{stored['config']['adapter']}, parallel {stored['config'].get('parallel')}; "
                "other space, seed, parallel or embeddings); "
                "use another --out, or --overwrite to replace it"
            )
        fs, path = storage.url_to_fs(cfg.out)
        # The record first: no finished sweep here. sweep.json last: until the old trials are
        # gone it keeps them the old sweep's, so a kill midway is never resumed as this sweep
        # with the old trials counted as its own (the same command removes the rest).
        for name in (runs.COMMIT_RECORD, TRIALS_FILE, TRIALS_DIR, SWEEP_FILE):
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)
    storage.ensure_writable(cfg.out)
    plan = {
        "key": key,
        "config": asdict(cfg),
        "space": cfg.resolved_space(),
        "metric": primary_metric(cfg.task),
        "model": plans["train"].model,
        "model_fingerprint": plans["train"].model_fingerprint,
        "extraction_keys": extraction_keys,
        "code_version": __version__,
        "created_at": records.now(),
    }
    storage.write_json(url, plan)
    _make_trials_folder(cfg)
    return plan


def lost_files(out: str, record: TrialRecord) -> list[str]:
    """What the run of the finished trial `record` of the sweep at `out` lacks now: the names its
    commit record lists that are gone, or that record itself; [] when stored whole, or for a
    failed trial (which has no run). One listing of the run folder; no file read but the record."""
    if record.status != "ok":
        return []
    run = storage.join(out, record.run)
    committed = runs.commit_record(run)
    return [runs.COMMIT_RECORD] if committed is None else runs.missing_files(run, committed)


def stored_trial(out: str, trial: int) -> TrialRecord | None:
    """The record of trial `trial` of the sweep at `out` while its run is stored whole
    (`lost_files`); None when it has no record or its run lost files."""
    url = storage.join(trial_url(out, trial), TRIAL_RECORD)
    if not storage.exists(url):
        return None
    record = read_trial(url)
    return None if lost_files(out, record) else record


def uncommit_lost_trials(out: str) -> list[int]:
    """Remove the trial record (and the run's commit record) of every finished trial whose run
    lost files (`lost_files`), with a warning naming them, so that it is suggested and trained
    again (with the same parameters: its batch's history is unchanged). Returns those trials."""
    lost = []
    for record in load_trials(out):
        if not (gone := lost_files(out, record)):
            continue
        warnings.warn(
            f"{out}: trial {record.trial}'s run lacks {len(gone)} of its files "
            f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}); training it again",
            stacklevel=1,  # shown as BERTVision's own warning (console.quiet_libraries)
        )
        fs, folder = storage.url_to_fs(trial_url(out, record.trial))
        for name in (TRIAL_RECORD, runs.COMMIT_RECORD):  # the trial's commit point first
            if fs.exists(f"{folder}/{name}"):
                fs.rm_file(f"{folder}/{name}")
        lost.append(record.trial)
    return lost


def _make_trials_folder(cfg: SweepConfig) -> None:
    """SWEEP/trials/, made once here: trials running at once each make only their own folder
    (a trial's write check removes the folders it made, which must not be a shared one)."""
    fs, path = storage.url_to_fs(storage.join(cfg.out, TRIALS_DIR))
    fs.makedirs(path, exist_ok=True)


def load_sweep(out: str) -> dict[str, Any]:
    """The sweep.json of the sweep folder `out`; FileFormatError naming it if garbled."""
    url = storage.join(out, SWEEP_FILE)
    stored = storage.read_json(url, keys=("config",))
    config = stored["config"]
    if not isinstance(config, dict) or not {"task", "adapter"} <= set(config):
        raise storage.FileFormatError(f"{url}: 'config' lacks the task or the adapter")
    return stored


def read_trial(url: str) -> TrialRecord:
    """The trial record at `url` (SWEEP/trials/NNNN/trial.json); FileFormatError naming it if it
    is not one, or if it is another trial's (moved or copied: its number and run folder are
    not NNNN's, and ensembles would read that other trial's outputs as this one's)."""
    data = storage.read_json(url, keys=())
    try:
        record = TrialRecord(**data)
    except TypeError as exc:  # missing or unknown fields
        raise storage.FileFormatError(f"{url} is not a trial record: {exc}") from None
    folder = url.rstrip("/").split("/")[-2]
    if f"{record.trial:04d}" != folder or record.run != f"{TRIALS_DIR}/{folder}":
        raise storage.FileFormatError(
            f"{url} is the record of trial {record.trial} (run {record.run}), not of the trial "
            f"in {TRIALS_DIR}/{folder}: moved or copied; remove it to run that trial again"
        )
    return record


def extracted_tasks(embeddings: str, adapter: str = "") -> list[str]:
    """The tasks, of every family, whose embeddings under `embeddings` are complete in the
    splits their sweeps read (`swept_splits`: train and the dev splits), sorted. With `adapter`,
    only the tasks whose rows it reads (its schema: pooler, scalarmix, cls the GLUE tasks',
    span squad2's)."""
    from bertvision import adapters
    from bertvision.families import task_names
    from bertvision.shards import ShardError, committed_shards

    schema = adapters.config_class(adapter).schema if adapter else None
    present = []
    for name in storage.list_names(embeddings):
        if name not in task_names():
            continue
        if schema is not None and get_task(name).family.schema != schema:
            continue
        try:
            for split in swept_splits(name):
                committed_shards(embeddings, name, split)
        except ShardError:
            continue  # not extracted yet, or still being extracted
        present.append(name)
    return present


def load_trials(out: str) -> list[TrialRecord]:
    """The committed trials of a sweep (their trial.json records), in trial order."""
    fs, path = storage.url_to_fs(out)
    found = fs.glob(f"{path.rstrip('/')}/{TRIALS_DIR}/*/{TRIAL_RECORD}")
    records = [
        read_trial(storage.join(out, TRIALS_DIR, p.rstrip("/").split("/")[-2], TRIAL_RECORD))
        for p in found
    ]
    return sorted(records, key=lambda r: r.trial)


def own_trials(out: str, trials: list[TrialRecord] | None = None) -> list[TrialRecord]:
    """The committed trials of the sweep at `out` that ran with its key (sweep.json's; all of
    them before it has one, or where it holds none). A trial of another key, left by an earlier
    sweep in that folder, is not one of its own: it is run again, which refuses it or with
    --overwrite replaces it (`finished_trial`), never counted as done or learnt from.
    `trials`: its committed trials when the caller has just loaded them (`load_trials`)."""
    trials = load_trials(out) if trials is None else trials
    if not storage.exists(storage.join(out, SWEEP_FILE)):
        return trials
    key = load_sweep(out).get("key")
    return trials if key is None else [t for t in trials if t.key == key]


def suggest_trials(cfg: SweepConfig) -> list[TrialSpec]:
    """TPE's points for the unfinished trials of the next batch: trials are suggested in
    batches of `cfg.parallel` (0..K-1, K..2K-1, ...), each batch from the trials before it, and
    trial n draws from the random stream (cfg.seed, n).

    So a trial's point depends on the sweep's settings alone, never on when the trials around it
    finished: a sweep killed with half a batch recorded suggests the rest of that batch as the
    uninterrupted sweep did (`parallel` is in the sweep's key, as it decides the batches).
    """
    from hyperopt import STATUS_FAIL, STATUS_OK, Domain, Trials, tpe
    from hyperopt.base import JOB_STATE_DONE

    finished = own_trials(cfg.out)
    done = {r.trial for r in finished}
    unfinished = [n for n in range(cfg.trials) if n not in done]
    if not unfinished:
        return []
    batch_start = unfinished[0] - unfinished[0] % cfg.parallel
    pending = [n for n in unfinished if n < batch_start + cfg.parallel]
    history_records = [r for r in finished if r.trial < batch_start]
    space = cfg.resolved_space()
    searched = hyperopt_space(space)
    if not searched:  # everything fixed: every trial is the same point
        return [TrialSpec(n, decode(space, {}), {}) for n in pending]

    # TPE only reads the space; trials are evaluated outside hyperopt.
    domain = Domain(lambda params: None, searched)
    metric = primary_metric(cfg.task)
    history = Trials()
    docs = []
    for record in history_records:
        result = (
            {"status": STATUS_OK, "loss": record.objective(metric)}
            if record.status == "ok"
            else {"status": STATUS_FAIL}
        )
        misc = {
            "tid": record.trial,
            "cmd": domain.cmd,
            "workdir": domain.workdir,
            "idxs": {name: [record.trial] for name in searched},
            "vals": {name: [record.hyperopt_vals[name]] for name in searched},
        }
        doc = history.new_trial_docs([record.trial], [None], [result], [misc])[0]
        doc["state"] = JOB_STATE_DONE
        docs.append(doc)
    history.insert_trial_docs(docs)
    history.refresh()

    specs = []
    for n in pending:
        seed = int(np.random.SeedSequence([cfg.seed, n]).generate_state(1)[0])
        (doc,) = tpe.suggest(
            [n], domain, history, seed, n_startup_jobs=cfg.startup_trials, verbose=False
        )
        vals = {name: _plain(values[0]) for name, values in doc["misc"]["vals"].items()}
        specs.append(TrialSpec(n, decode(space, vals), vals))
    return specs


def run_trial(cfg: SweepConfig, spec: TrialSpec, data: Any = None) -> TrialRecord:
    """Train one trial's adapter into SWEEP/trials/NNNN and commit its record (written last).

    A trial finished with this sweep's key (`content_key`: the settings and the embeddings by
    content) is returned as recorded, never run again; one of another key is an error unless
    `cfg.overwrite`, when it is run again. The run folder is the trial's own (training replaces
    what an interrupted try left with other parameters), and the record is removed before it
    changes, so a record always describes the run committed beside it.
    `data` is an `embeddings.load_embeddings` result to share; by default each process loads the
    embeddings once and every trial it runs shares that copy.
    """
    from bertvision.train import train_adapter

    key = content_key(cfg)
    if (record := finished_trial(cfg, spec, key)) is not None:
        return record
    started = time.perf_counter()
    try:
        outcome = train_adapter(
            trial_train_config(cfg, spec),
            data=data if data is not None else shared_embeddings(cfg),
            progress=False,
            trial_of=records.input_of(cfg.out, key),
        )
    except NonFiniteError as exc:  # a diverged trial is a result of the search, not a crash
        outcome = exc
    return commit_trial(cfg, spec, key, outcome, time.perf_counter() - started)


def finished_trial(cfg: SweepConfig, spec: TrialSpec, key: str) -> TrialRecord | None:
    """The record of trial `spec` finished with the sweep's key `key`, else None (the trial is
    to run). A record of another key is an error unless `cfg.overwrite`, which removes it."""
    record_url = storage.join(trial_url(cfg.out, spec.trial), TRIAL_RECORD)
    if not storage.exists(record_url):
        return None
    record = read_trial(record_url)
    if record.key == key:
        return record
    if not cfg.overwrite:
        raise ValueError(
            f"trial {spec.trial} in {cfg.out} ran on other settings or embeddings; "
            "use another --out, or --overwrite to replace the sweep"
        )
    fs, path = storage.url_to_fs(record_url)
    fs.rm_file(path)
    return None


def commit_trial(
    cfg: SweepConfig, spec: TrialSpec, key: str, outcome: dict | NonFiniteError, seconds: float
) -> TrialRecord:
    """Write trial `spec`'s record (its commit point) from what training gave: metrics.json,
    or the NonFiniteError of a diverged run (status "fail", as is a non-finite val metric)."""
    from bertvision.shards import worker_name

    metric = primary_metric(cfg.task)
    diverged = str(outcome) if isinstance(outcome, NonFiniteError) else ""
    metrics = {"val": {metric: None}, "dev": {}} if diverged else outcome
    objective = metrics["val"].get(metric)
    ok = objective is not None and math.isfinite(objective)
    record = TrialRecord(
        trial=spec.trial,
        params=spec.params,
        val=metrics["val"],
        dev=metrics["dev"],
        status="ok" if ok else "fail",
        run=f"{TRIALS_DIR}/{spec.trial:04d}",
        seconds=round(seconds, 2),
        hyperopt_vals=spec.hyperopt_vals,
        finished_at=records.now(),
        error="" if ok else diverged or f"validation {metric} is {objective}",
        worker=worker_name(),
        key=key,
    )
    storage.write_text_atomic(
        storage.join(trial_url(cfg.out, spec.trial), TRIAL_RECORD), record.to_json()
    )
    return record


def trial_train_config(cfg: SweepConfig, spec: TrialSpec):
    """The TrainConfig of one trial: the sweep's settings plus the trial's parameters."""
    from bertvision.train import TrainConfig

    return TrainConfig(
        task=cfg.task,
        embeddings=cfg.embeddings,
        out=trial_url(cfg.out, spec.trial),
        adapter=cfg.adapter,
        device=cfg.device,
        val_fraction=cfg.val_fraction,
        val_seed=cfg.val_seed,
        shuffle_seed=cfg.seed,  # one shard order for all trials: a batch shares its reads
        max_resident_gb=cfg.max_resident_gb,
        overwrite=True,  # the trial's folder is the sweep's: what is left there is replaced
        **spec.params,
    )


@lru_cache(maxsize=1)
def _embeddings(task: str, embeddings: str, device: str, max_resident_gb: float, key: str) -> Any:
    """`key`, the content identity of the embeddings at `embeddings`, is only part of the cache's
    key: other embeddings stored there since are another entry, never the old copy."""
    return get_task(task).family.load_embeddings(task, embeddings, device, max_resident_gb)


def shared_embeddings(cfg: SweepConfig) -> Any:
    """The sweep's embeddings as stored now (`content_key`), loaded once per process and shared
    by its trials, held or streamed as `cfg.max_resident_gb` has it."""
    return _embeddings(cfg.task, cfg.embeddings, cfg.device, cfg.max_resident_gb, content_key(cfg))


def record_trials(cfg: SweepConfig) -> list[TrialRecord]:
    """Rewrite SWEEP/trials.jsonl from the committed trial records (atomically: no half line),
    then the sweep's run record SWEEP/_commit.json (see `sweep_record`); each only when what it
    holds is not already what it would be written with (`stale_records`), so recording a sweep
    whose trials have not changed writes nothing."""
    trials = load_trials(cfg.out)
    lines, record = stale_records(cfg, trials)
    if lines is not None:
        storage.write_text_atomic(storage.join(cfg.out, TRIALS_FILE), lines)
    if record is not None:
        records.write_record(storage.join(cfg.out, runs.COMMIT_RECORD), record)
    return trials


def stale_records(
    cfg: SweepConfig, trials: list[TrialRecord]
) -> tuple[str | None, records.RunRecord | None]:
    """What `record_trials` is to write for the finished `trials`: the text of trials.jsonl, or
    None when the stored one has it; the sweep's run record, or None when the stored one says
    the same of them (all but `code`, `worker` and `committed_at`, which say who wrote it, and
    `settings`: those of the sweep's key are the same, and the others, such as `together`,
    describe the run that trained the trials, not a later one that finds them finished)."""
    lines = "".join(record.to_json() + "\n" for record in trials)
    url = storage.join(cfg.out, TRIALS_FILE)
    if storage.exists(url) and storage.read_text(url) == lines:
        lines = None
    record = sweep_record(cfg, trials)
    stored = records.read_record(storage.join(cfg.out, runs.COMMIT_RECORD))
    unchanged = ("code", "worker", "committed_at", "settings")
    if stored is not None and all(
        getattr(stored, f.name) == getattr(record, f.name)
        for f in fields(records.RunRecord)
        if f.name not in unchanged
    ):
        record = None
    return lines, record


def sweep_record(cfg: SweepConfig, trials: list[TrialRecord]) -> records.RunRecord:
    """The run record of the sweep as its finished `trials` leave it: inputs "embeddings/<split>"
    (the extraction keys of sweep.json), timings from sweep.json's creation to the last trial
    finished, with `trial_seconds` (all trials' seconds together)."""
    from bertvision.shards import split_url, worker_name

    plan = load_sweep(cfg.out)
    inputs = {
        f"embeddings/{split}": records.input_of(split_url(cfg.embeddings, cfg.task, split), key)
        for split, key in plan["extraction_keys"].items()
    }
    finished_at = max((t.finished_at for t in trials), default=plan["created_at"])
    seconds = datetime.fromisoformat(finished_at) - datetime.fromisoformat(plan["created_at"])
    return records.RunRecord(
        kind="sweep",
        key=plan["key"],
        settings=asdict(cfg),
        inputs=inputs,
        timings=records.make_timings(
            plan["created_at"],
            finished_at,
            seconds.total_seconds(),
            trial_seconds=sum(t.seconds for t in trials),
        ),
        files=[SWEEP_FILE, TRIALS_FILE],
        worker=worker_name(),
        committed_at=records.now(),
    )


def best_trials(records: list[TrialRecord], metric: str, k: int) -> list[TrialRecord]:
    """The k best finished trials by validation metric (ties: the earlier trial)."""
    ok = [r for r in records if r.status == "ok"]
    return sorted(ok, key=lambda r: (-r.val[metric], r.trial))[:k]


def summarize(cfg: SweepConfig, done_before: int) -> SweepSummary:
    """Record the trials (`record_trials`), then sum them up: `done_before` of them were
    finished before this run."""
    return _summary(cfg, record_trials(cfg), done_before)


def _summary(cfg: SweepConfig, trials: list[TrialRecord], done_before: int) -> SweepSummary:
    best = best_trials(trials, primary_metric(cfg.task), 1)
    return SweepSummary(
        out=cfg.out,
        trials=cfg.trials,
        done_before=done_before,
        ran=len(trials) - done_before,
        failed=sum(r.status != "ok" for r in trials),
        best=best[0] if best else None,
    )


def finished_sweep(cfg: SweepConfig) -> SweepSummary | None:
    """The summary of the sweep finished at `cfg.out` with these settings, found by reading
    alone; None when anything is left to do: no sweep.json of this sweep's key (none, or
    another sweep's), a trial of the first `cfg.trials` not finished with that key, or
    trials.jsonl or the run record not yet saying what the trials are (`stale_records`).
    A finished sweep is returned as it is stored: nothing written, not even the lease."""
    from bertvision.shards import ShardError

    try:
        key = content_key(cfg)
    except ShardError:
        return None  # no embeddings: `prepare_sweep` says so
    if not storage.exists(storage.join(cfg.out, SWEEP_FILE)):
        return None
    if load_sweep(cfg.out).get("key") != key:
        return None
    trials = load_trials(cfg.out)
    done = {t.trial for t in trials if t.key == key}
    if not done >= set(range(cfg.trials)):
        return None
    if any(lost_files(cfg.out, t) for t in trials):
        return None
    if stale_records(cfg, trials) != (None, None):
        return None
    return _summary(cfg, trials, len(trials))


def run_sweep(cfg: SweepConfig, data: Any = None, progress: bool = True) -> SweepSummary:
    """Run (or resume) a sweep to cfg.trials finished trials, cfg.parallel at a time.

    Parallel trials share one loaded copy of the embeddings (`data`, loaded here when not
    given): trained together over one read of it (`cfg.together`, bertvision.together), or on
    threads of this process. A sweep finished with the same settings is returned as stored,
    with nothing written (`finished_sweep`).
    """
    require(cfg)
    if (done := finished_sweep(cfg)) is not None:
        return done
    from bertvision.train import check_held_out_unseen

    check_held_out_unseen(cfg)  # before the lease writes into the folder
    with runs.lease(cfg.out):  # one sweep at a time in a folder
        prepare_sweep(cfg)
        return _run_sweep(cfg, data, progress)


def _run_sweep(cfg: SweepConfig, data: Any, progress: bool) -> SweepSummary:
    from tqdm.auto import tqdm

    done_before = len(own_trials(cfg.out, record_trials(cfg)))
    bar = tqdm(
        total=cfg.trials,
        initial=min(done_before, cfg.trials),
        desc=f"sweep {cfg.task}",
        disable=not progress,
    )
    with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
        while batch := suggest_trials(cfg):
            data = data if data is not None else shared_embeddings(cfg)
            if trains_together(cfg, batch):
                from bertvision.together import run_trials_together

                finished = run_trials_together(cfg, batch, data)
            else:  # one at a time in this thread: Ctrl-C or SIGTERM stops it mid-trial
                trial = partial(run_trial, cfg, data=data)
                finished = pool.map(trial, batch) if cfg.parallel > 1 else map(trial, batch)
            for record in finished:
                bar.update(1)
                bar.set_postfix(trial=record.trial, val=_primary(cfg, record))
            record_trials(cfg)
    bar.close()
    return summarize(cfg, done_before)


def trains_together(cfg: SweepConfig, batch: list[TrialSpec]) -> bool:
    """Whether the trials of `batch` train together over one read of the embeddings
    (bertvision.together): `cfg.together` and more than one trial."""
    return cfg.together and len(batch) > 1


def _primary(cfg: SweepConfig, record: TrialRecord) -> float | None:
    value = record.val.get(primary_metric(cfg.task))
    return None if value is None else round(value, 4)


def _plain(value: Any) -> float | int:
    """numpy scalars -> JSON-able Python numbers."""
    return value.item() if hasattr(value, "item") else value
