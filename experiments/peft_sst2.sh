#!/usr/bin/env bash
# The PEFT comparison of experiments/peft_sst2.yaml, seed by seed (so a cut-short run still
# holds every method for the seeds it finished). Resumes: finished cells are skipped.
# Usage: experiments/peft_sst2.sh DATA_DIR [OUT]   (OUT default experiments/results/peft_sst2)
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [OUT]}
out=${2:-experiments/results/peft_sst2}
declare -A methods=(
  [full]="--lr 3e-4"
  [head]="--peft head --lr 1e-2"
  [bitfit]="--peft bitfit --lr 3e-3"
  [lora_fedit]="--peft lora --lora-aggregation fedit --lr 3e-3"
  [lora_ffa]="--peft lora --lora-aggregation ffa --lr 3e-3"
  [lora_exact]="--peft lora --lora-aggregation exact --lr 3e-3"
)
for seed in 0 1 2; do
  for m in full head bitfit lora_fedit lora_ffa lora_exact; do
    # shellcheck disable=SC2086  # the method's flags are words
    fedjax-lm sweep --config experiments/peft_sst2.yaml --data-dir "$data" --seed "$seed" \
      ${methods[$m]} --no-progress --out-dir "$out/runs/$m/seed=$seed"
  done
done
