"""Benchmark of extraction: the encoder's bare forward against the whole pipeline, in one run.

Times (1) the encoder forward alone over the same length-sorted batches extraction makes and
(2) the whole extraction of the same examples (tokenize, forward, copy to host, Arrow, Parquet,
write, commit of every shard), `--repeats` times each, interleaved (forward, pipeline, forward,
...), so that a machine loaded by others weighs on both alike. Prints examples/s of each and the
pipeline's throughput as a fraction of the bare forward's (1.0: extraction at the encoder's
speed), from the median of the repeats; and the CPU seconds of each (this process, all threads:
on a CPU device, what an idle machine's wall-clock ratio would be, however loaded this one is).

    python benchmarks/bench_extract.py --task rte --split dev --data-dir ../shared/data/glue \
        [--model M] [--device cuda] [--batch-size 64] [--limit 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bertvision import encoder as enc
from bertvision import glue
from bertvision.extract import ExtractConfig, extract_shard, prepare_extraction


def split_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark over one GLUE task/split: --task, --split, --data-dir,
    --max-seq-length (bench_shard_format.py takes them from here too)."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=description
    )
    parser.add_argument("--task", default="rte", help="GLUE task")
    parser.add_argument("--split", default="dev", help="its split")
    parser.add_argument("--data-dir", default="../shared/data/glue", help="glue_data folder")
    parser.add_argument("--max-seq-length", type=int, default=128, help="tokens")
    return parser


def main() -> None:
    parser = split_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="encoder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples a forward")
    parser.add_argument("--shard-size", type=int, default=1000, help="examples a shard")
    parser.add_argument("--limit", type=int, default=None, help="first N train examples only")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    args = parser.parse_args()
    if args.limit is not None and args.split != "train":
        parser.error("--limit takes the first examples of the train split only")

    settings = dict(
        task=args.task,
        model=args.model,
        data_dir=args.data_dir,
        splits=[args.split],
        max_seq_length=args.max_seq_length,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=args.device,
        max_train_examples=args.limit,
    )
    cfg = ExtractConfig(out=tempfile.gettempdir(), **settings)  # resolved model and device
    examples = glue.load_split(args.task, args.split, args.data_dir)[: args.limit]
    encoder = enc.load_encoder(cfg.model, cfg.device)
    batches, tokens = _batches(encoder, examples, cfg)
    _forward(encoder, batches[:1], cfg.device)  # warm-up: first-call costs count in neither

    forward_times, extract_times, forward_cpu, extract_cpu = [], [], [], []
    for _ in range(args.repeats):
        cpu = time.process_time()
        forward_times.append(_forward(encoder, batches, cfg.device))
        forward_cpu.append(time.process_time() - cpu)
        seconds, cpu_seconds, rows, written = _extract(settings, len(examples))
        extract_times.append(seconds)
        extract_cpu.append(cpu_seconds)
    forward_seconds = statistics.median(forward_times)
    extract_seconds = statistics.median(extract_times)

    print(
        f"device {cfg.device} ({_device_name(cfg.device)}), model {cfg.model}, "
        f"{encoder.layers} layers x {encoder.hidden_size}, batch {cfg.batch_size}, "
        f"max length {cfg.max_seq_length}, {args.task}/{args.split}, "
        f"median of {args.repeats} interleaved repeats"
    )
    print(
        f"forward only : {len(examples)} examples, {tokens} tokens in {forward_seconds:.2f} s "
        f"= {len(examples) / forward_seconds:.1f} ex/s, {tokens / forward_seconds:.0f} tok/s  "
        f"(runs: {_runs(forward_times)})"
    )
    print(
        f"full extract : {rows} examples in {extract_seconds:.2f} s = "
        f"{rows / extract_seconds:.1f} ex/s, {written / 1e6:.1f} MB committed = "
        f"{written / 1e6 / extract_seconds:.1f} MB/s  (runs: {_runs(extract_times)})"
    )
    ratio = (rows / extract_seconds) / (len(examples) / forward_seconds)
    print(f"examples/s, full extract / forward only: {ratio:.2f}x (target >= 0.90x)")
    forward_cpu_s, extract_cpu_s = statistics.median(forward_cpu), statistics.median(extract_cpu)
    print(
        f"CPU seconds: forward only {forward_cpu_s:.2f} "
        f"(runs: {_runs(forward_cpu)}), full extract {extract_cpu_s:.2f} "
        f"(runs: {_runs(extract_cpu)}); examples per CPU second, full extract / forward only: "
        f"{(rows / extract_cpu_s) / (len(examples) / forward_cpu_s):.2f}x"
    )


def _batches(
    encoder: enc.Encoder, examples: list[glue.Example], cfg: ExtractConfig
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The padded batches of extract.hidden_state_batches (by token length), and all tokens."""
    tokenizer = encoder.tokenizer
    pairs = [ex.texts for ex in examples]
    tokens = tokenizer(
        [p[0] for p in pairs],
        [p[1] for p in pairs] if len(pairs[0]) > 1 else None,
        truncation=True,
        max_length=cfg.max_seq_length,
    )
    order = sorted(range(len(examples)), key=lambda i: (len(tokens["input_ids"][i]), i))
    batches = [
        tokenizer.pad(
            [{k: v[i] for k, v in tokens.items()} for i in order[b : b + cfg.batch_size]],
            return_tensors="pt",
        )
        for b in range(0, len(order), cfg.batch_size)
    ]
    return batches, sum(len(t) for t in tokens["input_ids"])


def _forward(encoder: enc.Encoder, batches: list[dict[str, torch.Tensor]], device: str) -> float:
    """Seconds of the bare forward (every layer's states, nothing kept) over `batches`."""
    _sync(device)
    started = time.perf_counter()
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode(), enc.autocast(device):
            encoder.model(**inputs, output_hidden_states=True)
    _sync(device)
    return time.perf_counter() - started


def _extract(settings: dict, count: int) -> tuple[float, float, int, int]:
    """Seconds, CPU seconds, rows and bytes of extracting the first `count` examples into a new
    folder, every shard committed (planning, which loads and checks, is not timed)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = ExtractConfig(out=out, **settings)
        (plan,) = prepare_extraction(cfg)
        shard_count = -(-count // plan.shard_size)
        started, cpu = time.perf_counter(), time.process_time()
        records = [extract_shard(cfg, plan, i) for i in range(shard_count)]
        _sync(cfg.device)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu, sum(r.rows for r in records), sum(r.bytes for r in records)


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f} s" for s in seconds)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"


if __name__ == "__main__":
    main()
