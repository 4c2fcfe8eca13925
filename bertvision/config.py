"""Every stage's settings, declared once: one dataclass per stage, each field with its help text.

    cfg = TrainConfig(task="rte", embeddings="emb", out="runs/rte-pooler", lr=3e-4)

The same class is the `bertvision` command's options (generated from the fields by
`bertvision.cli`), the Prefect flow's parameter (and so the deployment's parameter schema), the
core function's argument and the JSON saved beside its outputs: a field added here appears in
all of them without being typed again. `PipelineConfig` is built from the stage configs.

Fields shared by several stages are declared once, in the small base classes below (`Task`,
`Output`, `Source`, `Device`, `Seeded`, `HeldOut`, ...), and inherited. Every field is
keyword-only.

Validation raises `ConfigError(field, message)`: the command line names the flag
(`--lr must be > 0, got 0.0`), anything else the field (`lr must be > 0, got 0.0`). The fields
marked required (`task`, `out`, the inputs) may stay empty in a template (a stage of
`PipelineConfig`, a flow's defaults): `require(cfg)` checks them where the stage starts.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from bertvision.finite import is_non_finite, strict_loads


class ConfigError(ValueError):
    """A setting that cannot be used; `field` is its name in the config (dotted when nested)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    required: bool = False,
    parse: Callable[[str], Any] | None = None,
    argument: bool = False,
    url: bool = False,
) -> Any:
    """A config field with its help text.

    `required`: the stage cannot run while it is empty (the command line demands it).
    `parse`: turns the command line's text into the value (a search-space file into a dict).
    `argument`: on the command line, a positional argument instead of an option.
    `url`: a storage URL or path (`check_urls`).
    """
    metadata = {
        "help": help,
        "required": required,
        "parse": parse,
        "argument": argument,
        "url": url,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def require(cfg: Any, *, but: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first required field of `cfg` that is empty, those named in `but`
    aside (a field the caller fills in itself)."""
    for f in fields(cfg):
        if f.name in but:
            continue
        if f.metadata.get("required") and not getattr(cfg, f.name):
            raise ConfigError(f.name, "is required")


def check_finite(cfg: Any) -> None:
    """ConfigError naming the first numeric field of dataclass `cfg` that is NaN or infinite."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_non_finite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")


# numpy takes any seed >= 0, torch's generators at most 2**64 - 1; train.py seeds dropout with
# seed * 1_000_003 + epoch, which this bound keeps within torch's.
SEED_MAX = 2**32 - 1
SEED_RANGE = "0 to 2**32-1"


def check_seeds(cfg: Any) -> None:
    """ConfigError naming the first seed of `cfg` (`seed`, `*_seed`; None: unset) that is not
    an integer in [0, SEED_MAX]."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not (f.name == "seed" or f.name.endswith("_seed")) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
            raise ConfigError(
                f.name, f"must be an integer in [0, 2**32-1 = {SEED_MAX}], got {value}"
            )


def check_urls(cfg: Any) -> None:
    """ConfigError naming the first URL field of `cfg` that is empty where empty means no
    default (joined to a name, it would be a path at the filesystem root), or whose storage
    protocol no filesystem here serves.

    Empty is allowed only where the field's default is empty: a required field still unset in
    a template (`require` refuses it where the stage starts), or a documented default (`model`,
    a report's `out`). None is an optional field left out."""
    from bertvision.storage import StorageError, check_protocol

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not f.metadata.get("url") or value is None:
            continue
        if value == "":
            if f.default == "":
                continue
            unset = "omit it instead" if f.default is None else f"omit it for {f.default}"
            raise ConfigError(f.name, f"must not be empty ({unset})")
        try:
            check_protocol(value)
        except StorageError as exc:
            raise ConfigError(f.name, str(exc)) from None


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "text",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
}


def check_types(cfg: Any) -> None:
    """ConfigError naming the first field of dataclass `cfg` whose value is not of the type it
    is declared with: what the command line converts for itself, given otherwise (a search
    space's entry, a flow parameter, code). An integer is a number; a bool is neither."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), hints[f.name]
        if not _fits(value, kind):
            raise ConfigError(f.name, f"must be {_type_name(kind)}, got {value!r}")


def _fits(value: Any, kind: Any) -> bool:
    """Whether `value` is of the declared type `kind`; types other than the plain ones of
    _TYPE_NAMES, their generic forms and their unions (with None) are not checked."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(kind))
    if kind is type(None):
        return value is None
    kind = typing.get_origin(kind) or kind  # list[str] -> list
    if kind not in _TYPE_NAMES:
        return True
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _type_name(kind: Any) -> str:
    options = typing.get_args(kind) if typing.get_origin(kind) else (kind,)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        named = [_type_name(option) for option in options if option is not type(None)]
        return " or ".join(named) + (" (or left out)" if type(None) in options else "")
    return _TYPE_NAMES.get(typing.get_origin(kind) or kind, str(kind))


def check_fields(cfg: Any) -> None:
    """What every config checks of its fields: finite numbers, types as declared, seeds in
    range, URLs usable."""
    check_finite(cfg)
    check_types(cfg)
    check_seeds(cfg)
    check_urls(cfg)


def check_at_least(cfg: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value >= minimum:
            raise ConfigError(name, f"must be >= {minimum}, got {value}")


def check_at_most(cfg: Any, maximum: float, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value <= maximum:
            raise ConfigError(name, f"must be <= {maximum}, got {value}")


def check_fraction(cfg: Any, name: str, *, zero_allowed: bool = False) -> None:
    """0 < value < 1 (0 <= value < 1 when `zero_allowed`)."""
    value = getattr(cfg, name)
    if not ((value >= 0 if zero_allowed else value > 0) and value < 1):
        interval = "[0, 1)" if zero_allowed else "(0, 1)"
        raise ConfigError(name, f"must be in {interval}, got {value}")


def content_key(content: dict[str, Any]) -> str:
    """16 hex digits of sha256 over `content` as sorted JSON: the content keys of runs."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _task_name(cfg: Any) -> None:
    """Normalise cfg.task (aliases such as sst-2) when it is set, and give a `max_seq_length` of
    0 the task family's default; ConfigError listing every known task if it is unknown."""
    from bertvision.families import get_task, task_names

    if cfg.task:
        try:
            task = get_task(cfg.task)
        except ValueError:
            known = ", ".join(task_names())
            raise ConfigError("task", f"{cfg.task!r} is unknown; expected one of {known}") from None
        cfg.task = task.name
        if getattr(cfg, "max_seq_length", None) == 0:
            cfg.max_seq_length = task.family.max_seq_length


def _default_adapter(cfg: Any) -> None:
    """An empty `adapter` becomes the task family's (pooler for GLUE, span for SQuAD 2.0) once
    the task is known; it stays empty in a template without a task."""
    from bertvision.families import get_task

    if not cfg.adapter and cfg.task:
        cfg.adapter = get_task(cfg.task).family.default_adapter


def _adapter_fits_task(cfg: Any) -> None:
    """ConfigError for an adapter that does not read the task's rows: a GLUE adapter (one row
    per example) on a span task's windows, or a span adapter on a GLUE task."""
    from bertvision import adapters
    from bertvision.families import get_task

    if not cfg.task or cfg.adapter not in adapters.adapter_names():
        return
    family = get_task(cfg.task).family
    if adapters.config_class(cfg.adapter).schema == family.schema:
        return
    names = adapters.adapter_names()
    fitting = [n for n in names if adapters.config_class(n).schema == family.schema]
    rows = "window (span tasks)" if family.schema == "span" else "example (GLUE)"
    raise ConfigError(
        "adapter",
        f"{cfg.adapter!r} does not fit {cfg.task}, whose embeddings hold one row per {rows}; "
        f"use {' or '.join(fitting)}",
    )


def _resolve_model_and_device(cfg: Any) -> None:
    """The bundled encoder for an empty `model`; for an empty `device` cuda if there is one,
    else cpu; ConfigError naming `device` if it is not one torch has here."""
    import torch

    from bertvision import encoder as enc

    if hasattr(cfg, "model"):
        cfg.model = cfg.model or enc.default_model()
    cfg.device = cfg.device or enc.default_device()
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            "device", f"{cfg.device!r} is not a device: cpu, cuda or cuda:N"
        ) from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise ConfigError("device", f"{cfg.device!r} is not here: this machine has {gpus} GPU(s)")


# -- fields shared by several stages -----------------------------------------------------------

TASKS_HELP = "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or squad2 (SQuAD 2.0)"


@dataclass(kw_only=True)
class Task:
    task: str = setting("", TASKS_HELP, required=True)

    def __post_init__(self) -> None:
        _task_name(self)


@dataclass(kw_only=True)
class Output:
    """Where a result goes, and whether it may replace one made otherwise."""

    out: str = setting("", "Output URL: a path, memory://, az://", required=True, url=True)
    overwrite: bool = setting(
        False, "Replace a finished result made with other settings or inputs in OUT"
    )


@dataclass(kw_only=True)
class Stage(Output, Task):
    """What every stage has: its task, its output and whether it may replace one."""


@dataclass(kw_only=True)
class FromEmbeddings:
    embeddings: str = setting(
        "",
        "Extraction output URL (bertvision extract --out) holding the task",
        required=True,
        url=True,
    )


@dataclass(kw_only=True)
class Source:
    """Where the encoder and the data come from."""

    model: str = setting(
        "", "Hub name, local folder or fsspec URL of an encoder; default: bundled MiniLM", url=True
    )
    data_dir: str | None = setting(
        None,
        "A glue_data folder, or a SQuAD folder (train-v2.0.json, dev-v2.0.json); "
        "default: the Hugging Face hub",
        url=True,
    )


@dataclass(kw_only=True)
class Device:
    device: str = setting("", "cpu, cuda, cuda:1; default: cuda if available")


@dataclass(kw_only=True)
class Seeded:
    seed: int = setting(0, f"Seed of every random draw of the stage ({SEED_RANGE})")


@dataclass(kw_only=True)
class TrainSubset:
    """The training examples read. Extraction with a BERTVision-fine-tuned encoder must read
    those it was fine-tuned on, and adapters then refuse a held-out slice holding examples the
    encoder trained on (bertvision.finetune.FinetunedEncoder): set it as fine-tuning did."""

    max_train_examples: int | None = setting(
        None, "First N training examples (SQuAD: questions) only, for quick runs"
    )


@dataclass(kw_only=True)
class HeldOut:
    """The held-out slice of TRAIN: fine-tuning leaves it out, adapters are selected on it (and
    refuse one holding examples their encoder was fine-tuned on: set it as fine-tuning did)."""

    val_fraction: float = setting(0.1, "Slice of TRAIN held out for early stopping and selection")
    val_seed: int = setting(
        0, f"Which slice; the same value leaves out the same examples ({SEED_RANGE})"
    )


@dataclass(kw_only=True)
class Tokens:
    """How texts become the encoder's inputs: examples (GLUE) or windows of a long context with
    a document stride (SQuAD)."""

    max_seq_length: int = setting(
        0, "Tokens per example or window, at most; 0: the task's default (GLUE 128, SQuAD 384)"
    )
    doc_stride: int = setting(128, "SQuAD: context tokens that consecutive windows share")
    max_question_length: int = setting(64, "SQuAD: question tokens kept, at most")


# -- the stages --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FinetuneConfig(Stage, Source, Tokens, Device, Seeded, HeldOut, TrainSubset):
    """Settings of `bertvision finetune`: a brief fine-tuning of the encoder on one task."""

    epochs: float = setting(1.0, "Of fine-tuning; may be a fraction: 0.2")
    lr: float = setting(5e-5, "Peak learning rate of AdamW (linear warm-up and decay)")
    batch_size: int = setting(32, "Examples per step")
    warmup_fraction: float = setting(0.1, "Fraction of the steps spent warming up")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorms)")
    predict_test: bool = setting(
        True, "Write test predictions (unlabelled: costs time, scores nothing)"
    )

    def __post_init__(self) -> None:
        _task_name(self)
        check_fields(self)
        if not self.epochs > 0:
            raise ConfigError("epochs", f"must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        check_at_least(self, 0, "weight_decay")
        check_at_least(
            self, 1, "batch_size", "max_train_examples", "doc_stride", "max_question_length"
        )
        check_fraction(self, "val_fraction")
        check_fraction(self, "warmup_fraction", zero_allowed=True)
        _resolve_model_and_device(self)


DTYPES_HELP = (
    "Of the stored hidden states: float16 (lossless for the adapters), float32, or int8 "
    "(a float16 scale per layer and token; half float16's bytes, read back as float32)"
)


@dataclass(kw_only=True)
class ExtractConfig(Stage, Source, Tokens, Device, TrainSubset):
    """Settings of `bertvision extract`: all layers' hidden states of every example, as shards."""

    splits: list[str] = setting(
        default_factory=lambda: ["train", "dev"], help="Splits to extract: train,dev,test"
    )
    shard_size: int = setting(1000, "Examples (SQuAD: windows) per shard, at most")
    shard_bytes: int = setting(
        2**30,
        "Hidden-state bytes per shard, at most: fewer examples or windows per shard when "
        "max-seq-length tokens of every layer would pass it",
    )
    batch_size: int = setting(32, "Examples (SQuAD: windows) per forward pass")
    dtype: str = setting("float16", DTYPES_HELP)

    def __post_init__(self) -> None:
        from bertvision.schema import HIDDEN_DTYPES

        _task_name(self)
        check_fields(self)
        check_at_least(
            self,
            1,
            "shard_size",
            "shard_bytes",
            "batch_size",
            "doc_stride",
            "max_question_length",
            "max_train_examples",
        )
        if self.dtype not in HIDDEN_DTYPES:
            known = sorted(HIDDEN_DTYPES)
            raise ConfigError("dtype", f"must be one of {known}, got {self.dtype!r}")
        if self.task:
            from bertvision.extract import planned_splits

            try:
                self.splits = planned_splits(self.task, self.splits)
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError("splits", str(exc)) from None
        _resolve_model_and_device(self)


# The adapter's weights and activations grow with its width, and no data bounds it (a batch
# size or shard size past the data's is clipped to it): 4x BERT-large's hidden size.
ADAPTER_DIM_MAX = 4096


@dataclass(kw_only=True)
class TrainConfig(Stage, FromEmbeddings, Device, Seeded, HeldOut):
    """Settings of `bertvision train`: one adapter on stored embeddings (a sweep trial too)."""

    adapter: str = setting(
        "",
        "pooler, scalarmix or cls (the [CLS] linear probe); span for squad2; "
        "default: the task's (pooler; span for squad2)",
    )
    adapter_dim: int = setting(
        64, f"Width of the pooler's (and span adapter's) shared adapter (1 to {ADAPTER_DIM_MAX})"
    )
    token_pool: str = setting("cls+mean", "Pooler: first token (cls), masked mean, or cls+mean")
    dropout: float = setting(0.1, "Before the output layer")
    lr: float = setting(1e-3, "Learning rate of AdamW")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    epochs: int = setting(20, "At most; training stops early on a flat val metric")
    patience: int = setting(5, "Stop after N epochs without a better val metric; 0 = never")
    batch_size: int = setting(32, "Examples per step")
    model_fingerprint: str = setting("", "If set, refuse embeddings of any other encoder")
    max_resident_gb: float = setting(
        8.0, "Hold a split in (device) memory up to this size, else stream it from its shards"
    )
    shuffle_shards: int = setting(4, "When streaming: shards whose examples are shuffled together")
    read_ahead: int = setting(
        1,
        "When streaming: shard groups read and decoded on a thread while training on one "
        "(memory: 1 + this many groups); 0 = read each when its turn comes",
    )
    train_fraction: float = setting(
        1.0,
        "Share of TRAIN (held-out slice aside) trained on: a seeded subset of the examples "
        "(SQuAD: questions); for one seed, the 0.25 subset is part of the 0.5 one",
    )
    shuffle_seed: int | None = setting(
        None,
        "When streaming: seed of the order in which each epoch reads the shard groups "
        f"(default: seed; {SEED_RANGE}); runs sharing it and shuffle_shards can share every read",
    )

    def __post_init__(self) -> None:
        from bertvision import adapters

        _task_name(self)
        _default_adapter(self)
        check_fields(self)
        if self.adapter and self.adapter not in adapters.adapter_names():
            known = ", ".join(adapters.adapter_names())
            raise ConfigError("adapter", f"{self.adapter!r} is unknown; expected one of {known}")
        _adapter_fits_task(self)
        check_at_least(self, 1, "adapter_dim", "epochs", "batch_size", "shuffle_shards")
        check_at_most(self, ADAPTER_DIM_MAX, "adapter_dim")
        check_at_least(self, 0, "patience", "max_resident_gb", "read_ahead")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        check_at_least(self, 0, "weight_decay")
        check_fraction(self, "val_fraction")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError("train_fraction", f"must be in (0, 1], got {self.train_fraction}")
        _resolve_model_and_device(self)
        if self.adapter:  # validates the adapter's own options now
            self.adapter_config(layers=1, hidden_size=1)

    def adapter_config(self, layers: int, hidden_size: int):
        """The adapter's config for embeddings of `layers` x `hidden_size` (adapters registry)."""
        from bertvision import adapters, glue

        # GLUE: the task's classes (1: a score); span adapters give 2 logits (start, end) a token.
        glue_task = self.task and self.task in glue.TASKS
        try:
            return adapters.make_config(
                self.adapter,
                layers=layers,
                hidden_size=hidden_size,
                num_labels=glue.get_task(self.task).num_labels if glue_task else 2,
                dropout=self.dropout,
                adapter_dim=self.adapter_dim,
                token_pool=self.token_pool,
            )
        except ConfigError:
            raise
        except ValueError as exc:  # the adapter's own check, naming its field
            name = str(exc).split(" ", 1)[0]
            raise ConfigError(name, str(exc).removeprefix(f"{name} ")) from None

    def keyed_settings(self) -> dict[str, Any]:
        """The settings that can change the run's results (`run_key`): all but where it reads
        and writes and how fast (out, device, overwrite, embeddings, read_ahead)."""
        where = ("out", "device", "overwrite", "embeddings", "read_ahead")
        return {k: v for k, v in asdict(self).items() if k not in where}

    def run_key(self, extraction_keys: dict[str, str]) -> str:
        """Hashes what determines the run's results: a run folder never mixes two keys."""
        content = self.keyed_settings()
        # runs keyed before these options keep their keys
        if self.train_fraction == 1.0:
            del content["train_fraction"]
        # Whether the train split is held (shuffled whole) or streamed (shuffled in groups of
        # shuffle_shards shards) follows from the split's size and max_resident_gb alone, and
        # changes the batches: another limit may be another run.
        if self.max_resident_gb == TrainConfig.max_resident_gb:
            del content["max_resident_gb"]
        if self.shuffle_seed is None:
            del content["shuffle_seed"]
        content["extractions"] = extraction_keys
        return content_key(content)


# The training options with a range that a search-space entry must keep to, as TrainConfig
# checks it: else the sweep would start, write its records, and fail at its first trial.
SPACE_RANGES = {"seed": (0, SEED_MAX), "adapter_dim": (1, ADAPTER_DIM_MAX)}


def _space_extremes(spec: Any) -> list[Any] | None:
    """The values a well-formed search-space entry (sweep.check_space) gives at its ends; None
    for a continuous distribution, which gives non-integers."""
    if not isinstance(spec, dict):
        return [spec]
    kind, args = next(iter(spec.items()))
    if kind in ("uniform", "loguniform"):
        return None
    if kind == "randint":  # [low, high)
        return [args[0], args[1] - 1]
    return list(args) if kind == "choice" else args[:2]


def _check_space_ranges(space: dict[str, Any]) -> None:
    """ConfigError naming the first entry of a well-formed `space` that can give a value its
    training option refuses (SPACE_RANGES): one out of range, or a non-integer."""
    for name, (least, most) in SPACE_RANGES.items():
        if name not in space:
            continue
        extremes = _space_extremes(space[name])
        bad = "non-integers" if extremes is None else None
        for value in extremes or []:
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
                bad = repr(value)
                break
        if bad is not None:
            spec = space[name]
            gives = f"{json.dumps(spec)} can give {bad}" if isinstance(spec, dict) else bad
            raise ConfigError(
                "space", f"entry {name}: {gives}; {name} takes integers from {least} to {most}"
            )


def _check_space_values(cfg: SweepConfig) -> None:
    """ConfigError naming the first entry of `cfg`'s space whose end values (a constant, each
    choice, a distribution's bounds) a trial's TrainConfig refuses (lr -1, dropout 2, token_pool
    "max"): found now, not at the first trial once the sweep's records are written. A template
    without a task is checked when it gets one."""
    if not cfg.task:
        return
    for name, spec in cfg.resolved_space().items():
        extremes = _space_extremes(spec)
        # a continuous distribution gives fractions: an integer option refuses its bounds
        values = extremes or [float(end) for end in next(iter(spec.values()))[:2]]
        for value in values:
            try:
                TrainConfig(
                    task=cfg.task, embeddings="e", out="o", adapter=cfg.adapter, **{name: value}
                )
            except ConfigError as exc:
                why = exc.message
                if not extremes and why.startswith("must be an integer"):
                    why += f" ({next(iter(spec))} gives fractions: use quniform or randint)"
                raise ConfigError("space", f"entry {name}: {value!r}: {why}") from None


def _load_space(text: str) -> dict[str, Any]:
    """Search-space entries from the command line: inline JSON (`{"epochs": 3}`) or a file."""
    from bertvision.sweep import load_space

    if text.lstrip().startswith("{"):
        try:
            space = strict_loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("space", f"is not valid JSON: {exc}") from None
        if not isinstance(space, dict):
            raise ConfigError("space", "must be a mapping of parameter -> spec")
        return space
    return load_space(text)


@dataclass(kw_only=True)
class SweepConfig(Stage, FromEmbeddings, Device, Seeded, HeldOut):
    """Settings of `bertvision sweep`: hyperopt's TPE over an adapter, selected on held-out
    TRAIN. `seed` seeds hyperopt's draws (trial n draws from (seed, n))."""

    trials: int = setting(20, "Finished trials wanted in all (a rerun with more continues)")
    parallel: int = setting(
        1,
        "Trials at once: TPE suggests them in batches of this many, each batch from the trials "
        "before it (part of the sweep: a sweep resumes with the same --parallel)",
    )
    together: bool = setting(
        True,
        "Train the parallel trials of a batch together, over one read of the embeddings "
        "(else on threads, each trial reading them itself)",
    )
    adapter: str = setting(
        "", "pooler, scalarmix or cls; span for squad2; default: the task's (pooler; span)"
    )
    space: dict[str, Any] = setting(
        default_factory=dict,
        help="Search-space entries overriding the adapter's (on the command line: inline JSON "
        "such as '{\"epochs\": 3}', or a JSON or YAML file)",
        parse=_load_space,
    )
    startup_trials: int = setting(
        5, "Random trials before TPE models the results (hyperopt's default of 20 exceeds most)"
    )
    max_resident_gb: float = setting(
        8.0,
        "Hold a split in (device) memory up to this size, else stream it from its shards: one "
        "copy serves every trial, and each trial's batches follow from it",
    )

    def __post_init__(self) -> None:
        from bertvision.sweep import check_space

        _task_name(self)
        _default_adapter(self)
        _adapter_fits_task(self)
        check_fields(self)
        check_at_least(self, 1, "trials", "parallel", "startup_trials")
        check_at_least(self, 0, "max_resident_gb")
        check_fraction(self, "val_fraction")
        try:
            check_space(self.resolved_space())
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError("space", str(exc)) from None
        _check_space_ranges(self.resolved_space())
        _check_space_values(self)

    def resolved_space(self) -> dict[str, Any]:
        """The adapter's default space with this sweep's overrides applied (the overrides alone
        in a template without a task, whose adapter is not known yet)."""
        from bertvision.sweep import default_space

        return {**(default_space(self.adapter) if self.adapter else {}), **self.space}

    def key(self, extraction_keys: dict[str, str]) -> str:
        """Hashes what determines the trials, the embeddings' extraction keys included: a sweep
        folder never mixes two searches, nor trials on two extractions."""
        content = {
            "task": self.task,
            "adapter": self.adapter,
            "space": self.resolved_space(),
            "startup_trials": self.startup_trials,
            "parallel": self.parallel,  # the batches TPE suggests from the same history
            "max_resident_gb": self.max_resident_gb,  # held or streamed: the trials' batches
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "val_seed": self.val_seed,
            "extractions": extraction_keys,
        }
        return content_key(content)


@dataclass(kw_only=True)
class EnsembleConfig(Stage):
    """Settings of `bertvision ensemble`: the average of a sweep's best trials."""

    runs: str = setting("", "A sweep folder (bertvision sweep --out)", required=True, url=True)
    top_k: int = setting(5, "Members: the K best trials by validation metric")
    with_finetuned: str | None = setting(
        None, "A fine-tuning run whose outputs join the average as one more member", url=True
    )

    def __post_init__(self) -> None:
        _task_name(self)
        check_fields(self)
        check_at_least(self, 1, "top_k")


@dataclass(kw_only=True)
class ReportConfig:
    """Settings of `bertvision report`."""

    results: str = setting(
        "",
        "Results URL holding runs, sweeps and ensembles",
        required=True,
        argument=True,
        url=True,
    )
    out: str = setting("", "Where report.md and report.png go; default: the results URL", url=True)
    reference: str | None = setting(
        None,
        'JSON {"source": ..., "dev": {task: {metric: value}}} of published numbers',
        url=True,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        self.out = self.out or self.results


@dataclass(kw_only=True)
class VerifyConfig:
    """Settings of `bertvision verify`: a full read of every committed shard under an
    extraction output, against its commit record."""

    out: str = setting(
        "",
        "Extraction output URL (bertvision extract --out)",
        required=True,
        argument=True,
        url=True,
    )
    task: str = setting("", "Only this task; default: every task under OUT")
    split: str = setting("", "Only this split (train, dev, dev_matched, ...); default: every one")
    redo: bool = setting(
        False, "Uncommit each bad shard, so that the next extract redoes exactly those"
    )

    def __post_init__(self) -> None:
        _task_name(self)
        check_fields(self)


@dataclass(kw_only=True)
class PipelineConfig(Output, Source, Tokens, Device, Seeded, HeldOut, TrainSubset):
    """Settings of the whole pipeline (`bertvision run`, the `pipeline` flow), per task:

        OUT/<task>/finetune      fine-tuned encoder checkpoint and its dev metrics
        OUT/embeddings/<task>/   all-layer hidden states of its splits, as Parquet shards
        OUT/<task>/<adapter>     one adapter trained on them
        OUT/<task>/sweep         hyperopt trials over the adapter
        OUT/<task>/ensemble      the average of the best trials and the fine-tuned model

    Each stage's own settings come from its config here; the pipeline sets what links the
    stages (task, inputs, outputs) and what they share (its own fields: model, data_dir, seed,
    device, val_fraction, val_seed, max_train_examples, overwrite, and the windowing
    max_seq_length, doc_stride, max_question_length: fine-tuning and extraction see the same
    windows, as ensembles of both need). Fine-tuning predicts the
    test splits only when they are extracted (the ensemble's test predictions need both).
    """

    LINKED: ClassVar[tuple[str, ...]] = (
        "task",
        "out",
        "embeddings",
        "runs",
        "with_finetuned",
        "predict_test",
    )

    tasks: list[str] = setting(
        default_factory=lambda: ["rte"], help="GLUE tasks or squad2, e.g. rte,mrpc,squad2"
    )
    out: str = setting("runs/pipeline", "Output URL of every stage", url=True)
    workers: int = setting(
        0,
        "Extraction: spread the shards over N runs of the extract-shards deployment (a Prefect "
        "server's, PREFECT_API_URL); 0: here",
    )
    shards_per_task: int = setting(
        1,
        "Extraction: consecutive shards per task run; more for many small shards (fewer task "
        "runs and events for the Prefect server)",
    )
    finetune: FinetuneConfig = setting(default_factory=FinetuneConfig, help="Fine-tuning")
    extract: ExtractConfig = setting(default_factory=ExtractConfig, help="Extraction")
    train: TrainConfig = setting(default_factory=TrainConfig, help="The single adapter")
    sweep: SweepConfig = setting(default_factory=SweepConfig, help="The sweep")
    ensemble: EnsembleConfig = setting(default_factory=EnsembleConfig, help="The ensemble")
    verbose: bool = setting(
        False,
        "bertvision run: show the libraries' logs and warnings (Prefect's INFO lines, "
        "transformers' weight-loading reports); without it, progress bars and the results only",
    )

    def __post_init__(self) -> None:
        from bertvision.families import get_task

        if not self.tasks:
            raise ConfigError("tasks", "must name at least one task")
        try:
            self.tasks = [Task(task=name).task for name in self.tasks]
        except ConfigError as exc:
            raise ConfigError("tasks", exc.message) from None
        check_fields(self)
        check_at_least(self, 0, "workers")
        check_at_least(self, 1, "shards_per_task")
        check_fraction(self, "val_fraction")
        _resolve_model_and_device(self)
        families = {get_task(name).family.name for name in self.tasks}
        if self.data_dir and len(families) > 1:
            raise ConfigError(
                "tasks",
                f"mix {len(families)} task families ({', '.join(sorted(families))}), whose data "
                "one data folder cannot hold together; run each family on its own",
            )
        if self.ensemble.top_k > self.sweep.trials:
            raise ConfigError(
                "ensemble.top_k",
                f"{self.ensemble.top_k} is more than the sweep's {self.sweep.trials} trials",
            )
        for name in self.tasks:  # every stage's settings checked now, not when it starts
            try:
                self.stages(name)
            except ConfigError as exc:
                if exc.field in self._shared_names():  # the pipeline's own option
                    raise
                stage = next(s for s in PIPELINE_STAGES if exc.field in _field_names(self, s))
                raise ConfigError(f"{stage}.{exc.field}", exc.message) from None

    def stages(self, task: str) -> dict[str, Any]:
        """The five stage configs of `task`, linked: {"finetune": FinetuneConfig, ...}. The
        adapter of train and sweep, when their templates name none, is the task family's."""
        from bertvision.families import get_task
        from bertvision.storage import join

        family = get_task(task).family
        embeddings = join(self.out, "embeddings")
        finetune_out = join(self.out, task, "finetune")
        extract = self._stage(self.extract, task, out=embeddings, model=finetune_out)
        test_splits = set(family.evaluated_splits(task, True)) - set(
            family.evaluated_splits(task, False)
        )
        tested = bool(set(extract.splits) & test_splits)
        finetune = self._stage(self.finetune, task, out=finetune_out, predict_test=tested)
        adapter = self.train.adapter or family.default_adapter
        train = self._stage(
            self.train, task, embeddings=embeddings, out=join(self.out, task, adapter)
        )
        sweep = self._stage(
            self.sweep, task, embeddings=embeddings, out=join(self.out, task, "sweep")
        )
        ensemble = self._stage(
            self.ensemble,
            task,
            runs=sweep.out,
            out=join(self.out, task, "ensemble"),
            with_finetuned=finetune.out,
        )
        return {
            "finetune": finetune,
            "extract": extract,
            "train": train,
            "sweep": sweep,
            "ensemble": ensemble,
        }

    def _shared_names(self) -> set[str]:
        """The pipeline's own fields, which it sets in every stage that has them."""
        return {f.name for f in fields(self)} - set(PIPELINE_STAGES)

    def _stage(self, template: Any, task: str, **links: Any) -> Any:
        """`template` with the task, the links and the fields it shares with the pipeline."""
        own = self._shared_names()
        shared = {f.name: getattr(self, f.name) for f in fields(template) if f.name in own}
        return replace(template, **(shared | {"task": task} | links))


PIPELINE_STAGES = ("finetune", "extract", "train", "sweep", "ensemble")


def _field_names(cfg: Any, stage: str) -> set[str]:
    return {f.name for f in fields(getattr(cfg, stage))}
