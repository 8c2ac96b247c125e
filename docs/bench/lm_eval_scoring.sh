#!/usr/bin/env bash
# Wall time and peak memory of whole `lm_eval` processes scoring a multiple-choice task: `--model hf` against
# `--model ee-hf` at ε = 1, at ε = 0.9 and as a one-pass ε sweep, at each batch size, run in turn (one line each,
# then the ratios to `--model hf` at the same batch size). Every figure includes loading the model (a few seconds).
#
#   docs/bench/lm_eval_scoring.sh TASK LIMIT INCLUDE_PATH BATCH_SIZE... > table.md
#   e.g. docs/bench/lm_eval_scoring.sh hellaswag_local 32 local_tasks 4 16
#
# HF_BASE (default: the embedded model's dense folder) is what `--model hf` loads; HEADS (default: shipped) what
# `--model ee-hf` loads (its base must be HF_BASE). Needs GNU time (/usr/bin/time).
set -euo pipefail
task=$1 limit=$2 include=$3
shift 3
heads=${HEADS:-shipped}
base=${HF_BASE:-$(python -c 'from hf_earlyexit.modeling.base_earlyexit import embedded_dir; print(embedded_dir())')}
out=$(mktemp -d)
capability=$(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())')
echo "task $task, --limit $limit, float32, torch CPU capability and threads: $capability"
echo
echo "| batch | run | wall s | peak RSS GiB | acc | acc_norm | speed-up (hf wall ÷ wall) | memory ÷ hf's |"
echo "|---|---|---|---|---|---|---|---|"
for bs in "$@"; do
  declare -A wall=() mem=()
  for run in hf ee-hf_eps1 ee-hf_eps0.9 ee-hf_sweep; do
    case $run in
      hf) cmd=(lm_eval --model hf --model_args "pretrained=$base,dtype=float32") ;;
      ee-hf_eps1) cmd=(lm_eval --model ee-hf --model_args "pretrained=$heads,eps=1.0,dtype=float32") ;;
      ee-hf_eps0.9) cmd=(lm_eval --model ee-hf --model_args "pretrained=$heads,eps=0.9,dtype=float32") ;;
      ee-hf_sweep) cmd=(hf-earlyexit sweep --model "$heads" --eps 1 0.99 0.95 0.9 0.85 0.8 0.7 0.5
                         --output_dir "$out/sweep$bs") ;;
    esac
    if [[ $run == ee-hf_sweep ]]; then
      cmd+=(--tasks "$task" --include_path "$include" --limit "$limit" --batch_size "$bs")
    else
      cmd+=(--tasks "$task" --include_path "$include" --limit "$limit" --batch_size "$bs" --device cpu
            --output_path "$out/$run$bs")
    fi
    /usr/bin/time -f "%e %M" -o "$out/time" "${cmd[@]}" > "$out/$run$bs.log" 2>&1
    read -r seconds kib < "$out/time"
    wall[$run]=$seconds mem[$run]=$kib
    scores=$(python - "$out" "$run$bs" "$task" <<'PY'
import json, pathlib, sys
out, run, task = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if run.startswith("ee-hf_sweep"):  # the sweep's ε = 0.9 point
    metrics = json.loads((out / run.replace("ee-hf_", "") / "points" / "eps_0.9.json").read_text())["metrics"][task]
else:
    metrics = json.loads(sorted((out / run).rglob("results*.json"))[-1].read_text())["results"][task]
print(" | ".join(f"{metrics[k]:.3f}" if k in metrics else "–" for k in ("acc,none", "acc_norm,none")))
PY
)
    printf '| %s | %s | %.1f | %.2f | %s | %.2fx | %.2fx |\n' "$bs" "$run" "$seconds" \
      "$(echo "$kib / 1048576" | bc -l)" "$scores" "$(echo "${wall[hf]} / $seconds" | bc -l)" \
      "$(echo "$kib / ${mem[hf]}" | bc -l)"
  done
done
