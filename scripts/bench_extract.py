"""Benchmark of extraction: where the time goes, measured in one run.

Times (1) the encoder forward alone over the same length-bucketed batches and (2) the whole
extraction of the same examples (tokenize, forward, copy to host, Parquet write, commit), and
prints examples/s, tokens/s and MB/s of each and their ratio.

    python scripts/bench_extract.py --task rte --split train --data-dir ../shared/data/glue \
        [--model M] [--device cuda] [--batch-size 64] [--limit 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bertvision import encoder as enc
from bertvision import glue
from bertvision.extract import ExtractConfig, extract_shard, prepare_extraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="first N examples only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        cfg = ExtractConfig(
            task=args.task,
            out=out,
            model=args.model,
            data_dir=args.data_dir,
            splits=[args.split],
            max_seq_length=args.max_seq_length,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            device=args.device,
        )
        examples = glue.load_split(args.task, args.split, args.data_dir)[: args.limit]
        encoder = enc.load_encoder(cfg.model, cfg.device)
        forward_seconds, tokens = _forward_only(encoder, examples, cfg)

        (plan,) = prepare_extraction(cfg)
        limited = args.limit is not None and args.limit < plan.num_examples
        shard_count = -(-len(examples) // cfg.shard_size) if limited else plan.num_shards
        started = time.perf_counter()
        records = [extract_shard(cfg, plan, i) for i in range(shard_count)]
        _sync(cfg.device)
        extract_seconds = time.perf_counter() - started
        written = sum(r.bytes for r in records)
        rows = sum(r.rows for r in records)

    print(
        f"device {cfg.device} ({_device_name(cfg.device)}), model {cfg.model}, "
        f"{encoder.layers} layers x {encoder.hidden_size}, batch {cfg.batch_size}, "
        f"max length {cfg.max_seq_length}"
    )
    print(
        f"forward only : {len(examples)} examples, {tokens} tokens in {forward_seconds:.2f} s "
        f"= {len(examples) / forward_seconds:.1f} ex/s, {tokens / forward_seconds:.0f} tok/s"
    )
    print(
        f"full extract : {rows} examples in {extract_seconds:.2f} s = "
        f"{rows / extract_seconds:.1f} ex/s, {written / 1e6:.1f} MB written = "
        f"{written / 1e6 / extract_seconds:.1f} MB/s"
    )
    ratio = (extract_seconds / rows) / (forward_seconds / len(examples))
    print(f"time per example, full extract / forward only: {ratio:.2f}")


def _forward_only(
    encoder: enc.Encoder, examples: list[glue.Example], cfg: ExtractConfig
) -> tuple[float, int]:
    tokenizer = encoder.tokenizer
    pairs = [ex.texts for ex in examples]
    tokens = tokenizer(
        [p[0] for p in pairs],
        [p[1] for p in pairs] if len(pairs[0]) > 1 else None,
        truncation=True,
        max_length=cfg.max_seq_length,
    )
    order = sorted(range(len(examples)), key=lambda i: len(tokens["input_ids"][i]))
    batches = [
        tokenizer.pad(
            [{k: v[i] for k, v in tokens.items()} for i in order[b : b + cfg.batch_size]],
            return_tensors="pt",
        )
        for b in range(0, len(order), cfg.batch_size)
    ]
    _sync(cfg.device)
    started = time.perf_counter()
    for batch in batches:
        inputs = {k: v.to(cfg.device) for k, v in batch.items()}
        with torch.inference_mode(), enc.autocast(cfg.device):
            encoder.model(**inputs, output_hidden_states=True)
    _sync(cfg.device)
    return time.perf_counter() - started, sum(len(t) for t in tokens["input_ids"])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"


if __name__ == "__main__":
    main()
