"""Many adapters trained together over one read of their embeddings: a sweep's batch of trials.

    results = train_together([cfg_a, cfg_b, cfg_c], data)  # each: metrics.json, or its error
    records = run_trials_together(sweep_cfg, batch)         # a TPE batch, recorded as trials

Reading is what streamed training pays for (local shards, or Azure): K runs trained alone read
the train split twice an epoch each (training, then validation) and every split once more for
their outputs. Here every read serves all the runs: a group of shards is read and decoded once,
and each run still training takes its own batches from it, in its own order (drawn from its
seed), with its own batch size, adapter, optimizer and dropout generator; validation and the
final predictions read each split once for all runs.

Identical to training alone: each run takes exactly the steps `train.train_adapter` takes with
its config (`train.Fit`, `train.train_pack` and its objective's `validate_together` and
`predict_together` are the code of both), so its weights, metrics and files are byte for byte
those of the run alone (tests/test_together.py). Every task family: GLUE's runs (one row per
example) and span runs (SQuAD 2.0's windows, span_train.SpanObjective) alike.
Only the reads are shared, and only where that changes nothing:

- A streamed epoch reads its shard groups in the order drawn from (shuffle_seed or seed, epoch),
  grouped by shuffle_shards: runs whose order is the same share an epoch's reads; the others wait
  for a pass of their own. A sweep gives every trial its seed as `shuffle_seed`, so a whole batch
  shares every read. A resident split is read by nobody: all runs at an epoch train in one pass.
- Runs at different epochs (one resumed from a later checkpoint) catch up, earliest first.
- A run that diverges (a loss or an output NaN or infinite) stops with its NonFiniteError as its
  result, as it would alone; the others go on. Any other error stops them all.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict
from functools import partial
from typing import Any

from bertvision import records, runs, storage
from bertvision.config import SweepConfig, TrainConfig, require
from bertvision.finite import NonFiniteError
from bertvision.train import (
    Fit,
    _finished,
    _load_checkpoint,
    _write_run,
    make_objective,
    shard_order,
    start_epoch,
    train_pack,
)

Outcome = dict | NonFiniteError  # metrics.json, or why the run diverged


def train_together(
    cfgs: list[TrainConfig],
    data: Any,
    trial_of: dict[str, str] | None = None,
) -> list[Outcome]:
    """Train the runs `cfgs` (one task, one device, distinct `out`s) over shared reads of
    `data` (the task family's embeddings: embeddings.load_embeddings, span_train.load_span_data),
    write and commit each RUN as `train_adapter` does, and return each run's metrics.json, or
    the NonFiniteError of a run that diverged.

    Finished runs are returned as stored; unfinished ones resume from their checkpoints. Every
    run folder is leased while it trains (a second writer gets runs.FolderBusy). `trial_of`: the
    sweep whose trials these are (see `train_adapter`). ValueError for several devices or two
    runs with one `out`; runs of another task than `data`'s are refused as `train_adapter`
    refuses them.
    """
    for cfg in cfgs:
        require(cfg)
    if len({cfg.device for cfg in cfgs}) > 1:
        raise ValueError(f"runs trained together share one device, got {[c.device for c in cfgs]}")
    outs = [cfg.out.rstrip("/") for cfg in cfgs]
    if len(set(outs)) < len(outs):
        raise ValueError(f"runs trained together need an out each, got {outs}")
    stopwatch = records.Stopwatch()
    results: list[Outcome | None] = [None] * len(cfgs)
    fits: dict[int, Fit] = {}
    make_record = {}
    with ExitStack() as leases:
        for index, cfg in enumerate(cfgs):
            objective = make_objective(cfg, data)
            key = cfg.run_key(objective.extraction_keys())
            if (done := _finished(cfg, key)) is not None:
                results[index] = done
                continue
            checkpoint = _load_checkpoint(cfg, key)
            storage.ensure_writable(cfg.out)
            leases.enter_context(runs.lease(cfg.out))
            if (done := _finished(cfg, key)) is not None:  # finished by another meanwhile
                results[index] = done
                continue
            inputs = objective.inputs() | ({"sweep": trial_of} if trial_of else {})
            kind = "trial" if trial_of else "train"
            make_record[index] = partial(records.RunRecord, kind, key, asdict(cfg), inputs)
            fits[index] = Fit(cfg, key, objective, checkpoint)
        _train_epochs(fits, results)
        _commit(fits, results, make_record, stopwatch)
    return results  # type: ignore[return-value]  # every entry is set by now


def _train_epochs(fits: dict[int, Fit], results: list) -> None:
    """Every epoch of every run, in passes over the train split; a run that diverges gets its
    NonFiniteError in `results` and trains no further."""
    while True:
        waiting = {i: fit for i, fit in fits.items() if results[i] is None and fit.next_epoch()}
        if not waiting:
            return
        epoch = min(fit.next_epoch() for fit in waiting.values())
        orders, groups = {}, {}
        for i, fit in waiting.items():
            if fit.next_epoch() == epoch:
                orders[i] = start_epoch(fit.model, fit.cfg, epoch)
                cfg = fit.cfg
                groups[i] = fit.objective.train_split.shard_groups(
                    shard_order(cfg, epoch, orders[i]), cfg.shuffle_shards
                )
        first = next(iter(groups.values()))
        sharing = [i for i in groups if _same_groups(groups[i], first)]  # the rest: a later pass
        _train_pass({i: fits[i] for i in sharing}, epoch, first, orders, results)


def _same_groups(ours: list, theirs: list) -> bool:
    return len(ours) == len(theirs) and all(
        a.tolist() == b.tolist() for a, b in zip(ours, theirs, strict=True)
    )


def _train_pass(fits: dict[int, Fit], epoch: int, groups, orders, results: list) -> None:
    """One epoch of the runs `fits` over one read of each shard group, then their validation
    over one read of the held-out slice; each run's epoch ends as `train._fit`'s does."""
    objective = next(iter(fits.values())).objective
    train, device = objective.train_split, next(iter(fits.values())).cfg.device
    read_ahead = max(fit.cfg.read_ahead for fit in fits.values())
    started, cpu_started = time.perf_counter(), time.process_time()
    tallies = {i: (0.0, 0) for i in fits}
    for packed, rows in train.read_groups(groups, device, read_ahead):
        for i, fit in fits.items():
            if results[i] is not None:
                continue
            try:
                tallies[i] = train_pack(
                    fit.objective, fit.model, fit.optimizer, packed, rows, orders[i], fit.cfg,
                    epoch, *tallies[i],
                )  # fmt: skip
            except NonFiniteError as exc:
                results[i] = exc
    seconds = time.perf_counter() - started  # the pass's, shared by its runs
    cpu_seconds = time.process_time() - cpu_started
    alive = [i for i in fits if results[i] is None]
    if not alive:
        return
    for i in alive:
        fits[i].model.eval()
    asked = [(fits[i].objective, fits[i].model, fits[i].cfg) for i in alive]
    for i, validated in zip(alive, objective.validate_together(asked), strict=True):
        if isinstance(validated, NonFiniteError):
            results[i] = validated
            continue
        metrics, loss = validated
        total, count = tallies[i]
        eval_seconds = time.perf_counter() - started - seconds
        fits[i].end_epoch(epoch, total / count, metrics, loss, seconds, eval_seconds, cpu_seconds)


def _commit(fits: dict[int, Fit], results: list, make_record: dict, stopwatch) -> None:
    """Predict every split once for all trained runs, then write and commit each RUN."""
    trained = [i for i in fits if results[i] is None]
    if not trained:
        return
    for i in trained:
        fits[i].keep_best()
    asked = [(fits[i].objective, fits[i].model, fits[i].cfg) for i in trained]
    objective = fits[trained[0]].objective
    for i, predicted in zip(trained, objective.predict_together(asked), strict=True):
        if isinstance(predicted, NonFiniteError):
            results[i] = predicted
            continue
        fit = fits[i]
        run = make_record[i](stopwatch.timings(train_seconds=fit.train_seconds()))
        with runs.StagedRun(fit.cfg.out) as staged:
            metrics = fit.objective.write_predicted(predicted, staged.url)
            _write_run(fit.cfg, run, fit.objective, fit.model, fit.state, metrics, staged)
        results[i] = metrics


def run_trials_together(cfg: SweepConfig, specs: list, data: Any = None) -> list:
    """The sweep trials `specs` (sweep.TrialSpec) trained together (`train_together`), each
    recorded as `sweep.run_trial` records it: finished trials as recorded, a diverged one as
    "fail". A trial's seconds are its share of the batch's (the batch's over its trials run), so
    the sweep's trial_seconds still add up to the time spent. Returns their TrialRecords in the
    order of `specs`."""
    from bertvision import sweep

    key = sweep.content_key(cfg)
    finished = {s.trial: r for s in specs if (r := sweep.finished_trial(cfg, s, key)) is not None}
    todo = [s for s in specs if s.trial not in finished]
    if not todo:
        return [finished[s.trial] for s in specs]
    started = time.perf_counter()
    outcomes = train_together(
        [sweep.trial_train_config(cfg, s) for s in todo],
        data if data is not None else sweep.shared_embeddings(cfg),
        trial_of=records.input_of(cfg.out, key),
    )
    seconds = (time.perf_counter() - started) / len(todo)
    for spec, outcome in zip(todo, outcomes, strict=True):
        finished[spec.trial] = sweep.commit_trial(cfg, spec, key, outcome, seconds)
    return [finished[s.trial] for s in specs]
