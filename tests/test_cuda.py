"""CUDA: the same extraction under bf16 autocast, close to the float32 CPU forward.

Skipped without a GPU (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bertvision import glue, shards
from bertvision.extract import ExtractConfig, extract_hidden_states
from bertvision.finetune import FinetuneConfig, finetune_encoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_extraction_on_cuda_matches_the_float32_forward(tmp_path, minilm, glue_dir):
    from transformers import AutoModel, AutoTokenizer

    cfg = ExtractConfig(
        task="rte",
        out=str(tmp_path),
        model=minilm,
        data_dir=glue_dir,
        splits=["dev"],
        max_seq_length=128,
        device="cuda",
    )
    assert extract_hidden_states(cfg, progress=False).ok

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    examples = glue.load_split("rte", "dev", glue_dir)
    worst = 0.0
    for url in shards.committed_shards(str(tmp_path), "rte", "dev")[1]:
        meta, table = shards.read_shard(url)
        ids = table.column("example_id").to_pylist()
        for example_id, hidden in zip(ids, shards.hidden_arrays(table, meta), strict=True):
            tokens = tokenizer(
                *examples[example_id].texts, truncation=True, max_length=128, return_tensors="pt"
            )
            with torch.inference_mode():
                expected = torch.stack(model(**tokens, output_hidden_states=True).hidden_states)
            expected = expected[:, 0].numpy()
            assert hidden.shape == expected.shape
            error = np.linalg.norm(hidden.astype(np.float32) - expected, axis=(1, 2))
            worst = max(worst, float((error / np.linalg.norm(expected, axis=(1, 2))).max()))
    print(f"worst relative error of a layer, bf16 CUDA vs float32 CPU: {worst:.4f}")
    assert worst < 0.03


def test_finetune_runs_under_bf16_autocast(tmp_path, minilm, glue_dir):
    cfg = FinetuneConfig(
        task="rte", out=str(tmp_path), model=minilm, data_dir=glue_dir, epochs=0.2, device="cuda"
    )
    metrics = finetune_encoder(cfg, progress=False)
    assert 0.0 <= metrics["dev"]["accuracy"] <= 1.0
