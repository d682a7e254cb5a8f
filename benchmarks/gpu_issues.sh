#!/usr/bin/env bash
# The GPU cells the open issues ask for, for a lent H100/H200, in parts that each fit one
# device call (600 s at most; a session has 15 min of device time, start-up included):
#   peft   (default) issue 16: LoRA (R = 8, query/value) BERT-base clients, Adam, bf16, 4 steps
#          x batch 8 x length 128 — the widest unchunked cohort (the compiled plan's edge, 456 on
#          an H200, then one client more, then a narrower reference; stops at the first
#          out-of-memory failure; benchmarks/results/plan-h200-peft/) and a C = 2,048 round in
#          chunks of 256: round time, client-steps per second, peak memory (at most 8.5 min).
#   vsweep issue 18: paper 1's client sweep (C = 1..32 x 3 seeds, tiny preset, synthetic task)
#          with `sweep --vectorize` (padding bounds 1.5 and 32) vs the 18 cells one after
#          another, end to end (at most 9 min): a second call, STEPS=vsweep, where the
#          session's device time allows.
# Paper 1's GPU slice (issue 20) is its own command: experiments/paper1_gpu_slice.py.
#
# With the device tool (a bare machine with jax[cuda], flax, optax; the wheels it lacks travel
# in .gpu_slice/whl, written by `python experiments/paper1_gpu_slice.py prepare`):
#   command: bash benchmarks/gpu_issues.sh    carry: [".gpu_slice"]    timeout_s: 600
#   (then, if time is left: command: STEPS=vsweep bash benchmarks/gpu_issues.sh)
# STEPS names the parts ("peft", "vsweep", or both for a machine without the 600 s limit); SMOKE=1 runs every part at toy size (a CPU check of
# the plumbing, minutes). Results: at most 8 files in $OUT (what the device tool brings back),
# else benchmarks/results/gpu-issues-<host>/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
DEST="${OUT:-benchmarks/results/gpu-issues-$(hostname -s)}"
WORK="${WORK:-/tmp/gpu_issues}"
STEPS="${STEPS:-peft}"
mkdir -p "$DEST" "$WORK"
SITE=/tmp/site
if ! "$PY" -c 'import tensorboardX, datasets' 2>/dev/null && [ -d .gpu_slice/whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    .gpu_slice/whl/*.whl
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
LOG="$DEST/log.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
    || echo "no nvidia-smi"; date -u; } > "$DEST/gpu.txt"
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' >> "$DEST/gpu.txt" 2>&1
CARD=$(grep -o -i -E "h100|h200" "$DEST/gpu.txt" | head -1 | tr 'A-Z' 'a-z')

bench() {  # bench NAME TIMEOUT ARGS...: one fresh process (a fresh allocator), 2 files kept
  local name=$1 limit=$2
  shift 2
  echo "== $name: fedjax-lm bench $*" | tee -a "$LOG"
  timeout "$limit" "$PY" -m fedjax_lm.bench "$@" --out "$WORK/$name" 2>&1 \
    | grep -v -E "^WARNING|bfc_allocator" | tee -a "$LOG"
  cp "$WORK/$name/bench.json" "$DEST/$name.json" 2>/dev/null
  cp "$WORK/$name/report.md" "$DEST/$name.md" 2>/dev/null
}

if [[ " $STEPS " == *" peft "* ]]; then
  if [ "${SMOKE:-0}" = 1 ]; then
    lora=(--model tiny --max-length 16 --optimizer adam --peft lora --rounds 1 --local-steps 1)
    bench peft_widest 300 "${lora[@]}" --clients 4 --backends vmap
    bench peft_2048 300 "${lora[@]}" --clients 8 --backends vmap@4
  else
    bench peft_widest 270 --preset "gpu-peft-largest-c-${CARD:-h200}" --rounds 3
    bench peft_2048 230 --preset gpu-peft-2048 --rounds 2
  fi
fi
if [[ " $STEPS " == *" vsweep "* ]]; then
  # two vectorized arms: the default padding bound (6 programs, one per C) and 32 (one
  # program: on an accelerator a padded client costs little next to a program's compile)
  small=(--paddings 1.5,32)
  [ "${SMOKE:-0}" = 1 ] && small=(--clients 1,2 --seeds 1 --rounds 1 --paddings 1.5,2)
  echo "== vsweep: benchmarks/vectorized_sweep.py ${small[*]}" | tee -a "$LOG"
  timeout 540 "$PY" benchmarks/vectorized_sweep.py --out "$WORK/vsweep" "${small[@]}" 2>&1 \
    | tee -a "$LOG"
  cp "$WORK/vsweep/vectorized_sweep.json" "$DEST/vsweep.json" 2>/dev/null
  cp "$WORK/vsweep/vectorized_sweep.md" "$DEST/vsweep.md" 2>/dev/null
fi
echo "done; results in $DEST" | tee -a "$LOG"
