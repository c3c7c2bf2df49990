#!/usr/bin/env bash
# One prepared GPU run (a single H100, no network): about 8 minutes, every part under its own timeout.
#
#   0. install: dcq from this tree (pip -e, --no-deps), plus any wheels in .whl/ beside the tree
#      (simplejpeg: the loader's libjpeg-turbo decoder; without it the loader falls back to Pillow
#      and says so). Fetch them on a machine with pip:
#        pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_17_x86_64 -d .whl simplejpeg
#   1. smoke of the real commands on CUDA, fp16 and bf16: `dcq train` 30 steps for dcq, fc and pfc
#      (checkpoint), `--resume` to 60, then `dcq eval` and `dcq export` of each head's final.pt;
#      every exit code recorded;
#   2. end-to-end training steps (benchmarks/train_step.py: TrainStep on uint8 loader batches,
#      pinned, copied and normalised on the GPU): iresnet50, 112 px, 512-d, batch 128, bf16:
#      backbone only; DCQ's default recipe (k=2, in-batch) with a 10% queue and with 8192 at
#      1e5/1e6/1e7 identities; FC at 1e5/1e6; Partial FC 0.1 at 1e5/1e6/1e7 (OOM reported as such);
#   3. the loader on this machine's cores with the shipped decoder: DCQ items/s at k = 2;
#   4. summary: $OUT/gpu_summary.json and one table (samples/s, peak memory, loader items/s beside).
#
# Usage:  bash benchmarks/gpu.sh        Results in $OUT when set, else runs/gpu-bench/.
# Environment: PYTHON (default python3), DEVICE (default cuda),
#   DCQ_GPU_SMOKE=1: the same parts at tiny sizes (CPU, bf16 only, a minute; CI runs it): the same JSON keys.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DEST="${OUT:-runs/gpu-bench}"
mkdir -p "$DEST"
LOG="$DEST/gpu_bench.log"
: > "$LOG"
say() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
START=$(date +%s)

# -- 0. install (timeouts 45 s) ----------------------------------------------------------------------
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  timeout 15 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dcq-site .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH="/tmp/dcq-site${PYTHONPATH:+:$PYTHONPATH}" && say "installed wheels from .whl/"
fi
INFO='import dcq, torch, importlib.util as u
print("dcq", dcq.__version__, "torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "simplejpeg" if u.find_spec("simplejpeg") else "no-simplejpeg")'
if ! info=$(timeout 15 "$PY" -c "$INFO" 2>>"$LOG"); then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # the tree itself: no install needed
  info=$(timeout 15 "$PY" -c "$INFO" 2>>"$LOG") || { say "cannot import dcq and torch with $PY; see $LOG"; exit 2; }
fi
say "$info"
[ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"; }

if [ "${DCQ_GPU_SMOKE:-0}" = 1 ]; then
  AMPS=(bf16); SMOKE_SET=(--identities 24 --image-size 32); STEPS=4
  BACKBONE=(backbone=cpunet image_size=32 embedding_size=16 workers=0 batch_size=8)
  STEP_ARGS=(--backbone cpunet --image-size 16 --dim 16 --batch 8 --queue 10%,64 --dcq-classes 1e2,1e3
             --fc-classes 1e2 --pfc-classes 1e2,1e3 --recipes k2+ib --repeats 1 --warmup 0 --amp bf16)
  DATA_ARGS=(--identities 12 --size 32 --images 100 --batch 16 --batches 2 --rounds 1 --workers 0 --refs 2)
  T_SMOKE=150; T_STEP=90; T_DATA=30
else
  AMPS=(fp16 bf16); SMOKE_SET=(--identities 200 --image-size 112); STEPS=30
  BACKBONE=(backbone=iresnet18 image_size=112 embedding_size=512)
  STEP_ARGS=(--backbone iresnet50 --image-size 112 --dim 512 --batch 128 --queue 10%,8192
             --dcq-classes 1e5,1e6,1e7 --fc-classes 1e5,1e6 --pfc-classes 1e5,1e6,1e7 --recipes k2+ib
             --repeats 8 --warmup 3 --amp bf16)
  WORKERS=$(nproc)
  DATA_ARGS=(--identities 120 --size 112 --images 1500 --batch 128 --batches 8 --rounds 1 --workers "$WORKERS"
             --refs 2)
  T_SMOKE=170; T_STEP=175; T_DATA=60   # + install 45 and summary 30: 480 s
fi
status=0

# -- 1. smoke of the real commands ----------------------------------------------------------------
SMOKE="$DEST/smoke"; rm -rf "$SMOKE"; mkdir -p "$SMOKE"
say "smoke: dcq train/resume/eval/export on $DEVICE (${AMPS[*]})"
timeout "$T_SMOKE" "$PY" benchmarks/gpu_smoke.py --out "$SMOKE" --device "$DEVICE" --amps "${AMPS[@]}" --steps "$STEPS" \
  --json "$DEST/smoke.json" --set "${BACKBONE[@]}" --synth "${SMOKE_SET[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "smoke failed (exit $rc; 124 = timeout)"; status=1; }

# -- 2. end-to-end training steps -----------------------------------------------------------------
say "train_step (${STEP_ARGS[*]})"
timeout "$T_STEP" "$PY" benchmarks/train_step.py --device "$DEVICE" "${STEP_ARGS[@]}" \
  --json "$DEST/train_step_gpu.json" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "train_step failed (exit $rc; 124 = timeout)"; status=1; }

# -- 3. the loader --------------------------------------------------------------------------------
say "data_speed (${DATA_ARGS[*]})"
timeout "$T_DATA" "$PY" benchmarks/data_speed.py --device "$DEVICE" "${DATA_ARGS[@]}" \
  --json "$DEST/data_speed_gpu.json" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "data_speed failed (exit $rc; 124 = timeout)"; status=1; }

# -- 4. summary -----------------------------------------------------------------------------------
timeout 30 "$PY" benchmarks/gpu_summary.py "$DEST" --info "$info" --seconds $(( $(date +%s) - START )) \
  --status "$status" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "summary failed (exit $rc)"; status=1; }
say "done (status $status) in $(( $(date +%s) - START )) s; results in $DEST"
exit "$status"
