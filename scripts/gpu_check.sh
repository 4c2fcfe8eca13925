#!/usr/bin/env bash
# The GPU checks of issues #11 and #12 as one command that ends within DEADLINE seconds (one
# device call may run 10 minutes, and a session has 15 of device time, the machine's start
# included), on a machine with a CUDA torch, transformers and pyarrow but neither Prefect nor
# this package installed. Prepare .gpu/ here first (scripts/gpu_prepare.sh), then with the device
# tool: run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=570,
# kind="nvidia-h100-x1").
#
#   bash scripts/gpu_check.sh [RESULTS_DIR] [MODEL] [GLUE_DIR]
#        (defaults: $OUT, .gpu/minilm-fp16, .gpu/glue)
#
# In order, each stage given what is left of DEADLINE (default 480 s) and at most its own cap:
# 1. tests/test_cuda.py: bf16 extraction on CUDA vs the float32 forward; fine-tuning on CUDA
# 2. benchmarks/bench_extract.py on RTE train: bare forward vs the whole extraction, with MODEL
#    and with a bert-base-sized encoder of random weights (issue 11's >= 12,000 examples/s)
# 3. scripts/experiment.py (issue 12), TASKS (default smallest first) x SEEDS (5), whole training
#    sets, stopped between stages before the deadline (--stop-after); it continues from
#    RECORDS_FROM (default docs/results/experiment-glue-gpu.json, where an earlier session's
#    results were committed) when that was measured on this same GPU model
# 4. with INT8=1, benchmarks/bench_int8.py over 5 seeds; with SQUAD_DIR, the SQuAD 2.0 experiment
#    (scripts/experiment_squad.py, 3 seeds): only in what time is left
# Everything it writes to RESULTS_DIR (at most 8 files, what the device tool brings back):
# log.txt, results.{json,md,png} of the experiment, records.tgz (its stage records), and with
# SQUAD_DIR results-squad.json.
set -uo pipefail
results=${1:-${OUT:?RESULTS_DIR or OUT}}; model=${2:-.gpu/minilm-fp16}; glue=${3:-.gpu/glue}
deadline=${DEADLINE:-480}; device=${DEVICE:-cuda}
tasks=${TASKS:-wnli,rte,mrpc,stsb,cola,sst2}; seeds=${SEEDS:-5}
records_from=${RECORDS_FROM:-docs/results/experiment-glue-gpu.json}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$results"
log=$results/log.txt
quiet() { grep -vE "it/s|s/it|^Loading"; }
left() { echo $((deadline - SECONDS)); }
# capped CAP COMMAND...: COMMAND within min(CAP, what is left), or skipped, saying so
capped() {
  local cap=$1 seconds; shift
  seconds=$(left); ((seconds > cap)) && seconds=$cap
  if ((seconds < 20)); then echo "skipped, ${seconds} s left: $*"; return 0; fi
  echo "== $* (at most ${seconds} s)"
  timeout "$seconds" "$@"
  local status=$?
  ((status == 124)) && echo "stopped after ${seconds} s: $*"
  return 0
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
    transformers.__version__)"
} 2>&1 | tee "$log"

BERTVISION_TEST_MODEL=$model BERTVISION_TEST_GLUE_DIR=$glue \
  capped 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15 \
  | tee -a "$log"

capped 75 python3 benchmarks/bench_extract.py --model "$model" --data-dir "$glue" --task rte \
  --split train --device "$device" --batch-size 64 --repeats 2 2>&1 | quiet | tee -a "$log"

# bert-base-sized (12 layers x 768), random weights: speed does not depend on them; MODEL's
# tokenizer is bert-base-uncased's vocabulary.
python3 - "$model" /tmp/bert-base-random <<'PY' 2>&1 | quiet
import sys
from transformers import AutoTokenizer, BertConfig, BertModel
BertModel(BertConfig()).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PY
capped 75 python3 benchmarks/bench_extract.py --model /tmp/bert-base-random --data-dir "$glue" \
  --task rte --split train --device "$device" --batch-size 256 --repeats 2 2>&1 | quiet \
  | tee -a "$log"

# The experiment starts no stage in its last 150 s (one stage, a 3-epoch fine-tuning of CoLA
# say, may take that long); the outer timeout is the backstop.
continued=()
if [ -f "$records_from" ] && python3 - "$records_from" "$device" <<'PY'; then
import json, sys
sys.path.insert(0, "scripts")
from experiment import device_name
sys.exit(json.load(open(sys.argv[1]))["device"] != device_name(sys.argv[2]))
PY
  continued=(--records-from "$records_from")
fi
experiment=/tmp/experiment
stop_after=$(($(left) - 150))
if ((stop_after > 30)); then
  echo "== experiment: $tasks, $seeds seeds, stop after ${stop_after} s ${continued[*]}" \
    | tee -a "$log"
  timeout "$(left)" python3 scripts/experiment.py --data-dir "$glue" --model "$model" \
    --device "$device" --tasks "$tasks" --seeds "$seeds" --out "$experiment" \
    --stop-after "$stop_after" "${continued[@]}" 2>&1 | quiet | tail -n 250 | tee -a "$log"
  cp "$experiment"/results.{json,md,png} "$results/" 2>/dev/null
  tar -czf "$results/records.tgz" -C "$experiment" --exclude=runs --exclude=data . 2>/dev/null
else
  echo "skipped, $(left) s left: the experiment" | tee -a "$log"
fi

if [ "${INT8:-0}" = 1 ]; then
  capped 600 python3 benchmarks/bench_int8.py --model "$model" --data-dir "$glue" \
    --device "$device" --seeds 5 --epochs 10 2>&1 | quiet | tee -a "$log"
fi
if [ -n "${SQUAD_DIR:-}" ]; then
  capped 600 python3 scripts/experiment_squad.py --data-dir "$SQUAD_DIR" --model "$model" \
    --device "$device" --seeds 3 --out /tmp/experiment-squad 2>&1 | quiet | tail -n 30 \
    | tee -a "$log"
  cp /tmp/experiment-squad/results.json "$results/results-squad.json" 2>/dev/null
fi
echo "done at $SECONDS s of $deadline" | tee -a "$log"
