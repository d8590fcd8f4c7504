"""tokamax's LayerNorm/RMSNorm against jaxnorm's Pallas kernels and XLA path: time and numerics.

Usage (repository root on ``PYTHONPATH``, no installs; tokamax, if wanted, already on the
path, e.g. from the wheels of ``.whl/`` installed with ``pip --target``)::

    python3 benchmarks/tokamax_check.py OUT.json              # on a GPU: the sweep
    python3 benchmarks/tokamax_check.py OUT.json --tiny       # anywhere: small shapes

What is measured, per case (kind ``layer_norm``/``rms_norm`` x shape x dtype
``float32``/``bfloat16``), for three implementations of the same normalization with
``scale`` and ``bias`` in ``x``'s dtype and ``eps = 1e-5``:

- ``tokamax``: ``tokamax.layer_norm(x, scale, bias, epsilon=1e-5, subtract_mean=...,
  implementation="triton")`` (its Triton GPU kernels through jax-triton; ``subtract_mean=
  False`` is RMSNorm; on a CPU the only implementation it has, ``"xla"``);
- ``pallas``: ``jaxnorm.layer_norm/rms_norm(x, scale, bias, eps=1e-5,
  implementation="pallas")`` (interpreted off a GPU);
- ``xla``: the same with ``implementation="xla"``.

Time: of the forward ``y`` and of the forward+backward ``(y, dx, dscale, dbias)``
(``jax.vjp`` w.r.t. ``x``, ``scale``, ``bias``), each jitted. Device time per call is the sum
of the call's GPU kernel durations in one ``jax.profiler`` trace of ``--calls`` calls of
every function of the case (``pallas_check.py``'s method, ``"profiler"``); a function
the trace has no kernels for, and every function off a GPU, falls back to the wall time of
``--calls`` pipelined calls, best of ``--repeats`` (``"wall"``; it includes dispatch).

Numerics, per implementation: the largest relative error (``max|out - ref| / max(1,
max|ref|)``) of ``y``, ``dx``, ``dscale``, ``dbias`` against a float32 reference, the XLA
path on the inputs cast to float32 (``ok``: every error within 1e-4 for float32, 3e-2 for
bfloat16); and two guarantees jaxnorm makes:

- ``constant``: a constant row normalizes to exactly ``bias`` (LayerNorm: rows of 0.1,
  1/3, -7.77, 1234.5 in ``x``'s dtype; RMSNorm: a zero row), with finite ``dx``,
  ``dscale``, ``dbias``;
- ``mean_1e4`` (float32 cases only): rows of mean 1e4 and standard deviation 1 normalize
  with ``max|y - y64| < 1e-3`` against a float64 NumPy reference (the first 64 rows;
  ``dx``'s relative error is recorded beside it).

Each implementation of each case runs under its own ``try`` (the error string is
recorded); tokamax that does not import (it needs JAX >= 0.11.1 and Python >= 3.12) is
recorded once and its column left empty. The JSON is rewritten after every case, cases
past ``--budget`` seconds (counted from the start, tokamax's import included) are skipped,
and a markdown table is printed: µs, the ratios tokamax/jaxnorm-pallas and tokamax/xla,
and numerics.

Two shims let tokamax 0.0.17 import and compile where its pins are not met, each applied
only when needed and listed under ``environment.tokamax.shims``: ``xprof.cli.tools``
(imported unconditionally by ``tokamax/_src/benchmarking.py``, never called here) is
stubbed when xprof lacks it, and ``triton.backends.nvidia.driver.TMA_TF32`` (triton >= 3.7,
imported by jax-triton 0.4, which otherwise silently stubs its whole CUDA backend) is set to
Triton's value, 11, when missing; it only matters for TMA descriptors, which the
normalization kernels do not use.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import math
import pathlib
import platform
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pallas_check  # noqa: E402  (the benchmarks folder, for its timing helpers)

import jaxnorm  # noqa: E402

SHAPES = [(8192, 2048), (8192, 4096), (8192, 5120), (8192, 8192), (50176, 768)]
TINY_SHAPES = [(16, 7), (9, 130)]
KINDS = ("layer_norm", "rms_norm")
IMPLEMENTATIONS = ("tokamax", "pallas", "xla")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
EPS = 1e-5
CONSTANT_ROWS = {"layer_norm": (0.1, 1 / 3, -7.77, 1234.5), "rms_norm": (0.0,)}
LARGE_MEAN, LARGE_MEAN_ROWS, LARGE_MEAN_TOLERANCE = 1e4, 64, 1e-3
TMA_TF32 = 11  # triton.backends.nvidia.driver.TMA_TF32 of triton >= 3.7
OUTPUTS = ("y", "dx", "dscale", "dbias")

Functions = tuple[Callable[..., Any], Callable[..., Any]]


# --- tokamax -------------------------------------------------------------------------------

def _stub_xprof_cli_tools() -> None:
    """Registers a stub ``xprof.cli.tools`` (and any missing parent) in ``sys.modules``."""
    def get_kernel_stats_tool(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("xprof.cli.tools is a stub of benchmarks/tokamax_check.py")

    try:
        import xprof  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: stub the whole package
        sys.modules["xprof"] = types.ModuleType("xprof")
        sys.modules["xprof"].__path__ = []  # type: ignore[attr-defined]
    parent = sys.modules["xprof"]
    if "xprof.cli" not in sys.modules:
        cli = types.ModuleType("xprof.cli")
        cli.__path__ = []  # type: ignore[attr-defined]
        sys.modules["xprof.cli"] = cli
        parent.cli = cli  # type: ignore[attr-defined]
    tools = types.ModuleType("xprof.cli.tools")
    tools.get_kernel_stats_tool = get_kernel_stats_tool  # type: ignore[attr-defined]
    sys.modules["xprof.cli.tools"] = tools
    sys.modules["xprof.cli"].tools = tools  # type: ignore[attr-defined]


def _load_tokamax() -> tuple[Any, dict[str, Any]]:
    """``(tokamax module or None, what was found)``; applies the shims it needs."""
    info: dict[str, Any] = {"shims": []}
    try:
        found = importlib.util.find_spec("tokamax") is not None
    except Exception:  # noqa: BLE001
        found = False
    if not found:
        info["error"] = "ModuleNotFoundError: No module named 'tokamax'"
        return None, info
    try:
        import xprof.cli.tools  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # noqa: BLE001
        _stub_xprof_cli_tools()
        info["shims"].append("xprof.cli.tools stubbed (tokamax imports it; never called)")
    try:
        import triton  # type: ignore[import-not-found]
        import triton.backends.nvidia.driver as driver  # type: ignore[import-not-found]

        info["triton"] = triton.__version__
        if not hasattr(driver, "TMA_TF32"):
            driver.TMA_TF32 = TMA_TF32
            info["shims"].append(f"triton.backends.nvidia.driver.TMA_TF32 = {TMA_TF32} "
                                 f"(absent from triton {triton.__version__}; jax-triton 0.4 "
                                 "imports it)")
    except Exception as error:  # noqa: BLE001
        info["triton"] = f"unavailable: {type(error).__name__}: {error}"
    try:
        import tokamax  # type: ignore[import-not-found]
        from tokamax._src.ops.normalization import api  # type: ignore[import-not-found]
    except Exception as error:  # noqa: BLE001 - any failure: record it, time jaxnorm alone
        info["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        return None, info
    info["version"] = tokamax.__version__
    info["implementations"] = sorted(api.IMPLEMENTATIONS)
    try:
        import jax_triton  # type: ignore[import-not-found]

        info["jax_triton"] = jax_triton.__version__
        backend = jax_triton.triton_lib.cb.CUDABackend
        info["jax_triton_cuda_backend"] = f"{backend.__module__}.{backend.__qualname__}"
    except Exception as error:  # noqa: BLE001
        info["jax_triton"] = f"unavailable: {type(error).__name__}: {error}"
    return tokamax, info


# --- the functions -------------------------------------------------------------------------

_CACHE: dict[tuple[str, str], Functions] = {}


def _norm(kind: str, implementation: str, tokamax: Any, tokamax_implementation: str
          ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``norm(x, scale, bias) -> y`` of ``implementation``."""
    if implementation == "tokamax":
        subtract_mean = kind == "layer_norm"

        def tokamax_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
            return tokamax.layer_norm(x, scale, bias, axis=-1, epsilon=EPS,
                                      subtract_mean=subtract_mean,
                                      implementation=tokamax_implementation)
        return tokamax_norm
    norm = getattr(jaxnorm, kind)

    def jaxnorm_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        return norm(x, scale, bias, eps=EPS, implementation=implementation)
    return jaxnorm_norm


def _functions(kind: str, implementation: str, tokamax: Any, tokamax_implementation: str
               ) -> Functions:
    """``(forward, forward_backward)`` jitted, one pair per kind and implementation (the jit
    caches then serve every shape); named ``check_<implementation>_fwd``/``_fwdbwd`` so the
    profiler's ``hlo_module`` tells them apart."""
    key = (kind, implementation)
    if key not in _CACHE:
        norm = _norm(kind, implementation, tokamax, tokamax_implementation)

        def forward(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
            return norm(x, scale, bias)

        def forward_backward(x: jax.Array, scale: jax.Array, bias: jax.Array,
                             dy: jax.Array) -> tuple[jax.Array, ...]:
            y, pullback = jax.vjp(norm, x, scale, bias)
            return (y, *pullback(dy))

        forward.__name__ = f"check_{implementation}_fwd"
        forward_backward.__name__ = f"check_{implementation}_fwdbwd"
        _CACHE[key] = (jax.jit(forward), jax.jit(forward_backward))
    return _CACHE[key]


# --- timing --------------------------------------------------------------------------------

def _device_seconds(functions: dict[str, tuple[Callable, tuple]], calls: int
                    ) -> tuple[dict[str, float], float]:
    """``({name: GPU kernel seconds per call}, unattributed seconds per call)`` from one
    ``jax.profiler`` trace of ``calls`` calls of each function; names without kernels in
    the trace are left out (all of them off a GPU)."""
    profile_data = getattr(jax.profiler, "ProfileData", None)
    if profile_data is None or jax.default_backend() != "gpu":
        return {}, 0.0
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for fn, args in functions.values():
                jax.block_until_ready([fn(*args) for _ in range(calls)])
        paths = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        if not paths:
            return {}, 0.0
        events = pallas_check._gpu_stream_events(profile_data.from_file(paths[0]))
    totals = dict.fromkeys(functions, 0.0)
    unattributed = 0.0
    for module, nanoseconds in events:
        name = module.removeprefix("jit_").split(".")[0]
        if name in totals:
            totals[name] += nanoseconds
        else:
            unattributed += nanoseconds
    return ({name: total / calls / 1e9 for name, total in totals.items() if total > 0},
            unattributed / calls / 1e9)


def _times(functions: dict[str, tuple[Callable, tuple]], calls: int, repeats: int
           ) -> tuple[dict[str, float], dict[str, str], dict[str, float], float]:
    """``(seconds per call, method per name, wall seconds per call, unattributed GPU seconds
    per call)``: the profiler's device time where the trace has the function's kernels, else
    the wall time, which is measured for every function (a check on the attribution)."""
    for fn, args in functions.values():
        jax.block_until_ready(fn(*args))  # compiled before any timing
    try:
        device, unattributed = _device_seconds(functions, calls)
    except Exception as error:  # noqa: BLE001 - any profiler trouble: wall time
        print(f"profiler trace failed ({type(error).__name__}: {error}); wall time")
        device, unattributed = {}, 0.0
    wall = {name: pallas_check._seconds_per_call(fn, args, calls, repeats)
            for name, (fn, args) in functions.items()}
    seconds = {name: device.get(name, wall[name]) for name in functions}
    methods = {name: "profiler" if name in device else "wall" for name in functions}
    return seconds, methods, wall, unattributed


# --- numerics ------------------------------------------------------------------------------

@jax.jit
def _error_parts(out: jax.Array, ref: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(max|out - ref|, max|ref|, all finite)`` on the device, in float32."""
    out32 = out.astype(jnp.float32)
    return (jnp.max(jnp.abs(out32 - ref)), jnp.max(jnp.abs(ref)),
            jnp.all(jnp.isfinite(out32)))


def _relative_error(out: jax.Array, ref: jax.Array) -> float:
    """``max|out - ref| / max(1, max|ref|)``; inf where ``out`` is not finite."""
    if out.shape != ref.shape:
        return math.inf
    difference, largest, finite = jax.device_get(_error_parts(out, ref))
    if not finite:
        return math.inf
    return float(difference) / max(1.0, float(largest))


def _constant_check(kind: str, forward_backward: Callable, args: tuple[jax.Array, ...]
                    ) -> dict[str, Any]:
    """Rows set to constants (LayerNorm) or zero (RMSNorm): ``y`` exactly ``bias``?"""
    x, scale, bias, dy = args
    values = CONSTANT_ROWS[kind][: x.shape[0]]
    rows = jnp.broadcast_to(jnp.asarray(values, jnp.float32)[:, None],
                            (len(values), x.shape[1])).astype(x.dtype)
    y, dx, dscale, dbias = forward_backward(jnp.concatenate([rows, x[len(values):]]),
                                            scale, bias, dy)
    y_rows = np.asarray(y[: len(values)], np.float64)
    expected = np.broadcast_to(np.asarray(bias, np.float64), y_rows.shape)
    finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float64))))
                 for a in (dx[: len(values)], dscale, dbias))
    deviation = float(np.max(np.abs(y_rows - expected))) if np.all(np.isfinite(y_rows)) \
        else math.inf
    return {"values": list(values), "max_abs_deviation": deviation,
            "exact": bool(np.array_equal(y_rows, expected)), "finite_gradients": finite,
            "ok": bool(np.array_equal(y_rows, expected)) and finite}


def _reference64(kind: str, x: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                 dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y, dx)`` in float64 NumPy."""
    centred = x - x.mean(-1, keepdims=True) if kind == "layer_norm" else x
    rstd = 1 / np.sqrt((centred**2).mean(-1, keepdims=True) + EPS)
    normalized = centred * rstd
    g = dy * scale
    dx = g - normalized * (g * normalized).mean(-1, keepdims=True)
    if kind == "layer_norm":
        dx = dx - g.mean(-1, keepdims=True)
    return normalized * scale + bias, rstd * dx


def _large_mean_check(kind: str, forward_backward: Callable, args: tuple[jax.Array, ...]
                      ) -> dict[str, Any]:
    """Rows of mean 1e4, standard deviation 1 (float32) against float64 NumPy."""
    x, scale, bias, dy = args
    shifted = (x - 3) / 2 + LARGE_MEAN  # pallas_check's x is normal * 2 + 3
    y, dx, _, _ = forward_backward(shifted, scale, bias, dy)
    rows = min(LARGE_MEAN_ROWS, x.shape[0])
    as64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    y64, dx64 = _reference64(kind, as64(shifted[:rows]), as64(scale), as64(bias),
                             as64(dy[:rows]))
    y_rows, dx_rows = as64(y[:rows]), as64(dx[:rows])
    y_error = float(np.max(np.abs(y_rows - y64))) if np.all(np.isfinite(y_rows)) else math.inf
    dx_error = (float(np.max(np.abs(dx_rows - dx64)) / max(1.0, float(np.max(np.abs(dx64)))))
                if np.all(np.isfinite(dx_rows)) else math.inf)
    return {"rows": rows, "y_max_abs_error": y_error, "dx_relative_error": dx_error,
            "ok": y_error < LARGE_MEAN_TOLERANCE}


# --- one case ------------------------------------------------------------------------------

def _error_text(error: BaseException) -> str:
    """The error as one line (ExceptionGroups with their members)."""
    text = f"{type(error).__name__}: {error}"
    for member in getattr(error, "exceptions", ()) or ():
        text += f" [{type(member).__name__}: {member}]"
    return text[:800]


def _check_case(kind: str, shape: tuple[int, int], dtype_name: str, tokamax: Any,
                tokamax_implementation: str, calls: int, repeats: int) -> dict[str, Any]:
    """Compiles, checks and times one case; returns its record."""
    record: dict[str, Any] = {"kind": kind, "shape": list(shape), "dtype": dtype_name}
    args = pallas_check._inputs(shape, DTYPES[dtype_name])
    implementations = [i for i in IMPLEMENTATIONS if i != "tokamax" or tokamax is not None]
    if tokamax is None:
        record["tokamax"] = {"unavailable": True,
                             "error": "tokamax not importable (see environment.tokamax)"}
    outputs, timed = {}, {}
    for implementation in implementations:
        forward, forward_backward = _functions(kind, implementation, tokamax,
                                               tokamax_implementation)
        entry = record.setdefault(implementation, {})
        try:
            start = time.perf_counter()
            result = jax.block_until_ready(forward_backward(*args))
            jax.block_until_ready(forward(*args[:3]))
            entry["compile_and_first_calls_s"] = time.perf_counter() - start
            outputs[implementation] = result
            timed[implementation] = (forward, forward_backward)
        except Exception as error:  # noqa: BLE001 - one implementation must not stop the rest
            entry["error"] = _error_text(error)
            entry["traceback"] = traceback.format_exc()[-3000:]
    try:
        if dtype_name == "float32" and "xla" in outputs:
            reference = outputs["xla"]
        else:
            reference = _functions(kind, "xla", tokamax, tokamax_implementation)[1](
                *(a.astype(jnp.float32) for a in args))
    except Exception as error:  # noqa: BLE001
        record["reference_error"] = _error_text(error)
        reference = None
    for implementation, out in outputs.items():
        entry = record[implementation]
        forward_backward = timed[implementation][1]
        try:
            if reference is not None:
                entry["errors"] = {n: _relative_error(o, r)
                                   for n, o, r in zip(OUTPUTS, out, reference, strict=True)}
                entry["ok"] = all(e <= TOLERANCE[dtype_name] for e in entry["errors"].values())
            entry["constant"] = _constant_check(kind, forward_backward, args)
            if dtype_name == "float32":
                entry["mean_1e4"] = _large_mean_check(kind, forward_backward, args)
        except Exception as error:  # noqa: BLE001
            entry["numerics_error"] = _error_text(error)
            entry["traceback"] = traceback.format_exc()[-3000:]
    functions = {}
    for implementation, (forward, forward_backward) in timed.items():
        functions[f"check_{implementation}_fwd"] = (forward, args[:3])
        functions[f"check_{implementation}_fwdbwd"] = (forward_backward, args)
    if functions:
        try:
            seconds, methods, wall, unattributed = _times(functions, calls, repeats)
        except Exception as error:  # noqa: BLE001
            record["timing_error"] = _error_text(error)
            seconds, methods, wall, unattributed = {}, {}, {}, 0.0
        for name, value in seconds.items():
            implementation, stage = name.removeprefix("check_").rsplit("_", 1)
            record[implementation][f"{stage}_us"] = 1e6 * value
            record[implementation][f"{stage}_timing"] = methods[name]
            record[implementation][f"{stage}_wall_us"] = 1e6 * wall[name]
        # GPU time in the trace that no function's hlo_module claims (should be ~0; if not,
        # some kernels, e.g. jax-triton's, went uncounted: compare the *_wall_us fields)
        record["unattributed_gpu_us"] = 1e6 * unattributed
    for stage in ("fwd", "fwdbwd"):
        theirs = record.get("tokamax", {}).get(f"{stage}_us")
        for implementation in ("pallas", "xla"):
            ours = record.get(implementation, {}).get(f"{stage}_us")
            if theirs and ours:
                record[f"tokamax_over_{implementation}_{stage}"] = theirs / ours
    return record


def _run_case(kind: str, shape: tuple[int, int], dtype_name: str, tokamax: Any,
              tokamax_implementation: str, calls: int, repeats: int, skip: bool
              ) -> dict[str, Any]:
    """One case's record: checked and timed, skipped, or the error it raised."""
    if skip:
        return {"kind": kind, "shape": list(shape), "dtype": dtype_name,
                "skipped": "time budget"}
    try:
        return _check_case(kind, shape, dtype_name, tokamax, tokamax_implementation,
                           calls, repeats)
    except Exception as error:  # noqa: BLE001 - one failure must not stop the rest
        return {"kind": kind, "shape": list(shape), "dtype": dtype_name,
                "error": _error_text(error), "traceback": traceback.format_exc()[-3000:]}


# --- report --------------------------------------------------------------------------------

HEADER = ("| kind | shape | dtype | tokamax fwd µs | pallas fwd µs | xla fwd µs | tok/pallas "
          "| tok/xla | tokamax f+b µs | pallas f+b µs | xla f+b µs | tok/pallas | tok/xla "
          "| numerics tok, pallas | constant row tok, pallas | mean 1e4 tok, pallas |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _verdict(entry: dict[str, Any], key: str) -> str:
    """``ok``, ``BAD``, ``ERR``, ``n/a`` (tokamax absent) or ``-`` for one check of one
    implementation."""
    if entry.get("unavailable"):
        return "n/a"
    if "error" in entry or "numerics_error" in entry:
        return "ERR"
    value = entry.get(key)
    if value is None:
        return "-"
    ok = value if isinstance(value, bool) else value.get("ok")
    return "ok" if ok else "BAD"


def _row(record: dict[str, Any]) -> str:
    """One markdown line of the table."""
    shape = "×".join(map(str, record["shape"]))
    head = f"| {record['kind']} | {shape} | {record['dtype']} |"
    if "skipped" in record or "error" in record:
        text = record.get("skipped") or record.get("error")
        return f"{head} {'skipped' if 'skipped' in record else 'FAILED'}: {text} |"
    cells = []
    for stage in ("fwd", "fwdbwd"):
        for implementation in IMPLEMENTATIONS:
            entry = record.get(implementation, {})
            value = entry.get(f"{stage}_us")
            cells.append("n/a" if entry.get("unavailable") else "ERR" if "error" in entry
                         else "-" if value is None
                         else f"{value:.1f}" + ("" if entry.get(f"{stage}_timing")
                                                == "profiler" else " (wall)"))
        for implementation in ("pallas", "xla"):
            ratio = record.get(f"tokamax_over_{implementation}_{stage}")
            cells.append("-" if ratio is None else f"{ratio:.2f}")
    for key in ("ok", "constant", "mean_1e4"):
        cells.append(", ".join(_verdict(record.get(i, {}), key) for i in ("tokamax", "pallas")))
    return f"{head} {' | '.join(cells)} |"


def _summary(cases: list[dict[str, Any]]) -> list[str]:
    """Geometric-mean ratios and the guarantee tallies."""
    lines = []
    for implementation in ("pallas", "xla"):
        for stage in ("fwd", "fwdbwd"):
            ratios = [c[f"tokamax_over_{implementation}_{stage}"] for c in cases
                      if f"tokamax_over_{implementation}_{stage}" in c]
            if ratios:
                geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
                lines.append(f"- tokamax/{implementation} {stage}: geomean {geomean:.2f} "
                             f"(min {min(ratios):.2f}, max {max(ratios):.2f}, "
                             f"{len(ratios)} cases)")
    for implementation in IMPLEMENTATIONS:
        for key in ("ok", "constant", "mean_1e4"):
            entries = [c[implementation] for c in cases
                       if key in c.get(implementation, {})]
            passed = sum(bool(e[key] if key == "ok" else e[key]["ok"]) for e in entries)
            if entries:
                lines.append(f"- {implementation} {key}: {passed}/{len(entries)} cases pass")
    return lines


# --- main ----------------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", help="path of the JSON to write")
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes (pallas interpreted, tokamax's XLA path off a GPU)")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds after which the remaining cases are skipped")
    parser.add_argument("--calls", type=int, default=20, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=3, help="wall timings, best kept")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--tokamax-implementation", choices=("triton", "xla"), default=None,
                        help="tokamax's implementation; default triton on a GPU, else xla")
    return parser.parse_args(argv)


def _environment(tokamax_info: dict[str, Any], tokamax_implementation: str
                 ) -> dict[str, Any]:
    """What ran: versions, backend, device."""
    try:
        import typing_extensions

        typing_extensions_version = getattr(typing_extensions, "__version__", "present")
    except ImportError:
        typing_extensions_version = "absent"
    return {"jax": jax.__version__, "jaxlib": _jaxlib_version(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "python": platform.python_version(),
            "numpy": np.__version__, "typing_extensions": typing_extensions_version,
            "jaxnorm": jaxnorm.__version__,
            "tokamax": {**tokamax_info, "implementation": tokamax_implementation},
            "eps": EPS, "timing": "per function: profiler (GPU kernel time) or wall"}


def _jaxlib_version() -> str:
    """jaxlib's version string."""
    import jaxlib

    return str(getattr(jaxlib, "__version__", "unknown"))


def main(argv: list[str] | None = None) -> int:
    """Runs every case, prints the table, writes the JSON; returns 1 if a jaxnorm Pallas
    case failed (an error, or its numerics against the reference), 0 otherwise."""
    options = _parse(argv)
    start = time.perf_counter()
    logging.getLogger("absl").setLevel(logging.ERROR)  # tokamax's autotuning-cache notices
    tokamax, tokamax_info = _load_tokamax()
    tokamax_implementation = options.tokamax_implementation or (
        "triton" if jax.default_backend() == "gpu" else "xla")
    calls, repeats = (2, 1) if options.tiny else (options.calls, options.repeats)
    shapes = TINY_SHAPES if options.tiny else SHAPES
    results: dict[str, Any] = {"environment": _environment(tokamax_info,
                                                           tokamax_implementation),
                               "cases": []}
    if tokamax is None:
        print(f"tokamax not importable: {tokamax_info.get('error')}; timing jaxnorm alone")
    for shim in tokamax_info["shims"]:
        print(f"shim: {shim}")
    out = pathlib.Path(options.out)
    print(HEADER, flush=True)
    for kind in options.kinds:
        for shape in shapes:
            for dtype_name in options.dtypes:
                record = _run_case(kind, shape, dtype_name, tokamax, tokamax_implementation,
                                   calls, repeats,
                                   time.perf_counter() - start > options.budget)
                record["elapsed_s"] = time.perf_counter() - start
                results["cases"].append(record)
                print(_row(record), flush=True)
                out.write_text(json.dumps(results, indent=1))
    results["summary"] = _summary(results["cases"])
    results["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=1))
    print("\n" + "\n".join(results["summary"]))
    print(f"wrote {out} in {results['seconds']:.1f} s")
    pallas = [c.get("pallas", {}) for c in results["cases"] if "skipped" not in c]
    failed = any("error" in c for c in results["cases"]) or any(
        "error" in p or "numerics_error" in p or not p.get("ok", False) for p in pallas)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
