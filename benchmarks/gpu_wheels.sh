#!/usr/bin/env bash
# Fetch into .whl/ the wheels benchmarks/gpu_check.sh needs on a GPU image that has torch,
# transformers, numpy, pandas, pyarrow, einops and jaxtyping but not the rest of what saets imports
# (Python 3.12, x86-64; the versions installed here). Run where pip reaches PyPI; .whl/ is git-ignored
# by .git/info/exclude (add `/.whl/` there) and travels with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs="transformer-lens better-abc datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection"
pins=$(python3 -m pip list --format=freeze 2>/dev/null | grep -iE "^($(echo $pkgs | sed 's/ /|/g; s/-/[-_]/g'))==" || true)
[ -n "$pins" ] || { echo "none of $pkgs is installed here: install saets first (make install)"; exit 1; }
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls .whl
