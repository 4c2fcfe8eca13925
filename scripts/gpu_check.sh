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
# Settings, from the environment (default in brackets):
#   DEADLINE       seconds the whole command may take [480]
#   DEVICE         torch device of the benchmarks and the experiment [cuda]
#   TASKS          the experiment's GLUE tasks, in this order within each seed
#                  [wnli,rte,mrpc,stsb,cola]: not SST-2, whose whole-set seed outlasts one
#                  command (below); seeds run one at a time over all tasks, so a seed that
#                  cannot finish would hold back every later seed of the others
#   SEEDS          the experiment's seeds 0..SEEDS-1 per task [5]
#   RECORDS_FROM   an earlier run's results.json to continue from, used only when it was measured
#                  on this same GPU model (or CPU) and with the same settings (else the run
#                  starts from scratch, saying why) [docs/results/experiment-glue-gpu.json,
#                  absent until the first GPU session copies its results.json there]
#   STAGE_RESERVE  seconds before DEADLINE in which the experiment starts no stage [150]: at
#                  ~1,200 examples/s on an H100, a 3-epoch fine-tuning takes ~25 s on CoLA's 8.5k
#                  training examples, ~150-180 s on SST-2's 67k; a 20-trial sweep is unmeasured
#                  there. The outer timeout at DEADLINE is the backstop: an experiment it kills
#                  (SIGTERM, then SIGKILL 20 s later, should its clean-up hang)
#                  loses its unfinished seed, and brings back the seeds finished before
#   CHECKS         0: skip the CUDA tests and the extraction benchmarks (stages 1 and 2), leaving
#                  the experiment the whole command: for the sessions after the first [1]
#   INT8           1: also benchmarks/bench_int8.py over 5 seeds, in what time is left [0]
#   SQUAD_DIR      a SQuAD 2.0 folder: also scripts/experiment_squad.py, 3 seeds [unset]
#
# `python3` on PATH must have torch (a CUDA build for DEVICE=cuda), transformers, pyarrow, numpy,
# scipy, hyperopt, matplotlib, fsspec, datasets, safetensors, tqdm and pytest: pyproject.toml's
# dependencies less Prefect (bertvision itself is read from the working tree: PYTHONPATH). A dry
# run on this CPU machine, after scripts/gpu_prepare.sh (about 6 minutes; on CPU the two
# extraction benchmarks may be stopped by their caps, and test_cuda is skipped, saying why):
#   PATH=$PWD/.venv/bin:$PATH DEVICE=cpu DEADLINE=400 TASKS=wnli SEEDS=1 OUT=/tmp/gpu \
#     bash scripts/gpu_check.sh
#
# In order, each stage given what is left of DEADLINE and at most its own cap:
# 1. tests/test_cuda.py: bf16 extraction on CUDA vs the float32 forward; fine-tuning on CUDA
# 2. benchmarks/bench_extract.py on RTE train: bare forward vs the whole extraction, with MODEL
#    and with a bert-base-sized encoder of random weights (issue 11's >= 12,000 examples/s)
# 3. scripts/experiment.py (issue 12), TASKS x SEEDS, whole training sets, in a fresh folder
#    (mktemp -d) and stopped between stages STAGE_RESERVE s before the deadline (--stop-after);
#    it continues from RECORDS_FROM. Its results come back whether it exited 0 (stopped by
#    --stop-after included) or not: killed by the deadline or failed, the log says so with its
#    exit status, and its results.json holds the seeds finished before (it is written after
#    each). Either way records.tgz keeps the stage records it wrote, and the log lists them
# 4. with INT8=1, benchmarks/bench_int8.py; with SQUAD_DIR, the SQuAD 2.0 experiment: only in
#    what time is left
# Everything it writes to RESULTS_DIR (at most 8 files, what the device tool brings back):
# log.txt, results.{json,md,png} of the experiment, records.tgz (its stage records), and with
# SQUAD_DIR results-squad.json.
#
# Afterwards, back here: copy RESULTS_DIR/results.json to docs/results/experiment-glue-gpu.json
# and commit it (with results.md beside it if wanted), so that the next GPU session continues
# from it (RECORDS_FROM's default) instead of running the finished seeds again; with CHECKS=0
# it gives the experiment the whole command. A seed is the
# unit carried between sessions (a stopped seed's checkpoints stay on the machine that ran it):
# a whole-set SST-2 seed (a 14-epoch fine-tuning grid of 60k examples, ~12 minutes on an H100
# by the rates above) does not fit into one command; SST-2 needs a longer lease, with its own
# results file (TASKS=sst2 RECORDS_FROM=docs/results/experiment-sst2-gpu.json, copied back
# there): a results.json holds the tasks of its run only.
set -uo pipefail
results=${1:-${OUT:?RESULTS_DIR or OUT}}; model=${2:-.gpu/minilm-fp16}; glue=${3:-.gpu/glue}
deadline=${DEADLINE:-480}; device=${DEVICE:-cuda}
tasks=${TASKS:-wnli,rte,mrpc,stsb,cola}; seeds=${SEEDS:-5}
records_from=${RECORDS_FROM:-docs/results/experiment-glue-gpu.json}
reserve=${STAGE_RESERVE:-150}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$results"
log=$results/log.txt
# A fresh folder per invocation, removed at the end: what comes back is under RESULTS_DIR.
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Line-buffered, so that the log follows the commands as they run.
quiet() { grep --line-buffered -vE "it/s|s/it|^Loading"; }
left() { echo $((deadline - SECONDS)); }
# capped CAP COMMAND...: COMMAND within min(CAP, what is left), or skipped, saying so; returns
# COMMAND's exit status (124: stopped by its cap), 0 when skipped
capped() {
  local cap=$1 seconds; shift
  seconds=$(left); ((seconds > cap)) && seconds=$cap
  if ((seconds < 20)); then echo "skipped, ${seconds} s left: $*"; return 0; fi
  echo "== $* (at most ${seconds} s)"
  timeout -k 20 "$seconds" "$@"
  local status=$?
  ((status == 124 || status == 137)) && echo "stopped after ${seconds} s: $*"
  return $status
}
# ended NAME STATUS [NOTE]: true if STATUS is 0, else a log line saying how NAME ended (NOTE
# appended), and false
ended() {
  local name=$1 status=$2 note=${3:-}
  ((status == 0)) && return 0
  if ((status == 124 || status == 137)); then
    echo "$name: killed by the deadline (exit status $status)$note" \
      | tee -a "$log"
  else
    echo "$name: failed (exit status $status)$note" | tee -a "$log"
  fi
  return 1
}

{
  date -u
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else
    echo "no nvidia-smi"
  fi
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
    transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$log"
# The GPU image lacks hyperopt (the sweep's TPE): scripts/gpu_prepare.sh put its wheel (pure
# Python; its dependencies are in the image) in .gpu/wheels.
if ! python3 -c "import hyperopt" 2>/dev/null && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" \
    .gpu/wheels/*.whl 2>&1 | tee -a "$log"
  export PYTHONPATH=$PYTHONPATH:$work/site
fi
if ! python3 -c "import torch, transformers, pyarrow, hyperopt" 2>/dev/null; then
  echo "python3 ($(command -v python3)) lacks torch, transformers, pyarrow or hyperopt: put one" \
    "that has them first on PATH, or run scripts/gpu_prepare.sh (see the header)" | tee -a "$log"
  exit 2
fi

if [ "${CHECKS:-1}" = 1 ]; then
  # -rs: a skipped test says why (no CUDA device, no GLUE files).
  BERTVISION_TEST_MODEL=$model BERTVISION_TEST_GLUE_DIR=$glue \
    capped 120 python3 -m pytest -q -s -rs -p no:cacheprovider tests/test_cuda.py 2>&1 \
    | tail -n 15 | tee -a "$log"

  capped 75 python3 benchmarks/bench_extract.py --model "$model" --data-dir "$glue" --task rte \
    --split train --device "$device" --batch-size 64 --repeats 2 2>&1 | quiet | tee -a "$log"

  # bert-base-sized (12 layers x 768), random weights: speed does not depend on them; MODEL's
  # tokenizer is bert-base-uncased's vocabulary.
  python3 - "$model" "$work/bert-base-random" <<'PY' 2>&1 | quiet
import sys
from transformers import AutoTokenizer, BertConfig, BertModel
BertModel(BertConfig()).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PY
  capped 75 python3 benchmarks/bench_extract.py --model "$work/bert-base-random" \
    --data-dir "$glue" --task rte --split train --device "$device" --batch-size 256 \
    --repeats 2 2>&1 | quiet | tee -a "$log"
else
  echo "CHECKS=0: no CUDA tests or extraction benchmarks; the experiment has the time" \
    | tee -a "$log"
fi

# The experiment starts no stage in its last STAGE_RESERVE s (see the header); the outer timeout
# is the backstop.
continued=() from="from scratch (no $records_from)"
if [ -f "$records_from" ]; then
  from="from scratch ($records_from was measured on another device)"
  if python3 - "$records_from" "$device" <<'PY'; then
import json, sys
sys.path.insert(0, "scripts")
from experiment import device_name
sys.exit(json.load(open(sys.argv[1]))["device"] != device_name(sys.argv[2]))
PY
    continued=(--records-from "$records_from") from="continuing from $records_from"
  fi
fi
experiment=$work/experiment
stop_after=$(($(left) - reserve))
if ((stop_after > 30)); then
  echo "== experiment: $tasks, $seeds seeds, stop after ${stop_after} s, $from" | tee -a "$log"
  run_experiment() {
    timeout -k 20 "$(left)" python3 scripts/experiment.py --data-dir "$glue" --model "$model" \
      --device "$device" --tasks "$tasks" --seeds "$seeds" --out "$experiment" \
      --stop-after "$(($(left) - reserve))" "$@" 2>&1 | quiet | tee -a "$log"
    return "${PIPESTATUS[0]}"
  }
  run_experiment "${continued[@]}"
  status=$?
  # refused before any stage (its settings differ: a default changed since), and nothing written
  if ((status == 2)) && ((${#continued[@]})) && [ ! -e "$experiment" ]; then
    echo "== experiment: $records_from not taken (above); from scratch" | tee -a "$log"
    run_experiment
    status=$?
  fi
  # results.json is written after each finished seed: there even when the experiment was killed
  if [ -f "$experiment/results.json" ]; then
    ended experiment "$status" ": its results hold the seeds it finished, records.tgz the stages"
    cp "$experiment"/results.{json,md,png} "$results/" 2>/dev/null
  else
    ended experiment "$status" ": no seed finished; records.tgz has the stages it finished"
  fi
  tar -czf "$results/records.tgz" -C "$experiment" --exclude=runs --exclude=data . 2>/dev/null
  for seed in "$experiment"/*/records/*/seed-*/; do  # how far it got, killed or not
    [ -d "$seed" ] || continue
    names=$(cd "$seed" && ls -- *.json 2>/dev/null | sed 's/\.json$//' | paste -sd ' ')
    echo "stage records, $(basename "$(dirname "$seed")") $(basename "$seed"): ${names:-none}" \
      | tee -a "$log"
  done
else
  echo "skipped, $(left) s left (STAGE_RESERVE $reserve): the experiment" | tee -a "$log"
fi

if [ "${INT8:-0}" = 1 ]; then
  capped 600 python3 benchmarks/bench_int8.py --model "$model" --data-dir "$glue" \
    --device "$device" --seeds 5 --epochs 10 2>&1 | quiet | tee -a "$log"
fi
if [ -n "${SQUAD_DIR:-}" ]; then
  squad=$work/experiment-squad
  capped 600 python3 scripts/experiment_squad.py --data-dir "$SQUAD_DIR" --model "$model" \
    --device "$device" --seeds 3 --out "$squad" 2>&1 | quiet | tee -a "$log"
  status=${PIPESTATUS[0]}
  if ended "the SQuAD experiment" "$status" ": its results are not copied"; then
    cp "$squad/results.json" "$results/results-squad.json" 2>/dev/null
  fi
fi
echo "done at $SECONDS s of $deadline" | tee -a "$log"
