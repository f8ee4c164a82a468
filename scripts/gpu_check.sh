#!/usr/bin/env bash
# The one script to run on a lent GPU machine (torch, triton, transformers present; nothing can be
# installed). From the repository root:
#
#     OUT=/some/dir bash scripts/gpu_check.sh      # OUT defaults to ./results/gpu
#
# Steps (each keeps going if an earlier one failed; the exit status is non-zero if any failed):
#   1. pytest tests/test_kernels.py compiled for the GPU (TRITON_INTERPRET unset), gpu tests included
#   2. scripts/bench_kernels.py at GPU sizes (16 MiB, 256 MiB, 2 GiB; BENCH_SIZES) -> $OUT/bench_kernels.json
#   3. scripts/bench_agent.py --device cuda --dtype bfloat16 (the default workload) into $OUT;
#      $OUT is exported for it
# Logs and JSON go under $OUT. Each step has a time limit; the whole run stays under ~6 minutes.
#
# The lent machine's image has transformers 5.17, below the tested range (>= 5.24, < 5.25: hf_kvpool
# computes without the pool outside it). Carry the 5.24 wheel: here, in the repository root,
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0
# and name .whl in the device call's carry: this script installs every wheel there into /tmp/site.

set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT  # scripts that honour $OUT write there
BENCH_SIZES="${BENCH_SIZES:-16 256 2048}"  # MiB of K/V moved
unset TRITON_INTERPRET
PY="${PYTHON:-python}"
failed=()

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record failure
    local name="$1" limit="$2"
    shift 2
    log "step $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    log "step $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
}

# --- make hf_kvpool.triton_kernels importable -----------------------------------------------------
# The package maps the top-level triton_kernels/ folder to hf_kvpool.triton_kernels, which plain
# PYTHONPATH=. cannot express. Prefer an existing install; else a temporary tree of symlinks with
# hf_kvpool/triton_kernels -> triton_kernels; else an editable install.
if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing carried wheels: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
importable() { "$PY" -c "import hf_kvpool.triton_kernels, hf_kvpool.core.paging" >/dev/null 2>&1; }
if ! importable; then
    shim="$(mktemp -d)"
    mkdir "$shim/hf_kvpool"
    for f in "$PWD"/hf_kvpool/*; do ln -s "$f" "$shim/hf_kvpool/"; done
    ln -s "$PWD/triton_kernels" "$shim/hf_kvpool/triton_kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    log "using a symlinked package tree at $shim"
fi
if ! importable; then
    log "symlink tree did not work; trying pip install -e . --no-deps --no-build-isolation"
    "$PY" -m pip install -e . --no-deps --no-build-isolation >"$OUT/pip_install.log" 2>&1 || true
fi
if ! importable; then
    log "hf_kvpool.triton_kernels is not importable:"
    "$PY" -c "import hf_kvpool.triton_kernels" 2>&1 | tail -n 5 | tee -a "$OUT/gpu_check.log"
    failed+=("import")
fi

{
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__); print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

# --- 1. kernel tests, compiled ---------------------------------------------------------------------
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    step test_kernels 200 "$PY" -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider \
        --junitxml="$OUT/test_kernels.xml"
else
    log "pytest is not installed: kernel tests not run (bench_kernels.py still checks Triton == torch)"
    failed+=("test_kernels(no pytest)")
fi

# --- 2. kernel benchmark ---------------------------------------------------------------------------
# shellcheck disable=SC2086  # BENCH_SIZES is a list of words
step bench_kernels 120 "$PY" scripts/bench_kernels.py --sizes $BENCH_SIZES --out "$OUT/bench_kernels.json"

# --- 3. end-to-end agent benchmark at GPU size (built-in random model, bf16) ----------------------
step bench_agent 240 "$PY" scripts/bench_agent.py --device cuda --dtype bfloat16 --out "$OUT/bench_agent.json"

if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all steps passed"
