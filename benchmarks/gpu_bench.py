"""Device time of jaxnorm, Flax and PyTorch on one NVIDIA GPU, over the shared shape sweep.

Run through ``benchmarks/gpu_timing.sh`` (which picks the interpreter); directly::

    PYTHONPATH=. python3 benchmarks/gpu_bench.py                 # whole sweep, BUDGET_S=280
    python3 benchmarks/gpu_bench.py --tiny --out /tmp/t.json     # tiny shapes, CPU smoke test

For every case of ``sweep.py`` (layer × shape, float32 and bfloat16, forward and
forward+backward with respect to the input and the parameters) it times

- ``jaxnorm.linen.<Layer>`` (api ``module``) and the functional ``jaxnorm.<layer>`` on the
  same data (api ``functional``), against ``flax.linen.<Layer>`` built with the same
  arguments (``dtype`` = the input's dtype, training mode); with ``implementation="pallas"``
  too (column ``jaxnorm-pallas``) when the installed jaxnorm accepts that argument;
- device time: one ``jax.profiler`` trace per case, every implementation called
  ``TRACE_CALLS`` times; each kernel on a GPU stream is attributed to its implementation by
  the trace's ``hlo_module`` (the jitted function's name), its durations summed per call,
  and the kernel list kept. Where the events carry no module, each implementation gets a
  trace of its own;
- wall time of pipelined calls: ``PIPELINE_CALLS`` calls, one block at the end, best of
  ``PIPELINE_REPEATS``;
- the pass floor: ``sweep.FLOOR_PASSES`` passes over an x-sized array at the copy bandwidth
  measured at the start of the same run (``y = 2x + 1`` on 1 GiB of float32, bytes = read
  + write), and each implementation's fraction of it (floor / time: 1 is the floor);
- PyTorch eager and ``torch.compile`` (``dynamic=False``, default mode; channels-last
  ``Conv``-style layouts, parameters in the input's dtype) in a second process: CUDA
  events around ``PIPELINE_CALLS`` pipelined calls. ``torch.compile`` gets what the time
  budget leaves, case by case, and records the cases it finished.

The JAX part and the PyTorch part run in separate processes (their CUDA libraries never
share one) under one time budget (``--budget-s``, default ``$BUDGET_S`` or 280 s). Each
writes the JSON after every case, so a run stopped early keeps what it finished; a failing
case records its error and the run goes on. Output: ``benchmarks/gpu/<device>-<date>.json``
(``records``: one per case × dtype × pass × api, with ``layer``, ``shape``, ``dtype``,
``pass``, ``api``, ``jaxnorm_us``, ``flax_us``, ``torch_eager_us``, ``torch_compile_us``,
``floor_us``, ``kernels``, …) and the Markdown report beside it (``.md``).

Without a GPU (``--tiny`` on a CPU) the trace has no GPU plane: the ``*_us`` columns are
then the pipelined wall time, and the record says so in ``timing``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import inspect
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # jaxnorm from this checkout, installed or not
import sweep  # noqa: E402

DEFAULT_OUT_DIR = HERE / "gpu"
TRACE_CALLS = 5
PIPELINE_CALLS = 20
PIPELINE_REPEATS = 3
COPY_BYTES = 1 << 30
BATCH_NORM_MOMENTUM = 0.9
JAX_SHARE = 0.75  # of the budget, for the JAX part; PyTorch gets the rest
REPORT_SECONDS = 8.0  # kept back from the budget for the report
GRACE_SECONDS = 10.0  # past a part's deadline before its process is killed
IMPLEMENTATIONS = ("jaxnorm_module", "jaxnorm_functional", "flax", "jaxnorm_pallas")
COLUMN = {"jaxnorm_module": "jaxnorm", "jaxnorm_functional": "jaxnorm",
          "flax": "flax", "jaxnorm_pallas": "jaxnorm-pallas"}
FUNCTIONAL = {"LayerNorm": "layer_norm", "RMSNorm": "rms_norm", "BatchNorm": "batch_norm",
              "GroupNorm": "group_norm", "InstanceNorm": "instance_norm"}


def epsilon(layer: str) -> float:
    """Flax's default epsilon of ``layer`` (both libraries get it explicitly)."""
    return 1e-5 if layer == "BatchNorm" else 1e-6


# --------------------------------------------------------------------------------------
# Settings, cases and the JSON document


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures, where it writes, and until when."""

    out: Path
    deadline: float
    tiny: bool = False
    only: str | None = None
    max_cases: int | None = None
    torch_compile: bool = True
    workers: int = 8


def selected_cases(settings: Settings) -> list[tuple[sweep.Case, str]]:
    """The sweep's ``(case, dtype)`` pairs in run order (layers interleaved), tiny with
    ``--tiny``, filtered by ``--only`` (a substring of the label) and ``--max-cases``."""
    cases = sweep.interleaved(sweep.SWEEP)
    if settings.tiny:
        cases = [sweep.tiny(case) for case in cases]
    pairs = list(sweep.with_dtypes(cases))
    if settings.only:
        pairs = [(c, d) for c, d in pairs if settings.only.lower() in c.label(d).lower()]
    return pairs[: settings.max_cases] if settings.max_cases else pairs


def case_key(case: sweep.Case, dtype: str) -> dict[str, Any]:
    """The fields naming a case in every record."""
    return {"layer": case.layer, "shape": list(case.shape), "dtype": dtype,
            "param_dtype": case.param_dtype_for(dtype), "model": case.model}


def load(path: Path) -> dict[str, Any]:
    """The run's JSON document (a fresh one if the file does not exist yet)."""
    if path.exists():
        return json.loads(path.read_text())
    return {"environment": {}, "records": [], "torch": [], "errors": [], "skipped": [],
            "notes": []}


def save(path: Path, document: dict[str, Any]) -> None:
    """Writes ``document`` atomically (a killed run leaves the previous version whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(partial, path)


def seconds_left(settings: Settings) -> float:
    """Seconds until the part's deadline."""
    return settings.deadline - time.time()


def record_error(document: dict[str, Any], where: str, error: BaseException) -> None:
    """Keeps ``error`` (and the end of its traceback) in the document and prints it."""
    text = "".join(traceback.format_exception(error))[-2000:]
    document["errors"].append({"where": where, "error": repr(error)[:500], "traceback": text})
    print(f"ERROR {where}: {error!r}"[:400], flush=True)


# --------------------------------------------------------------------------------------
# The JAX functions timed


def flax_module(library: Any, layer: str, dtype: Any, param_dtype: Any) -> Any:
    """``library.<layer>`` (``flax.linen`` or ``jaxnorm.linen``) in training mode."""
    common = {"epsilon": epsilon(layer), "dtype": dtype, "param_dtype": param_dtype}
    if layer == "BatchNorm":
        return library.BatchNorm(use_running_average=False, momentum=BATCH_NORM_MOMENTUM,
                                 **common)
    if layer == "GroupNorm":
        return library.GroupNorm(num_groups=32, **common)
    return getattr(library, layer)(**common)


def module_apply(module: Any) -> Callable[..., Any]:
    """``(params, state, x) -> (y, new_state)``; ``state`` is the batch statistics or ``{}``."""

    def apply(params: Any, state: Any, x: Any) -> tuple[Any, Any]:
        if state:
            y, updates = module.apply({"params": params, "batch_stats": state}, x,
                                      mutable=["batch_stats"])
            return y, updates["batch_stats"]
        return module.apply({"params": params}, x), {}

    return apply


def functional_apply(layer: str, pallas: bool = False) -> Callable[..., Any]:
    """``(params, state, x) -> (y, new_state)`` through ``jaxnorm.<layer>`` with the module's
    arguments; BatchNorm also updates the running statistics as the module does."""
    import jaxnorm

    function = getattr(jaxnorm, FUNCTIONAL[layer])
    extra: dict[str, Any] = {"implementation": "pallas"} if pallas else {}
    if layer == "GroupNorm":
        extra["num_groups"] = 32

    def apply(params: Any, state: Any, x: Any) -> tuple[Any, Any]:
        scale, bias = params.get("scale"), params.get("bias")
        eps = epsilon(layer)
        if layer != "BatchNorm":
            return function(x, scale, bias, eps=eps, dtype=x.dtype, **extra), {}
        y, mean, var = function(x, scale, bias, eps=eps, dtype=x.dtype, **extra)
        decay = BATCH_NORM_MOMENTUM
        new_state = {"mean": decay * state["mean"] + (1 - decay) * mean,
                     "var": decay * state["var"] + (1 - decay) * var}
        return y, new_state

    return apply


def accepts_pallas(layer: str) -> bool:
    """Whether the installed ``jaxnorm.<layer>`` takes ``implementation=`` (the Pallas hook)."""
    import jaxnorm

    try:
        return "implementation" in inspect.signature(getattr(jaxnorm, FUNCTIONAL[layer])).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def passes_of(apply: Callable[..., Any], name: str) -> dict[str, Callable[..., Any]]:
    """The forward and forward+backward functions of ``apply``, named ``<name>__fwd`` and
    ``<name>__fwdbwd`` (the profiler reports kernels under ``jit_<function name>``)."""
    import jax

    def forward(params: Any, state: Any, x: Any, dy: Any) -> Any:
        del dy
        return apply(params, state, x)

    def forward_backward(params: Any, state: Any, x: Any, dy: Any) -> Any:
        y, pullback, new_state = jax.vjp(lambda p, v: apply(p, state, v), params, x,
                                         has_aux=True)
        dparams, dx = pullback(dy)
        return y, dparams, dx, new_state

    forward.__name__ = forward.__qualname__ = f"{name}__fwd"
    forward_backward.__name__ = forward_backward.__qualname__ = f"{name}__fwdbwd"
    return {"forward": forward, "forward+backward": forward_backward}


def implementations(case: sweep.Case, dtype: Any, param_dtype: Any) -> dict[str, Callable]:
    """``name -> apply`` of every implementation timed for ``case``."""
    import flax.linen as nn

    import jaxnorm.linen

    applies = {
        "jaxnorm_module": module_apply(flax_module(jaxnorm.linen, case.layer, dtype, param_dtype)),
        "jaxnorm_functional": functional_apply(case.layer),
        "flax": module_apply(flax_module(nn, case.layer, dtype, param_dtype)),
    }
    if accepts_pallas(case.layer):
        applies["jaxnorm_pallas"] = functional_apply(case.layer, pallas=True)
    return applies


def make_variables(case: sweep.Case, dtype: Any, param_dtype: Any) -> tuple[Any, Any]:
    """``(params, batch_stats)`` of Flax's module for ``case``: scale ≈ 1, bias ≈ 0 with a
    little noise, running mean 0 and variance 1 (host arrays: no compilation)."""
    import flax.linen as nn
    import jax
    import numpy as np

    module = flax_module(nn, case.layer, dtype, param_dtype)
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(case.shape, dtype))
    rng = np.random.default_rng(0)

    def fill(path: Any, leaf: Any) -> Any:
        name = str(path[-1].key)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        value = {"scale": 1 + 0.1 * noise, "bias": 0.1 * noise,
                 "mean": np.zeros(leaf.shape, np.float32),
                 "var": np.ones(leaf.shape, np.float32)}.get(name, noise)
        return jax.numpy.asarray(value, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return variables["params"], variables.get("batch_stats", {})


def data_function(shape: tuple[int, ...], dtype: Any) -> Callable[[Any], tuple[Any, Any]]:
    """``key -> (x, dy)``: x with mean 3 and standard deviation 2 (not centred, as real
    activations), dy standard normal."""
    import jax
    import jax.numpy as jnp

    def data(key: Any) -> tuple[Any, Any]:
        kx, kdy = jax.random.split(key)
        x = 3 + 2 * jax.random.normal(kx, shape, jnp.float32)
        return x.astype(dtype), jax.random.normal(kdy, shape, jnp.float32).astype(dtype)

    data.__name__ = "make_data"
    return data


def compile_all(functions: dict[str, tuple[Callable, tuple]], workers: int
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """``jax.jit``-compiles every ``name -> (function, argument specs)``: each is lowered in
    this thread and compiled at once on one of ``workers`` threads (XLA compiles without
    the GIL), so lowering the next overlaps compiling the last. Returns the executables
    and the errors, by name."""
    import jax

    start = time.perf_counter()
    errors: dict[str, str] = {}
    futures = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for name, (function, args) in functions.items():
            try:
                futures[name] = pool.submit(jax.jit(function).lower(*args).compile)
            except Exception as error:  # one implementation failing keeps the others
                errors[name] = f"lower: {error!r}"[:1000]
        lowered = time.perf_counter() - start
        compiled = {}
        for name, future in futures.items():
            try:
                compiled[name] = future.result()
            except Exception as error:
                errors[name] = f"compile: {error!r}"[:1000]
    print(f"  {len(functions)} functions lowered in {lowered:.1f}s, all compiled after "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    return compiled, errors


# --------------------------------------------------------------------------------------
# Timing: the profiler trace and pipelined wall time


@dataclasses.dataclass
class Kernel:
    """One kernel name of one implementation, summed over the trace."""

    name: str
    line: str
    count: int = 0
    nanoseconds: float = 0.0


def profile_data_class() -> Any:
    """``jax.profiler.ProfileData`` (``None`` where this JAX has none)."""
    try:
        from jax.profiler import ProfileData
    except ImportError:
        try:
            from jax._src.lib import _profile_data

            ProfileData = _profile_data.ProfileData
        except (ImportError, AttributeError):
            return None
    return ProfileData


Event = tuple[str, str, float, str]  # stream line, kernel, duration ns, hlo_module


def trace_events(calls: dict[str, Callable[[], Any]], repeats: int) -> list[Event]:
    """Runs each call ``repeats`` times under one ``jax.profiler`` trace; returns the GPU
    stream events as ``(line, kernel, duration ns, hlo_module)`` (empty without a GPU)."""
    import jax

    profile_data = profile_data_class()
    if profile_data is None:
        return []
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for call in calls.values():
                out = None
                for _ in range(repeats):
                    out = call()
                jax.block_until_ready(out)
        paths = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        if not paths:
            return []
        return gpu_stream_events(profile_data.from_file(paths[0]))


def gpu_stream_events(profile: Any) -> list[Event]:
    """``(line, kernel, duration ns, hlo_module)`` of the events on the GPU planes' stream
    lines (every line of a GPU plane where none is named a stream)."""
    events = []
    for plane in profile.planes:
        if not re.search(r"gpu", plane.name, re.IGNORECASE):
            continue
        lines = list(plane.lines)
        streams = [line for line in lines if "stream" in line.name.lower()] or lines
        for line in streams:
            for event in line.events:
                events.append((line.name, event.name, float(event.duration_ns),
                               event_module(event)))
    return events


def event_module(event: Any) -> str:
    """The ``hlo_module`` stat of a trace event ("" where it has none or no stats)."""
    try:
        stats = dict(getattr(event, "stats", None) or ())
    except (TypeError, ValueError):
        return ""
    module = stats.get("hlo_module", "")
    return module.decode(errors="replace") if isinstance(module, bytes) else str(module)


def owner(module: str, names: Iterable[str]) -> str | None:
    """Which of ``names`` (jitted function names) the ``hlo_module`` ``module`` belongs to."""
    for name in sorted(names, key=len, reverse=True):
        if module == f"jit_{name}" or re.search(rf"(^|_){re.escape(name)}($|\W)", module):
            return name
    return None


def kernels_by_owner(events: Sequence[Event], names: Sequence[str],
                     everything_to: str | None = None) -> tuple[dict[str, list[Kernel]], float]:
    """Events grouped per function name and kernel; with ``everything_to``, all events go
    to that name. Also returns the nanoseconds no name claimed."""
    grouped: dict[str, dict[tuple[str, str], Kernel]] = {name: {} for name in names}
    unclaimed = 0.0
    for line, kernel, nanoseconds, module in events:
        name = everything_to or owner(module, names)
        if name is None:
            unclaimed += nanoseconds
            continue
        entry = grouped[name].setdefault((line, kernel), Kernel(kernel, line))
        entry.count += 1
        entry.nanoseconds += nanoseconds
    return {name: list(kernels.values()) for name, kernels in grouped.items()}, unclaimed


def device_kernels(calls: dict[str, Callable[[], Any]]) -> dict[str, list[Kernel]] | None:
    """Per function name, its kernels in one trace of ``TRACE_CALLS`` calls each; ``None``
    where the trace has no GPU events (a CPU). Events without a recognizable module (over
    1% of the time) make each function get a trace of its own."""
    events = trace_events(calls, TRACE_CALLS)
    if not events:
        return None
    grouped, unclaimed = kernels_by_owner(events, list(calls))
    total = sum(e[2] for e in events)
    if unclaimed <= 0.01 * total:
        return grouped
    print(f"  note: {unclaimed / total:.0%} of the kernel time has no hlo_module: "
          "one trace per implementation", flush=True)
    separate = {}
    for name, call in calls.items():
        own = trace_events({name: call}, TRACE_CALLS)
        separate[name] = kernels_by_owner(own, [name], everything_to=name)[0][name]
    return separate


def pipelined_seconds(call: Callable[[], Any], calls: int = PIPELINE_CALLS,
                      repeats: int = PIPELINE_REPEATS) -> float:
    """Seconds per call of ``calls`` back-to-back calls and one block, best of ``repeats``."""
    import jax

    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def kernel_summary(kernels: list[Kernel]) -> list[dict[str, Any]]:
    """Kernels per call, longest first: name, stream line, launches and µs per call."""
    rows = sorted(kernels, key=lambda k: -k.nanoseconds)
    return [{"name": k.name, "line": k.line, "per_call": round(k.count / TRACE_CALLS, 2),
             "us": round(k.nanoseconds / TRACE_CALLS / 1e3, 2)} for k in rows]


# --------------------------------------------------------------------------------------
# The JAX part


def copy_bandwidth(settings: Settings) -> dict[str, Any]:
    """Bytes per second of ``y = 2x + 1`` on float32 (1 GiB; 4 MiB with ``--tiny``):
    read + write over the device time (the wall time without a GPU trace)."""
    import jax
    import jax.numpy as jnp

    size = (4 << 20) if settings.tiny else COPY_BYTES
    spec = jax.ShapeDtypeStruct((size // 4,), jnp.float32)

    def copy_probe(x: Any) -> Any:
        return x * 2 + 1

    compiled = jax.jit(copy_probe).lower(spec).compile()
    x = jnp.ones(spec.shape, spec.dtype)
    call = lambda: compiled(x)  # noqa: E731
    jax.block_until_ready(call())
    wall = pipelined_seconds(call, calls=10)
    try:
        kernels = device_kernels({"copy_probe": call})
    except Exception as error:  # the wall time stays
        print(f"copy bandwidth: the profiler trace failed ({error!r}); wall time", flush=True)
        kernels = None
    device = (sum(k.nanoseconds for k in kernels["copy_probe"]) / TRACE_CALLS / 1e9
              if kernels else None)
    seconds = device or wall
    del x
    return {"bytes": 2 * size, "device_us": device and round(device * 1e6, 2),
            "wall_us": round(wall * 1e6, 2), "gbps": round(2 * size / seconds / 1e9, 1),
            "timing": "device" if device else "wall"}


def time_case(case: sweep.Case, dtype_name: str, copy_gbps: float, settings: Settings
              ) -> list[dict[str, Any]]:
    """Compiles and times every implementation of one case (both passes); returns its
    records, one per pass and api."""
    import jax
    import jax.numpy as jnp

    dtype, param_dtype = jnp.dtype(dtype_name), jnp.dtype(case.param_dtype_for(dtype_name))
    params, state = make_variables(case, dtype, param_dtype)
    spec = jax.ShapeDtypeStruct(case.shape, dtype)
    args = (params, state, spec, spec)
    functions: dict[str, tuple[Callable, tuple]] = {
        "make_data": (data_function(case.shape, dtype), (jax.random.key(0),))}
    for impl, apply in implementations(case, dtype, param_dtype).items():
        for pass_name, function in passes_of(apply, impl).items():
            functions[function.__name__] = (function, args)
    compiled, errors = compile_all(functions, settings.workers)
    x, dy = compiled["make_data"](jax.random.key(0))
    calls = {name: (lambda c=c: c(params, state, x, dy))
             for name, c in compiled.items() if name != "make_data"}
    for name in list(calls):  # a first call: runtime errors surface here, not in the trace
        try:
            jax.block_until_ready(calls[name]())
        except Exception as error:
            errors[name] = f"run: {error!r}"[:1000]
            del calls[name]
    wall = {name: pipelined_seconds(call) for name, call in calls.items()}
    kernels, why = None, "wall: no GPU plane in the profiler trace"
    try:
        kernels = device_kernels(calls) if calls else None
    except Exception as error:  # the wall times stay
        errors["trace"] = f"trace: {error!r}"[:1000]
        why = "wall: the profiler trace failed"
    return case_records(case, dtype_name, dtype.itemsize, copy_gbps, wall, kernels, errors, why)


def case_records(case: sweep.Case, dtype_name: str, itemsize: int, copy_gbps: float,
                 wall: dict[str, float], kernels: dict[str, list[Kernel]] | None,
                 errors: dict[str, str], wall_reason: str = "wall") -> list[dict[str, Any]]:
    """The case's records (module and functional api, each pass) from its timings; without
    ``kernels`` the times are the wall times, ``wall_reason`` saying why."""
    records = []
    for pass_name, short in (("forward", "fwd"), ("forward+backward", "fwdbwd")):
        us, lists = {}, {}
        for impl in IMPLEMENTATIONS:
            name = f"{impl}__{short}"
            if name not in wall:
                continue
            if kernels is not None:
                found = kernels.get(name) or []
                us[impl] = sum(k.nanoseconds for k in found) / TRACE_CALLS / 1e3 or None
                lists[impl] = kernel_summary(found)
            else:
                us[impl] = wall[name] * 1e6
        floor_us = sweep.floor_bytes(case, itemsize, pass_name) / (copy_gbps * 1e9) * 1e6
        for api in ("module", "functional"):
            ours = f"jaxnorm_{api}"
            record = {
                **case_key(case, dtype_name), "pass": pass_name, "api": api,
                "jaxnorm_us": _round(us.get(ours)), "flax_us": _round(us.get("flax")),
                "jaxnorm_pallas_us": _round(us.get("jaxnorm_pallas")),
                "torch_eager_us": None, "torch_compile_us": None,
                "floor_us": round(floor_us, 2),
                "floor_passes": sweep.FLOOR_PASSES[case.layer][pass_name],
                "timing": "device" if kernels is not None else wall_reason,
                "jaxnorm_wall_us": _round(1e6 * wall.get(f"{ours}__{short}", math.nan)),
                "flax_wall_us": _round(1e6 * wall.get(f"flax__{short}", math.nan)),
                "kernels": {COLUMN[i]: lists[i] for i in (ours, "flax", "jaxnorm_pallas")
                            if i in lists},
                "errors": {n: e for n, e in errors.items() if n.endswith(f"__{short}")
                           or n in ("make_data", "trace")},
            }
            records.append(with_ratios(record))
    return records


def _round(value: float | None, digits: int = 2) -> float | None:
    """``value`` rounded; ``None`` for a missing or NaN value."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def with_ratios(record: dict[str, Any]) -> dict[str, Any]:
    """Adds jaxnorm/Flax, the floor fractions (floor / time) and the kernel counts."""
    ours, flax, floor = record["jaxnorm_us"], record["flax_us"], record["floor_us"]
    record["ratio"] = round(ours / flax, 4) if ours and flax else None
    for name in ("jaxnorm", "flax", "jaxnorm_pallas"):
        value = record.get(f"{name}_us")
        record[f"{name}_floor_fraction"] = round(floor / value, 4) if value else None
    record["kernel_count"] = {name: sum(round(k["per_call"]) for k in kernels)
                              for name, kernels in record["kernels"].items()}
    return record


def jax_environment() -> dict[str, Any]:
    """Versions and the device, as JAX sees them."""
    import flax
    import jax

    import jaxnorm

    device = jax.devices()[0]
    return {"jax": jax.__version__, "flax": flax.__version__, "jaxnorm": jaxnorm.__version__,
            "backend": jax.default_backend(), "device_kind": str(device.device_kind),
            "python": platform.python_version(),
            "pallas_hook": {layer: accepts_pallas(layer) for layer in FUNCTIONAL}}


def jax_part(settings: Settings) -> None:
    """Times every case with JAX, writing the JSON after each."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    document = load(settings.out)
    document["environment"].update(jax_environment())
    print("jax part:", document["environment"], flush=True)
    if jax.default_backend() != "gpu" and not settings.tiny:
        document["notes"].append(f"JAX backend is {jax.default_backend()}, not gpu: nothing "
                                 "timed (only --tiny runs without a GPU)")
        save(settings.out, document)
        raise SystemExit("JAX sees no GPU; run with --tiny for a CPU smoke test")
    try:
        copy = copy_bandwidth(settings)
    except Exception as error:
        record_error(document, "copy bandwidth", error)
        copy = {"gbps": math.nan}
    document["environment"]["copy"] = copy
    print(f"copy bandwidth: {copy}", flush=True)
    save(settings.out, document)
    run_cases(document, settings, copy["gbps"])


def run_cases(document: dict[str, Any], settings: Settings, copy_gbps: float) -> None:
    """The case loop: stops starting cases when the budget would not fit one more."""
    pairs = selected_cases(settings)
    durations: list[float] = []
    for index, (case, dtype) in enumerate(pairs):
        expected = 1.5 * max(durations[-5:], default=2.0)
        if seconds_left(settings) < expected:
            document["skipped"] += [{**case_key(c, d), "reason": "time budget"}
                                    for c, d in pairs[index:]]
            print(f"time budget: {len(pairs) - index} cases left untimed", flush=True)
            break
        start = time.time()
        try:
            records = time_case(case, dtype, copy_gbps, settings)
        except Exception as error:
            record_error(document, case.label(dtype), error)
            records = []
        durations.append(time.time() - start)
        document["records"] += records
        save(settings.out, document)
        print_case(index, len(pairs), case, dtype, records, durations[-1])


def print_case(index: int, total: int, case: sweep.Case, dtype: str,
               records: list[dict[str, Any]], seconds: float) -> None:
    """One progress line per case."""
    cells = []
    for r in records:
        if r["api"] == "module":
            short = "fwd" if r["pass"] == "forward" else "fwd+bwd"
            cells.append(f"{short}: jaxnorm {r['jaxnorm_us']} flax {r['flax_us']} "
                         f"floor {r['floor_us']} us")
    errors = sorted({name for r in records for name in r["errors"]})
    print(f"[{index + 1}/{total} {seconds:4.1f}s] {case.label(dtype)}: " + "; ".join(cells)
          + (f"  errors: {errors}" if errors else ""), flush=True)


# --------------------------------------------------------------------------------------
# The PyTorch part


def torch_module(layer: str, channels: int, torch: Any) -> Any:
    """PyTorch's module for ``layer`` with the same epsilon (and BatchNorm momentum)."""
    nn = torch.nn
    if layer == "LayerNorm":
        return nn.LayerNorm(channels, eps=1e-6)
    if layer == "RMSNorm":
        return nn.RMSNorm(channels, eps=1e-6)
    if layer == "BatchNorm":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=1 - BATCH_NORM_MOMENTUM)
    if layer == "GroupNorm":
        return nn.GroupNorm(32, channels, eps=1e-6)
    return nn.InstanceNorm2d(channels, eps=1e-6, affine=True)


def torch_inputs(case: sweep.Case, dtype: Any, device: str, torch: Any) -> tuple[Any, Any]:
    """x (mean 3, std 2) and dy; image layers as NCHW in channels-last memory, which holds
    the same bytes as JAX's NHWC."""
    x = torch.randn(case.shape, device=device, dtype=torch.float32).mul_(2).add_(3).to(dtype)
    if len(case.shape) == 4:
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    return x, torch.randn_like(x)


def torch_seconds(call: Callable[[], Any], torch: Any, cuda: bool) -> float:
    """Seconds per call of ``PIPELINE_CALLS`` pipelined calls (CUDA events on a GPU, the
    host clock otherwise), best of ``PIPELINE_REPEATS``, after three warm-up calls."""
    for _ in range(3):
        call()
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    synchronize()
    best = math.inf
    for _ in range(PIPELINE_REPEATS):
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(PIPELINE_CALLS):
                call()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(PIPELINE_CALLS):
                call()
            seconds = time.perf_counter() - begin
        best = min(best, seconds / PIPELINE_CALLS)
    return best


def torch_calls(module: Any, function: Any, x: Any, dy: Any, torch: Any
                ) -> dict[str, Callable[[], Any]]:
    """The forward (no grad) and forward+backward calls of ``function`` (the module or its
    ``torch.compile``), gradients cleared to None each time (no accumulation kernels)."""

    def forward() -> Any:
        with torch.no_grad():
            return function(x)

    def forward_backward() -> Any:
        x.grad = None
        module.zero_grad(set_to_none=True)
        function(x).backward(dy)

    return {"forward": forward, "forward+backward": forward_backward}


def torch_case(case: sweep.Case, dtype_name: str, kind: str, torch: Any
               ) -> dict[str, dict[str, float | str]]:
    """``pass -> {kind: µs}`` (or ``{kind + "_error": text}``) for one case, ``kind`` being
    ``"eager"`` or ``"compile"``."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    module = torch_module(case.layer, case.shape[-1], torch).to(device=device, dtype=dtype)
    x, dy = torch_inputs(case, dtype, device, torch)
    function = module
    if kind == "compile":
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no stale guards
        function = torch.compile(module, dynamic=False)
    results: dict[str, dict[str, float | str]] = {}
    for pass_name, call in torch_calls(module, function, x, dy, torch).items():
        try:
            results[pass_name] = {kind: round(1e6 * torch_seconds(call, torch, cuda), 2)}
        except Exception as error:  # e.g. a compile failure: the other pass still runs
            results[pass_name] = {f"{kind}_error": repr(error)[:500]}
    return results


def configure_dynamo(torch: Any) -> None:
    """Raises dynamo's recompilation limits (renamed across PyTorch versions)."""
    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 1024))


def torch_part(settings: Settings) -> None:
    """PyTorch eager for every case, then ``torch.compile`` (LayerNorm/RMSNorm first) while
    the budget lasts; merged into the records after each case."""
    import torch

    document = load(settings.out)
    cuda = torch.cuda.is_available()
    document["environment"]["torch"] = torch.__version__
    document["environment"]["torch_device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    if not cuda and not settings.tiny:
        document["notes"].append("PyTorch sees no GPU: its columns stay empty")
        save(settings.out, document)
        return
    configure_dynamo(torch)
    pairs = selected_cases(settings)
    torch_kind(document, settings, pairs, "eager", torch)
    if settings.torch_compile:
        tokens_first = sorted(pairs, key=lambda p: p[0].layer not in ("LayerNorm", "RMSNorm"))
        torch_kind(document, settings, tokens_first, "compile", torch)


def torch_kind(document: dict[str, Any], settings: Settings,
               pairs: Sequence[tuple[sweep.Case, str]], kind: str, torch: Any) -> None:
    """Times ``kind`` (eager or compile) case by case until the budget would not fit the
    next (1.5 × the slowest of the last three; 30 s before the first ``torch.compile``)."""
    durations: list[float] = []
    for index, (case, dtype) in enumerate(pairs):
        first = 30.0 if kind == "compile" else 2.0
        if seconds_left(settings) < 1.5 * max(durations[-3:], default=first):
            document["notes"].append(f"time budget: torch {kind} timed {index} of "
                                     f"{len(pairs)} cases")
            save(settings.out, document)
            print(document["notes"][-1], flush=True)
            return
        start = time.time()
        try:
            results = torch_case(case, dtype, kind, torch)
        except Exception as error:
            record_error(document, f"torch {kind} {case.label(dtype)}", error)
            continue
        durations.append(time.time() - start)
        add_torch(document, case, dtype, results)
        save(settings.out, document)
        print(f"torch {kind} {case.label(dtype)} ({durations[-1]:.1f}s): {results}", flush=True)


def add_torch(document: dict[str, Any], case: sweep.Case, dtype: str,
              results: dict[str, dict[str, float | str]]) -> None:
    """Adds one case's PyTorch results to ``document["torch"]`` and the records."""
    for pass_name, values in results.items():
        key = {**case_key(case, dtype), "pass": pass_name}
        entry = next((t for t in document["torch"] if all(t.get(k) == v for k, v in key.items())),
                     None)
        if entry is None:
            entry = dict(key)
            document["torch"].append(entry)
        entry.update(values)
    merge_torch(document)


def merge_torch(document: dict[str, Any]) -> None:
    """Copies the PyTorch times into the JAX records of the same case and pass."""
    def key(r: dict[str, Any]) -> tuple:
        return r["layer"], tuple(r["shape"]), r["dtype"], r["param_dtype"], r["pass"]

    times = {key(t): t for t in document["torch"]}
    for record in document["records"]:
        found = times.get(key(record), {})
        record["torch_eager_us"] = found.get("eager")
        record["torch_compile_us"] = found.get("compile")


# --------------------------------------------------------------------------------------
# The report


def geometric_mean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the positive values (``None`` if there are none)."""
    logs = [math.log(v) for v in values if v]
    return round(math.exp(sum(logs) / len(logs)), 4) if logs else None


def summary(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: per api and pass, the geometric mean and worst jaxnorm/Flax and
    the geometric-mean fractions of the floor; then functional/module on the same data."""
    header = ["api", "pass", "cases", "jaxnorm/Flax geomean", "worst", "floor frac. jaxnorm",
              "floor frac. Flax", "floor frac. pallas"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for api in ("module", "functional"):
        for pass_name in (*sweep.PASSES, None):
            chosen = [r for r in records if r["api"] == api
                      and (pass_name is None or r["pass"] == pass_name)]
            ratios = [r["ratio"] for r in chosen if r["ratio"]]
            if not chosen:
                continue
            cells = [api, pass_name or "both", str(len(chosen)),
                     _cell(geometric_mean(ratios), 3), _cell(max(ratios, default=None), 3)]
            cells += [_cell(geometric_mean(r[f"{name}_floor_fraction"] for r in chosen), 3)
                      for name in ("jaxnorm", "flax", "jaxnorm_pallas")]
            lines.append("| " + " | ".join(cells) + " |")
    pairs = list(paired_apis(records).values())
    lines += ["", f"functional/module on the same data: geomean {_cell(geometric_mean(pairs), 3)}"
                  f", worst {_cell(max(pairs, default=None), 3)}."]
    return "\n".join(lines)


def paired_apis(records: Sequence[dict[str, Any]]) -> dict[tuple, float]:
    """functional µs / module µs, per case and pass."""
    by_api: dict[str, dict[tuple, float]] = {"module": {}, "functional": {}}
    for r in records:
        if r["jaxnorm_us"]:
            key = (r["layer"], tuple(r["shape"]), r["dtype"], r["param_dtype"], r["pass"])
            by_api[r["api"]][key] = r["jaxnorm_us"]
    return {k: round(v / by_api["module"][k], 4) for k, v in by_api["functional"].items()
            if by_api["module"].get(k)}


def _cell(value: Any, digits: int = 1) -> str:
    """A table cell: numbers rounded, missing values as a dash."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(records: Sequence[dict[str, Any]]) -> str:
    """One row per case × dtype × pass (the module api, the functional beside it)."""
    header = ["layer", "shape", "dtype", "params", "pass", "jaxnorm µs", "functional µs",
              "Flax µs", "jaxnorm/Flax", "floor µs", "floor frac. jaxnorm", "floor frac. Flax",
              "kernels jaxnorm/Flax", "pallas µs", "torch eager µs", "torch.compile µs"]
    functional = {(r["layer"], tuple(r["shape"]), r["dtype"], r["param_dtype"], r["pass"]): r
                  for r in records if r["api"] == "functional"}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        if r["api"] != "module":
            continue
        f = functional.get((r["layer"], tuple(r["shape"]), r["dtype"], r["param_dtype"],
                            r["pass"]), {})
        counts = r["kernel_count"]
        cells = [r["layer"], "×".join(map(str, r["shape"])), r["dtype"], r["param_dtype"],
                 r["pass"], _cell(r["jaxnorm_us"]), _cell(f.get("jaxnorm_us")),
                 _cell(r["flax_us"]), _cell(r["ratio"], 3), _cell(r["floor_us"]),
                 _cell(r["jaxnorm_floor_fraction"], 2), _cell(r["flax_floor_fraction"], 2),
                 f"{counts.get('jaxnorm', '–')}/{counts.get('flax', '–')}",
                 _cell(f.get("jaxnorm_pallas_us")), _cell(r["torch_eager_us"]),
                 _cell(r["torch_compile_us"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(document: dict[str, Any]) -> str:
    """The Markdown report of a run."""
    env, records = document["environment"], document["records"]
    timing = {r["timing"] for r in records} or {"–"}
    cases = {(r["layer"], tuple(r["shape"]), r["dtype"], r["param_dtype"]) for r in records}
    parts = [
        f"# GPU benchmark: {env.get('device', '?')}, {env.get('date', '?')}", "",
        "`bash benchmarks/gpu_timing.sh` (`benchmarks/gpu_bench.py`). jax "
        f"{env.get('jax')}, flax {env.get('flax')}, jaxnorm {env.get('jaxnorm')}, torch "
        f"{env.get('torch', '–')}, Python {env.get('python')}; backend {env.get('backend')}.",
        "",
        f"Times: {', '.join(sorted(timing))} (device: the sum of the kernels on the GPU "
        f"streams per call, {TRACE_CALLS} calls traced); PyTorch: CUDA events over "
        f"{PIPELINE_CALLS} pipelined calls. Copy bandwidth (`2x + 1`, read + write): "
        f"{env.get('copy', {}).get('gbps')} GB/s. Floor: LayerNorm/RMSNorm 2 (forward) and 5 "
        "(forward+backward) passes of x, BatchNorm/GroupNorm/InstanceNorm 3 and 8, at that "
        "bandwidth; floor fraction = floor / time (1 = at the floor).", "",
        f"Cases timed: {len(cases)}, skipped (time budget): {len(document['skipped'])}, errors: "
        f"{len(document['errors']) + sum(bool(r['errors']) for r in records)}; "
        f"run took {env.get('seconds', '?')} s of a {env.get('budget_s', '?')} s budget.", "",
        summary(records), "",
        table(records), "",
    ]
    notes = document["notes"] + [f"error in {e['where']}: {e['error']}" for e in document["errors"]]
    if notes:
        parts += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# The driver


def device_name() -> str:
    """The GPU's name from ``nvidia-smi`` (``"cpu"`` without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0].strip() or "cpu"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "cpu"


def default_out(device: str, tiny: bool, now: datetime.datetime) -> Path:
    """``benchmarks/gpu/<device>-<date>[-tiny].json``; a second run the same day gets the
    time appended (every run's output is kept)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    slug = slug.removeprefix("nvidia-") or "device"
    stem = f"{slug}-{now:%Y-%m-%d}" + ("-tiny" if tiny else "")
    path = DEFAULT_OUT_DIR / f"{stem}.json"
    return path if not path.exists() else DEFAULT_OUT_DIR / f"{stem}-{now:%H%M%S}.json"


def part_command(part: str, args: argparse.Namespace, out: Path, deadline: float) -> list[str]:
    """The command line running one part in its own process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out),
               "--deadline", str(deadline), "--workers", str(args.workers)]
    command += ["--tiny"] if args.tiny else []
    command += ["--only", args.only] if args.only else []
    command += ["--max-cases", str(args.max_cases)] if args.max_cases else []
    command += ["--no-torch-compile"] if args.no_torch_compile else []
    return command


def run_part(part: str, args: argparse.Namespace, out: Path, deadline: float) -> None:
    """Runs a part in a child process, killed ``GRACE_SECONDS`` past its deadline (what it
    wrote stays); a failure is noted in the document, never raised."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE",
                                                           "false"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = part_command(part, args, out, deadline)
    print(f"== {part} part ({deadline - time.time():.0f} s): {shlex.join(command)}", flush=True)
    try:
        code = subprocess.run(command, env=env, timeout=max(5.0, deadline - time.time()
                                                            + GRACE_SECONDS)).returncode
        message = f"{part} part exited with {code}" if code else None
    except subprocess.TimeoutExpired:
        message = f"{part} part killed at its deadline (+{GRACE_SECONDS:.0f} s)"
    if message:
        print(message, flush=True)
        document = load(out)
        document["notes"].append(message)
        save(out, document)


def drive(args: argparse.Namespace) -> Path:
    """The whole run: the JAX part, the PyTorch part, the report."""
    start = time.time()
    now = datetime.datetime.now(datetime.UTC)
    device = device_name()
    out = Path(args.out) if args.out else default_out(device, args.tiny, now)
    document = load(out)
    document["environment"].update({
        "device": device, "date": now.strftime("%Y-%m-%d %H:%M UTC"), "budget_s": args.budget_s,
        "command": shlex.join(sys.argv), "host": platform.node(),
        "timing_method": "device time from jax.profiler traces; see the module docstring"})
    save(out, document)
    end = start + args.budget_s - REPORT_SECONDS
    jax_end = end if args.no_torch else start + JAX_SHARE * (end - start)
    run_part("jax", args, out, jax_end)
    if not args.no_torch:
        run_part("torch", args, out, end)
    document = load(out)
    document["environment"]["seconds"] = round(time.time() - start, 1)
    save(out, document)
    markdown = report(document)
    out.with_suffix(".md").write_text(markdown)
    print(markdown, flush=True)
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.time() - start:.0f} s", flush=True)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    parser.add_argument("--budget-s", type=float,
                        default=float(os.environ.get("BUDGET_S", "280")),
                        help="seconds the whole run may take (default: $BUDGET_S or 280)")
    parser.add_argument("--out", default=None, help="the JSON file (default: "
                        "benchmarks/gpu/<device>-<date>.json; the report gets .md)")
    parser.add_argument("--only", default=None, help="cases whose label contains this")
    parser.add_argument("--max-cases", type=int, default=None, help="the first N cases")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="PyTorch eager only")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads compiling XLA executables")
    parser.add_argument("--part", choices=("jax", "torch", "report"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the whole benchmark, or one part of it (``--part``, for the child processes)."""
    args = parse_args(argv)
    if args.part is None:
        drive(args)
        return
    settings = Settings(
        out=Path(args.out), deadline=args.deadline or time.time() + args.budget_s,
        tiny=args.tiny, only=args.only, max_cases=args.max_cases,
        torch_compile=not args.no_torch_compile, workers=args.workers)
    if args.part == "jax":
        jax_part(settings)
    elif args.part == "torch":
        torch_part(settings)
    else:
        document = load(settings.out)
        settings.out.with_suffix(".md").write_text(report(document))


if __name__ == "__main__":
    main()
