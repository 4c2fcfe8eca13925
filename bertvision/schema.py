"""The one definition of BERTVision's stored data: shard columns, shard metadata, manifest records.

Every writer and reader imports this module; nobody builds a shard schema inline. The format is
documented for other tools in docs/shard-format.md.

Layout of one extraction of one task/split under an output URL:

    OUT/<task>/<split>/shard-00000.parquet      committed shards (shards.split_dataset reads them)
    OUT/<task>/<split>/_manifest/plan.json      what this extraction is: key, settings, shard count
    OUT/<task>/<split>/_manifest/shard-00000.json   commit record of one shard (written last)
    OUT/<task>/<split>/_manifest/shard-00000.failed.json   last failure of a shard not yet done
    OUT/<task>/<split>/_manifest/run.json       the run record (bertvision.records) of the whole
                                                extraction, once complete and verified
    OUT/<task>/<split>/_incomplete/...          shards being written (never read)

Readers build the dataset from the commit records (shards.split_dataset), never from the folder's
listing alone, which may hold stray files or a shard renamed into place before its record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa

from bertvision.finite import strict_json, strict_loads
from bertvision.records import code_info

# Each schema has its format version, written in every plan and shard:
# 1: GLUE, `hidden` was list (int32 offsets); still read.
# 2: GLUE, `hidden` was large_list (int64 offsets); still read, and still written where an
#    extraction was planned in it (an extraction finishes in the format it began in).
# 3: span tasks (SQuAD): one row per window, with its identity, offsets and answer positions;
#    `hidden` as in 2 (read, and written as 2 is).
# 4: GLUE, int8 states: `hidden` holds int8 bytes (large_binary), `hidden_scale` their scales.
# 5: span tasks, int8 states, as 4.
# 6: GLUE, float16 and float32 states as raw bytes too (large_binary): Parquet writes a list
#    column value by value with a repetition and a definition level each, which cost ~6x the
#    CPU of writing the same bytes as one binary value a row and ~10x of reading them
#    (benchmarks/RESULTS.md, "Raw bytes").
# 7: span tasks, float states as 6.
# A reader that knows only 1 and 2 refuses a span shard by its version instead of misreading it;
# one that knows 1 to 3, an int8 shard; one that knows 1 to 5, a raw-bytes float shard.
FORMAT_VERSION = 6
SPAN_FORMAT_VERSION = 7
FORMAT_VERSIONS = {"glue": FORMAT_VERSION, "span": SPAN_FORMAT_VERSION}
QUANTISED_FORMAT_VERSIONS = {"glue": 4, "span": 5}
# The formats whose `hidden` is a large_list of values, not bytes: still written to finish an
# extraction begun in one (format 1, a `list`, is only read).
LIST_FORMATS = (2, 3)
# The formats this version reads, per schema: a GLUE shard claiming 3 is refused as unknown.
READABLE_FORMATS = {"glue": (1, 2, 4, 6), "span": (3, 5, 7)}
META_PREFIX = "bertvision."
# Who wrote a shard or a plan: recorded beside the content, never hashed into a key.
CODE_FIELDS = ("code_version", "git_commit")
# Plan and shard fields added with span shards, and their values in GLUE plans and shards: a
# GLUE plan's key leaves them out, so GLUE keys are those of plans written before them.
SPAN_FIELDS = {"schema": "glue", "doc_stride": 0, "max_question_length": 0}


@dataclass(frozen=True)
class HiddenDtype:
    """An element type the hidden states may be stored as, in every library that handles them.

    `name` is what plans, shard metadata and `--dtype` say; the one table is HIDDEN_DTYPES.
    A quantised dtype (int8) stores each (layer, token) vector's values with a float16 scale
    (`bertvision.quantise`); readers give back float32 states.
    """

    name: str
    arrow: pa.DataType  # of the stored values (the list formats: of `hidden`'s elements)
    numpy: np.dtype  # of the stored values, and of the decoded arrays of float dtypes
    torch_name: str  # torch.<torch_name>: the stored values as training holds them
    scale: np.dtype | None = None  # quantised: the dtype of the scales (`hidden_scale`)

    @property
    def itemsize(self) -> int:
        """Bytes per stored value."""
        return self.numpy.itemsize

    @property
    def quantised(self) -> bool:
        return self.scale is not None

    def token_bytes(self, layers: int, hidden_size: int) -> int:
        """Bytes one token's states take, stored or held: values of every layer, and their
        scales (one a layer) if quantised."""
        scales = layers * self.scale.itemsize if self.quantised else 0
        return layers * hidden_size * self.itemsize + scales

    def torch(self):
        """The torch dtype (torch is imported here only: reading shards does not need it)."""
        import torch

        return getattr(torch, self.torch_name)


# Hidden-state element types a shard may hold; "float16" is the default (lossless for the
# adapters: float16 keeps about 3.3 significant digits).
HIDDEN_DTYPES: dict[str, HiddenDtype] = {
    dtype.name: dtype
    for dtype in (
        HiddenDtype("float16", pa.float16(), np.dtype(np.float16), "float16"),
        HiddenDtype("float32", pa.float32(), np.dtype(np.float32), "float32"),
        HiddenDtype("int8", pa.int8(), np.dtype(np.int8), "int8", scale=np.dtype(np.float16)),
    )
}


def hidden_dtype(name: str) -> HiddenDtype:
    """The stored dtype called `name`; ValueError naming the known ones otherwise."""
    if name not in HIDDEN_DTYPES:
        raise ValueError(f"unknown hidden dtype {name!r}; expected one of {sorted(HIDDEN_DTYPES)}")
    return HIDDEN_DTYPES[name]


def format_version(schema: str, dtype: str) -> int:
    """The format a new extraction of `schema` ("glue" or "span") holding `dtype` states is
    written in: 6 or 7, or 4 or 5 for int8."""
    versions = QUANTISED_FORMAT_VERSIONS if hidden_dtype(dtype).quantised else FORMAT_VERSIONS
    return versions[schema]


def label_type(regression: bool) -> pa.DataType:
    """int64 class index for classification, float32 score for regression (STS-B)."""
    return pa.float32() if regression else pa.int64()


def _hidden_fields(dtype: str, format_version: int | None) -> list[pa.Field]:
    # (L, T, H) in C order; L = num_hidden_layers + 1 (embeddings first). As raw bytes (the
    # values little-endian, L x T x H of them), or in the list formats a large_list of values
    # (int64 offsets: bert-large's 25 x 1024 values a token pass 2**31 within a shard).
    stored = hidden_dtype(dtype)
    if format_version in LIST_FORMATS:
        return [pa.field("hidden", pa.large_list(stored.arrow), nullable=False)]
    hidden = pa.field("hidden", pa.large_binary(), nullable=False)
    if not stored.quantised:
        return [hidden]
    # Scales (L, T) flattened in C order, one per layer and token.
    return [
        hidden,
        pa.field("hidden_scale", pa.large_list(pa.from_numpy_dtype(stored.scale)), nullable=False),
    ]


def shard_schema(
    *, regression: bool, dtype: str = "float16", format_version: int | None = None
) -> pa.Schema:
    """The GLUE schema: one row per example; `hidden` as `format_version` stores it (default:
    the current format)."""
    return pa.schema(
        [
            pa.field("example_id", pa.int64(), nullable=False),  # row index within its split
            pa.field("label", label_type(regression)),  # null for unlabelled test rows
            pa.field("length", pa.int32(), nullable=False),  # real tokens stored, T
            *_hidden_fields(dtype, format_version),
        ]
    )


def span_schema(*, dtype: str = "float16", format_version: int | None = None) -> pa.Schema:
    """The span schema (SQuAD): one row per window of a question's context, as
    `bertvision.squad.build_features` makes them; `hidden` as in `shard_schema`."""
    return pa.schema(
        [
            pa.field("window_id", pa.int64(), nullable=False),  # row index within its split
            pa.field("question_id", pa.string(), nullable=False),
            pa.field("example_index", pa.int64(), nullable=False),  # the question's, file order
            pa.field("window_index", pa.int32(), nullable=False),  # 0, 1, ... per question
            pa.field("is_impossible", pa.bool_(), nullable=False),
            # Token positions of the first answer in the window; 0 (CLS) for none in it.
            pa.field("start_position", pa.int32(), nullable=False),
            pa.field("end_position", pa.int32(), nullable=False),
            pa.field("length", pa.int32(), nullable=False),  # real tokens stored, T
            # (T, 2) flattened: [start, end) characters of each token in the context; -1 for
            # question, special tokens.
            pa.field("offsets", pa.list_(pa.int32()), nullable=False),
            *_hidden_fields(dtype, format_version),
        ]
    )


# The column that numbers a split's rows (examples or windows), per schema.
ID_COLUMNS = {"glue": "example_id", "span": "window_id"}
# What a split's rows are, per schema (as status reports name them).
ROW_NAMES = {"glue": "examples", "span": "windows"}
SCHEMAS = tuple(ID_COLUMNS)


def plan_schema(plan: ExtractionPlan) -> pa.Schema:
    """The columns of a shard of `plan`."""
    if plan.schema == "span":
        return span_schema(dtype=plan.dtype, format_version=plan.format_version)
    return shard_schema(
        regression=plan.regression, dtype=plan.dtype, format_version=plan.format_version
    )


@dataclass(frozen=True)
class ShardMeta:
    """Parquet key-value metadata carried by every shard (keys `bertvision.<field>`)."""

    task: str
    split: str
    model: str  # the name or URL it was loaded from
    model_fingerprint: str  # over the encoder's weights, config and tokenizer: encoder.fingerprint
    layers: int
    hidden_size: int
    max_seq_length: int
    dtype: str
    extraction_key: str
    format_version: int = FORMAT_VERSION
    # The code that wrote the shard (records.code_info); "" in shards written before they were
    # recorded. Never part of the extraction key.
    code_version: str = ""
    git_commit: str = ""
    # Which columns (SCHEMAS) and the windowing of span shards; absent from GLUE shards written
    # before span shards existed, which read as "glue".
    schema: str = "glue"
    doc_stride: int = 0
    max_question_length: int = 0

    def to_metadata(self) -> dict[bytes, bytes]:
        return {f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> ShardMeta:
        raw = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        values = {}
        for f in fields(cls):
            key = f"{META_PREFIX}{f.name}"
            if key not in raw:
                if f.name in CODE_FIELDS or f.name in SPAN_FIELDS:  # an older shard, as written
                    continue
                raise ValueError(f"not a BERTVision shard: metadata key {key!r} is missing")
            values[f.name] = int(raw[key]) if f.type == "int" else raw[key]
        return cls(**values)


@dataclass(frozen=True)
class ExtractionPlan:
    """What one extraction of one task/split is; stored as _manifest/plan.json.

    `key` hashes everything that determines the shards' content. A plan with another key in the
    same folder is a different extraction, and the two are never mixed.
    """

    task: str
    split: str
    model: str
    model_fingerprint: str
    data_fingerprint: str
    num_examples: int
    shard_size: int
    max_seq_length: int
    dtype: str
    layers: int
    hidden_size: int
    regression: bool
    format_version: int = FORMAT_VERSION
    key: str = field(default="", compare=False)
    # The code that planned the extraction; "" in plans written before it was recorded. Not
    # content: another commit's plan of the same content has the same key, and resumes it.
    code_version: str = field(default="", compare=False)
    git_commit: str = field(default="", compare=False)
    # Span tasks: schema "span", and the windowing (SQuAD's doc stride and question tokens).
    # `num_examples` then counts windows, and shards are ranges of windows.
    schema: str = "glue"
    doc_stride: int = 0
    max_question_length: int = 0
    # The target of a shard's hidden-state bytes that chose `shard_size` (0: none recorded).
    # Not content: the shards depend on `shard_size` alone.
    shard_bytes: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.schema not in SCHEMAS:
            raise ValueError(f"schema must be one of {list(SCHEMAS)}, got {self.schema!r}")
        object.__setattr__(self, "key", self.content_key())

    def content_key(self) -> str:
        # a path is not content, nor is the code, nor the byte target behind shard_size
        where = ("key", "model", "shard_bytes", *CODE_FIELDS)
        content = {
            k: v
            for k, v in asdict(self).items()
            if k not in where and not (k in SPAN_FIELDS and v == SPAN_FIELDS[k])
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_examples // self.shard_size))

    def shard_range(self, index: int) -> tuple[int, int]:
        """Row ids (examples, or windows for span plans) [start, stop) of shard `index`."""
        if not 0 <= index < self.num_shards:
            raise IndexError(
                f"shard {index} out of range: {self.task}/{self.split} has {self.num_shards} shards"
            )
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_examples)

    def shard_key(self, index: int) -> str:
        start, stop = self.shard_range(index)
        return f"{self.key}:{start}-{stop}"

    def shard_meta(self) -> ShardMeta:
        """The metadata of a shard of this plan written now, by this process's code."""
        code = code_info()
        return ShardMeta(
            task=self.task,
            split=self.split,
            model=self.model,
            model_fingerprint=self.model_fingerprint,
            layers=self.layers,
            hidden_size=self.hidden_size,
            max_seq_length=self.max_seq_length,
            dtype=self.dtype,
            extraction_key=self.key,
            format_version=self.format_version,
            code_version=code["version"],
            git_commit=code["git_commit"],
            schema=self.schema,
            doc_stride=self.doc_stride,
            max_question_length=self.max_question_length,
        )

    def to_json(self) -> str:
        return strict_json(asdict(self), type(self).__name__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExtractionPlan:
        data = _json_object(text)
        stored_key = data.pop("key", "")
        plan = cls(**data)
        if stored_key and stored_key != plan.key:
            raise ValueError(
                f"plan.json is corrupt: stored key {stored_key} != computed {plan.key}"
            )
        return plan


@dataclass(frozen=True)
class ShardRecord:
    """Commit record of one shard, _manifest/shard-NNNNN.json. Its presence is the commit point."""

    index: int
    file: str  # file name relative to the split folder
    start: int
    stop: int
    rows: int
    bytes: int
    sha256: str
    key: str  # ExtractionPlan.shard_key(index)
    seconds: float
    worker: str
    committed_at: str

    def to_json(self, indent: int | None = 2) -> str:
        return strict_json(asdict(self), type(self).__name__, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        return cls(**_json_object(text))


@dataclass(frozen=True)
class ShardFailure:
    """Last failure of a shard not committed since: _manifest/shard-NNNNN.failed.json."""

    index: int
    error: str
    worker: str
    failed_at: str

    def to_json(self) -> str:
        return strict_json(asdict(self), type(self).__name__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardFailure:
        return cls(**_json_object(text))


def _json_object(text: str) -> dict:
    """A record's fields; ValueError if `text` is not a JSON object (TypeError follows from the
    constructor for missing or unknown fields)."""
    data = strict_loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_record_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def shard_failure_name(index: int) -> str:
    return f"shard-{index:05d}.failed.json"


MANIFEST_DIR = "_manifest"
INCOMPLETE_DIR = "_incomplete"
PLAN_FILE = "plan.json"
RUN_FILE = "run.json"
