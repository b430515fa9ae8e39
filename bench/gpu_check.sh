#!/usr/bin/env bash
# The GPU measurements of generation and of the update at the real batch, in one run:
#   decode  bench/decode_speed.py: eager against the static-cache compiled decoder on the Qwen2.5-0.5B and 7B
#           architectures, bf16, 8, 32 and 128 rows of 512 new tokens (eager timed over its first 32 tokens: it
#           is bound by the host, the same per token at any length), peak memory of each static decode; then the
#           fp32 exactness check (0.5B, 128 rows, 64 tokens, before and after an in-place weight update).
#   step    bench/gpu.py --config configs/qwen2.5-7b-h100.yaml: the real configuration (32 prompts x 4
#           completions, 512 new tokens, micro_batch_tokens 8192, 8-bit AdamW, bf16, checkpointing) on the 7B
#           architecture with 192-token prompts under an 80 GB cap, two steps, the second timed by phase
#           (rollout, old log-probs, update, optimizer) with peak memory and the first minibatch's ratio.
# Each writes its JSON as it goes into bench/results/<part>-<device>-<date>.json, the output beside them in a
# .log; a part that runs past its time limit keeps what it finished.
#
#   bash bench/gpu_check.sh                      # both parts (about 6 minutes on an H200 with cold compile caches)
#   bash bench/gpu_check.sh --only step          # one part (decode or step)
#   bash bench/gpu_check.sh --smoke --out DIR    # the same code on the CPU with the tiny architecture (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SMOKE=0
OUT=bench/results
ONLY="decode step"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUT=${2:?--out needs a directory}; shift ;;
        --only) ONLY=${2:?--only needs decode or step}; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--smoke] [--out DIR] [--only decode|step]" >&2; exit 2 ;;
    esac
    shift
done
for part in $ONLY; do
    case "$part" in decode|step) ;; *) echo "gpu_check: --only: unknown part $part (decode or step)" >&2; exit 2 ;; esac
done

DEVICE=$("$PY" -c '
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-"))')
if [ "$SMOKE" = 0 ] && [ "$DEVICE" = cpu ]; then
    echo "gpu_check: no CUDA device; --smoke runs the same code on the CPU" >&2
    exit 2
fi
STAMP=$(date +%Y-%m-%d)
mkdir -p "$OUT"

run() {  # part, time limit in seconds, command...
    local part=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $part ($DEVICE, limit ${limit} s): $*"
    set +e
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$part-$DEVICE-$STAMP.log"
    local rc=${PIPESTATUS[0]}
    set -e
    echo "== $part: exit $rc after $((SECONDS - start)) s"
    return "$rc"
}

status=0
if [[ " $ONLY " == *" decode "* ]]; then
    if [ "$SMOKE" = 1 ]; then
        run decode 300 "$PY" bench/decode_speed.py --smoke --rows 4,12 --eager-tokens 20 \
            --out "$OUT/decode-$DEVICE-$STAMP.json" || status=1
    else
        run decode 300 "$PY" bench/decode_speed.py --models 0.5b,7b --rows 8,32,128 --new-tokens 512 \
            --eager-tokens 32 --no-repeat-check --check-tokens 64 --out "$OUT/decode-$DEVICE-$STAMP.json" || status=1
    fi
fi
if [[ " $ONLY " == *" step "* ]]; then
    if [ "$SMOKE" = 1 ]; then
        run step 300 "$PY" bench/gpu.py --smoke --config configs/qwen2.5-7b-h100.yaml \
            --out "$OUT/step-$DEVICE-$STAMP.json" || status=1
    else
        run step 210 "$PY" bench/gpu.py --config configs/qwen2.5-7b-h100.yaml --models 7b --prompt-len 192 \
            --steps 2 --memory-cap-gb 80 --out "$OUT/step-$DEVICE-$STAMP.json" || status=1
    fi
fi
exit $status
