#!/usr/bin/env bash
# The train-step benchmark at large size on a GPU: ViT-B/16 at 224 + GPT-2 small (124M) with
# cross-attention, batch 64, float32 and bfloat16 compute. Writes one JSON per dtype.
#
#   benchmarks/train_step_gpu.sh [OUT_DIR] [extra train_step.py flags]
#
# Environment: PYTHON (default python), DTYPES (default "float32 bfloat16"), and for a dry run
# on a machine without a GPU: DEVICE=cpu SIZE=tiny (runs the same commands at a toy size).
# The torch baseline needs a CUDA build of torch (the `bench` extra); without one the JSON
# carries ours and the matmul ceiling only, with torch_note saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${1:-benchmarks/results}
shift || true
DEVICE=${DEVICE:-gpu}
SIZE=${SIZE:-large}
DTYPES=${DTYPES:-float32 bfloat16}
if [[ "$DEVICE" == gpu ]]; then
  backend=$("$PY" -c "import jax; print(jax.default_backend())")
  if [[ "$backend" != gpu ]]; then
    echo "train_step_gpu.sh: JAX sees no GPU (backend: $backend); install jax[cuda12]" >&2
    exit 2
  fi
  timing=(--warmup 3 --steps 10 --rounds 5 --ceiling-repeats 10)
else
  timing=(--warmup 1 --steps 1 --rounds 2 --ceiling-n 256)
fi
mkdir -p "$OUT_DIR"
for dtype in $DTYPES; do
  "$PY" benchmarks/train_step.py --size "$SIZE" --device "$DEVICE" --dtype "$dtype" \
    "${timing[@]}" --json "$OUT_DIR/train_step_${DEVICE}_${SIZE}_${dtype}.json" "$@"
done
