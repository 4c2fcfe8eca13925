"""TokenBatch, what adapters read: a batch's real tokens packed example by example, no padding."""

from __future__ import annotations

import pytest
import torch

from bertvision.batch import TokenBatch


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (3, 2, 4, 1): example 0 has 2 real tokens, 1 has 4, 2 has 1; token t of example b
    in layer l holds 100 b + 10 l + t, padding holds NaN."""
    lengths = torch.tensor([2, 4, 1])
    mask = torch.arange(4)[None, :] < lengths[:, None]
    b, layer, t = torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(4), indexing="ij")
    hidden = (100 * b + 10 * layer + t).float()[..., None]
    return hidden.masked_fill(~mask[:, None, :, None], float("nan")), mask


def test_a_padded_batch_packs_its_real_tokens_example_by_example_in_order():
    batch = TokenBatch.from_padded(*padded_batch())
    assert batch.tokens.shape == (7, 2, 1) and batch.tokens.dtype == torch.float32
    assert batch.tokens[:, 0, 0].tolist() == [0, 1, 100, 101, 102, 103, 200]  # layer 0
    assert batch.tokens[:, 1, 0].tolist() == [10, 11, 110, 111, 112, 113, 210]  # layer 1
    assert batch.lengths.tolist() == [2, 4, 1] and batch.size == 3 and batch.width == 4
    assert batch.starts.tolist() == [0, 2, 6]
    assert batch.example.tolist() == [0, 0, 1, 1, 1, 1, 2]
    assert batch.position.tolist() == [0, 1, 0, 1, 2, 3, 0]
    assert batch.mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]


def test_first_mean_and_scatter_reduce_each_example_over_its_own_tokens_only():
    batch = TokenBatch.from_padded(*padded_batch())
    assert batch.first(batch.tokens)[:, :, 0].tolist() == [[0, 10], [100, 110], [200, 210]]
    assert batch.mean(batch.tokens)[:, :, 0].tolist() == [[0.5, 10.5], [101.5, 111.5], [200, 210]]
    layer_0 = batch.scatter(batch.tokens[:, 0, 0])  # (B, T), zero at padding
    assert layer_0.tolist() == [[0, 1, 0, 0], [100, 101, 102, 103], [200, 0, 0, 0]]


def test_the_padded_view_gives_back_the_real_tokens_and_zero_padding():
    given, mask = padded_batch()
    hidden, back = TokenBatch.from_padded(given, mask).padded()
    assert torch.equal(back, mask)
    assert torch.equal(hidden, given.nan_to_num(0.0)) and hidden.is_contiguous()


def test_the_mean_passes_each_example_its_share_of_the_gradient():
    batch = TokenBatch.from_padded(*padded_batch())
    tokens = batch.tokens.clone().requires_grad_()
    batch.mean(tokens).sum().backward()
    assert tokens.grad[:, 0, 0].tolist() == [1 / 2] * 2 + [1 / 4] * 4 + [1.0]


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ([[True, False, True]], "real tokens first"),
        ([[False, False, False]], "at least one real token"),
    ],
)
def test_masks_with_gaps_or_no_real_token_are_refused(mask, message):
    with pytest.raises(ValueError, match=message):
        TokenBatch.from_padded(torch.zeros(1, 2, 3, 4), torch.tensor(mask))
