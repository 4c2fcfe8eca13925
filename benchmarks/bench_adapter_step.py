"""Benchmark of one adapter training step on real tokens only against the padded formulas
(issue 11): the pooler's (or span adapter's) forward and backward on batches of stored
embeddings, computed as `AdapterPooler.forward` does (down and gelu on the batch's real tokens
packed, `Packed.batch`'s TokenBatch; up after pooling) and as before (the adapter on every layer
and position of the padded batch, `TokenBatch.padded`, padding included, then pooled: the
formulas in pooler.py's docstring), same weights, same batches.

Both run in one process on one thread (`torch.set_num_threads(1)`), alternated --repeats times,
each over the same --steps batches of --batch-size shuffled train examples; printed: CPU seconds
of each pass, of building the batches (`Packed.batch`, the stored dtype gathered and cast to
float32, each dropped before the next as in training; not in the passes), the share of padding
in the batches, and the largest difference of the logits.

    python benchmarks/bench_adapter_step.py --embeddings emb [--task rte] [--adapter pooler]
        [--steps 6] [--batch-size 32] [--repeats 4]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from bertvision import adapters
from bertvision.batch import TokenBatch
from bertvision.embeddings import load_embeddings


def padded(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The adapter's formulas at every position of a padded batch (hidden, mask), padding
    included: (B, C) or (2, B, T)."""
    hidden, mask = batch
    adapted = hidden + model.up(nn.functional.gelu(model.down(hidden)))  # (B, L, T, H)
    weights = torch.softmax(model.layer_logits, dim=0)
    if isinstance(model, adapters.SpanAdapter):
        mixed = torch.einsum("blth,l->bth", adapted, weights)
        logits = model.head(model.dropout(mixed)).masked_fill(~mask[:, :, None], float("-inf"))
        return logits.permute(2, 0, 1)
    keep = mask[:, None, :, None]
    mean = torch.where(keep, adapted, 0.0).sum(dim=2) / keep.sum(dim=2)
    parts = {"cls": [adapted[:, :, 0]], "mean": [mean]}
    parts["cls+mean"] = parts["cls"] + parts["mean"]
    pooled = torch.cat(parts[model.config.token_pool], dim=-1)  # (B, L, P)
    return model.head(model.dropout(torch.einsum("blp,l->bp", pooled, weights)))


def real_tokens_only(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    out = model(batch)
    return torch.stack(out) if isinstance(out, tuple) else out


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--embeddings", required=True, help="an extraction's folder or URL")
    parser.add_argument("--task", default="rte")
    parser.add_argument("--adapter", default="pooler", choices=["pooler", "span"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    train = load_embeddings(args.task, args.embeddings, ["train"], device="cpu").splits["train"]
    packed = train.resident
    order = np.random.default_rng(0).permutation(train.num_examples)
    rows = [order[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.steps)]
    building = []
    for _ in range(args.repeats):  # each batch dropped when the next is built, as in training
        started = time.process_time()
        for chosen in rows:
            packed.batch(chosen, "cpu")
        building.append(time.process_time() - started)
    batches = [packed.batch(chosen, "cpu") for chosen in rows]
    inputs = {"padded": [batch.padded() for batch in batches], "real tokens": batches}
    real = sum(len(batch.tokens) for batch in batches)
    positions = sum(batch.size * batch.width for batch in batches)
    torch.manual_seed(0)
    model = adapters.build_adapter(
        adapters.make_config(
            args.adapter,
            layers=train.plan.layers,
            hidden_size=train.plan.hidden_size,
            num_labels=2,
            dropout=0.0,
        )
    )
    forms = {"padded": padded, "real tokens": real_tokens_only}
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for repeat in range(args.repeats):
        names = list(forms) if repeat % 2 == 0 else list(forms)[::-1]
        for name in names:
            started = time.process_time()
            for batch in inputs[name]:
                model.zero_grad(set_to_none=True)
                out = forms[name](model, batch)
                out[torch.isfinite(out)].square().sum().backward()
            seconds[name].append(time.process_time() - started)
    worst = max(
        (padded(model, ours) - real_tokens_only(model, theirs)).nan_to_num(0.0).abs().max().item()
        for ours, theirs in zip(inputs["padded"], batches, strict=True)
    )
    print(
        f"\n{args.task} {args.adapter}, {args.steps} batches of {args.batch_size} "
        f"({1 - real / positions:.0%} of positions padding), forward+backward, 1 thread"
    )
    print(f"{'batches':12} CPU s: {' '.join(f'{v:.2f}' for v in building)} (Packed.batch)")
    for name, values in seconds.items():
        print(f"{name:12} CPU s: {' '.join(f'{v:.2f}' for v in values)}")
    ratio = min(seconds["padded"]) / min(seconds["real tokens"])
    print(f"best padded / best real tokens: {ratio:.2f}x; largest logit difference {worst:.1e}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
