#!/usr/bin/env bash
# One prepared GPU benchmark run for a lent GPU; finishes in under 10 minutes (each part has a timeout).
#
#   1. train_step: iresnet50, 112 px, 512-d, batch 128, bf16 autocast: samples/s and peak memory of
#      backbone-only, DCQ (queue 8192) at 1e5 / 1e6 / 1e7 identities and FC at 1e5 / 1e6 classes
#      (an out-of-memory configuration is reported as such);
#   2. dcq bench heads --device cuda --dtype bf16 --classes 1e5,1e6,1e7 (FC, Partial FC 0.1, DCQ);
#   3. benchmarks/data_speed.py on this machine's cores: Pillow + float32 against libjpeg-turbo + uint8
#      (normalised on the GPU after a pinned non-blocking copy), DCQ items/s at k = 1, 2 with 1/4/8 workers.
#
# Usage (from anywhere):  bash benchmarks/gpu.sh
# Results: JSON (+ PNG, logs) in $OUT when set, else runs/gpu-bench/.
# Environment: PYTHON (default python3), DEVICE (default cuda),
#   DCQ_GPU_SMOKE=1: the same steps with tiny sizes (runs on CPU in seconds; the tests use it).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DEST="${OUT:-runs/gpu-bench}"
mkdir -p "$DEST"
LOG="$DEST/gpu_bench.log"
: > "$LOG"
say() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# The package: installed, or installable without network, or used from the source tree.
INFO='import dcq, torch, importlib.util as u
print("dcq", dcq.__version__, "torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "matplotlib" if u.find_spec("matplotlib") else "no-matplotlib")'
if ! info=$("$PY" -c "$INFO" 2>>"$LOG"); then
  say "installing dcq: pip install -e . --no-deps"
  "$PY" -m pip install -q -e . --no-deps >>"$LOG" 2>&1 \
    || "$PY" -m pip install -q -e . --no-deps --no-build-isolation >>"$LOG" 2>&1 \
    || { say "pip install failed; using PYTHONPATH=src"; export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; }
  info=$("$PY" -c "$INFO" 2>>"$LOG") || { say "cannot import dcq and torch with $PY; see $LOG"; exit 2; }
fi
say "$info"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG" || true
fi

if [ "${DCQ_GPU_SMOKE:-0}" = 1 ]; then
  TRAIN_ARGS=(--backbone cpunet --image-size 16 --dim 16 --batch 8 --queue 64
              --dcq-classes 1e2,1e3 --fc-classes 1e2,1e3 --repeats 1 --warmup 0)
  HEADS_ARGS=(--classes 1e2,1e3 --batch 8 --dim 16 --queue 64 --repeats 1 --warmup 0)
  DATA_ARGS=(--identities 12 --size 32 --images 100 --batch 16 --batches 2 --rounds 1 --workers 0,1 --refs 2)
  T_TRAIN=120; T_HEADS=120; T_DATA=120
else
  TRAIN_ARGS=(--backbone iresnet50 --image-size 112 --dim 512 --batch 128 --queue 8192
              --dcq-classes 1e5,1e6,1e7 --fc-classes 1e5,1e6 --repeats 20 --warmup 5)
  HEADS_ARGS=(--classes 1e5,1e6,1e7 --batch 128 --dim 512 --queue 8192 --repeats 10 --warmup 3)
  DATA_ARGS=(--identities 120 --size 112 --images 2000 --batch 128 --batches 10 --rounds 2 --workers 1,4,8
             --refs 1,2)
  T_TRAIN=240; T_HEADS=200; T_DATA=150   # + start-up and install: < 10 minutes in all
fi

status=0
say "train_step (${TRAIN_ARGS[*]})"
timeout "$T_TRAIN" "$PY" benchmarks/train_step.py --device "$DEVICE" --amp bf16 "${TRAIN_ARGS[@]}" \
  --json "$DEST/train_step_gpu.json" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "train_step failed (exit $rc; 124 = timeout)"; status=1; }

PLOT=()
case "$info" in *no-matplotlib*) ;; *) PLOT=(--plot "$DEST/heads_gpu.png") ;; esac
say "dcq bench heads (${HEADS_ARGS[*]})"
timeout "$T_HEADS" "$PY" -m dcq bench heads --device "$DEVICE" --dtype bf16 "${HEADS_ARGS[@]}" \
  --json "$DEST/heads_gpu.json" "${PLOT[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "bench heads failed (exit $rc; 124 = timeout)"; status=1; }

say "data_speed (${DATA_ARGS[*]})"
timeout "$T_DATA" "$PY" benchmarks/data_speed.py --device "$DEVICE" "${DATA_ARGS[@]}" \
  --json "$DEST/data_speed_gpu.json" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "data_speed failed (exit $rc; 124 = timeout)"; status=1; }

say "done (status $status); results in $DEST"
exit "$status"
