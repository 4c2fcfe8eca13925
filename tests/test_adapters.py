"""Adapter models: the registry, configs, save/load, padding invariance, trained layer weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bertvision import adapters
from bertvision.adapters import (
    AdapterConfig,
    AdapterPooler,
    PoolerConfig,
    ScalarMix,
    build_adapter,
    load_adapter,
    make_config,
    register,
    save_adapter,
)
from bertvision.batch import TokenBatch

SHAPE = {"layers": 3, "hidden_size": 8}


def make(name: str, num_labels: int = 2, **options) -> nn.Module:
    torch.manual_seed(0)
    options = {"adapter_dim": 4, **options}
    return build_adapter(make_config(name, **SHAPE, num_labels=num_labels, **options)).eval()


def test_the_four_adapters_are_registered():
    assert adapters.adapter_names() == ["cls", "pooler", "scalarmix", "span"]


@pytest.mark.parametrize("name", ["Pooler", "1pool", "", "my-adapter", "a b"])
def test_registry_refuses_badly_formed_names(name):
    with pytest.raises(ValueError, match="bad adapter name"):
        register(name, PoolerConfig, AdapterPooler)


def test_registry_refuses_a_duplicate_name_and_wrong_classes():
    @dataclasses.dataclass
    class OtherConfig(AdapterConfig):
        pass

    with pytest.raises(ValueError, match="'pooler' is already registered"):
        register("pooler", OtherConfig, AdapterPooler)
    with pytest.raises(TypeError, match="subclass AdapterConfig"):
        register("other", dict, AdapterPooler)
    with pytest.raises(TypeError, match="subclass torch.nn.Module"):
        register("other", OtherConfig, dict)
    with pytest.raises(ValueError, match="already registered as 'pooler'"):
        register("other", PoolerConfig, AdapterPooler)
    assert "other" not in adapters.adapter_names()


def test_configs_validate_themselves():
    with pytest.raises(ValueError, match="^adapter_dim must be >= 1, got 0$"):
        PoolerConfig(**SHAPE, num_labels=2, adapter_dim=0)
    with pytest.raises(ValueError, match="token_pool must be one of"):
        PoolerConfig(**SHAPE, num_labels=2, token_pool="max")
    with pytest.raises(ValueError, match="layers must be >= 1"):
        make_config("scalarmix", layers=0, hidden_size=8, num_labels=2)
    with pytest.raises(ValueError, match="dropout must be in"):
        make_config("cls", **SHAPE, num_labels=2, dropout=1.0)
    with pytest.raises(ValueError, match="unknown adapter 'lstm'"):
        make_config("lstm", **SHAPE, num_labels=2)


def test_make_config_takes_only_the_options_an_adapter_has():
    config = make_config("cls", **SHAPE, num_labels=3, adapter_dim=16, dropout=0.2)
    assert config.to_dict() == {
        "adapter": "cls",
        "layers": 3,
        "hidden_size": 8,
        "num_labels": 3,
        "dropout": 0.2,
    }


@pytest.mark.parametrize("name", ["pooler", "scalarmix", "cls"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_output_is_one_logit_per_class_or_one_score(name, num_labels):
    model = make(name, num_labels=num_labels)
    out = model(TokenBatch.from_padded(torch.randn(5, 3, 7, 8), torch.ones(5, 7, dtype=torch.bool)))
    assert out.shape == (5, num_labels)


@pytest.mark.parametrize("name", ["pooler", "scalarmix", "cls"])
@pytest.mark.parametrize("token_pool", ["cls+mean", "mean", "cls"])
def test_padding_never_affects_the_output(name, token_pool):
    model = make(name, token_pool=token_pool)
    torch.manual_seed(1)
    example = torch.randn(3, 4, 8)  # (L, T, H): 4 real tokens
    alone = model(TokenBatch.from_padded(example[None], torch.ones(1, 4, dtype=torch.bool)))

    in_batch = model(TokenBatch.from_padded(*among_padded_batch_mates(example)))
    torch.testing.assert_close(in_batch[0], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(in_batch).all()


def padded_adapter_pooler(model: AdapterPooler, hidden: torch.Tensor, mask: torch.Tensor):
    """The pooler's formulas (pooler.py) computed at every position, padding included: its
    adapter on every layer and token, then the first token and the masked mean."""
    adapted = hidden + model.up(nn.functional.gelu(model.down(hidden)))  # (B, L, T, H)
    parts = {"cls": [adapted[:, :, 0]], "mean": [masked_mean(adapted, mask)]}
    parts["cls+mean"] = parts["cls"] + parts["mean"]
    pooled = torch.cat(parts[model.config.token_pool], dim=-1)  # (B, L, P)
    mixed = torch.einsum("blp,l->bp", pooled, torch.softmax(model.layer_logits, dim=0))
    return model.head(model.dropout(mixed))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the token axis of real tokens only: (B, L, T, H), mask (B, T) -> (B, L, H)."""
    keep = mask[:, None, :, None]
    return torch.where(keep, values, 0.0).sum(dim=2) / keep.sum(dim=2)


def padded_span_adapter(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor):
    """The span adapter's formulas (span.py) at every position, padding included."""
    adapted = hidden + model.up(nn.functional.gelu(model.down(hidden)))  # (B, L, T, H)
    mixed = torch.einsum("blth,l->bth", adapted, torch.softmax(model.layer_logits, dim=0))
    logits = model.head(model.dropout(mixed)).masked_fill(~mask[:, :, None], float("-inf"))
    return logits[..., 0], logits[..., 1]


def batch_of_very_different_lengths() -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (4, 3, 30, 8) with 30, 2, 17 and 1 real tokens, padding zero (as
    TokenBatch.padded gives it), and its mask."""
    torch.manual_seed(2)
    lengths = torch.tensor([30, 2, 17, 1])
    mask = torch.arange(30)[None, :] < lengths[:, None]
    hidden = torch.randn(4, 3, 30, 8).masked_fill(~mask[:, None, :, None], 0.0)
    return hidden, mask


@pytest.mark.parametrize("token_pool", ["cls+mean", "mean", "cls"])
def test_the_pooler_on_real_tokens_only_equals_its_padded_formulas(token_pool):
    """Outputs and the gradient of every parameter are those of the adapter run on every
    position, padding included, then pooled over the real tokens."""
    model = make("pooler", token_pool=token_pool, init_scale=0.5)  # `up` far from 0
    hidden, mask = batch_of_very_different_lengths()
    ours = model(TokenBatch.from_padded(hidden, mask))
    theirs = padded_adapter_pooler(model, hidden, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert_same_gradients(model, ours, theirs)


def test_the_span_adapter_on_real_tokens_only_equals_its_padded_formulas():
    model = make("span", num_labels=2, init_scale=0.5)
    hidden, mask = batch_of_very_different_lengths()
    ours = torch.stack(model(TokenBatch.from_padded(hidden, mask)))
    theirs = torch.stack(padded_span_adapter(model, hidden, mask))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # -inf at the same places
    real = mask.expand(2, -1, -1)
    assert_same_gradients(model, ours[real], theirs[real])


def assert_same_gradients(model: nn.Module, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Each parameter's gradient of a weighted sum of `ours` equals that of `theirs`."""
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters()]
    mine = torch.autograd.grad((ours * weights).sum(), params)
    reference = torch.autograd.grad((theirs * weights).sum(), params)
    for param_name, a, b in zip(dict(model.named_parameters()), mine, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=param_name)


@pytest.mark.parametrize("name", ["pooler", "scalarmix", "cls"])
def test_save_and_load_rebuild_the_same_class_and_outputs(name):
    model = make(name, num_labels=3)
    url = f"memory://adapters-{name}/adapter"
    save_adapter(model, url)
    loaded = load_adapter(url)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    hidden, mask = torch.randn(2, 3, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(
        loaded(TokenBatch.from_padded(hidden, mask)), model(TokenBatch.from_padded(hidden, mask))
    )


def test_loading_a_folder_without_an_adapter_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no adapter under memory://nothing-here"):
        load_adapter("memory://nothing-here")


def test_scalar_mix_learns_its_layer_weights_and_scale():
    """Only layer 2 carries the label: training must move the softmax weights towards it."""
    torch.manual_seed(0)
    model = make("scalarmix", dropout=0.0).train()
    labels = torch.randint(0, 2, (64,))
    hidden = torch.randn(64, 3, 5, 8)
    hidden[:, 2, :, 0] += 4.0 * (2 * labels[:, None] - 1)
    mask = torch.ones(64, 5, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(TokenBatch.from_padded(hidden, mask)), labels).backward()
        optimizer.step()
    assert isinstance(model, ScalarMix)
    weights = model.layer_weights()
    assert weights.argmax() == 2 and weights[2] > 0.5
    assert model.scale.item() != 1.0


def among_padded_batch_mates(example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, mask): `example` (L, 4, H) first in a batch of 3 with 12 positions, its 8 padding
    positions filled with large garbage instead of zeros, another row's padding with NaN."""
    layers, _, hidden = example.shape
    batch = torch.randn(3, layers, 12, hidden)
    batch[0, :, :4] = example
    batch[0, :, 4:] = 1e4
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 9:] = False
    batch[2, :, 9:] = float("nan")
    return batch, mask
