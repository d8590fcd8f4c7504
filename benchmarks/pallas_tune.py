"""Tile-setting sweep of the Pallas kernels on a GPU: which backend, tiles, warps and
program counts are fastest, measured, per case of the LayerNorm/RMSNorm and
GroupNorm/InstanceNorm sweep.

Usage (repository root on ``PYTHONPATH``, no installs)::

    python3 benchmarks/pallas_tune.py OUT.json              # on a GPU
    python3 benchmarks/pallas_tune.py OUT.json --tiny       # anywhere: small, interpreted

The kernels read their tile settings from module constants
(``jaxnorm._pallas_common.TILE_ELEMENTS``/``NUM_WARPS``,
``jaxnorm._pallas_layer_norm.MAX_PARTIAL_BLOCKS``/``BACKWARD_*``,
``jaxnorm._pallas_group_norm.TILE_ELEMENTS``/``MAX_BLOCK_ROWS``/``NUM_WARPS``/
``TARGET_PROGRAMS``; for the Mosaic GPU kernels, selected by
``jaxnorm._pallas_dispatch.BACKEND``, ``jaxnorm._pallas_mosaic_rows.PROGRAMS``/``STAGES``
and ``jaxnorm._pallas_mosaic_groups.TILE_ELEMENTS``/``PROGRAMS``/``STAGES``; a Mosaic
variant of a shape its kernels do not take is not run). For each case this script traces the forward and the
forward+backward once per variant of those constants (the constants are read while
tracing), compiles all of them in parallel threads, checks every variant's ``y`` and
gradients against the XLA path, and times every variant and the XLA path in one
``jax.profiler`` trace (device time: the sum of the call's GPU kernels), as
``benchmarks/pallas_check.py`` does. The JSON is rewritten after every case; cases past
``--budget`` seconds are skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import pallas_check as check

from jaxnorm import (
    _pallas_common,
    _pallas_dispatch,
    _pallas_group_norm,
    _pallas_layer_norm,
    _pallas_mosaic_groups,
    _pallas_mosaic_rows,
    _pallas_tuning,
)

ROW_VARIANTS = [
    {"tile": 4096}, {"tile": 8192}, {"tile": 16384},
    {"tile": 4096, "warps": 16}, {"tile": 8192, "warps": 16}, {"tile": 16384, "warps": 16},
    {"tile": 4096, "partials": 264}, {"tile": 8192, "warps": 16, "partials": 264},
    {"tile": 16384, "partials": 264},
]
"""Row-kernel variants: tile elements, warps (None: the default rule), backward programs."""

GROUP_VARIANTS = [
    {"tile": 4096, "rows": 16}, {"tile": 8192, "rows": 64}, {"tile": 16384, "rows": 128},
    {"tile": 32768, "rows": 256}, {"tile": 16384, "rows": 128, "warps": 16},
    {"tile": 16384, "rows": 128, "programs": 264}, {"tile": 8192, "rows": 64, "programs": 4096},
    {"tile": 32768, "rows": 256, "warps": 16, "programs": 528},
]
"""Group-kernel variants: tile elements, most rows a tile, warps, reducing programs."""

MOSAIC = "mosaic_gpu"
"""The ``backend`` of a Mosaic GPU variant (variants without one are Triton's)."""

MOSAIC_ROW_VARIANTS = [
    {"backend": MOSAIC}, {"backend": MOSAIC, "programs": 132},
    {"backend": MOSAIC, "programs": 264}, {"backend": MOSAIC, "programs": 1056},
    {"backend": MOSAIC, "stages": 4},
]
"""Mosaic GPU row-kernel variants: the planned settings (first), programs, stages."""

MOSAIC_GROUP_VARIANTS = [
    {"backend": MOSAIC}, {"backend": MOSAIC, "tile": 1024}, {"backend": MOSAIC, "tile": 4096},
    {"backend": MOSAIC, "programs": 16}, {"backend": MOSAIC, "stages": 4},
]
"""Mosaic GPU group-kernel variants: the defaults (first), tile, programs an example,
stages."""

BACKEND_OF = {None: "triton", MOSAIC: MOSAIC}
"""A variant's backend from its ``backend`` key."""


def variants_of(kind: str) -> list[dict[str, Any]]:
    """Every variant of ``kind``'s kernel: Triton's, then Mosaic GPU's."""
    if kind in ("layer_norm", "rms_norm"):
        return ROW_VARIANTS + MOSAIC_ROW_VARIANTS
    return GROUP_VARIANTS + MOSAIC_GROUP_VARIANTS


def mosaic_takes(kind: str, shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether the Mosaic GPU kernels take a case (the dispatcher would use Triton)."""
    if kind in ("layer_norm", "rms_norm"):
        return _pallas_mosaic_rows.takes(shape[-1], dtype)
    spatial = 1
    for size in shape[1:-1]:
        spatial *= size
    return _pallas_mosaic_groups.takes(spatial, shape[-1], dtype)


@contextlib.contextmanager
def settings(kind: str, variant: dict[str, int]) -> Iterator[None]:
    """Sets the kernels' tile constants to ``variant`` (None: the default) and empties the
    measured table for the duration, so that exactly ``variant`` is traced."""
    rows = kind in ("layer_norm", "rms_norm")
    if variant.get("backend") == MOSAIC and rows:
        targets = [(_pallas_mosaic_rows, "PROGRAMS", variant.get("programs")),
                   (_pallas_mosaic_rows, "STAGES", variant.get("stages"))]
    elif variant.get("backend") == MOSAIC:
        targets = [(_pallas_mosaic_groups, "TILE_ELEMENTS", variant.get("tile")),
                   (_pallas_mosaic_groups, "PROGRAMS", variant.get("programs")),
                   (_pallas_mosaic_groups, "STAGES", variant.get("stages"))]
    elif rows:
        targets = [(_pallas_common, "TILE_ELEMENTS", variant.get("tile")),
                   (_pallas_common, "NUM_WARPS", variant.get("warps")),
                   (_pallas_layer_norm, "MAX_PARTIAL_BLOCKS", variant.get("partials"))]
    else:
        targets = [(_pallas_group_norm, "TILE_ELEMENTS", variant.get("tile")),
                   (_pallas_group_norm, "MAX_BLOCK_ROWS", variant.get("rows")),
                   (_pallas_group_norm, "NUM_WARPS", variant.get("warps")),
                   (_pallas_group_norm, "TARGET_PROGRAMS", variant.get("programs"))]
    targets += [(_pallas_tuning, "TUNED", []), (_pallas_tuning, "PREFERRED_BACKEND", []),
                (_pallas_dispatch, "BACKEND", BACKEND_OF[variant.get("backend")])]
    saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
    try:
        for module, name, value in targets:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def lowered_pair(kind: str, groups: int, implementation: str, name: str,
                 args: tuple) -> dict[str, Any]:
    """``{name_fwd: lowered, name_fwdbwd: lowered}`` of the current settings."""
    norm = check._norm(kind, groups)

    def forward(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        return norm(x, scale, bias, eps=1e-5, implementation=implementation)

    def forward_backward(x: jax.Array, scale: jax.Array, bias: jax.Array,
                         dy: jax.Array) -> tuple[jax.Array, ...]:
        y, pullback = jax.vjp(forward, x, scale, bias)
        return (y, *pullback(dy))

    forward.__name__, forward_backward.__name__ = f"{name}_fwd", f"{name}_fwdbwd"
    return {f"{name}_fwd": jax.jit(forward).lower(*args[:3]),
            f"{name}_fwdbwd": jax.jit(forward_backward).lower(*args)}


def compiled_variants(kind: str, groups: int, args: tuple, variants: list[dict[str, int]]
                      ) -> dict[str, Callable]:
    """Every variant's and XLA's forward and forward+backward, compiled in parallel (a
    Mosaic GPU variant only where its kernels take the shape)."""
    lowered = lowered_pair(kind, groups, "xla", "tune_xla", args)
    taken = mosaic_takes(kind, args[0].shape, args[0].dtype)
    for index, variant in enumerate(variants):
        if variant.get("backend") == MOSAIC and not taken:
            continue
        with settings(kind, variant):
            try:
                lowered.update(lowered_pair(kind, groups, "pallas", f"tune_v{index}", args))
            except Exception as error:  # noqa: BLE001 - a variant that does not lower
                print(f"  variant {variant} does not lower: {type(error).__name__}: "
                      f"{str(error)[:200]}")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
        compiled = {}
        for name, future in futures.items():
            try:
                compiled[name] = future.result()
            except Exception as error:  # noqa: BLE001 - a variant that does not compile
                print(f"  {name} does not compile: {type(error).__name__}: {str(error)[:200]}")
        return compiled


def tune_case(kind: str, shape: tuple[int, ...], groups: int, dtype_name: str,
              variants: list[dict[str, int]], calls: int, repeats: int) -> dict[str, Any]:
    """One case: every variant checked against XLA and timed with it."""
    args = check._inputs(shape, check.DTYPES[dtype_name])
    compiled = compiled_variants(kind, groups, args, variants)
    reference = jax.block_until_ready(compiled["tune_xla_fwdbwd"](*args))
    record = {**check._record(kind, shape, groups, dtype_name), "variants": []}
    functions = {}
    for name, fn in compiled.items():
        functions[name] = (fn, args if name.endswith("fwdbwd") else args[:3])
    seconds, record["timing"] = check._times(functions, calls, repeats)
    record["xla_fwd_us"] = 1e6 * seconds["tune_xla_fwd"]
    record["xla_fwdbwd_us"] = 1e6 * seconds["tune_xla_fwdbwd"]
    taken = mosaic_takes(kind, shape, args[0].dtype)
    for index, variant in enumerate(variants):
        if f"tune_v{index}_fwd" not in seconds or f"tune_v{index}_fwdbwd" not in seconds:
            skipped = variant.get("backend") == MOSAIC and not taken
            error = "a shape the Mosaic GPU kernels do not take" if skipped else "did not compile"
            record["variants"].append({**variant, "ok": False, "error": error,
                                       "fwd_us": float("inf"), "fwdbwd_us": float("inf")})
            continue
        outputs = compiled[f"tune_v{index}_fwdbwd"](*args)
        errors = [check._relative_error(o, r) for o, r in zip(outputs, reference)]
        record["variants"].append({
            **variant, "fwd_us": 1e6 * seconds[f"tune_v{index}_fwd"],
            "fwdbwd_us": 1e6 * seconds[f"tune_v{index}_fwdbwd"],
            "max_error": max(errors), "ok": max(errors) <= check.TOLERANCE[dtype_name]})
    return record


def best_line(record: dict[str, Any]) -> str:
    """The case's XLA times and its best variant per pass."""
    head = f"{record['kind']:13} {'x'.join(map(str, record['shape'])):>16} {record['dtype']:8}"
    if "error" in record or "skipped" in record:
        return f"{head} {record.get('error') or record.get('skipped')}"
    good = [v for v in record["variants"] if v["ok"]] or record["variants"]
    cells = []
    for stage in ("fwd", "fwdbwd"):
        best = min(good, key=lambda v: v[f"{stage}_us"])
        xla = record[f"xla_{stage}_us"]
        setting = {k: v for k, v in best.items() if k in (*SETTING_KEYS, "backend")}
        cells.append(f"{stage}: xla {xla:8.1f} best {best[f'{stage}_us']:8.1f} "
                     f"({best[f'{stage}_us'] / xla:4.2f}) {setting}")
    bad = sum(not v["ok"] for v in record["variants"])
    return f"{head} {' | '.join(cells)}" + (f"  {bad} variants FAILED check" if bad else "")


SETTING_KEYS = ("tile", "warps", "partials", "rows", "programs", "stages")
"""The keys of a variant that are settings (the rest are its measurements)."""

MIN_GAIN = 0.03
"""A measured setting enters the table only when it beats the defaults by this fraction."""


def stage_time(variant: dict[str, Any], stage: str) -> float:
    """A variant's device time of ``stage``: the forward, or the backward as the
    forward+backward less the forward (separate kernels, summed by the profiler)."""
    if stage == "forward":
        return variant["fwd_us"]
    return variant["fwdbwd_us"] - variant["fwd_us"]


def case_keys(cases: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """The measured cases by ``(kernel, dtype, padded width)``."""
    keyed: dict[tuple, list[dict[str, Any]]] = {}
    for case in cases:
        if "variants" in case and any(v.get("ok") for v in case["variants"]):
            width = 1 << max(0, (case["shape"][-1] - 1).bit_length())
            keyed.setdefault((case["kind"], case["dtype"], width), []).append(case)
    return keyed


def best_variant(members: list[dict[str, Any]], stage: str, indices: list[int]) -> int:
    """Of the variants ``indices`` (the first: that backend's defaults), the one whose
    ``stage`` time relative to the defaults, summed over ``members``, is least; the
    defaults unless it gains :data:`MIN_GAIN`."""
    default = indices[0]

    def cost(index: int) -> float:
        # a backward time (forward+backward less forward) may round to 0 on tiny cases
        return sum(stage_time(m["variants"][index], stage)
                   / max(stage_time(m["variants"][default], stage), 1e-3)
                   if m["variants"][index].get("ok") else float("inf") for m in members)

    best = min(indices, key=cost)
    return best if cost(best) <= (1 - MIN_GAIN) * cost(default) else default


def backend_indices(members: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The variant indices of each backend whose defaults passed on every member."""
    backends: dict[str, list[int]] = {}
    for index, variant in enumerate(members[0]["variants"]):
        backends.setdefault(BACKEND_OF[variant.get("backend")], []).append(index)
    return {backend: indices for backend, indices in backends.items()
            if all(m["variants"][indices[0]].get("ok") for m in members)}


def table_entries(cases: list[dict[str, Any]]) -> tuple[list[dict], list[dict], list[dict]]:
    """``(TUNED, MEASURED_FASTER, PREFERRED_BACKEND)`` of the run, per kernel, dtype and
    padded width, for each backend measured (Mosaic GPU's under ``"mosaic_<kernel>"``):
    the best setting per stage (when not that backend's defaults); whether that tuned
    kernel beat XLA by :data:`MIN_GAIN` in both passes on every member case; and the
    backend whose tuned kernel took less forward+backward time relative to XLA, summed
    over the members, among those that beat XLA where any did. A backend counts for a key
    only where its defaults passed on every member case (Mosaic GPU: where its kernels
    took every shape of the key)."""
    tuned, faster, preferred = [], [], []
    for (kernel, dtype, width), members in sorted(case_keys(cases).items()):
        totals = {}
        for backend, indices in backend_indices(members).items():
            name = f"mosaic_{kernel}" if backend == MOSAIC else kernel
            chosen = {stage: best_variant(members, stage, indices)
                      for stage in ("forward", "backward")}
            for stage, index in chosen.items():
                if index != indices[0]:
                    setting = {k: v for k, v in members[0]["variants"][index].items()
                               if k in SETTING_KEYS}
                    tuned.append({"kernel": name, "dtype": dtype, "width": width,
                                  "stage": stage, "settings": setting})
            wins, totals[backend] = [], 0.0
            for m in members:
                fwd = stage_time(m["variants"][chosen["forward"]], "forward")
                bwd = stage_time(m["variants"][chosen["backward"]], "backward")
                wins.append(fwd <= (1 - MIN_GAIN) * m["xla_fwd_us"]
                            and fwd + bwd <= (1 - MIN_GAIN) * m["xla_fwdbwd_us"])
                totals[backend] += (fwd + bwd) / m["xla_fwdbwd_us"]
            faster.append({"kernel": name, "dtype": dtype, "width": width, "pallas": all(wins)})
        if totals:  # among the backends that beat XLA, if any: automatic selection uses it
            winners = {b for b, f in zip(totals, faster[-len(totals):]) if f["pallas"]}
            choices = {b: t for b, t in totals.items() if b in winners} or totals
            preferred.append({"kernel": kernel, "dtype": dtype, "width": width,
                              "backend": min(choices, key=choices.get)})
    return tuned, faster, preferred


def _python(entry: dict[str, Any]) -> str:
    """``entry`` as a Python dict literal (strings double-quoted)."""
    items = (f"{json.dumps(k)}: {json.dumps(v) if isinstance(v, str) else repr(v)}"
             for k, v in entry.items())
    return "{" + ", ".join(items) + "}"


def _literal(name: str, entries: list[dict]) -> str:
    """``name: list[dict] = [...]``, one entry a line or two (settings on the second)."""
    if not entries:
        return f"{name}: list[dict] = []\n"
    lines = []
    for entry in entries:
        head = _python({k: v for k, v in entry.items() if k != "settings"})
        if "settings" in entry:
            head = f"{head[:-1]},\n     \"settings\": {_python(entry['settings'])}}}"
        lines.append(f"    {head}")
    body = ",\n".join(lines)
    return f"{name}: list[dict] = [\n{body},\n]\n"


def write_table(path: pathlib.Path, cases: list[dict[str, Any]], measured_on: str) -> None:
    """Rewrites ``MEASURED_ON``, ``TUNED``, ``MEASURED_FASTER`` and ``PREFERRED_BACKEND``
    in the table module at
    ``path`` (each assignment up to its docstring)."""
    tuned, faster, preferred = table_entries(cases)
    text = path.read_text()
    replacements = {"MEASURED_ON": f"MEASURED_ON = {json.dumps(measured_on)}\n",
                    "TUNED": _literal("TUNED", tuned),
                    "MEASURED_FASTER": _literal("MEASURED_FASTER", faster),
                    "PREFERRED_BACKEND": _literal("PREFERRED_BACKEND", preferred)}
    for name, assignment in replacements.items():
        start = text.index(f"\n{name}") + 1
        end = text.index('\n"""', start) + 1
        text = text[:start] + assignment + text[end:]
    path.write_text(text)


def interleaved(cases: list[tuple]) -> list[tuple]:
    """The row-kernel and group-kernel cases taken in turn, so that a budget cut leaves out
    the largest shapes of both rather than one kernel family."""
    rows = [c for c in cases if c[0] in ("layer_norm", "rms_norm")]
    groups = [c for c in cases if c[0] not in ("layer_norm", "rms_norm")]
    ordered = []
    while rows or groups:
        ordered += rows[:2] + groups[:1]
        rows, groups = rows[2:], groups[1:]
    return ordered


def main(argv: list[str] | None = None) -> int:
    """Runs every case; writes the JSON and prints each case's best variants."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budget", type=float, default=200.0)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=None, help="kinds to run")
    parser.add_argument("--write-table", type=pathlib.Path, default=None,
                        help="regenerate this jaxnorm/_pallas_tuning.py from the run")
    options = parser.parse_args(argv)
    cases = interleaved(check.TINY if options.tiny else check.SWEEP)
    calls, repeats = (2, 1) if options.tiny else (options.calls, 3)
    results: dict[str, Any] = {"environment": check._environment(), "cases": []}
    out, start = pathlib.Path(options.out), time.perf_counter()
    for kind, shape, groups in cases:
        for dtype_name in check.DTYPES:
            if options.only and kind not in options.only:
                continue
            variants = variants_of(kind)
            if time.perf_counter() - start > options.budget:
                record = {**check._record(kind, shape, groups, dtype_name),
                          "skipped": "time budget"}
            else:
                try:
                    record = tune_case(kind, shape, groups, dtype_name, variants, calls,
                                       repeats)
                except Exception as error:  # noqa: BLE001 - one failure must not stop the rest
                    record = {**check._record(kind, shape, groups, dtype_name),
                              "error": f"{type(error).__name__}: {str(error)[:400]}",
                              "traceback": traceback.format_exc()[-2000:]}
            results["cases"].append(record)
            print(best_line(record), flush=True)
            results["seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    if options.write_table is not None:
        environment = results["environment"]
        measured_on = (f"{environment['device']}, JAX {environment['jax']}, "
                       f"{time.strftime('%Y-%m-%d')}: python3 benchmarks/pallas_tune.py")
        write_table(options.write_table, results["cases"], measured_on)
        print(f"rewrote {options.write_table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
