#!/usr/bin/env bash
# Both speed benchmarks at large size on a GPU, in one run (a lent GPU's time is short),
# generation first:
#   generation: GPT-2 small's decoder shape (768 wide, 12 layers, 12 heads, vocabulary
#               50,257) with cross-attention and the MiniLM-sized query tower, batch 1 and 32,
#               24 tokens with a retrieval of 4 neighbours every 4 (benchmarks/generate.py);
#   train step: ViT-B/16 at 224 + GPT-2 small (124M) with cross-attention, batch 64,
#               float32 and bfloat16 compute (benchmarks/train_step.py).
# Writes one JSON per run to OUT_DIR and the whole output to OUT_DIR/gpu_log.txt.
#
#   benchmarks/gpu.sh [OUT_DIR]
#
# Environment: PYTHON (default python3); WHAT (default "generate train"); DTYPES (train step,
# default "float32 bfloat16"); WHEELS: a folder of wheels installed first into /tmp/site, for
# a machine that has JAX and torch but no network (benchmarks/gpu_wheels.txt lists them and
# how to download them). Dry run on a machine without a GPU: DEVICE=cpu SIZE=tiny.
# The torch baselines need a CUDA build of torch (the `bench` extra); without one the JSONs
# carry ours only, with torch_note saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-benchmarks/results}
DEVICE=${DEVICE:-gpu}
SIZE=${SIZE:-large}
WHAT=${WHAT:-generate train}
DTYPES=${DTYPES:-float32 bfloat16}
mkdir -p "$OUT_DIR"
if [[ -n "${WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ravlm_jax from this checkout
# fail in seconds, not after a GPU's minutes, when a package is missing or too old
missing=$("$PY" - <<'PY' 2>/dev/null || echo "python failed to start"
import importlib
bad = []
for name in ("jax", "flax.nnx", "optax", "ml_collections", "scann", "ravlm_jax.generate",
             "ravlm_jax.train.steps"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every failure in one line
        bad.append(f"{name} ({type(e).__name__}: {e})")
print("; ".join(bad))
PY
)
if [[ -n "$missing" ]]; then
  echo "gpu.sh: cannot import: $missing (see benchmarks/gpu_wheels.txt)" >&2
  exit 2
fi
if [[ "$DEVICE" == gpu ]]; then
  backend=$("$PY" -c "import jax; print(jax.default_backend())")
  if [[ "$backend" != gpu ]]; then
    echo "gpu.sh: JAX sees no GPU (backend: $backend); install jax with CUDA" >&2
    exit 2
  fi
  train_timing=(--warmup 3 --steps 10 --rounds 5 --ceiling-repeats 10)
else
  train_timing=(--warmup 1 --steps 1 --rounds 2 --ceiling-n 256)
fi
if [[ "$SIZE" == large ]]; then
  gen_size=(--width 768 --layers 12 --heads 12 --vocab 50257 --neighbour-table-mib 8192)
else
  gen_size=(--width 64 --layers 1 --heads 2 --vocab 2048 --rows 2000 --new-tokens 8
            --batches 2 --repeats 2)
fi
{
  echo "gpu.sh: $(date -u '+%F %T UTC'), device $DEVICE, size $SIZE, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  for what in $WHAT; do
    case "$what" in
      train)
        for dtype in $DTYPES; do
          "$PY" benchmarks/train_step.py --size "$SIZE" --device "$DEVICE" --dtype "$dtype" \
            "${train_timing[@]}" --json "$OUT_DIR/train_step_${DEVICE}_${SIZE}_${dtype}.json"
        done ;;
      generate)
        "$PY" benchmarks/generate.py --device "$DEVICE" "${gen_size[@]}" \
          --json "$OUT_DIR/generate_${DEVICE}_${SIZE}.json" ;;
      *) echo "gpu.sh: unknown WHAT entry '$what' (train, generate)" >&2; exit 2 ;;
    esac
  done
} 2>&1 | tee "$OUT_DIR/gpu_log.txt"
