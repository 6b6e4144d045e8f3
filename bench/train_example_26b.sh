#!/usr/bin/env bash
# examples/train_gemma4_qlora.py on the full 26B-A4B text config (random weights) on one GPU:
# with stackpatch applied (P13: 4-bit experts) at 512 and 2,048 tokens, then stock.
# Run on the lent GPU machine from the repo root; logs land in $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/example-out}
CKPT=${CKPT:-/tmp/ckpt-26b}
DATA=/tmp/example-data
STEPS=${STEPS:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -f "$CKPT/config.json" ] || python3 bench/whole_model_memory.py make --dir "$CKPT"
python3 bench/example_data.py --model-dir "$CKPT" --out "$DATA"
run() {  # label length extra-args...
  local label=$1 length=$2; shift 2
  python3 examples/train_gemma4_qlora.py --model "$CKPT" --data "$DATA/chat$length.jsonl" \
    --output-dir "/tmp/run-$label-$length" --max-length "$length" --max-steps "$STEPS" \
    --grad-accum 1 --save-steps 100000 "$@" > "$OUT/$label-$length.out" 2>&1 || echo "exit $?" >> "$OUT/$label-$length.out"
  cp "/tmp/run-$label-$length/log.jsonl" "$OUT/$label-$length.jsonl" 2>/dev/null || true
  grep -E "^(data|model|adapter|error)" "$OUT/$label-$length.out" || tail -5 "$OUT/$label-$length.out"
}
LABELS=${LABELS:-patched stock}  # e.g. LABELS=patched to rerun only the patched stack
python3 apply_patches.py --apply -q
python3 apply_patches.py --verify
if [[ " $LABELS " == *" patched "* ]]; then
  run patched 512
  run patched 2048
fi
python3 apply_patches.py --revert -q
if [[ " $LABELS " == *" stock "* ]]; then
  run stock 512 --skip-patch-check
  run stock 2048 --skip-patch-check
fi
