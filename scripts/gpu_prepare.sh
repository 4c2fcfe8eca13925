#!/usr/bin/env bash
# Makes .gpu/, what the GPU machine needs beside the working tree (it travels only as a carried,
# git-ignored path of at most 64 MiB with the tree): the bundled all-MiniLM-L6-v2 as float16
# (45 MB instead of 91; loaded back as float32, so its fingerprint is that of the rounded
# weights, the same in every session), a copy of the GLUE files the experiment reads, and the
# wheel of hyperopt, which the GPU image lacks.
#
#   bash scripts/gpu_prepare.sh [GLUE_DIR]        (default ../shared/data/glue; after scripts/setup)
#
# then, with the device tool: run(command="bash scripts/gpu_check.sh", carry=[".gpu"],
# timeout_s=570, kind="nvidia-h100-x1"): see scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
glue=${1:-../shared/data/glue}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
rm -rf .gpu && mkdir -p .gpu/glue
.venv/bin/python - .gpu/minilm-fp16 <<'PY'
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from bertvision import encoder

source, target = Path(encoder.default_model()), Path(sys.argv[1])
target.mkdir(parents=True)
weights = load_file(source / "model.safetensors")
save_file({k: v.half() for k, v in weights.items()}, target / "model.safetensors")
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json"):
    shutil.copy(source / name, target / name)
PY
# The GPU image has no hyperopt (the sweep's TPE; pure Python, its dependencies are there).
mkdir -p .gpu/wheels
.venv/bin/pip download -q --no-deps --only-binary=:all: -d .gpu/wheels \
  "hyperopt==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("hyperopt"))')"
for task in CoLA SST-2 MRPC STS-B RTE WNLI; do
  mkdir -p ".gpu/glue/$task"
  cp "$glue/$task"/*.tsv ".gpu/glue/$task/"
done
du -sh .gpu/*
