"""The Mosaic GPU row kernels compiled for an NVIDIA H200 without one.

JAX lowers a Mosaic GPU kernel in Python (layouts, TMA copies, barriers, reductions) into
the ``mosaic_gpu_v2`` custom call of the module; XLA then compiles the module around it.
Both run on a CPU-only machine against the H200's device description, so this script
checks, for every case of ``benchmarks/pallas_check.py``'s sweep and the GroupNorm/
InstanceNorm shapes of the benchmark sweep (``benchmarks/sweep.py``), float32 and bfloat16
inputs, float32 and input-dtype parameters, that the forward and the forward+backward of
``implementation="pallas"`` with ``JAXNORM_PALLAS_BACKEND=mosaic_gpu`` lower and compile
(a shape the Mosaic GPU kernels do not take is reported, not compiled), and reports the Mosaic kernels and the XLA fusions around them. The
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
import math
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
os.environ["JAXNORM_PALLAS_BACKEND"] = "mosaic_gpu"

import jax
import jax.numpy as jnp
from accelerators import H200_TARGET_CONFIG, TARGETS, target_mesh
from jax.sharding import NamedSharding, PartitionSpec
from pallas_check import SWEEP, _norm
from sweep import SD_UNET_GROUP_NORM, STYLE_INSTANCE_NORM

from jaxnorm import _pallas_dispatch, _pallas_mosaic_groups, _pallas_mosaic_rows

CASES = SWEEP + [("group_norm", case.shape, 32) for case in SD_UNET_GROUP_NORM] + [
    ("instance_norm", case.shape, case.shape[-1]) for case in STYLE_INSTANCE_NORM]
"""``(kind, shape, groups)``: every case of the GPU check, and the sweep's group shapes."""


def _compile(kind: str, shape: tuple[int, ...], groups: int, dtype: Any, param_dtype: Any,
             mesh: Any) -> dict[str, Any]:
    """Compiles the forward and forward+backward; the Mosaic kernels and fusions of each."""
    norm = _norm(kind, groups)
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


def _mosaic_takes(kind: str, shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether the Mosaic GPU kernels take the case (else the dispatcher uses Triton)."""
    if kind in ("layer_norm", "rms_norm"):
        return _pallas_mosaic_rows.takes(shape[-1], dtype)
    return _pallas_mosaic_groups.takes(math.prod(shape[1:-1]), shape[-1], dtype)


def _ptxas_report(path: pathlib.Path) -> dict[str, int]:
    """Registers per thread and spilled bytes of one kernel, from its ``ptxas -v`` log."""
    text = path.read_text()
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(registers.group(1)) if registers else -1,
            "spill_bytes": sum(spills)}


def _run_case(kind: str, shape: tuple[int, ...], groups: int, dtype: Any, param_dtype: Any,
              mesh: Any) -> dict[str, Any]:
    """One case's record: compiled, skipped (a shape the kernels do not take) or failed."""
    case = {"kind": kind, "shape": list(shape), "groups": groups, "dtype": dtype.name,
            "params": param_dtype.name}
    start = time.perf_counter()
    try:
        if _mosaic_takes(kind, shape, dtype):
            case.update(_compile(kind, shape, groups, dtype, param_dtype, mesh), ok=True)
        else:
            case.update(ok=True, skipped="not a shape the Mosaic kernels take")
    except Exception as error:  # noqa: BLE001 - report, go on
        case.update(ok=False, error=f"{type(error).__name__}: {error}"[:500],
                    traceback=traceback.format_exc()[-2000:])
    case["seconds"] = round(time.perf_counter() - start, 2)
    return case


def main(argv: list[str] | None = None) -> int:
    """Compiles every case; writes the JSON; returns 1 if any case failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="path of the JSON to write")
    options = parser.parse_args(argv)
    mesh = target_mesh(TARGETS["h200"], H200_TARGET_CONFIG)
    _pallas_dispatch.interpret_mode = lambda: False  # compile for the GPU, not interpret
    results: dict[str, Any] = {"jax": jax.__version__, "target": "h200 (deviceless)",
                               "cases": []}
    for kind, shape, groups in CASES:
        for dtype_name, param_name in (("float32", "float32"), ("bfloat16", "float32"),
                                       ("bfloat16", "bfloat16")):
            case = _run_case(kind, shape, groups, jnp.dtype(dtype_name), jnp.dtype(param_name),
                             mesh)
            results["cases"].append(case)
            print(json.dumps({k: v for k, v in case.items() if k != "traceback"}), flush=True)
    options.out.write_text(json.dumps(results, indent=1) + "\n")
    failed = sum(not case["ok"] for case in results["cases"])
    print(f"{len(results['cases']) - failed} of {len(results['cases'])} cases compiled; "
          f"wrote {options.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
