"""Benchmark of int8 hidden states: bytes stored, reconstruction error, and the adapters' dev
metrics, float16 against int8, with the bundled all-MiniLM-L6-v2 (no fine-tuning).

For each task it extracts train (all of it, or the first --max-train-examples) and dev at
--max-seq-length once with `--dtype float16` and once with `--dtype int8` (bertvision.extract,
the real path), then trains the pooler adapter on each dtype with seeds 0..--seeds-1, the same
settings and the same seed for both dtypes (bertvision.train; the epoch kept is the best on the
held-out slice of TRAIN), and prints:

- bytes per example of the committed shards (files, with Parquet's framing and zstd) against
  dense padded float16 (max_seq_length x layers x hidden size x 2 bytes an example);
- the relative RMS error per layer of the int8 shards' states against the float16 shards' of
  the same examples, and of other scale layouts on the same states (the choice of
  bertvision.quantise: one scale per (layer, token));
- per dev metric: each dtype's mean and sample sd over the seeds, the paired per-seed changes
  (int8 - float16) in points, their mean, sd and 95% t interval, and whether the mean change
  is within the target of TARGET_POINTS.

    python benchmarks/bench_int8.py --data-dir ../shared/data/glue \
        [--tasks rte,mrpc,cola] [--max-train-examples N] [--seeds 5] [--epochs 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats

from bertvision import shards
from bertvision.embeddings import load_embeddings
from bertvision.extract import ExtractConfig, extract_hidden_states
from bertvision.quantise import INT8_MAX, dequantise, quantise
from bertvision.schema import ShardMeta
from bertvision.train import TrainConfig, train_adapter

DTYPES = ("float16", "int8")
TARGET_POINTS = 0.5  # issue #11: the dev metric changes by at most this many points


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tasks", default="rte,mrpc,cola")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--max-train-examples", type=int, default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5, help="adapter seeds 0..N-1")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        for task in args.tasks.split(","):
            embeddings = {}
            for dtype in DTYPES:
                out = str(Path(root) / dtype)
                cfg = ExtractConfig(
                    task=task,
                    out=out,
                    model=args.model,
                    data_dir=args.data_dir,
                    splits=["train", "dev"],
                    max_seq_length=args.max_seq_length,
                    max_train_examples=args.max_train_examples,
                    dtype=dtype,
                    device=args.device,
                )
                assert extract_hidden_states(cfg, progress=False).ok
                embeddings[dtype] = out
            print(f"== {task} (max length {args.max_seq_length}, MiniLM, no fine-tuning)")
            report_bytes(task, embeddings)
            report_errors(task, embeddings)
            report_metrics(task, embeddings, args, root)


def report_bytes(task: str, embeddings: dict[str, str]) -> None:
    for split in ("train", "dev"):
        line = []
        for dtype, out in embeddings.items():
            plan, urls = shards.committed_shards(out, task, split)
            stored = sum(Path(url).stat().st_size for url in urls)
            dense = plan.num_examples * plan.max_seq_length * plan.layers * plan.hidden_size * 2
            line.append(
                f"{dtype} {stored / plan.num_examples / 1e3:.1f} kB/example "
                f"= {stored / dense:.3f}x dense"
            )
        print(f"  bytes {split} ({plan.num_examples} ex): " + "; ".join(line))


def split_states(out: str, task: str, split: str) -> dict[int, np.ndarray]:
    states = {}
    for table in shards.iter_split(out, task, split):
        plan = ShardMeta.from_metadata(table.schema.metadata)
        ids = table.column("example_id").to_pylist()
        states |= dict(zip(ids, shards.hidden_arrays(table, plan), strict=True))
    return states


def _scaled(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    scale = scale.astype(np.float16).astype(np.float32)
    divisor = np.where(scale > 0, scale, 1)
    return np.clip(np.rint(x / divisor), -INT8_MAX, INT8_MAX) * scale


# Scale layouts compared on the same states (L, T, H): restored states, and scales stored.
LAYOUTS = {
    "(layer, token) [stored]": lambda x: (dequantise(*quantise(x)), x.shape[0] * x.shape[1]),
    "token, all layers": lambda x: (
        _scaled(x, np.abs(x).max(axis=(0, 2), keepdims=True) / INT8_MAX),
        x.shape[1],
    ),
    "(layer, channel) per example": lambda x: (
        _scaled(x, np.abs(x).max(axis=1, keepdims=True) / INT8_MAX),
        x.shape[0] * x.shape[2],
    ),
}


def report_errors(task: str, embeddings: dict[str, str]) -> None:
    reference = split_states(embeddings["float16"], task, "dev")
    stored = split_states(embeddings["int8"], task, "dev")
    states = [reference[i].astype(np.float32) for i in sorted(reference)]
    values = sum(x.size for x in states)

    def rel_rms(restored: list[np.ndarray]) -> str:
        error = sum(((r - x) ** 2).sum(axis=(1, 2)) for r, x in zip(restored, states, strict=True))
        energy = sum((x**2).sum(axis=(1, 2)) for x in states)
        return " ".join(f"{v:.4f}" for v in np.sqrt(error / energy))

    print("  relative RMS error per layer (0 = embeddings), dev, against float16:")
    print(f"    int8 shards as stored            {rel_rms([stored[i] for i in sorted(reference)])}")
    for name, layout in LAYOUTS.items():
        restored, scales = zip(*map(layout, states), strict=True)
        overhead = 2 * sum(scales) / values  # float16 scales, bytes per int8 value
        print(f"    {name:32s} {rel_rms(list(restored))}  (+{overhead:.2%} bytes)")


def report_metrics(task: str, embeddings: dict[str, str], args, root: str) -> None:
    scores: dict[str, dict[str, list[float]]] = {dtype: {} for dtype in embeddings}  # points
    data = {
        dtype: load_embeddings(task, out, ["train", "dev"], args.device)
        for dtype, out in embeddings.items()
    }
    for seed in range(args.seeds):  # seed by seed: a run stopped early still holds pairs
        for dtype, out in embeddings.items():
            cfg = TrainConfig(
                task=task,
                embeddings=out,
                out=str(Path(root) / "runs" / task / dtype / str(seed)),
                adapter="pooler",
                epochs=args.epochs,
                seed=seed,
                device=args.device,
            )
            dev = train_adapter(cfg, data=data[dtype], progress=False)["dev"]
            for metric, value in dev.items():
                scores[dtype].setdefault(metric, []).append(100 * value)
            shown = ", ".join(f"{m} {100 * v:.2f}" for m, v in dev.items())
            print(f"  {dtype} seed {seed}: {shown}", flush=True)
    for metric, ours in scores["float16"].items():
        print(
            f"  dev {metric} over {args.seeds} seeds: {paired_change(ours, scores['int8'][metric])}"
        )


def paired_change(float16: list[float], int8: list[float]) -> str:
    """Each dtype's mean and sample sd, and the per-seed changes int8 - float16 (points, seed i
    of one against seed i of the other) with their mean, sample sd and 95% t interval."""
    f16, i8 = np.asarray(float16), np.asarray(int8)
    change = i8 - f16
    mean, sd = change.mean(), change.std(ddof=1)
    low, high = (
        stats.t.interval(0.95, len(change) - 1, loc=mean, scale=sd / np.sqrt(len(change)))
        if sd > 0
        else (mean, mean)
    )
    met = "met" if abs(mean) <= TARGET_POINTS else "NOT met"
    return (
        f"float16 {f16.mean():.2f} ± {f16.std(ddof=1):.2f}, int8 {i8.mean():.2f} ± "
        f"{i8.std(ddof=1):.2f}; change per seed {' '.join(f'{c:+.2f}' for c in change)}; "
        f"mean {mean:+.2f} ± {sd:.2f} (95% CI {low:+.2f} to {high:+.2f}); "
        f"|mean change| <= {TARGET_POINTS}: {met}"
    )


if __name__ == "__main__":
    main()
