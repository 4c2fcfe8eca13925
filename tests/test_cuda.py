"""CUDA: the same extraction under bf16 autocast, close to the float32 CPU forward and the same
for any batch size; fine-tuning under bf16 autocast, the same for the same seed.

Skipped without a GPU (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bertvision import glue, shards
from bertvision.batch import TokenBatch
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


def test_the_token_mean_on_cuda_equals_the_cpu_and_repeats_bit_for_bit():
    """TokenBatch.mean adds each example's tokens in order on CUDA (no atomics): the same sums
    every run, and the CPU's values up to rounding, gradients included."""
    lengths = torch.tensor([300, 2, 170, 1, 64])
    values = torch.randn(int(lengths.sum()), 13, 384, generator=torch.Generator().manual_seed(0))
    on_cpu = TokenBatch.of(values, lengths, 300)
    on_cuda = TokenBatch.of(values.cuda(), lengths.cuda(), 300)
    means = []
    for _ in range(3):
        given = values.cuda().requires_grad_()
        mean = on_cuda.mean(given)
        mean.square().sum().backward()
        means.append((mean.detach(), given.grad))
    for mean, grad in means[1:]:
        assert torch.equal(mean, means[0][0]) and torch.equal(grad, means[0][1])
    torch.testing.assert_close(means[0][0].cpu(), on_cpu.mean(values), rtol=1e-5, atol=1e-6)


def test_what_cuda_stores_does_not_depend_on_batch_mates(tmp_path, minilm, glue_dir):
    """Kind 1 on the GPU: RTE dev extracted one example a batch and 64 a batch stores the same
    states up to bf16 rounding (the kernels differ with the batch's shape, the padding never
    reaches a real token)."""
    stored = {}
    for batch_size in (1, 64):
        out = str(tmp_path / f"batch-{batch_size}")
        cfg = ExtractConfig(task="rte", out=out, model=minilm, data_dir=glue_dir, splits=["dev"],
                            max_seq_length=128, batch_size=batch_size, device="cuda")  # fmt: skip
        assert extract_hidden_states(cfg, progress=False).ok
        for url in shards.committed_shards(out, "rte", "dev")[1]:
            meta, table = shards.read_shard(url)
            ids = table.column("example_id").to_pylist()
            for example_id, hidden in zip(ids, shards.hidden_arrays(table, meta), strict=True):
                stored.setdefault(example_id, []).append(hidden.astype(np.float32))
    worst = 0.0
    for alone, in_batch in stored.values():
        error = np.linalg.norm(alone - in_batch, axis=(1, 2))
        worst = max(worst, float((error / np.linalg.norm(alone, axis=(1, 2))).max()))
    print(f"worst relative difference of a layer, batch 1 vs batch 64 on CUDA: {worst:.4f}")
    assert worst < 0.02


def test_fine_tuning_on_cuda_with_the_same_seed_gives_the_same_weights(tmp_path, minilm, glue_dir):
    """Kind 8 on the GPU: two fine-tunings with the same seed, bit for bit (atomic adds, as in
    the embeddings' backward, would make them differ)."""
    from safetensors.torch import load_file

    weights = []
    for run in ("a", "b"):
        cfg = FinetuneConfig(task="rte", out=str(tmp_path / run), model=minilm, data_dir=glue_dir,
                             epochs=0.1, seed=3, device="cuda", predict_test=False)  # fmt: skip
        finetune_encoder(cfg, progress=False)
        weights.append(load_file(str(tmp_path / run / "model.safetensors")))
    differing = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    print(f"tensors that differ between two same-seed fine-tunings on CUDA: {len(differing)}")
    assert differing == []
