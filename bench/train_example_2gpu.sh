#!/usr/bin/env bash
# examples/train_gemma4_qlora.py under `accelerate launch` on 2 GPUs: DDP and FSDP2 (wrapping
# Gemma4TextDecoderLayer) on the tiny model, then DDP on the full 26B-A4B text config (random
# weights). Needs stackpatch applied (done here). Logs land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/example-2gpu}
CKPT=${CKPT:-/tmp/ckpt-26b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 apply_patches.py --apply -q && python3 apply_patches.py --verify -q || exit 1
FSDP2=(--use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
  --fsdp_transformer_layer_cls_to_wrap Gemma4TextDecoderLayer --fsdp_state_dict_type FULL_STATE_DICT
  --fsdp_cpu_ram_efficient_loading false)
launch() {  # label accelerate-args -- script-args
  local label=$1; shift
  local accel=(); while [ "$1" != "--" ]; do accel+=("$1"); shift; done; shift
  accelerate launch --num_processes 2 --mixed_precision bf16 "${accel[@]}" \
    examples/train_gemma4_qlora.py --output-dir "/tmp/run-$label" "$@" > "$OUT/$label.out" 2>&1
  echo "$label: exit $?" | tee -a "$OUT/$label.out"
  cp "/tmp/run-$label/log.jsonl" "$OUT/$label.jsonl" 2>/dev/null
  grep -E "^(data|model|adapter|error)" "$OUT/$label.out"
}
[ -n "${ONLY_FSDP:-}" ] || launch ddp-tiny --multi_gpu -- --tiny --max-steps 20 --batch-size 2 --grad-accum 2 --lr 5e-3
[ -n "${ONLY_FSDP:-}" ] || launch fsdp2-tiny-4bit "${FSDP2[@]}" -- --tiny --max-steps 20 --batch-size 2 --grad-accum 2 --lr 5e-3
[ -n "${ONLY_DENSE:-}" ] || launch fsdp2-tiny-bf16 "${FSDP2[@]}" -- --tiny --no-4bit --max-steps 20 --batch-size 2 --grad-accum 2 --lr 5e-3
launch fsdp2-tiny-dense-4bit "${FSDP2[@]}" -- --tiny dense --max-steps 20 --batch-size 2 --grad-accum 2 --lr 5e-3
[ -n "${SKIP_26B:-}" ] && exit 0
[ -f "$CKPT/config.json" ] || python3 bench/whole_model_memory.py make --dir "$CKPT" > /dev/null
python3 bench/example_data.py --model-dir "$CKPT" --out /tmp/example-data --lengths 2048 > /dev/null
launch ddp-26b --multi_gpu -- --model "$CKPT" --data /tmp/example-data/chat2048.jsonl \
  --max-length 2048 --max-steps 6 --grad-accum 1 --save-steps 100000
