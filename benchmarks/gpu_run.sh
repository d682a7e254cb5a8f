#!/usr/bin/env bash
# The GPU grid (`--preset gpu`) and the largest-C search on one H100/H200 in ~12 minutes;
# results to $OUT if set.
# Runs from a bare checkout on a machine that has jax[cuda], flax and optax installed:
#   PYTHON=python3 bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
DEST="${OUT:-benchmarks/results/gpu-$(hostname -s)}"
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # per-cell peak memory, not a 75% preallocation
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95   # the largest-C search may use (almost) the card
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$DEST/gpu.txt" 2>&1
"$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, jax.devices())' | tee -a "$DEST/gpu.txt"
# The card's exact GpuTargetConfig, for `fedjax-lm plan --target FILE` on machines without it.
"$PY" -m fedjax_lm.scale.targets --dump "$DEST/target_config.textproto" 2>&1 | tail -1
# bench.json / report.md are rewritten after every group, so a timeout keeps what finished.
# STEPS picks the parts: "largest-c grid" (default, ~12 min; largest-c alone ~5 min).
STEPS="${STEPS:-largest-c grid}"
if [[ " $STEPS " == *" largest-c "* ]]; then
  # First, in its own process: a fresh allocator (see grid.py). ~1 min a cell.
  # One preset per card: the C around the edge XLA's plan for that card predicts.
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E "h100|h200" \
    | tr 'A-Z' 'a-z')
  timeout 330 "$PY" -m fedjax_lm.bench --preset "gpu-largest-c-${CARD:-h100}" --rounds 3 \
    --out "$DEST/largest-c" 2>&1 | grep -v "^WARNING" | grep -v "bfc_allocator" \
    | tee "$DEST/largest-c.log"
fi
if [[ " $STEPS " == *" grid "* ]]; then
  timeout 420 "$PY" -m fedjax_lm.bench --preset gpu --rounds 5 --trace 2 --out "$DEST" 2>&1 \
    | grep -v "^WARNING" | tee "$DEST/bench.log"
fi
echo "done; results in $DEST"
