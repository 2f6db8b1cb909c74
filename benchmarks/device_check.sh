#!/usr/bin/env bash
# The GPU half of the benchmarks and tests, in one call of a lent GPU machine (the `device`
# tool's `run`, from the repository root, with timeout_s=600):
#
#   bash benchmarks/device_check.sh                  # every phase, in the order below
#   bash benchmarks/device_check.sh bn               # only this phase
#
#   tests        the tests that run bnjax's math (not the packaging, docs, benchmarks or
#                examples), quick loop only (-m "not slow and not live"), on the GPU; the
#                multi-device ones skip there (tests/devices.py). 514 tests: 60 s on 2 CPU cores
#   models-f32   bench_models.py, ResNet-50 at batch 128 of 224x224, float32, with the float64
#                check of the SGD update (on 16 examples)
#   models-bf16  bench_models.py, ResNet-50, bfloat16
#   bn           bench_batch_norm.py at its GPU shapes
#
# Each phase runs under a time limit: its own (below) or what is left of the whole run's
# DEVICE_CHECK_BUDGET_S (570 s by default, inside the call's 600 s), whichever is less, so a
# phase that hangs or fails leaves the others' results and a phase that ends early leaves its
# time to the next. With the machine's start this spends about 12 of a task's 15 device
# minutes: there is no second full call, but a phase cut short can be rerun alone at once,
# while the machine is still warm. It uses the machine's python3 (its image holds
# jax with CUDA, flax, optax, orbax, torch, pytest, hypothesis); bnjax comes from this checkout
# through PYTHONPATH. What it writes to $OUT: device_check.log (every phase's output) and the
# phases' JSON records. Back here, copy the JSON into benchmarks/results/ and re-render:
#
#   python benchmarks/bench_batch_norm.py --render && python benchmarks/bench_models.py --render
#
# DEVICE_CHECK_QUICK=1 runs each phase at its smallest on whatever device there is: a dry run of
# this script, about 5 minutes on 2 CPU cores (`JAX_PLATFORMS=cpu`, `PYTHON=.venv/bin/python`).
# The test suite checks only its phase names and the flags it passes (tests/test_bench_models.py).
set -uo pipefail
cd "$(dirname "$0")/.."

all_phases=(tests models-f32 models-bf16 bn)
phases=("${@:-${all_phases[@]}}")
for name in "${phases[@]}"; do
  if [[ " ${all_phases[*]} " != *" $name "* ]]; then
    echo "device_check.sh: unknown phase '$name'; choose from ${all_phases[*]}" >&2
    exit 2
  fi
done

out=${OUT:-$(mktemp -d)}
log="$out/device_check.log"
python=${PYTHON:-python3}
quick=${DEVICE_CHECK_QUICK:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
reports=$(mktemp -d)  # the markdown each script renders: re-rendered here, so not sent back
summary=()

deadline=$((SECONDS + ${DEVICE_CHECK_BUDGET_S:-570}))

# phase NAME LIMIT_S COMMAND...: runs COMMAND under LIMIT_S or the time left, its output in
# the log.
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 30 ]; then
    summary+=("$name: not run, ${left} s left")
    echo "=== ${summary[-1]}" | tee -a "$log"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name: $* (limit ${limit} s, $(date -u +%H:%M:%S) UTC)" | tee -a "$log"
  local start=$SECONDS
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1
  local status=$?
  summary+=("$name: exit $status after $((SECONDS - start)) s")
  echo "=== ${summary[-1]}" | tee -a "$log"
}

tests() {
  local files=(
    accuracy batch_norm conventions equinox errors flax_scenarios fold goldens gradients linen
    nnx numerics properties reliability training transforms
  )
  local paths=("${files[@]/#/tests/test_}")
  paths=("${paths[@]/%/.py}")
  if [ "$quick" = 1 ]; then
    paths=(tests/test_batch_norm.py tests/test_accuracy.py)
  fi
  # The GPU first, the CPU beside it; XLA's preallocation off for the pytest workers sharing it.
  JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu} XLA_PYTHON_CLIENT_PREALLOCATE=false \
    "$python" -m pytest -q -n 8 -p no:cacheprovider -m "not slow and not live" -rfs "${paths[@]}"
}

models() {
  local dtype=$1
  shift
  local size=()
  [ "$quick" = 1 ] && size=(--quick)
  "$python" benchmarks/bench_models.py "${size[@]}" --models resnet50 --dtype "$dtype" \
    --no-torch-compile --no-progress --json "$out/models_${kind}_$dtype.json" \
    --output "$reports/MODELS.md" "$@"
}

bn() {
  local size=()
  [ "$quick" = 1 ] && size=(--quick)
  "$python" benchmarks/bench_batch_norm.py "${size[@]}" --json "$out/$kind.json" \
    --output "$reports/RESULTS.md"
}

{
  echo "=== device check, $(date -u +%Y-%m-%d) UTC, quick=$quick"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
  "$python" -c 'import importlib.metadata as m, jax
print(*(f"{p} {m.version(p)}" for p in ("jax", "jaxlib", "flax", "optax", "torch", "numpy")))
print(jax.devices())' 2>&1
} | tee -a "$log"
# The device's name, as the scripts name their JSON records (NVIDIA_H200, cpu).
kind=$("$python" -c 'import jax; print(jax.devices()[0].device_kind.replace(" ", "_"))')
[ "$quick" = 1 ] && kind="quick_$kind"
# The phases run in a child bash under `timeout`: it needs the functions and these settings.
export out python quick kind reports
export -f tests models bn

for name in "${phases[@]}"; do
  case $name in
    tests) phase tests 120 tests ;;
    models-f32) phase models-f32 240 models float32 ;;
    models-bf16) phase models-bf16 180 models bfloat16 --no-float64-check ;;
    bn) phase bn 180 bn ;;
  esac
done
rm -rf "$reports"
printf '%s\n' "${summary[@]}" | tee -a "$log"
ls -l "$out"
