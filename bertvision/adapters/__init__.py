"""Adapter models trained on stored all-layer embeddings, and the registry that names them.

Every adapter is an `nn.Module` with one contract, by the rows it reads:

    logits = adapter(batch)   # batch: a TokenBatch (bertvision.batch) -> (B, C)

where `batch.tokens` (N, L, H) holds the real tokens of B examples packed one after another
(no padding), L counts the embedding output plus every encoder layer, and C is the task's number
of classes (1 for regression). Span adapters (config `schema` "span", for SQuAD's windows)
answer per token instead, in the padded layout of the batch's longest window T:

    start_logits, end_logits = adapter(batch)    # each (B, T), -inf at padding

An example's output never depends on its batch-mates. Dropout layers are `adapters.Dropout`, so that
training can give each run its own random generator (`use_generator`).

One module per method (`pooler.py`, `scalarmix.py`, `cls.py`, `span.py`), each holding its
config dataclass, its `nn.Module` and one `register(name, ConfigClass, ModuleClass)` call. A
config is saved as JSON next to the weights with its adapter name, so `load_adapter` always
rebuilds the right class:

    save_adapter(model, "RUN/adapter")      # adapter_config.json + adapter.safetensors
    model = load_adapter("RUN/adapter")     # a PoolerConfig comes back as an AdapterPooler
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from bertvision import storage
from bertvision.config import check_finite
from bertvision.finite import strict_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


@dataclass
class AdapterConfig:
    """What every adapter needs: the shape of the embeddings and of the output.

    The shape fields come from the embeddings (`layers`, `hidden_size`) and the task
    (`num_labels`), so a saved config rebuilds a module that fits the saved weights.
    """

    layers: int  # L: the embedding output + every encoder layer
    hidden_size: int  # H
    num_labels: int  # classes; 1 = regression (one score)
    dropout: float = 0.1  # before the output layer

    adapter_name: ClassVar[str] = ""  # set by register()
    # The rows of the extractions it reads (bertvision.schema): "glue", one per example, giving
    # (B, C) logits; "span", one per window, giving per-token start and end logits.
    schema: ClassVar[str] = "glue"

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("layers", "hidden_size", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter_name, **asdict(self)}


_NAME = re.compile(r"[a-z][a-z0-9_]*")
_CONFIGS: dict[str, type[AdapterConfig]] = {}
_MODULES: dict[str, type[nn.Module]] = {}


def register(name: str, config_class: type[AdapterConfig], module_class: type[nn.Module]) -> None:
    """Make adapter `name` known; the module class is built as `module_class(config)`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"bad adapter name {name!r}: use lower-case letters, digits and '_', "
            "starting with a letter"
        )
    if name in _CONFIGS:
        raise ValueError(f"adapter {name!r} is already registered")
    if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)):
        raise TypeError(f"adapter {name!r}: config class must subclass AdapterConfig")
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"adapter {name!r}: module class must subclass torch.nn.Module")
    if "adapter_name" in vars(config_class) and config_class.adapter_name:
        raise ValueError(
            f"adapter {name!r}: {config_class.__name__} is already registered "
            f"as {config_class.adapter_name!r}"
        )
    config_class.adapter_name = name
    _CONFIGS[name] = config_class
    _MODULES[name] = module_class


def adapter_names() -> list[str]:
    return sorted(_CONFIGS)


def config_class(name: str) -> type[AdapterConfig]:
    if name not in _CONFIGS:
        raise ValueError(f"unknown adapter {name!r}; expected one of {', '.join(adapter_names())}")
    return _CONFIGS[name]


def make_config(name: str, **values: Any) -> AdapterConfig:
    """The config of adapter `name` from `values`; values it has no field for are left out, so
    one set of training options (adapter_dim, dropout, ...) serves every adapter."""
    cls = config_class(name)
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    data = dict(data)
    name = data.pop("adapter", None)
    if name is None:
        raise ValueError("adapter config has no 'adapter' name")
    return config_class(name)(**data)


def build_adapter(config: AdapterConfig) -> nn.Module:
    if not config.adapter_name or config.adapter_name not in _MODULES:
        raise ValueError(f"{type(config).__name__} is not a registered adapter config")
    return _MODULES[config.adapter_name](config)


def save_adapter(model: nn.Module, url: str) -> None:
    """Write `model.config` as JSON and the weights as safetensors under folder `url`."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    fs, path = storage.url_to_fs(storage.join(url, WEIGHTS_FILE))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, save(state))
    storage.write_text_atomic(
        storage.join(url, CONFIG_FILE),
        strict_json(model.config.to_dict(), f"{url}/{CONFIG_FILE}", indent=2) + "\n",
    )


def load_adapter(url: str, device: str = "cpu") -> nn.Module:
    """The adapter saved under folder `url`, of the class its config names, in eval mode."""
    from safetensors.torch import load

    config_url = storage.join(url, CONFIG_FILE)
    if not storage.exists(config_url):
        raise FileNotFoundError(f"no adapter under {url} (missing {CONFIG_FILE})")
    try:
        config = config_from_dict(storage.read_json(config_url, keys=("adapter",)))
    except TypeError as exc:  # unknown or missing fields
        raise storage.FileFormatError(f"{config_url} is not an adapter config: {exc}") from None
    model = build_adapter(config)
    fs, path = storage.url_to_fs(storage.join(url, WEIGHTS_FILE))
    model.load_state_dict(load(fs.cat_file(path)))
    return model.to(device).eval()


class Dropout(nn.Dropout):
    """`nn.Dropout` that draws its masks from `generator` when one is set (`use_generator`), not
    from torch's global generator: runs on threads of one process then draw independently, each
    what its own seed gives. Every adapter uses this class for its dropout."""

    generator: torch.Generator | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.generator is None:
            return super().forward(input)
        keep = torch.empty_like(input).bernoulli_(1.0 - self.p, generator=self.generator)
        return input * keep / (1.0 - self.p)


def use_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make every `Dropout` of `model` draw from `generator` (on the model's device); None =
    torch's global generator."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.generator = generator


# Each method registers itself on import.
from bertvision.adapters.cls import ClsConfig, ClsProbe  # noqa: E402
from bertvision.adapters.pooler import AdapterPooler, PoolerConfig  # noqa: E402
from bertvision.adapters.scalarmix import ScalarMix, ScalarMixConfig  # noqa: E402
from bertvision.adapters.span import SpanAdapter, SpanConfig  # noqa: E402

__all__ = [
    "AdapterConfig",
    "AdapterPooler",
    "ClsConfig",
    "ClsProbe",
    "Dropout",
    "PoolerConfig",
    "ScalarMix",
    "ScalarMixConfig",
    "SpanAdapter",
    "SpanConfig",
    "adapter_names",
    "build_adapter",
    "config_class",
    "config_from_dict",
    "load_adapter",
    "make_config",
    "register",
    "save_adapter",
    "use_generator",
]
