#!/usr/bin/env bash
# One command on a GPU machine (<= 8 minutes on an H100): the static decode engine against
# TransformerLens (fp32 tokens, bf16 activations), then decode and effects throughput on
# Gemma-2-2B-shaped random weights. JSON in benchmarks/results/<date>/gpu_check.json (and $OUT/).
# Arguments pass to `python -m benchmarks.gpu_check` (e.g. --rows 1024, --vectors 4, --smoke).
#
# The project's packages that a bare GPU image lacks (transformer_lens, pydantic, datasets, ...)
# travel as wheels in .whl/: fetch them once with `bash benchmarks/gpu_wheels.sh` where pip works.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/saets-site .whl/*.whl
  export PYTHONPATH=/tmp/saets-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python3 -m benchmarks.gpu_check "$@"
