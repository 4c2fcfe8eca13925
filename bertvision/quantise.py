"""int8 hidden states: symmetric absmax quantisation with one float16 scale per (layer, token).

    values, scales = quantise(states)     # (L, T, H) float -> (L, T, H) int8, (L, T) float16
    restored = dequantise(values, scales)  # (L, T, H) float32

Each token's vector in each layer is scaled so that its largest magnitude maps to 127:
`scale = absmax / 127`, rounded up to a float16, and `value = round(x / scale)`, which rounding
up keeps within [-127, 127] (symmetric: -128 is never used, so negation is exact). Every
restored element is within half its scale of the original, `|x - value * scale| <= scale / 2`,
i.e. within 1/254 of its token's largest magnitude in that layer (times 1 + 2**-10, float16's
rounding). Below float16's normal range (absmax < 127 * 2**-14, about 0.0078; never seen in
BERT's states) the scale's step is float16's smallest, 2**-24, so the error is at most
`absmax / 254 + 2**-25`: never a whole token lost to a scale rounded to zero. A token whose
states are all zero has scale 0 and restores to zeros.

Why per (layer, token): measured on all-MiniLM-L6-v2's states of RTE dev
(benchmarks/bench_int8.py), it restores the states with 0.9-1.7% relative RMS error per layer
for 0.5% of extra bytes, at any sequence length. One scale per token across all layers costs
less (0.07%) but errs 1.5-3.3% (the layers' ranges differ); one per (layer, channel) of an
example, the usual cure for BERT's outlier dimensions (Bondarenko et al. 2021, "Understanding
and Overcoming the Challenges of Efficient Transformer Quantization"), errs 0.6-0.8% but its
L x H scales cost 2 / T of the values' bytes (3% at RTE's 65 tokens, 17% at CoLA's 11). A
float16 scale adds at most 2**-10 relative error to the scale, far below int8's step.

Scales are float16: states beyond 127 x 65504 in magnitude overflow them (`quantise` gives an
infinite scale; extraction refuses such states, see bertvision.extract).
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127


def quantise(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 values (..., T, H) and float16 scales (..., T) of float `states` (..., T, H): one
    scale per vector along the last axis (per layer and token for (L, T, H)).

    Non-finite states give non-finite scales (their values are then meaningless); callers
    check the scales."""
    states = np.asarray(states, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        exact = np.abs(states).max(axis=-1) / INT8_MAX
        scales = exact.astype(np.float16)
        # Rounded up, never down: no value beyond 127, no tiny token's scale rounded to zero.
        scales = np.where(scales < exact, np.nextafter(scales, np.float16(np.inf)), scales)
        divisor = np.where(scales > 0, scales, 1).astype(np.float32)[..., None]
        quotient = np.nan_to_num(np.rint(states / divisor), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(quotient, -INT8_MAX, INT8_MAX).astype(np.int8)
    return values, scales


def dequantise(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 states (..., T, H) of int8 `values` (..., T, H) and their `scales` (..., T)."""
    return values.astype(np.float32) * scales.astype(np.float32)[..., None]
