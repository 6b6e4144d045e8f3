#!/usr/bin/env bash
# The main job end to end, on environments this script sets up under .demo/:
#   .demo/tool    stackpatch's own dependencies
#   .demo/gemma4  the Gemma 4 fine-tuning stack the patches are for (torch 2.13.0 CPU,
#                 transformers 5.5.4, peft 0.19.1, bitsandbytes 0.49.2, accelerate 1.13.0)
# then check -> apply -> verify -> a reinstall that undoes the patches -> verify fails ->
# apply again -> revert, proving every file byte-identical to what pip installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
STACK=(torch==2.13.0 transformers==5.5.4 peft==0.19.1 bitsandbytes==0.49.2 accelerate==1.13.0)

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [ ! -x .demo/tool/bin/python ]; then
  step "creating .demo/tool with stackpatch's dependencies"
  "$PY" -m venv .demo/tool
  .demo/tool/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
fi
if [ ! -x .demo/gemma4/bin/python ]; then
  step "creating .demo/gemma4: ${STACK[*]}"
  "$PY" -m venv .demo/gemma4
  # torch is pinned on the same line so pip never reaches for a multi-GB CUDA build.
  .demo/gemma4/bin/python -m pip install -q --disable-pip-version-check "${STACK[@]}"
fi

TOOL=(.demo/tool/bin/python apply_patches.py --python .demo/gemma4/bin/python)
SITE=$(.demo/gemma4/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
fingerprint() { (cd "$SITE" && find transformers bitsandbytes peft -name '*.py' -print0 | sort -z | xargs -0 sha256sum | sha256sum); }
PRISTINE=$(fingerprint)

step "--check: what applies to this environment"
"${TOOL[@]}" --check
step "--apply"
"${TOOL[@]}" --apply
step "--verify (exit 0: everything applied and unchanged)"
"${TOOL[@]}" --verify
step "pip install --force-reinstall --no-deps transformers==5.5.4 (what an upgrade does to a patch)"
.demo/gemma4/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps transformers==5.5.4
step "--verify now fails (exit 1), naming the drifted patch"
if "${TOOL[@]}" --verify; then echo "expected --verify to fail after the reinstall" >&2; exit 1; fi
step "--apply again"
"${TOOL[@]}" --apply -q && "${TOOL[@]}" --verify -q && echo "verify: ok"
step "--revert: back to the installed bytes"
"${TOOL[@]}" --revert
if [ "$(fingerprint)" != "$PRISTINE" ]; then echo "revert left a difference" >&2; exit 1; fi
echo "every .py file of transformers, bitsandbytes and peft is byte-identical to the install"
