#!/usr/bin/env bash
# compute-sanitizer memcheck over the Triton backend on hostile inputs (every layout, garbage index
# arrays), plus the bitwise-repeatability check of scripts/hostile_check.py. GPU machine, repo root,
# after the wheel install of scripts/gpu_check.sh (PYTHONPATH=/tmp/site:$PWD).
# XLA's pooling allocator would hide an out-of-bounds read inside its pool: allocate per buffer.
export XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false
log=${OUT:-/tmp}/sanitizer.log
compute-sanitizer --tool memcheck --target-processes all --error-exitcode 3 \
  python3 scripts/hostile_check.py --backend "${1:-triton}" > "$log" 2>&1
rc=$?
grep -E "ERROR SUMMARY|hostile runs|Invalid|out of bounds" "$log" | sort | uniq -c | head -20
echo "sanitizer exit code: $rc"
exit $rc
