#!/usr/bin/env bash
# The GPU checks of the torch engine in one run, each result in a file of its own:
#
#     bash loadtests/cuda_checks.sh [OUTPUT_DIR]        # default: cuda-checks/
#
# 1. the CUDA tests (pytest -m cuda): kernels on the device against their CPU twins, the
#    engine's tokens on CUDA (CUDA graphs on and off) against the CPU's;
# 2. a decode step's wall time against its kernel time (loadtests/profile_decode.py),
#    CUDA graphs on, then off (--enforce-eager);
# 3. output tokens/s through the engine (loadtests/benchmark_engine.py), graphs on, then off.
# A random model of SmolLM2-135M's shape, bfloat16; under ten minutes in all. PYTHON picks the interpreter (default:
# .venv/bin/python, else python3); each step has a time limit, and a failing step does not
# stop the ones after it. The exit status is the worst step's.
set -u
out=${1:-cuda-checks}
mkdir -p "$out"
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND into OUTPUT_DIR/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&2
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local code=$?
    echo "   exit $code" >&2
    tail -n 25 "$out/$name.txt" >&2
    [ "$code" -gt "$status" ] && status=$code
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
step pytest-cuda 200 "$python" -m pytest -q -m cuda -p no:cacheprovider tests/backends
common=(--random-weights --device cuda --dtype bfloat16)
step profile-graphs 90 "$python" loadtests/profile_decode.py "${common[@]}" --batch 64 128
step profile-eager 60 "$python" loadtests/profile_decode.py "${common[@]}" --batch 64 --enforce-eager
step engine-graphs 120 "$python" loadtests/benchmark_engine.py "${common[@]}" --concurrency 1 8 32 64 128 --skip-hf
step engine-eager 90 "$python" loadtests/benchmark_engine.py "${common[@]}" --concurrency 64 128 --skip-hf \
    --enforce-eager
exit "$status"
