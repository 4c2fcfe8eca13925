#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA torch, transformers and pyarrow but without
# this package installed (run from the repository root):
#
#   bash scripts/gpu_check.sh RESULTS_DIR MODEL GLUE_DIR [EXPERIMENT_SECONDS] [SQUAD_DIR]
#
# 1. tests/test_cuda.py: bf16 extraction on CUDA vs the float32 forward; fine-tuning on CUDA
# 2. benchmarks/bench_extract.py: forward-only vs full-extraction throughput on RTE train, with
#    MODEL and with a bert-base-sized encoder of random weights (issue 11's >= 12,000 examples/s)
#    int8 against float16 over 5 seeds on the whole RTE, MRPC, CoLA training sets (issue 11)
# 3. scripts/experiment.py on RTE, then MRPC, 5 seeds each (each stopped after EXPERIMENT_SECONDS)
# 4. with SQUAD_DIR: scripts/experiment_squad.py on the whole split, 3 seeds (issue 10)
# 5. with FULL=1: the whole experiment of issue 12 (six tasks, 5 seeds; table, JSON, plot, records)
set -uo pipefail
results=${1:?results folder}; model=${2:?encoder folder}; glue=${3:?glue_data folder}
budget=${4:-240}; squad=${5:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/log.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
  transformers.__version__)" | tee -a "$results/log.txt"

BERTVISION_TEST_MODEL=$model BERTVISION_TEST_GLUE_DIR=$glue \
  python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15 \
  | tee -a "$results/log.txt"

python3 benchmarks/bench_extract.py --model "$model" --data-dir "$glue" --task rte --split train \
  --device cuda --batch-size 64 2>&1 | grep -v "^Loading" | tee -a "$results/log.txt"

# bert-base-sized (12 layers x 768), random weights: speed does not depend on them; MODEL's
# tokenizer is bert-base-uncased's vocabulary.
python3 - "$model" /tmp/bert-base-random <<'PY'
import sys
from transformers import AutoTokenizer, BertConfig, BertModel
BertModel(BertConfig()).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PY
python3 benchmarks/bench_extract.py --model /tmp/bert-base-random --data-dir "$glue" --task rte \
  --split train --device cuda --batch-size 256 2>&1 | grep -v "^Loading" | tee -a "$results/log.txt"

timeout "$budget" python3 benchmarks/bench_int8.py --model "$model" --data-dir "$glue" \
  --device cuda --seeds 5 --epochs 10 2>&1 | grep -vE "it/s|s/it|^Loading" \
  | tee -a "$results/log.txt"

# One task after the other, each within its share of the budget: a task that finishes has its
# table even if the next one is stopped; the per-stage records of both come back as archives.
for task in rte mrpc; do
  timeout "$budget" python3 scripts/experiment.py --data-dir "$glue" --model "$model" \
    --device cuda --tasks "$task" --seeds 5 --out "/tmp/experiment-$task" 2>&1 \
    | grep -vE "it/s|s/it|^Loading" | tail -n 30 | tee -a "$results/log.txt"
  cp "/tmp/experiment-$task/results.json" "$results/results-$task.json" 2>/dev/null
  tar -czf "$results/records-$task.tgz" -C "/tmp/experiment-$task" --exclude=runs . 2>/dev/null
done

# SQuAD 2.0 (issue 10): (a)-(f) on the whole article split, 384-token windows, 3 seeds
if [ -n "$squad" ]; then
  timeout "$budget" python3 scripts/experiment_squad.py --data-dir "$squad" --model "$model" \
    --device cuda --seeds 3 --out /tmp/experiment-squad 2>&1 \
    | grep -vE "it/s|s/it|^Loading" | tail -n 30 | tee -a "$results/log.txt"
  cp /tmp/experiment-squad/results.json "$results/results-squad.json" 2>/dev/null
  cp /tmp/experiment-squad/results.md "$results/results-squad.md" 2>/dev/null
  tar -czf "$results/records-squad.tgz" -C /tmp/experiment-squad --exclude=runs --exclude=data .
fi

# The full experiment (hours): resumable, so a stopped run continues when started again.
if [ "${FULL:-0}" = 1 ]; then
  python3 scripts/experiment.py --data-dir "$glue" --model "$model" --device cuda \
    --tasks cola,sst2,mrpc,stsb,rte,wnli --seeds 5 --out /tmp/experiment-full 2>&1 \
    | grep -vE "it/s|s/it|^Loading" | tail -n 200 | tee -a "$results/log.txt"
  cp /tmp/experiment-full/results.{json,md,png} "$results/" 2>/dev/null
  tar -czf "$results/records-full.tgz" -C /tmp/experiment-full --exclude=runs --exclude=data .
fi
