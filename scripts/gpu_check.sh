#!/usr/bin/env bash
# GPU correctness on the lent H100: the shared test suite on the GPU backends, natively (no interpreter).
# Run from the repo root on the GPU machine, with the wheels of ../shared/tools/device-wheels.sh in .whl:
#   bash scripts/gpu_check.sh [pytest test files...]     (default: triton, pallas and xla suites,
#   the launch paths, the tile table, write_kv and the naive reference)
# Prints the pytest summary line last; the full log goes to $OUT/pytest_gpu.log when $OUT is set.
# jax-triton 0.4.1 + triton 3.7.1 instead (../shared/tools/triton-parts.sh installs them in /tmp/site37):
#   JVA_SITE=/tmp/site37 bash scripts/gpu_check.sh
# JVA_JOBS=N runs the files as N parallel pytest processes (a file's summary line each).
# A test still running after JVA_TEST_TIMEOUT seconds (default 120) gets every thread's Python stack
# dumped into the log (pytest's faulthandler_timeout; it does not stop the test): a hung kernel then
# names itself (benchmarks/NOTES.md, session 27 item 4).
set -o pipefail
if [ -n "${JVA_SITE:-}" ]; then
  export PYTHONPATH=$JVA_SITE:$PWD
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
log=${OUT:-/tmp}/pytest_gpu.log
export PYTEST_FLAGS="-q -p no:cacheprovider -rfE -o faulthandler_timeout=${JVA_TEST_TIMEOUT:-120}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, jax_triton, triton; print('jax', jax.__version__, 'jax_triton', jax_triton.__version__, 'triton', triton.__version__, jax.devices())"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/test_triton_backend.py tests/test_triton_launch.py tests/test_tuned.py
                                  tests/test_cache.py tests/test_reference.py tests/test_pallas_backend.py
                                  tests/test_xla_backend.py tests/test_pallas_mosaic.py)
existing=()
for f in "${files[@]}"; do [ -f "$f" ] && existing+=("$f"); done
if [ "${JVA_JOBS:-1}" -le 1 ]; then
  python3 -m pytest "${existing[@]}" $PYTEST_FLAGS 2>&1 | tee "$log" | tail -40
  exit
fi
# JVA_JOBS=N: one pytest process per file, N at a time (kernel builds are CPU-bound; the GPU has room).
: > "$log"
printf '%s\n' "${existing[@]}" | xargs -P "$JVA_JOBS" -I{} sh -c \
  'python3 -m pytest "$1" $PYTEST_FLAGS > "/tmp/$(basename "$1").log" 2>&1; echo "$1 rc=$?"' _ {}
status=0
for f in "${existing[@]}"; do
  l=/tmp/$(basename "$f").log
  cat "$l" >> "$log"
  grep -E "^(FAILED|ERROR) " "$l"
  echo "$f: $(tail -1 "$l")"
  tail -1 "$l" | grep -qE "failed|error|no tests ran" && status=1
done
exit $status
