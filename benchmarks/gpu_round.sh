#!/usr/bin/env bash
# Every GPU check of a development round, in one command of under 10 minutes, on a machine
# with one NVIDIA GPU and no network (system python3 with CUDA JAX, Flax, PyTorch):
#
#     OUT=/some/dir bash benchmarks/gpu_round.sh
#
# 1. benchmarks/pallas_tune.py: the Pallas kernels' tile settings swept and checked against
#    XLA; the table jaxnorm/_pallas_tuning.py is regenerated from the run (copied to $OUT).
# 2. the Pallas, tuning, README and reliability tests on the GPU (kernels compiled, not
#    interpreted), under a time limit.
# 2b. benchmarks/pallas_check.py with JAXNORM_PALLAS_BACKEND=mosaic_gpu: the Mosaic GPU
#    kernels checked against XLA and timed.
# 3. benchmarks/tokamax_check.py: tokamax's LayerNorm/RMSNorm against jaxnorm's, when the
#    wheels in .whl/ (tokamax and what it needs beyond the machine's packages) install.
# 4. benchmarks/gpu_timing.sh: the whole sweep, jaxnorm (automatic selection, now reading
#    the new table) against Flax, jaxnorm-pallas, PyTorch eager and torch.compile.
#
# Environment: OUT (default benchmarks/gpu/round), TUNE_S, TEST_S, MOSAIC_S, TOKAMAX_S,
# TIMING_S (seconds of each step: 160, 60, 50, 60, 230; 560 in all, under a 600 s call).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-$REPO/benchmarks/gpu/round}"
TUNE_S="${TUNE_S:-160}"
TEST_S="${TEST_S:-60}"
MOSAIC_S="${MOSAIC_S:-50}"
TOKAMAX_S="${TOKAMAX_S:-60}"
TIMING_S="${TIMING_S:-230}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
SECONDS=0
MARK="$(mktemp)"
log() { printf '[gpu_round %3ds] %s\n' "$SECONDS" "$*"; }

log "1. tile settings ($TUNE_S s)"
timeout "$TUNE_S" python3 benchmarks/pallas_tune.py "$OUT/pallas_tune.json" \
    --budget $((TUNE_S - 45)) --write-table jaxnorm/_pallas_tuning.py
log "tune exit $?"
cp jaxnorm/_pallas_tuning.py "$OUT/"

log "2. tests on the GPU ($TEST_S s)"
JAX_PLATFORMS=cuda timeout "$TEST_S" python3 -m pytest -q -n 8 -p no:cacheprovider \
    tests/test_pallas.py tests/test_pallas_mosaic.py tests/test_pallas_tuning.py tests/test_readme.py \
    tests/test_reliability.py 2>&1 | tail -n 40
log "tests exit ${PIPESTATUS[0]}"

log "2b. Mosaic GPU kernels ($MOSAIC_S s)"
JAXNORM_PALLAS_BACKEND=mosaic_gpu timeout "$MOSAIC_S" python3 benchmarks/pallas_check.py \
    "$OUT/pallas_check_mosaic.json" --budget $((MOSAIC_S - 20))
log "mosaic exit $?"

log "3. tokamax ($TOKAMAX_S s)"
if compgen -G ".whl/*.whl" >/dev/null && python3 -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --upgrade --target /tmp/tokamax-site .whl/*.whl; then
    PYTHONPATH="/tmp/tokamax-site:$REPO" timeout "$TOKAMAX_S" python3 \
        benchmarks/tokamax_check.py "$OUT/tokamax_check.json" --budget $((TOKAMAX_S - 20))
    log "tokamax exit $?"
else
    log "no tokamax wheels in .whl/: skipped"
fi

log "4. the sweep ($TIMING_S s)"
TOTAL_S="$TIMING_S" bash benchmarks/gpu_timing.sh
log "timing exit $?"
find benchmarks/gpu -maxdepth 1 -newer "$MARK" -type f \( -name '*.json' -o -name '*.md' \) \
    -exec cp {} "$OUT/" \;
log "done; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
