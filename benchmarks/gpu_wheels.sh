#!/usr/bin/env bash
# Fetch into .whl/ the wheels benchmarks/gpu_check.sh needs on a GPU image that has torch,
# transformers, numpy, pandas, pyarrow, einops and jaxtyping but not the rest of what saets imports
# (Python 3.12, x86-64; the versions installed here). Run where pip reaches PyPI; .whl/ is kept out of
# git by .git/info/exclude and travels with the working tree (WHEEL_DIR: another folder).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHEEL_DIR:-.whl}
[ "$dest" != .whl ] || grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pkgs="transformer-lens better-abc datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection"
pins=$(python3 -m pip list --format=freeze 2>/dev/null | grep -iE "^($(echo $pkgs | sed 's/ /|/g; s/-/[-_]/g'))==" || true)
[ -n "$pins" ] || { echo "none of $pkgs is installed here: install saets first (make install)"; exit 1; }
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" $pins
ls "$dest"
