#!/usr/bin/env bash
# Issue 13: stackpatch, unsloth, experts4bit-qlora and axolotl side by side on one GPU.
#
#   bash bench/peers/run.sh [SPEC...]        SPEC = TRAINER or TRAINER:ROW
#     TRAINER: stackpatch | unsloth | e4b (experts4bit-qlora) | axolotl;  ROW: attn | experts
#     default: every trainer, both rows
#
# Makes or reuses the random-weight 26B-A4B checkpoint ($CKPT) and the chat data + shared
# token files ($DATA), installs each peer's wheels (.whl/peers, bench/peers/wheels.py) into
# its own --target folder, then runs each trainer and row in its own process (one load,
# every length) under the same GPU cap. stackpatch runs first, on the stack patched by
# apply_patches.py; the stack is reverted before any peer runs. Results: $OUT/peers.jsonl,
# a line as soon as each exists, and one log per process; a compact table at the end.
#
# Environment: OUT CKPT DATA LENGTHS STEPS CAP_GIB (GiB) BUDGET_S (seconds from this
# script's start after which no process starts and running ones get SIGTERM; keep it under
# the device's 600 s per command) MIN_START_S WHEELS SITE WORK PYTHON.
# DRY_RUN=1: a CPU check of this script and the adapters on a tiny checkpoint
# (bench/peers/tiny_checkpoint.py); WHEEL_SUBSTITUTES=DIR then replaces same-named wheels
# (another Python's multiprocess, say).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
HERE=bench/peers
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
if [[ $DRY_RUN == 1 ]]; then
  CKPT=${CKPT:-/tmp/peers-dry/ckpt} DATA=${DATA:-/tmp/peers-dry/data}
  LENGTHS=${LENGTHS:-64 128} STEPS=${STEPS:-4} SAMPLES=12
else
  CKPT=${CKPT:-/tmp/ckpt-26b} DATA=${DATA:-/tmp/peers-data}
  LENGTHS=${LENGTHS:-512 2048 4096} STEPS=${STEPS:-10} SAMPLES=32
fi
((SAMPLES < STEPS)) && SAMPLES=$STEPS  # one sample per step, never reused
OUT=${OUT:-/tmp/peers-out} CAP_GIB=${CAP_GIB:-23}
BUDGET_S=${BUDGET_S:-540} MIN_START_S=${MIN_START_S:-75}
WHEELS=${WHEELS:-$ROOT/.whl/peers} SITE=${SITE:-/tmp/peers-site} WORK=${WORK:-/tmp/peers-work}
export OUT CKPT DATA LENGTHS STEPS CAP_GIB BUDGET_S DRY_RUN
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Nothing may reach a hub: fail at once instead of waiting for a network that is not there.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
RESULTS=$OUT/peers.jsonl
SETUP_LOG=$OUT/setup.log
mkdir -p "$OUT" "$WORK" "$SITE" || exit 2
INHERITED_PYTHONPATH=${PYTHONPATH:-}

say() { echo "[run.sh $(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

# -- which processes -------------------------------------------------------------------------
declare -a SPECS=()
add_spec() {  # trainer [row]
  local trainer=$1 row=${2:-}
  case $trainer in
    stackpatch|unsloth|axolotl) ;;
    e4b|experts4bit-qlora) trainer=e4b ;;
    *) echo "error: unknown trainer '$trainer' (stackpatch, unsloth, e4b, axolotl)" >&2; exit 2 ;;
  esac
  if [[ $trainer == axolotl ]]; then SPECS+=("axolotl:check"); return; fi
  case $row in
    "") SPECS+=("$trainer:attn" "$trainer:experts") ;;
    attn|experts) SPECS+=("$trainer:$row") ;;
    *) echo "error: unknown row '$row' in '$trainer:$row' (attn, experts)" >&2; exit 2 ;;
  esac
}
(($# == 0)) && set -- stackpatch unsloth e4b axolotl
for spec in "$@"; do add_spec "${spec%%:*}" "$([[ $spec == *:* ]] && echo "${spec#*:}")"; done
# stackpatch first (patched stack), then the rest in the order given (stock stack)
declare -a ORDERED=()
for spec in "${SPECS[@]}"; do [[ $spec == stackpatch:* ]] && ORDERED+=("$spec"); done
for spec in "${SPECS[@]}"; do [[ $spec != stackpatch:* ]] && ORDERED+=("$spec"); done
say "processes: ${ORDERED[*]}; lengths $LENGTHS; $STEPS steps; cap $CAP_GIB GiB; budget ${BUDGET_S}s"

wants() { [[ " ${ORDERED[*]} " == *" $1"* ]]; }

# -- checkpoint, data, tokens ----------------------------------------------------------------
prepare() {
  # whole_model_memory.py writes the index last: a checkpoint cut off while being made is
  # made again
  if [[ -f $CKPT/model.safetensors.index.json || -f $CKPT/model.safetensors ]]; then
    say "reusing checkpoint $CKPT"
  elif [[ $DRY_RUN == 1 ]]; then
    $PYTHON $HERE/tiny_checkpoint.py --dir "$CKPT" || return 1
  else
    say "making the 26B-A4B checkpoint in $CKPT"
    $PYTHON bench/whole_model_memory.py make --dir "$CKPT" || return 1
  fi
  local stamp
  stamp=$DATA/.stamp-$(echo "$CKPT $LENGTHS $SAMPLES" | sha256sum | cut -c1-16)
  if [[ -f $stamp && -f $CKPT/tokenizer.json ]]; then
    say "reusing chat data and tokens in $DATA"
    return 0
  fi
  # shellcheck disable=SC2086  # LENGTHS is a list
  $PYTHON bench/example_data.py --model-dir "$CKPT" --out "$DATA" --lengths $LENGTHS \
    --samples "$SAMPLES" &&
    $PYTHON $HERE/tokens.py --model-dir "$CKPT" --data "$DATA" --lengths $LENGTHS &&
    touch "$stamp"
}
prepare >>"$SETUP_LOG" 2>&1
rc=$?
tail -n 4 "$SETUP_LOG"
if ((rc != 0)); then say "error: checkpoint or data failed (exit $rc), see $SETUP_LOG"; exit 1; fi

# -- wheels ----------------------------------------------------------------------------------
wheel_files() {  # stem... -> paths (a WHEEL_SUBSTITUTES file wins)
  local stem file
  for stem in "$@"; do
    file=$(ls "${WHEEL_SUBSTITUTES:-/nonexistent}/$stem"-*.whl 2>/dev/null | head -n 1)
    [[ -n $file ]] || file=$(ls "$WHEELS/$stem"-*.whl 2>/dev/null | head -n 1)
    [[ -n $file ]] || { echo "error: no $stem wheel in $WHEELS (run python3 bench/peers/wheels.py)" >&2; return 1; }
    echo "$file"
  done
}
declare -A PEER_WHEELS=(
  [unsloth]="unsloth unsloth_zoo trl datasets dill multiprocess bitsandbytes"
  [e4b]="experts4bit_qlora grouped_nf4_gemm bitsandbytes"
  [axolotl]="axolotl"
)
install_into() {  # folder stem... -> installs those wheels into SITE/folder, prints its path
  local name=$1 files stamp target=$SITE/$1
  shift
  files=$(wheel_files "$@") || return 1
  local mine=()
  for f in $files; do [[ $f == "$WHEELS"/* ]] && mine+=("$f"); done
  $PYTHON $HERE/preflight.py wheels "$WHEELS/MANIFEST.json" "${mine[@]}" >&2 || return 1
  # shellcheck disable=SC2086  # one path per word
  stamp=$(sha256sum $files | sha256sum | cut -c1-16)
  if [[ ! -f $target/.stamp-$stamp ]]; then
    rm -rf "$target"
    # shellcheck disable=SC2086
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$target" $files >&2 || return 1
    touch "$target/.stamp-$stamp"
  fi
  echo "$target"
}
install_peer() {  # trainer -> its own --target folder
  # shellcheck disable=SC2086
  install_into "$1" ${PEER_WHEELS[$1]}
}

# stackpatch runs on the machine's stack plus, if missing there, bitsandbytes (4-bit) and
# libcst (apply_patches.py): the same path for --apply, the run and --revert.
SP_PATH=$INHERITED_PYTHONPATH
stackpatch_path() {
  local missing=()
  PYTHONPATH=$SP_PATH $PYTHON -c "import bitsandbytes" 2>/dev/null || missing+=(bitsandbytes)
  PYTHONPATH=$SP_PATH $PYTHON -c "import libcst" 2>/dev/null || missing+=(libcst)
  ((${#missing[@]} == 0)) && return 0
  local deps
  deps=$(install_into stackpatch-deps "${missing[@]}" 2>>"$SETUP_LOG") || return 1
  SP_PATH=$deps${SP_PATH:+:$SP_PATH}
  say "stackpatch: ${missing[*]} from $deps"
}

# -- processes -------------------------------------------------------------------------------
left() { echo $((BUDGET_S - SECONDS)); }
skip_line() {  # trainer row reason
  $PYTHON - "$RESULTS" "$1" "$2" "$3" <<'EOF'
import sys
sys.path.insert(0, "bench/peers")
from measure import append_line, now_iso
results, trainer, row, reason = sys.argv[1:]
append_line(results, {"kind": "failed", "trainer": trainer, "row": row, "time": now_iso(),
                      "stage": "start", "status": "not_run", "error": reason})
EOF
  say "$1/$2 not run: $3"
}
run_process() {  # trainer row pythonpath command...
  local trainer=$1 row=$2 path=$3; shift 3
  local log=$OUT/$trainer-$row.log limit
  limit=$(($(left) - 5))
  if ((limit < MIN_START_S)); then
    skip_line "$trainer" "$row" "not started: ${limit}s left of BUDGET_S=${BUDGET_S}s (MIN_START_S=$MIN_START_S)"
    return
  fi
  mkdir -p "$WORK/$trainer-$row"
  say "$trainer/$row: start (limit ${limit}s), log $log"
  PYTHONPATH=$path PEERS_RESULTS=$RESULTS PEERS_CAP_GIB=$CAP_GIB \
    timeout -s TERM -k 20 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  $PYTHON $HERE/measure.py exit "$RESULTS" "$trainer" "$row" "$rc" "$log"
  grep '^\[peers\]' "$log" | cut -c1-700
  say "$trainer/$row: exit $rc"
}
adapter() {  # trainer row pythonpath script
  run_process "$1" "$2" "$3" $PYTHON "$HERE/$4" --row "$2" --ckpt "$CKPT" --data "$DATA" \
    --work "$WORK/$1-$2" --lengths "$LENGTHS" --steps "$STEPS"
}

$PYTHON $HERE/preflight.py setup "$RESULTS" "$WHEELS/MANIFEST.json"

stackpatch_path || { say "error: stackpatch's bitsandbytes/libcst did not install, see $SETUP_LOG"; exit 1; }
if wants stackpatch:; then
  if PYTHONPATH=$SP_PATH $PYTHON apply_patches.py --apply -q >>"$SETUP_LOG" 2>&1; then
    PYTHONPATH=$SP_PATH $PYTHON apply_patches.py --verify 2>&1 | tail -n 3
    for spec in "${ORDERED[@]}"; do
      [[ $spec == stackpatch:* ]] || continue
      adapter stackpatch "${spec#*:}" "$SP_PATH" adapter_stackpatch.py
    done
  else
    for spec in "${ORDERED[@]}"; do
      [[ $spec == stackpatch:* ]] && skip_line stackpatch "${spec#*:}" "apply_patches.py --apply failed: $(tail -n 1 "$SETUP_LOG")"
    done
  fi
fi
# Peers run on the stock stack. Revert with the path the patches were applied with; also
# when stackpatch is not asked for (a call cut off while patched left the stack patched;
# on a stock stack it changes nothing).
if ! PYTHONPATH=$SP_PATH $PYTHON apply_patches.py --revert -q >>"$SETUP_LOG" 2>&1; then
  say "error: apply_patches.py --revert failed, no peer runs on a patched stack: $(tail -n 1 "$SETUP_LOG")"
  exit 1
fi

for spec in "${ORDERED[@]}"; do
  trainer=${spec%%:*} row=${spec#*:}
  [[ $trainer == stackpatch ]] && continue
  if ! site=$(install_peer "$trainer" 2>>"$SETUP_LOG"); then
    skip_line "$trainer" "$row" "wheels did not install: $(tail -n 1 "$SETUP_LOG")"
    continue
  fi
  case $trainer in
    axolotl)
      PYTHONPATH= PEERS_RESULTS=$RESULTS $PYTHON $HERE/adapter_axolotl.py \
        --wheel "$(wheel_files axolotl)" --site "$site" >>"$SETUP_LOG" 2>&1
      grep '\[peers\] axolotl' "$SETUP_LOG" | tail -n 1 | cut -c1-900 ;;
    unsloth)
      [[ $DRY_RUN == 1 ]] && export UNSLOTH_ALLOW_CPU=1
      adapter unsloth "$row" "$site" adapter_unsloth.py ;;
    e4b)
      adapter experts4bit-qlora "$row" "$site" adapter_e4b.py ;;
  esac
done

say "done; results in $RESULTS"
$PYTHON $HERE/report.py --results "$RESULTS" --print
