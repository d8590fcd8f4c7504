#!/usr/bin/env bash
# Device time of jaxnorm vs Flax vs PyTorch on one NVIDIA GPU over the shared shape sweep
# (benchmarks/sweep.py), in one command and under 5 minutes:
#
#     bash benchmarks/gpu_timing.sh                 # writes benchmarks/gpu/<device>-<date>.{json,md}
#     bash benchmarks/gpu_timing.sh --only LayerNorm   # any gpu_bench.py option passes through
#
# It runs as is on a machine without network access: when `python3` (or $PYTHON) already
# imports a CUDA-enabled JAX, Flax and PyTorch, it uses them and installs nothing (jaxnorm
# itself comes from this checkout, through PYTHONPATH). Only when something is missing AND
# a package index answers does it install the missing pieces, into a virtual environment
# that sees the system's packages ($GPU_VENV, default .venv-gpu in the repository). Without
# PyTorch the PyTorch columns stay empty; without a CUDA JAX nothing can be timed.
#
# Environment:
#   PYTHON    the interpreter to use (default: python3)
#   TOTAL_S   seconds the whole command may take (default: 285)
#   BUDGET_S  seconds for benchmarks/gpu_bench.py (default: TOTAL_S minus the checks here)
#   GPU_VENV  where to install missing packages (default: <repo>/.venv-gpu)
#
# With --tiny (tiny shapes, a smoke test) it also runs on a CPU-only JAX and installs nothing.
#
# The timing itself is benchmarks/gpu_bench.py (its docstring says what is measured).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-285}"
GPU_VENV="${GPU_VENV:-$REPO/.venv-gpu}"
SECONDS=0
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # leave GPU memory to PyTorch as well
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

log() { printf '[gpu_timing %3ds] %s\n' "$SECONDS" "$*" >&2; }

# Prints what the interpreter $1 lacks: jax, jax-cuda, flax, torch, torch-cuda (each probe
# in its own process, so that the two CUDA stacks never load together).
missing_in() {
    local py="$1" out=""
    timeout 120 "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
        >/dev/null 2>&1 || {
        if timeout 60 "$py" -c 'import jax' >/dev/null 2>&1; then out="jax-cuda"; else out="jax"; fi; }
    timeout 60 "$py" -c 'import flax.linen' >/dev/null 2>&1 || out="$out flax"
    timeout 120 "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' \
        >/dev/null 2>&1 || {
        if timeout 60 "$py" -c 'import torch' >/dev/null 2>&1; then out="$out torch-cuda"; else out="$out torch"; fi; }
    echo $out
}

index_reachable() {
    timeout 15 "$PYTHON" -c 'import os, urllib.request
url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/pip/"
urllib.request.urlopen(url, timeout=8)' >/dev/null 2>&1
}

# pip requirements for the missing pieces (CUDA 13 wheels when the driver supports them).
requirements_for() {
    local cuda major reqs=""
    cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)"
    major="cuda12"; [ "${cuda:-0}" -ge 13 ] && major="cuda13"
    for item in "$@"; do
        case "$item" in
            jax|jax-cuda) reqs="$reqs jax[$major]" ;;
            flax) reqs="$reqs flax" ;;
            torch|torch-cuda) reqs="$reqs torch" ;;
        esac
    done
    echo $reqs
}

if command -v nvidia-smi >/dev/null; then
    log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
else
    log "nvidia-smi not found: no NVIDIA GPU visible"
fi

TINY=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY=1; done

PY="$PYTHON"
MISSING="$(missing_in "$PY")"
if [ "$TINY" = 1 ]; then   # a CPU smoke test: no CUDA needed, nothing installed
    MISSING="$(echo $MISSING | sed 's/jax-cuda//; s/torch-cuda//')"
    MISSING="$(echo $MISSING)"
    [ -z "$MISSING" ] || { log "--tiny: $PY lacks $MISSING"; exit 1; }
fi
if [ -n "$MISSING" ] && [ -x "$GPU_VENV/bin/python" ]; then
    log "$PY lacks: $MISSING; trying $GPU_VENV"
    PY="$GPU_VENV/bin/python"
    MISSING="$(missing_in "$PY")"
fi
if [ -n "$MISSING" ]; then
    if index_reachable; then
        REQS="$(requirements_for $MISSING)"
        log "missing: $MISSING; installing $REQS into $GPU_VENV"
        if [ ! -x "$GPU_VENV/bin/python" ]; then
            "$PYTHON" -m venv --system-site-packages "$GPU_VENV" || log "cannot create $GPU_VENV"
        fi
        if [ -x "$GPU_VENV/bin/python" ]; then
            PY="$GPU_VENV/bin/python"
            # shellcheck disable=SC2086
            "$PY" -m pip install --quiet $REQS || log "pip install failed"
            MISSING="$(missing_in "$PY")"
        fi
    else
        log "missing: $MISSING, and no package index answers: installing nothing"
    fi
fi
case " $MISSING " in
    *" jax "*|*" jax-cuda "*|*" flax "*)
        log "cannot time without a CUDA-enabled JAX and Flax ($PY lacks: $MISSING)"
        exit 1 ;;
esac
EXTRA=()
if [ -n "$MISSING" ]; then
    log "PyTorch unusable ($MISSING): its columns stay empty"
    EXTRA=(--no-torch)
fi
log "using $PY: $("$PY" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)' 2>&1 | tail -n 1)"

export BUDGET_S="${BUDGET_S:-$(( TOTAL_S - SECONDS - 5 ))}"
log "running benchmarks/gpu_bench.py with a ${BUDGET_S}s budget"
"$PY" "$REPO/benchmarks/gpu_bench.py" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
STATUS=$?
log "done in ${SECONDS}s (exit $STATUS)"
exit $STATUS
