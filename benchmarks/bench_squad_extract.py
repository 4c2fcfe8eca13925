"""Windows per second and stored bytes per window of a SQuAD 2.0 extraction.

    python benchmarks/bench_squad_extract.py --data-dir ../shared/data/squad/split --windows 300

Extracts the dev windows of the first questions of the split's dev file (whole paragraphs, at
least --windows questions) with the bundled MiniLM (or --model), 384 tokens, doc stride 128,
and prints: windows, windows per second (over the shards' own seconds: the forward passes,
Parquet encoding and commits, not the model load or the windowing), stored bytes per window,
and that against dense padded float16 states of max-seq-length tokens (what a (W, L, T, H)
array would take).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bertvision import encoder as enc
from bertvision import shards, squad
from bertvision.config import ExtractConfig
from bertvision.extract import extract_hidden_states


def dev_slice(data_dir: str, folder: Path, questions: int) -> None:
    """Write a dev-v2.0.json of the first whole paragraphs of `data_dir`'s dev file holding at
    least `questions` questions (at 384 tokens nearly every question is one window)."""
    document = json.loads((Path(data_dir) / squad.SPLIT_FILES["dev"]).read_text())
    kept, count = [], 0
    for article in document["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if count >= questions:
                break
            paragraphs.append(paragraph)
            count += len(paragraph["qas"])
        kept.append(article | {"paragraphs": paragraphs})
        if count >= questions:
            break
    (folder / squad.SPLIT_FILES["dev"]).write_text(json.dumps({"data": kept}))


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", default="../shared/data/squad/split")
    parser.add_argument("--model", default="")
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    model = args.model or enc.default_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dev_slice(args.data_dir, folder, args.windows)
        cfg = ExtractConfig(
            task="squad2",
            data_dir=str(folder),
            splits=["dev"],
            model=model,
            out=str(folder / "emb"),
            device=args.device,
            batch_size=args.batch_size,
            max_seq_length=384,
            doc_stride=128,
            max_question_length=64,
        )
        summary = extract_hidden_states(cfg, progress=False)
        assert summary.ok, summary
        plan, _ = shards.committed_shards(cfg.out, "squad2", "dev")
        records = shards.committed_records(shards.split_url(cfg.out, "squad2", "dev"), plan)
        seconds = sum(r.seconds for r in records.values())
        stored = sum(r.bytes for r in records.values())
        dense = plan.max_seq_length * plan.layers * plan.hidden_size * 2
        print(f"model {model} ({plan.layers} layers x {plan.hidden_size}), device {args.device}")
        print(f"windows {plan.num_examples}, shards {plan.num_shards}")
        print(f"windows/s {plan.num_examples / seconds:.1f} ({seconds:.1f} s in shards)")
        print(
            f"stored bytes/window {stored / plan.num_examples:,.0f}; dense padded float16 "
            f"{dense:,} ({stored / plan.num_examples / dense:.1%} of it)"
        )


if __name__ == "__main__":
    main()
