"""Brief ("partial") fine-tuning of any Hugging Face encoder on a task of any family
(bertvision.families: GLUE's sequence classification, SQuAD 2.0's spans).

`epochs` may be a fraction: 0.2 trains on two tenths of an epoch's batches of training rows
(examples for GLUE, windows for SQuAD). AdamW with linear
warm-up and decay, seeded, bf16 autocast on CUDA. The checkpoint at `out` loads with
`from_pretrained` (and so with `bertvision extract --model out`); `out/metrics.json` holds the val
and dev metrics, and the predictions are written in the family's formats (GLUE: like an adapter
run's; SQuAD: bertvision.squad.SquadFamily). The held-out slice of TRAIN that adapters select
on (`val_fraction`, `val_seed`; whole articles for SQuAD) is left out of training.

What the checkpoint was fine-tuned on is recorded by content (`FinetunedEncoder`, in the run
record's `finetuned_encoder`): the fingerprint of its encoder, the task, the first
`train_examples` examples of TRAIN and their fingerprint, `val_fraction` and `val_seed`. An
extraction with the checkpoint copies it into its own record, and adapter training on those
embeddings refuses a held-out slice holding examples the encoder trained on (another
`max_train_examples` at extraction, another `val_fraction` or `val_seed` in training): the
slice would rate the adapter on examples its encoder has learnt.

The run is committed whole (bertvision.runs: staged, moved into place, the checkpoint's
config.json, metrics.json and then the commit record last), keyed on `content_key`: the settings,
the encoder's fingerprint (its weights, wherever they come from) and the data's fingerprints. A
finished run with that key is returned as stored; one with another key is refused unless
`overwrite`, which replaces it whole. The commit record is the run's record (bertvision.records,
kind "finetune"), naming its inputs: the model (URL and fingerprint) and each split of the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from bertvision import __version__, families, glue, records, rng, runs, storage
from bertvision import encoder as enc
from bertvision.config import FinetuneConfig, require
from bertvision.finite import NonFiniteError


@dataclass(frozen=True)
class FinetunedEncoder:
    """An encoder that a BERTVision fine-tuning made, and what it trained on: of the task's TRAIN
    split the first `train_examples` examples (SQuAD: questions; `max_train_examples` as set,
    None: all), `data_fingerprint` their fingerprint (the family's data_fingerprint), less the
    held-out slice of `val_fraction` and `val_seed` (GLUE: glue.held_out_ids of their ids;
    SQuAD: whole articles, squad.held_out_titles). Kept in records.RunRecord.finetuned_encoder.
    """

    fingerprint: str  # encoder.fingerprint of the checkpoint's encoder, as extraction loads it
    run_key: str  # the fine-tuning's content key
    task: str  # its canonical name
    max_train_examples: int | None
    train_examples: int
    val_fraction: float
    val_seed: int
    data_fingerprint: str

    @classmethod
    def from_record(cls, record: records.RunRecord, url: str) -> FinetunedEncoder | None:
        """The encoder `record` (read from `url`) describes; None when it describes none (a
        record of another kind, or one written before they were recorded). FileFormatError
        naming `url` when the description is garbled."""
        described = record.finetuned_encoder
        if not described:
            return None
        types = {
            "fingerprint": str,
            "run_key": str,
            "task": str,
            "max_train_examples": (int, type(None)),
            "train_examples": int,
            "val_fraction": (int, float),
            "val_seed": int,
            "data_fingerprint": str,
        }
        wrong = sorted(
            name
            for name, kind in types.items()
            if not isinstance(described.get(name), kind) or isinstance(described.get(name), bool)
        )
        if wrong or set(described) != {f.name for f in fields(cls)}:
            raise storage.FileFormatError(
                f"{url}: 'finetuned_encoder' is not the description of a fine-tuned encoder "
                f"(fields {', '.join(wrong or sorted(set(described) ^ set(types)))})"
            )
        return cls(**described)

    def held_out_flags(self) -> str:
        """Its held-out slice as the command line sets it: --val-fraction F --val-seed S."""
        return f"--val-fraction {self.val_fraction:g} --val-seed {self.val_seed}"

    def subset_flag(self) -> str:
        """The train examples it read as the command line sets them."""
        if self.max_train_examples is None:
            return "no --max-train-examples"
        return f"--max-train-examples {self.max_train_examples}"


def _load_data(cfg: FinetuneConfig) -> dict[str, list]:
    """The examples fine-tuning reads: "train" (the first `max_train_examples`), the dev splits
    and, with `predict_test`, the test splits (those the task's family has)."""
    task = families.get_task(cfg.task)
    family = task.family
    return {
        "train": family.load_split(task.name, "train", cfg.data_dir)[: cfg.max_train_examples]
    } | {
        s: family.load_split(task.name, s, cfg.data_dir)
        for s in family.evaluated_splits(task.name, cfg.predict_test)
    }


def run_inputs(
    cfg: FinetuneConfig, data: dict[str, list] | None = None
) -> dict[str, dict[str, str]]:
    """The run's inputs (records.RunRecord.inputs): "model" (its URL and fingerprint) and
    "data/<split>" for each split read (the data folder and the family's data_fingerprint).
    `data` is `_load_data`'s result when already loaded."""
    data = data if data is not None else _load_data(cfg)
    family = families.get_task(cfg.task).family
    model = records.input_of(cfg.model, enc.load_encoder(cfg.model, "cpu").fingerprint)
    where = cfg.data_dir or family.hub_url
    return {"model": model} | {
        f"data/{split}": records.input_of(where, family.data_fingerprint(examples))
        for split, examples in data.items()
    }


def content_key(cfg: FinetuneConfig, data: dict[str, list] | None = None) -> str:
    """What determines the run: the settings, the encoder's weights and the data, by content.

    The model and data are named by URL in `cfg`; the key uses their fingerprints instead, so a
    checkpoint or data file replaced at the same URL gives another key. `data` is `_load_data`'s
    result when already loaded."""
    return _key(cfg, run_inputs(cfg, data))


def _keyed_settings(cfg: FinetuneConfig) -> dict:
    """The settings the content key covers: all but where the model, data and run are, and
    how it runs (their content is keyed instead)."""
    where = ("out", "model", "data_dir", "device", "overwrite")
    return {k: v for k, v in asdict(cfg).items() if k not in where}


def _key(cfg: FinetuneConfig, inputs: dict[str, dict[str, str]]) -> str:
    content = _keyed_settings(cfg)
    content["model_fingerprint"] = inputs["model"]["key"]
    content["data"] = {
        name.removeprefix("data/"): read["key"]
        for name, read in inputs.items()
        if name.startswith("data/")
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def finished_run(cfg: FinetuneConfig, key: str) -> dict | None:
    """metrics.json of the run committed at `cfg.out` with `key`, else None; a ValueError for a
    run with another key unless `cfg.overwrite`."""
    if runs.finished(cfg.out, key, cfg.overwrite, "fine-tuning", _keyed_settings(cfg)) is None:
        return None
    return load_metrics(cfg.out)


def finetune_encoder(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune, evaluate on dev, write the checkpoint and predictions; returns metrics.json.

    A run finished at `cfg.out` with the same content key is returned as stored, without
    training. While it trains, `cfg.out` is leased (runs.Lease): a second writer gets FolderBusy.
    The model's dropout draws from torch's global generator, so the training holds it seeded
    (`rng.seeded`): fine-tunings on threads of one process take turns and each gives what its
    seed gives. A loss or output that is NaN or infinite stops the run (NonFiniteError) before
    anything is written.
    """
    require(cfg)
    stopwatch = records.Stopwatch()
    task = families.get_task(cfg.task)
    data = _load_data(cfg)
    config = enc.check_encoder(cfg.model)
    enc.check_max_seq_length(cfg.model, config, cfg.max_seq_length)
    inputs = run_inputs(cfg, data)
    key = _key(cfg, inputs)

    def fine_tune() -> dict:
        with rng.seeded(cfg.seed, cfg.device):
            return _finetune(cfg, task, data, inputs, key, progress, stopwatch)

    return runs.once(cfg.out, lambda: finished_run(cfg, key), fine_tune)


def _finetune(
    cfg: FinetuneConfig,
    task: families.Task,
    data: dict,
    inputs: dict[str, dict[str, str]],
    key: str,
    progress: bool,
    stopwatch: records.Stopwatch,
):
    from tqdm.auto import tqdm

    family = task.family
    train, val = family.held_out(data["train"], cfg.val_fraction, cfg.val_seed)
    evaluated = {"val": val} | {s: ex for s, ex in data.items() if s != "train"}

    tokenizer = enc.load_tokenizer(cfg.model)  # right padding: no batch-mate shifts a position
    with enc.loading(cfg.model, "weights"):
        model = family.model_head(task.name, enc.local_model_path(cfg.model))
    model = model.to(cfg.device)
    rows = family.training_set(task.name, train, tokenizer, cfg)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    optimizer, scheduler = _optimizer(model, cfg, total_steps)

    started = time.perf_counter()
    model.train()
    generator = np.random.default_rng(cfg.seed)
    bar = tqdm(total=total_steps, desc=f"finetune {task.name}", disable=not progress)
    seen = 0
    for step, batch_rows in enumerate(_batches(len(rows), cfg.batch_size, generator)):
        if step == total_steps:
            break
        batch = rows.batch(batch_rows, cfg.device)
        with enc.autocast(cfg.device):
            loss = model(**batch).loss
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"fine-tuning diverged at step {step}: the loss is {value}; "
                f"try a lower --lr (now {cfg.lr})"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(batch_rows)
        bar.update(1)
        bar.set_postfix(loss=round(value, 4))
    bar.close()
    train_seconds = time.perf_counter() - started

    model.eval()
    evaluation = family.evaluate(task.name, model, tokenizer, evaluated, cfg, progress)
    result = {
        **evaluation.metrics,
        **evaluation.extra,
        # examples: training rows, i.e. windows for SQuAD
        "train": {
            "steps": total_steps,
            "examples": seen,
            "seconds": round(train_seconds, 2),
            "examples_per_second": round(seen / train_seconds, 2),
        },
        "config": asdict(cfg),
        "key": key,
        "code_version": __version__,
    }
    timings = stopwatch.timings(train_seconds=train_seconds)
    run = records.RunRecord("finetune", key, asdict(cfg), inputs, timings)
    with runs.StagedRun(cfg.out) as staged:
        fingerprint = _save_checkpoint(model, tokenizer, staged.url)
        made = FinetunedEncoder(
            fingerprint=fingerprint,
            run_key=key,
            task=task.name,
            max_train_examples=cfg.max_train_examples,
            train_examples=len(data["train"]),
            val_fraction=cfg.val_fraction,
            val_seed=cfg.val_seed,
            data_fingerprint=inputs["data/train"]["key"],
        )
        evaluation.write(staged.url)
        storage.write_json(storage.join(staged.url, "metrics.json"), result)
        staged.commit(
            replace(run, finetuned_encoder=asdict(made)), last=("config.json", "metrics.json")
        )
    return result


# -- GLUE: the fine-tuning parts of bertvision.glue.GlueFamily ---------------------------------


class GlueTrainingSet:
    """GLUE examples as training rows: each batch tokenized and padded to its longest."""

    def __init__(self, task: glue.GlueTask, examples: list[glue.Example], tokenizer, max_length):
        self.task, self.examples = task, examples
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, rows: list[int], device: str) -> dict:
        examples = [self.examples[i] for i in rows]
        batch = _tokenize(self.tokenizer, examples, self.max_length, device)
        batch["labels"] = torch.tensor(
            [ex.label for ex in examples],
            dtype=torch.float32 if self.task.regression else torch.long,
            device=device,
        )
        return batch


def evaluate_glue(
    task: glue.GlueTask,
    model,
    tokenizer,
    splits: dict[str, list[glue.Example]],
    cfg,
    progress: bool = False,
) -> families.Evaluation:
    """Outputs of every split, GLUE metrics of val and the dev splits; `write` writes each
    split's outputs and submission file (bertvision.predictions)."""
    from bertvision.metrics import compute_metrics
    from bertvision.predictions import point_predictions, write_predictions

    outputs = {
        s: _predict(model, tokenizer, ex, cfg, f"predict {task.name} {s}" if progress else None)
        for s, ex in splits.items()
    }
    metrics = {
        split: compute_metrics(
            task, point_predictions(task, outputs[split]), [ex.label for ex in splits[split]]
        )
        for split in ("val", *task.dev_splits)
    }

    def write(url: str) -> None:
        for split, examples in splits.items():
            write_predictions(
                url,
                task,
                split,
                [ex.example_id for ex in examples],
                [ex.label for ex in examples],
                outputs[split],
            )

    return families.Evaluation(
        {
            "val": metrics["val"],
            "dev": metrics[task.dev_splits[0]],
            **{split: metrics[split] for split in task.dev_splits[1:]},
        },
        write,
    )


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": cfg.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(cfg.warmup_fraction * total_steps), total_steps
    )
    return optimizer, scheduler


def _batches(n: int, batch_size: int, generator: np.random.Generator):
    """Index batches over seeded shuffles of the data, epoch after epoch, forever."""
    while True:
        order = generator.permutation(n)
        for begin in range(0, n, batch_size):
            yield order[begin : begin + batch_size].tolist()


def _tokenize(tokenizer, examples: list[glue.Example], max_length: int, device: str):
    firsts = [ex.texts[0] for ex in examples]
    seconds = [ex.texts[1] for ex in examples] if len(examples[0].texts) > 1 else None
    batch = tokenizer(
        firsts, seconds, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def _predict(
    model, tokenizer, examples: list[glue.Example], cfg: FinetuneConfig, bar: str | None = None
) -> np.ndarray:
    """(N, num_labels) class probabilities, or (N, 1) scores for regression; with a progress
    bar named `bar` if given."""
    from tqdm.auto import tqdm

    outputs = []
    batches = range(0, len(examples), cfg.batch_size * 2)
    for begin in tqdm(batches, desc=bar, unit="batch", disable=bar is None, leave=False):
        batch = _tokenize(
            tokenizer, examples[begin : begin + cfg.batch_size * 2], cfg.max_seq_length, cfg.device
        )
        with enc.autocast(cfg.device):
            logits = model(**batch).logits.float()
        outputs.append(logits if logits.shape[-1] == 1 else logits.softmax(-1))
    result = torch.cat(outputs).cpu().numpy()
    if not np.isfinite(result).all():
        raise NonFiniteError("the fine-tuned model's outputs are NaN or infinite; try a lower --lr")
    return result


def _save_checkpoint(model, tokenizer, out: str) -> str:
    """Write the checkpoint (from_pretrained files) into the staging folder `out`; returns the
    fingerprint of the encoder it loads to (`encoder_fingerprint`)."""
    fs, path = storage.url_to_fs(out)
    with tempfile.TemporaryDirectory() as local:
        model.save_pretrained(local)
        tokenizer.save_pretrained(local)
        fs.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(local)):
            fs.put_file(os.path.join(local, name), f"{path.rstrip('/')}/{name}")
        return encoder_fingerprint(local)


def encoder_fingerprint(checkpoint: str) -> str:
    """The fingerprint of the encoder in the local folder `checkpoint` as encoder.load_encoder
    loads it (encoder.read_base_model), without keeping it in load_encoder's cache: the folder
    is a temporary one."""
    return enc.fingerprint(enc.read_base_model(checkpoint), enc.load_tokenizer(checkpoint))


def load_metrics(out: str) -> dict:
    return storage.read_json(storage.join(out, "metrics.json"))
