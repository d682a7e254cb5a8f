#!/usr/bin/env bash
# The PEFT comparison of experiments/peft_text.yaml: C = 8, then 64, then 512, task by task,
# method by method; each call is one vectorized sweep over partition x seed (the yaml's grid:
# both partitions' 3 seeds train as one program of 6 federations, split where the memory
# budget says so). Resumes: finished cells are
# skipped. Usage: experiments/peft_text.sh DATA_DIR [OUT] [CLIENT_COUNTS]
# (OUT default experiments/results/peft_text, CLIENT_COUNTS default "8 64 512").
# C = 512 holds ~3 examples a client (2,000 over 512), fewer than a batch of 4: its cells keep
# the last partial batch (--drop-last false); at C = 8 and 64 a client's 4 steps x 4 examples
# a round never reach the end of its shard, so drop_last changes nothing there.
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [OUT] [CLIENT_COUNTS]}
out=${2:-experiments/results/peft_text}
counts=${3:-8 64 512}
declare -A methods=(
  [full]="--lr 3e-4"
  [head]="--peft head --lr 1e-2"
  [bitfit]="--peft bitfit --lr 3e-3"
  [lora_fedit]="--peft lora --lora-aggregation fedit --lr 3e-3"
  [lora_ffa]="--peft lora --lora-aggregation ffa --lr 3e-3"
  [lora_exact]="--peft lora --lora-aggregation exact --lr 3e-3"
)
declare -A length=([sst2]=48 [ag_news]=64)
for clients in $counts; do
  extra=()
  [ "$clients" -gt 64 ] && extra=(--drop-last false)
  for task in sst2 ag_news; do
    for m in full head bitfit lora_fedit lora_ffa lora_exact; do
      # shellcheck disable=SC2086  # the method's flags are words
      fedjax-lm sweep --config experiments/peft_text.yaml --data-dir "$data" --task "$task" \
        --clients "$clients" --max-length "${length[$task]}" ${methods[$m]} "${extra[@]}" \
        --no-progress --out-dir "$out/runs/$task/C=$clients/$m"
    done
  done
done
