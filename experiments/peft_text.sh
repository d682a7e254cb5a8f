#!/usr/bin/env bash
# The PEFT comparison of experiments/peft_text.yaml: C = 8 before C = 64, seed by seed, task by
# task (so a cut-short run holds every method for the cells it reached). Resumes: finished
# cells are skipped. Usage: experiments/peft_text.sh DATA_DIR [OUT] [SEEDS]
# (OUT default experiments/results/peft_text, SEEDS default "0 1 2").
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [OUT] [SEEDS]}
out=${2:-experiments/results/peft_text}
seeds=${3:-0 1 2}
declare -A methods=(
  [full]="--lr 3e-4"
  [head]="--peft head --lr 1e-2"
  [bitfit]="--peft bitfit --lr 3e-3"
  [lora_fedit]="--peft lora --lora-aggregation fedit --lr 3e-3"
  [lora_ffa]="--peft lora --lora-aggregation ffa --lr 3e-3"
  [lora_exact]="--peft lora --lora-aggregation exact --lr 3e-3"
)
declare -A length=([sst2]=48 [ag_news]=64)
for clients in 8 64; do
  for seed in $seeds; do
    for task in sst2 ag_news; do
      for m in full head bitfit lora_fedit lora_ffa lora_exact; do
        # shellcheck disable=SC2086  # the method's flags are words
        fedjax-lm sweep --config experiments/peft_text.yaml --data-dir "$data" --seed "$seed" \
          --task "$task" --clients "$clients" --max-length "${length[$task]}" ${methods[$m]} \
          --no-progress --out-dir "$out/runs/$task/C=$clients/$m/seed=$seed"
      done
    done
  done
done
