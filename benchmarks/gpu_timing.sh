#!/usr/bin/env bash
# Times every `benchmarks/run.py --quick` case on one NVIDIA GPU: jaxnorm, Flax, PyTorch
# eager and torch.compile, and appends a dated Markdown table (with the device name) to
# benchmarks/GPU_RESULTS.md. One command on a fresh machine, meant to finish in under
# 8 minutes:
#
#     bash benchmarks/gpu_timing.sh
#
# Environment:
#   GPU_VENV     the virtual environment to create/reuse (default: .venv-gpu in the repo,
#                which .gitignore ignores)
#   PYTHON       the interpreter to create it with (default: python3; needs >= 3.11)
#   BUDGET_S     seconds the whole run may take (default: 460); the PyTorch step stops
#                early, keeping the cases it finished, when it would run past it
#   TORCH_SPEC   the torch requirement (default: PyPI's CUDA 13 build `torch` when the
#                driver supports CUDA 13, else `torch==2.10.0`, the last CUDA 12.8 build)
#
# Steps: venv + `jax[cuda12]==0.10.2`, flax, torch in one resolver pass (the JAX and the
# PyTorch timings run in separate processes, so their CUDA libraries never share one);
# `run.py --quick --no-memory --json` for jaxnorm vs Flax; run.py's `torch_times` per case
# (each written as soon as it is measured); then the merged table.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_VENV="${GPU_VENV:-$REPO/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-460}"
RESULTS="$REPO/benchmarks/GPU_RESULTS.md"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SECONDS=0

log() { printf '[gpu_timing %3ds] %s\n' "$SECONDS" "$*" >&2; }

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this needs an NVIDIA GPU" >&2; exit 1; }
DEVICE="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
DRIVER_CUDA="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)"
if [ -z "${TORCH_SPEC:-}" ]; then
    if [ "${DRIVER_CUDA:-0}" -ge 13 ]; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.10.0"; fi
fi
log "device: $DEVICE (driver CUDA ${DRIVER_CUDA:-?}); torch requirement: $TORCH_SPEC"

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "$PYTHON is older than 3.11; set PYTHON=python3.11 (or newer)" >&2; exit 1; }
if [ ! -x "$GPU_VENV/bin/python" ]; then
    log "creating $GPU_VENV"
    "$PYTHON" -m venv "$GPU_VENV" \
        || { "$PYTHON" -m pip install --quiet virtualenv && "$PYTHON" -m virtualenv "$GPU_VENV"; }
fi
PY="$GPU_VENV/bin/python"
log "installing jax[cuda12]==0.10.2, flax, $TORCH_SPEC"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "jax[cuda12]==0.10.2" "jaxlib==0.10.2" "flax==0.12.8" optax chex \
    numpy "$TORCH_SPEC"

export XLA_PYTHON_CLIENT_PREALLOCATE=false   # leave GPU memory to PyTorch as well
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import jax; assert jax.default_backend() == "gpu", f"JAX sees no GPU: {jax.devices()}"
print("jax", jax.__version__, jax.devices()[0].device_kind)' || exit 1
TORCH_OK=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "PyTorch sees no GPU"
print("torch", torch.__version__, "CUDA", torch.version.cuda)' || TORCH_OK=0

log "timing jaxnorm vs Flax (run.py --quick)"
"$PY" "$REPO/benchmarks/run.py" --quick --no-memory --seconds 1.0 --json "$WORK/jax.json" \
    > "$WORK/jax.log" 2>&1 || { tail -n 40 "$WORK/jax.log" >&2; exit 1; }

LEFT=$(( BUDGET_S - SECONDS - 20 ))
if [ "$LEFT" -lt 30 ]; then LEFT=30; fi
[ "$TORCH_OK" = 1 ] || log "PyTorch cannot use the GPU: its columns stay empty"
[ "$TORCH_OK" = 0 ] || log "timing PyTorch eager and torch.compile (at most ${LEFT}s)"
[ "$TORCH_OK" = 0 ] || timeout "$LEFT" "$PY" - "$REPO" "$WORK/torch.json" <<'EOF' || log "PyTorch step stopped early ($?)"
import importlib.util, json, sys, traceback
repo, out = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("run", f"{repo}/benchmarks/run.py")
run = importlib.util.module_from_spec(spec)
sys.modules["run"] = run
spec.loader.exec_module(run)
records = []
for layer, shape in run.QUICK_CASES:
    for dtype in run.DTYPES:
        try:
            times = run.torch_times(layer, shape, dtype, 100)
        except Exception:  # one failing case keeps the others
            traceback.print_exc()
            continue
        for (name, pass_name), ms in times.items():
            records.append({"layer": layer, "shape": list(shape), "dtype": dtype,
                            "pass": pass_name, "name": name, "ms": ms})
        with open(out, "w") as f:  # after every case: a timeout keeps what is done
            json.dump(records, f)
        print(layer, shape, dtype, {k: round(v, 3) for k, v in times.items()}, flush=True)
EOF

log "writing $RESULTS"
"$PY" - "$WORK/jax.json" "$WORK/torch.json" "$RESULTS" "$DEVICE" <<'EOF'
import datetime, json, os, sys
jax_path, torch_path, results, device = sys.argv[1:5]
jax_run = json.load(open(jax_path))
torch_ms = {}
if os.path.exists(torch_path):
    for r in json.load(open(torch_path)):
        torch_ms[(r["layer"], tuple(r["shape"]), r["dtype"], r["pass"], r["name"])] = r["ms"]
env = jax_run["environment"]
header = ["layer", "shape", "dtype", "pass", "jaxnorm ms", "Flax ms", "jaxnorm/Flax",
          "torch eager ms", "torch.compile ms", "jaxnorm/torch.compile", "jaxnorm GB/s"]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for r in jax_run["records"]:
    key = (r["layer"], tuple(r["shape"]), r["dtype"], r["pass"])
    eager, compiled = (torch_ms.get((*key, n)) for n in ("torch_eager", "torch_compile"))
    cells = [r["layer"], "×".join(map(str, r["shape"])), r["dtype"], r["pass"],
             f"{r['jaxnorm_ms']:.3f}", f"{r['flax_ms']:.3f}", f"{r['ratio']:.3f}",
             f"{eager:.3f}" if eager else "–", f"{compiled:.3f}" if compiled else "–",
             f"{r['jaxnorm_ms'] / compiled:.3f}" if compiled else "–",
             f"{r['jaxnorm_gbps']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
summary = " · ".join(f"{k}: {v}" for k, v in jax_run["summary"].items())
date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
section = [
    f"## {date} — {device}", "",
    f"jax {env['jax']}, flax {env['flax']}, {env['device']}; `bash benchmarks/gpu_timing.sh` "
    "(run.py --quick: median ms; jaxnorm/Flax is the median of paired ratios; PyTorch: "
    "channels-last NCHW modules, median of 100 calls).", "",
    *lines, "", f"jaxnorm/Flax: {summary}", "",
]
new = not os.path.exists(results)
with open(results, "a") as f:
    if new:
        f.write("# GPU timings\n\nAppended by `benchmarks/gpu_timing.sh`, one section per run.\n\n")
    f.write("\n".join(section) + "\n")
print("\n".join(section))
EOF
log "done in ${SECONDS}s"
