"""GPU check of the Pallas kernels (``implementation="pallas"``) against the XLA path.

Usage (repository root on ``PYTHONPATH``, no installs)::

    python3 benchmarks/pallas_check.py OUT.json            # on a GPU: the sweep
    python3 benchmarks/pallas_check.py OUT.json --tiny     # anywhere: small, interpreted
    JAXNORM_PALLAS_BACKEND=mosaic_gpu python3 benchmarks/pallas_check.py OUT.json \
        --kinds layer_norm rms_norm                        # Mosaic GPU, row kernels only

For each case (kernel, shape, dtype) it compiles the forward and the forward+backward of
both paths, checks the kernel's ``y``, ``dx``, ``dscale``, ``dbias`` against XLA's, and
times both: the device time of one call is the sum of its GPU kernels' durations in a
``jax.profiler`` trace of ``--calls`` calls (``"timing": "profiler"``), or, where the trace
gives nothing (a CPU, a JAX without ``jax.profiler.ProfileData``), the wall time of
``--calls`` pipelined calls ended by one ``block_until_ready``, divided by the calls, best
of ``--repeats`` (``"timing": "wall"``; it includes dispatch, which dominates small
cases). The pass floor is one read or write of an ``x``-sized array at the copy
bandwidth measured in the same run (``y = x + 1``, the faster of float32 and bfloat16):
2 passes forward, 5 forward+backward
(read ``x``, ``dy``, write ``dx``) for LayerNorm/RMSNorm; 3 and 8 for GroupNorm and
InstanceNorm (statistics, normalize; sums, ``dx``). Each case runs under its own
``try``; the JSON is rewritten after every case, and cases past ``--budget`` seconds are
skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from jaxnorm import _pallas_dispatch, _pallas_mosaic_rows

ROWS = [(8192, 2048), (8192, 4096), (8192, 5120), (8192, 8192), (50176, 768)]
SWEEP = ([(kind, shape, 1) for shape in ROWS for kind in ("layer_norm", "rms_norm")]
         + [("group_norm", (16, 64, 64, 256), 32), ("instance_norm", (16, 64, 64, 128), 128),
            ("group_norm", (8, 32, 32, 512), 32), ("instance_norm", (8, 112, 112, 64), 64)])
TINY = [("layer_norm", (16, 7), 1), ("rms_norm", (9, 130), 1),
        ("group_norm", (2, 5, 3, 6), 2), ("instance_norm", (2, 3, 4, 5), 5)]
PASSES = {"layer_norm": (2, 5), "rms_norm": (2, 5), "group_norm": (3, 8),
          "instance_norm": (3, 8)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def _norm(kind: str, groups: int) -> Callable:
    """The function of ``kind`` as ``norm(x, scale, bias, **options)``."""
    if kind == "group_norm":
        return lambda *a, **o: jaxnorm.group_norm(*a, num_groups=groups, **o)
    return getattr(jaxnorm, kind)


def _functions(kind: str, groups: int, implementation: str) -> tuple[Callable, Callable]:
    """``(forward, forward_backward)``, jitted: ``y``, and ``(y, dx, dscale, dbias)``."""
    norm = _norm(kind, groups)

    def forward(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        return norm(x, scale, bias, eps=1e-5, implementation=implementation)

    def forward_backward(x: jax.Array, scale: jax.Array, bias: jax.Array,
                         dy: jax.Array) -> tuple[jax.Array, ...]:
        y, pullback = jax.vjp(forward, x, scale, bias)
        return (y, *pullback(dy))

    # distinct names: the profiler's hlo_module (jit_<name>) tells the functions apart
    forward.__name__ = f"check_{implementation}_fwd"
    forward_backward.__name__ = f"check_{implementation}_fwdbwd"
    return jax.jit(forward), jax.jit(forward_backward)


def _inputs(shape: tuple[int, ...], dtype: Any) -> tuple[jax.Array, ...]:
    """Random ``(x, scale, bias, dy)``; ``x`` off-centre so centring matters."""
    keys = jax.random.split(jax.random.key(0), 4)
    features = shape[-1]
    x = (jax.random.normal(keys[0], shape, jnp.float32) * 2 + 3).astype(dtype)
    scale = (1 + 0.1 * jax.random.normal(keys[1], (features,))).astype(dtype)
    bias = (0.1 * jax.random.normal(keys[2], (features,))).astype(dtype)
    dy = jax.random.normal(keys[3], shape, jnp.float32).astype(dtype)
    return x, scale, bias, dy


def _seconds_per_call(fn: Callable, args: tuple, calls: int, repeats: int) -> float:
    """Best over ``repeats`` of (wall time of ``calls`` pipelined calls) / ``calls``."""
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _gpu_stream_events(profile: Any) -> list[tuple[str, float]]:
    """``(hlo_module, duration ns)`` of every event on a GPU plane's stream lines."""
    events = []
    for plane in profile.planes:
        if "gpu" not in plane.name.lower():
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                stats = dict(event.stats) if event.stats is not None else {}
                module = stats.get("hlo_module", "")
                module = module.decode() if isinstance(module, bytes) else str(module)
                events.append((module, float(event.duration_ns)))
    return events


def _device_seconds(functions: dict[str, tuple[Callable, tuple]], calls: int
                    ) -> dict[str, float] | None:
    """Per jitted function name, the summed GPU kernel time of one call, from one
    ``jax.profiler`` trace of ``calls`` calls of each; None where the trace has no GPU
    events or misses a function (a CPU, or a JAX without ``ProfileData``)."""
    profile_data = getattr(jax.profiler, "ProfileData", None)
    if profile_data is None or jax.default_backend() != "gpu":
        return None
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for fn, args in functions.values():
                jax.block_until_ready([fn(*args) for _ in range(calls)])
        paths = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        if not paths:
            return None
        events = _gpu_stream_events(profile_data.from_file(paths[0]))
    totals = {name: 0.0 for name in functions}
    for module, nanoseconds in events:
        name = module.removeprefix("jit_").split(".")[0]
        if name in totals:
            totals[name] += nanoseconds
    if not all(totals.values()):
        return None
    return {name: total / calls / 1e9 for name, total in totals.items()}


def _times(functions: dict[str, tuple[Callable, tuple]], calls: int, repeats: int
           ) -> tuple[dict[str, float], str]:
    """``(seconds per call by name, method)``: profiler device time, else wall time."""
    for fn, args in functions.values():
        jax.block_until_ready(fn(*args))  # compiled before any timing
    try:
        device = _device_seconds(functions, calls)
    except Exception as error:  # noqa: BLE001 - any profiler trouble: fall back
        print(f"profiler trace failed ({type(error).__name__}: {error}); wall time")
        device = None
    if device is not None:
        return device, "profiler"
    return {name: _seconds_per_call(fn, args, calls, repeats)
            for name, (fn, args) in functions.items()}, "wall"


def _relative_error(ours: jax.Array, theirs: jax.Array) -> float:
    """max |ours - theirs| / max(1, max |theirs|), in float64 on the host."""
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _check_case(kind: str, shape: tuple[int, ...], groups: int, dtype_name: str,
                calls: int, repeats: int) -> dict[str, Any]:
    """Compiles, checks and times one case; returns its record."""
    args = _inputs(shape, DTYPES[dtype_name])
    record = _record(kind, shape, groups, dtype_name)
    outputs, functions = {}, {}
    for implementation in ("xla", "pallas"):
        forward, forward_backward = _functions(kind, groups, implementation)
        with _backends_run() as backends:
            outputs[implementation] = jax.block_until_ready(forward_backward(*args))
        if implementation == "pallas":
            record["backend"] = ",".join(sorted(set(backends))) or "none"
        functions[f"check_{implementation}_fwd"] = (forward, args[:3])
        functions[f"check_{implementation}_fwdbwd"] = (forward_backward, args)
    seconds, record["timing"] = _times(functions, calls, repeats)
    for name, value in seconds.items():
        record[f"{name.removeprefix('check_')}_us"] = 1e6 * value
    names = ("y", "dx", "dscale", "dbias")
    errors = {n: _relative_error(p, x)
              for n, p, x in zip(names, outputs["pallas"], outputs["xla"])}
    record["errors"] = errors
    record["ok"] = all(e <= TOLERANCE[dtype_name] for e in errors.values())
    return record


@contextlib.contextmanager
def _backends_run() -> Iterator[list[str]]:
    """The Pallas backends (``"triton"``, ``"mosaic_gpu"``) of the kernels the dispatcher
    plans while the block traces, in order."""
    backends: list[str] = []
    run_plan = _pallas_dispatch.run_plan

    def spy(plan: Any, *args: Any) -> Any:
        backends.append(plan.case.backend)
        return run_plan(plan, *args)

    _pallas_dispatch.run_plan = spy
    try:
        yield backends
    finally:
        _pallas_dispatch.run_plan = run_plan


def _record(kind: str, shape: tuple[int, ...], groups: int, dtype_name: str
            ) -> dict[str, Any]:
    """The fields that name a case."""
    return {"kind": kind, "shape": list(shape), "groups": groups, "dtype": dtype_name}


def _copy_bandwidth(rows: int, features: int, dtype: Any, calls: int, repeats: int) -> float:
    """Bytes per second of ``y = x + 1`` (one read, one write) on a ``(rows, features)``."""
    x = jnp.ones((rows, features), dtype)

    def check_copy(v: jax.Array) -> jax.Array:
        return v + 1

    seconds, _ = _times({"check_copy": (jax.jit(check_copy), (x,))}, calls, repeats)
    return 2 * x.size * x.dtype.itemsize / seconds["check_copy"]


def _add_floors(record: dict[str, Any], bandwidth: dict[str, float]) -> None:
    """Adds the pass floors (µs) and each time's fraction of its floor (floor / time);
    one pass moves ``rows * features`` elements at the best copy bandwidth of ``bandwidth``
    (bytes per second, read plus write)."""
    itemsize = jnp.dtype(DTYPES[record["dtype"]]).itemsize
    pass_us = 1e6 * math.prod(record["shape"]) * itemsize / max(bandwidth.values())
    for stage, passes in zip(("fwd", "fwdbwd"), PASSES[record["kind"]]):
        record[f"floor_{stage}_us"] = passes * pass_us
        for implementation in ("xla", "pallas"):
            key = f"{implementation}_{stage}_us"
            if key in record:
                record[f"{implementation}_{stage}_of_floor"] = passes * pass_us / record[key]


def _row(record: dict[str, Any]) -> str:
    """One line of the table."""
    shape = "x".join(map(str, record["shape"]))
    head = f"{record['kind']:13} {shape:>16} {record['dtype']:8}"
    if "error" in record:
        return f"{head} FAILED: {record['error']}"
    if "skipped" in record:
        return f"{head} skipped: {record['skipped']}"
    cells = [f"{record.get(f'{i}_{s}_us', float('nan')):9.1f}"
             for s in ("fwd", "fwdbwd") for i in ("xla", "pallas")]
    floors = [f"{record.get(f'pallas_{s}_of_floor', float('nan')):5.2f}"
              for s in ("fwd", "fwdbwd")]
    worst = max(record["errors"].values())
    verdict = "ok" if record["ok"] else "BAD"
    timing = record.get("timing", "")
    backend = record.get("backend", "")
    return (f"{head} {' '.join(cells)}  {' '.join(floors)}  {worst:8.1e} {verdict} {timing} "
            f"{backend}")


def _run_case(kind: str, shape: tuple[int, ...], groups: int, dtype_name: str, calls: int,
              repeats: int, bandwidth: dict[str, float], skip: bool) -> dict[str, Any]:
    """One case's record: checked and timed, skipped, or the error it raised."""
    if skip:
        return {**_record(kind, shape, groups, dtype_name), "skipped": "time budget",
                "ok": True}
    try:
        record = _check_case(kind, shape, groups, dtype_name, calls, repeats)
        _add_floors(record, bandwidth)
    except Exception as error:  # noqa: BLE001 - one failure must not stop the rest
        return {**_record(kind, shape, groups, dtype_name), "ok": False,
                "error": f"{type(error).__name__}: {str(error)[:500]}",
                "traceback": traceback.format_exc()[-3000:]}
    return record


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="path of the JSON to write")
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes, interpreted off a GPU (the CPU self-test)")
    parser.add_argument("--calls", type=int, default=20, help="pipelined calls per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings, best kept")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="the dtypes to run")
    parser.add_argument("--budget", type=float, default=100.0,
                        help="seconds after which the remaining cases are skipped")
    parser.add_argument("--kinds", nargs="+", choices=list(PASSES), default=list(PASSES),
                        help="the kernels to run (all by default)")
    return parser.parse_args(argv)


def _environment() -> dict[str, Any]:
    """What ran: versions, backend, device."""
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "python": platform.python_version(),
            "pallas_backend": "triton (jax.experimental.pallas.triton); interpret off GPU",
            "kernel_backend": os.environ.get("JAXNORM_PALLAS_BACKEND") or "default",
            "mosaic_gpu_available": _pallas_mosaic_rows.available(),
            "timing": "per case: profiler (GPU kernel time) or wall (pipelined calls)"}


def main(argv: list[str] | None = None) -> int:
    """Runs every case, prints the table, writes the JSON; returns 0 if every case that
    ran passed its check, 1 otherwise."""
    options = _parse(argv)
    calls, repeats = (2, 1) if options.tiny else (options.calls, options.repeats)
    shapes = [case for case in (TINY if options.tiny else SWEEP) if case[0] in options.kinds]
    results: dict[str, Any] = {"environment": _environment(), "cases": []}
    out = pathlib.Path(options.out)
    start = time.perf_counter()
    rows, cols = (9, 130) if options.tiny else (8192, 8192)
    results["copy_bandwidth_GBps"] = {
        name: _copy_bandwidth(rows, cols, dtype, calls, repeats) / 1e9
        for name, dtype in DTYPES.items()}
    bandwidth = {k: v * 1e9 for k, v in results["copy_bandwidth_GBps"].items()}
    print(f"{'kind':13} {'shape':>16} dtype     xla_fwd pallas_fwd xla_f+b pallas_f+b (us)"
          "  of floor: fwd f+b  max_err")
    for dtype_name in options.dtypes:
        for kind, shape, groups in shapes:
            record = _run_case(kind, shape, groups, dtype_name, calls, repeats,
                               bandwidth, time.perf_counter() - start > options.budget)
            results["cases"].append(record)
            print(_row(record), flush=True)
            out.write_text(json.dumps(results, indent=1))
    results["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} in {results['seconds']:.1f} s")
    return 0 if all(case["ok"] for case in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
