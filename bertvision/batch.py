"""What adapters read: a batch's real tokens packed together, never padded.

    batch = packed.batch(rows, "cuda")   # embeddings.Packed -> TokenBatch
    batch.tokens                         # (N, L, H) float32, N = real tokens of the batch
    logits = adapter(batch)              # (B, C)

Tokens sit example by example, in the order of the batch's rows, each example's tokens in
order: example b's tokens are rows starts[b] .. starts[b] + lengths[b] - 1 of `tokens`, and
`example`, `position` say where each token sits in a padded (B, T) layout. The reductions the
adapters need take (N, ...) values of these tokens: `first` (token 0, [CLS]), `mean` (over each
example's tokens) and `scatter` (back into a zero-padded (B, T, ...) tensor, for per-token
outputs); `mask` and `padded` give the padded view where it is wanted (tests, references).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """The real tokens of B examples, packed: N = the sum of their lengths."""

    tokens: torch.Tensor  # (N, L, H) float32
    lengths: torch.Tensor  # (B,) int64, tokens of each example, all >= 1
    starts: torch.Tensor  # (B,) int64, the row of each example's first token in `tokens`
    example: torch.Tensor  # (N,) int64, the example (0 .. B-1) of each token
    position: torch.Tensor  # (N,) int64, each token's place in its example (0 .. length-1)
    width: int  # T, the longest example's length

    @classmethod
    def of(cls, tokens: torch.Tensor, lengths: torch.Tensor, width: int) -> TokenBatch:
        """The batch of `tokens` (N, L, H), example by example, of `lengths` (B,) on the tokens'
        device; `width` is lengths.max(), given so that nothing waits on the device."""
        return cls(tokens, lengths, *layout(lengths, len(tokens)), width)

    @classmethod
    def from_padded(cls, hidden: torch.Tensor, mask: torch.Tensor) -> TokenBatch:
        """The batch of padded states: hidden (B, L, T, H), mask (B, T) True on real tokens, each
        row's real tokens first (right padding, as the encoder pads). What is at padding is
        never read. ValueError if a row has no real token or a gap in its mask."""
        lengths = mask.sum(dim=1)
        if not torch.equal(
            mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
        ):
            raise ValueError("every row of the mask must be real tokens first, then padding")
        if bool((lengths < 1).any()):
            raise ValueError("every example needs at least one real token")
        tokens = hidden.transpose(1, 2)[mask].float()  # (N, L, H)
        return cls.of(tokens, lengths, int(lengths.max()))

    @property
    def size(self) -> int:
        """B, the number of examples."""
        return len(self.lengths)

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool, True on each example's real tokens."""
        positions = torch.arange(self.width, device=self.lengths.device)
        return positions[None, :] < self.lengths[:, None]

    def first(self, values: torch.Tensor) -> torch.Tensor:
        """Each example's value at its first token: (N, ...) -> (B, ...)."""
        return values[self.starts]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over each example's tokens: (N, ...) -> (B, ...).

        Summed by `index_add` on the CPU; on other devices, where `index_add` adds in any order
        (atomics: results would change from run to run), by `torch.segment_reduce`, which adds
        each example's tokens in order."""
        if values.device.type == "cpu":
            zeros = values.new_zeros((self.size, *values.shape[1:]))
            total = zeros.index_add(0, self.example, values)
        else:
            total = torch.segment_reduce(values, "sum", lengths=self.lengths, axis=0)
        return total / self.lengths.view(-1, *[1] * (values.dim() - 1)).to(values.dtype)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The values of the tokens in the padded layout, zero at padding: (N, ...) ->
        (B, T, ...)."""
        padded = values.new_zeros((self.size, self.width, *values.shape[1:]))
        return padded.index_put((self.example, self.position), values)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, L, T, H) zero at padding, and mask (B, T): the padded view of the batch."""
        return self.scatter(self.tokens).transpose(1, 2).contiguous(), self.mask


def layout(lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the tokens of examples of `lengths` (B,) sit when packed one after another, `total`
    (= lengths.sum()) in all: starts (B,), and each token's example and position, each (N,),
    on the lengths' device."""
    example = torch.repeat_interleave(
        torch.arange(len(lengths), device=lengths.device), lengths, output_size=total
    )
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(total, device=lengths.device) - starts[example]
    return starts, example, position
