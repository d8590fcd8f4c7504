"""The Mosaic GPU row kernels compiled for an NVIDIA H200 without one.

JAX lowers a Mosaic GPU kernel in Python (layouts, TMA copies, barriers, reductions) into
the ``mosaic_gpu_v2`` custom call of the module; XLA then compiles the module around it.
Both run on a CPU-only machine against the H200's device description, so this script
checks, for every LayerNorm/RMSNorm case of ``benchmarks/pallas_check.py``'s sweep (float32
and bfloat16 inputs, float32 and input-dtype parameters), that the forward and the
forward+backward of ``implementation="pallas"`` with ``JAXNORM_PALLAS_ROW_BACKEND=mosaic_gpu``
lower and compile, and reports the Mosaic kernels and the XLA fusions around them. The
compile runs each kernel through LLVM to PTX and ``ptxas`` for ``sm_90a``; their report
(``MOSAIC_GPU_DUMP_PTXAS``) gives each kernel's registers per thread and spills. Only a
device run (``benchmarks/gpu_round.sh``, step 2b) checks the values the generated code
computes and measures its speed.

Usage, in the deviceless compile environment of ``benchmarks/accelerators.py``::

    JAX_PLATFORMS=cpu ../venvs/aot-gpu/bin/python benchmarks/mosaic_lowering.py \\
        benchmarks/mosaic_lowering.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time
import traceback
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ["JAXNORM_PALLAS_ROW_BACKEND"] = "mosaic_gpu"

import jax
import jax.numpy as jnp
from accelerators import H200_TARGET_CONFIG, TARGETS, target_mesh
from jax.sharding import NamedSharding, PartitionSpec
from pallas_check import ROWS

import jaxnorm
from jaxnorm import _pallas_dispatch

PARAMS = ("float32", "input")


def _compile(kind: str, shape: tuple[int, int], dtype: Any, param_dtype: Any, mesh: Any
             ) -> dict[str, Any]:
    """Compiles the forward and forward+backward; the Mosaic kernels and fusions of each."""
    norm = getattr(jaxnorm, kind)
    replicated = NamedSharding(mesh, PartitionSpec())
    out_dtype = jnp.promote_types(dtype, param_dtype)

    def forward(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        return norm(x, scale, bias, eps=1e-5, implementation="pallas")

    def forward_backward(x: jax.Array, scale: jax.Array, bias: jax.Array, dy: jax.Array
                         ) -> tuple[jax.Array, ...]:
        y, pullback = jax.vjp(forward, x, scale, bias)
        return (y, *pullback(dy))

    x = jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    vector = jax.ShapeDtypeStruct(shape[-1:], param_dtype, sharding=replicated)
    dy = jax.ShapeDtypeStruct(shape, out_dtype, sharding=replicated)
    record = {}
    for name, fn, args in (("forward", forward, (x, vector, vector)),
                           ("forward+backward", forward_backward, (x, vector, vector, dy))):
        with tempfile.TemporaryDirectory() as dump:
            os.environ.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=dump)
            compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compile()
            ptxas = [_ptxas_report(path) for path in sorted(pathlib.Path(dump).glob("*.ptxas"))]
        text = compiled.as_text()
        record[name] = {"mosaic_kernels": text.count('custom_call_target="mosaic_gpu_v2"'),
                        "xla_fusions": text.count(" fusion("), "ptxas": ptxas}
    return record


def _ptxas_report(path: pathlib.Path) -> dict[str, int]:
    """Registers per thread and spilled bytes of one kernel, from its ``ptxas -v`` log."""
    text = path.read_text()
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(registers.group(1)) if registers else -1,
            "spill_bytes": sum(spills)}


def main(argv: list[str] | None = None) -> int:
    """Compiles every case; writes the JSON; returns 1 if any case failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="path of the JSON to write")
    options = parser.parse_args(argv)
    mesh = target_mesh(TARGETS["h200"], H200_TARGET_CONFIG)
    _pallas_dispatch.interpret_mode = lambda: False  # compile for the GPU, not interpret
    results: dict[str, Any] = {"jax": jax.__version__, "target": "h200 (deviceless)",
                               "cases": []}
    for shape in ROWS:
        for kind in ("layer_norm", "rms_norm"):
            for dtype_name in ("float32", "bfloat16"):
                for params in PARAMS if dtype_name != "float32" else PARAMS[:1]:
                    dtype = jnp.dtype(dtype_name)
                    param_dtype = dtype if params == "input" else jnp.dtype(jnp.float32)
                    case = {"kind": kind, "shape": list(shape), "dtype": dtype_name,
                            "params": param_dtype.name}
                    start = time.perf_counter()
                    try:
                        case.update(_compile(kind, shape, dtype, param_dtype, mesh), ok=True)
                    except Exception as error:  # noqa: BLE001 - report, go on
                        case.update(ok=False, error=f"{type(error).__name__}: {error}"[:500],
                                    traceback=traceback.format_exc()[-2000:])
                    case["seconds"] = round(time.perf_counter() - start, 2)
                    results["cases"].append(case)
                    print(json.dumps({k: v for k, v in case.items() if k != "traceback"}),
                          flush=True)
    options.out.write_text(json.dumps(results, indent=1) + "\n")
    failed = sum(not case["ok"] for case in results["cases"])
    print(f"{len(results['cases']) - failed} of {len(results['cases'])} cases compiled; "
          f"wrote {options.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
