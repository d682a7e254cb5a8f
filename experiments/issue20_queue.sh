#!/usr/bin/env bash
# Issue 20's remaining CPU runs, one after another (2 cores: one experiment at a time), each
# resuming where it stopped: paper 1 (Yelp-5, then blog10), the AG News collapse ablation, then
# paper 3's 5,000-step run. Rerun the same command in a new session to continue; finished runs
# are skipped. Usage: nice -n 19 experiments/issue20_queue.sh DATA_DIR [WAIT_PID]
# (WAIT_PID: a run already going, e.g. the paper 1 sweep started by hand; waited for first).
# Stop with `kill -TERM <pid of the running fedjax-lm>` (held to a clean point, resumable) and
# then this script.
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [WAIT_PID]}
if [ -n "${2:-}" ]; then
  while kill -0 "$2" 2>/dev/null; do sleep 30; done
fi
res=experiments/results
step() { echo "== $(date -u +%FT%TZ) $*"; "$@"; }
step fedjax-lm sweep --config experiments/paper1_powered.yaml --data-dir "$data" \
  --out-dir $res/paper1_powered/runs --no-progress
step fedjax-lm sweep --config experiments/paper1_powered_blog10.yaml --data-dir "$data" \
  --out-dir $res/paper1_powered/runs_blog10 --no-progress
step fedjax-lm sweep --config experiments/collapse_agnews.yaml --data-dir "$data" \
  --out-dir $res/collapse_agnews/runs --no-progress
step python -m fedjax_lm.personalize.abu --config experiments/abu_cifar10_long.yaml \
  --data-dir "$data" --out $res/abu_cifar10_long
echo "== $(date -u +%FT%TZ) all done"
