"""Smoke test of ``benchmarks/run.py`` on tiny shapes: every layer's jaxnorm and Flax
functions agree, and the timing, bandwidth, JSON and memory plumbing produce the records
``benchmarks/RESULTS.md`` is written from. No assertion on timings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

RUN_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_run"] = module
    spec.loader.exec_module(module)
    return module


TINY_SHAPES = {
    "LayerNorm": (6, 8),
    "RMSNorm": (6, 8),
    "BatchNorm": (4, 3, 3, 8),
    "GroupNorm": (2, 3, 3, 64),
    "InstanceNorm": (2, 3, 3, 8),
}


@pytest.mark.parametrize("layer_name", sorted(TINY_SHAPES))
def test_benchmarked_jaxnorm_layer_computes_what_the_flax_layer_computes(run, layer_name):
    layer = run.LAYERS[layer_name]
    x, params, dy = run.make_inputs(layer, TINY_SHAPES[layer_name], np.float32)
    ours = run.forward_and_backward(_tuple_output(run.jaxnorm_output(layer)), bool(layer.mutable))
    theirs = run.forward_and_backward(_tuple_output(run.flax_output(layer)), bool(layer.mutable))
    (y, dx, dparams, _), (flax_y, flax_dx, flax_dparams, _) = (
        jax.jit(ours)(x, params, dy),
        jax.jit(theirs)(x, params, dy),
    )
    np.testing.assert_allclose(y, flax_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, flax_dx, rtol=1e-3, atol=1e-3)
    for name in layer.param_names:
        np.testing.assert_allclose(dparams[name], flax_dparams[name], rtol=1e-3, atol=1e-3)


def _tuple_output(apply):
    """Flax's mutable apply returns a pair; ``jax.vjp(..., has_aux=True)`` wants a tuple."""

    def wrapped(x, params):
        out = apply(x, params)
        return tuple(out) if isinstance(out, (tuple, list)) else out

    return wrapped


def test_minimal_bytes_counts_two_and_three_passes_forward(run):
    layer_norm, batch_norm = run.LAYERS["LayerNorm"], run.LAYERS["BatchNorm"]
    assert run.minimal_bytes(layer_norm, (10, 4), np.float32, "forward") == 2 * 40 * 4
    assert run.minimal_bytes(batch_norm, (10, 4), np.float32, "forward") == 3 * 40 * 4
    assert run.minimal_bytes(layer_norm, (10, 4), "bfloat16", "forward+backward") == 5 * 40 * 2


def test_main_writes_one_record_per_case_dtype_and_pass(run, tmp_path):
    path = tmp_path / "results.json"
    result = run.main(
        [
            "--shapes",
            "BatchNorm:4x3x3x8",
            "--seconds",
            "0.01",
            "--min-repeats",
            "3",
            "--dtypes",
            "float32",
            "--no-memory",
            "--no-weight-norms",
            "--json",
            str(path),
        ]
    )
    written = json.loads(path.read_text())
    assert written["records"] == result["records"]
    keys = {(r["layer"], tuple(r["shape"]), r["dtype"], r["pass"]) for r in written["records"]}
    assert keys == {
        (layer, shape, dtype, pass_name)
        for layer, shape in (("BatchNorm", (4, 3, 3, 8)),)
        for dtype in ("float32",)
        for pass_name in ("forward", "forward+backward")
    }
    for record in written["records"]:
        assert {"jaxnorm_ms", "flax_ms", "ratio"} <= set(record)
        assert record["jaxnorm_ms"] > 0 and record["flax_ms"] > 0 and record["ratio"] > 0
    assert written["summary"]["max_ratio"] == max(r["ratio"] for r in written["records"])


def test_json_flag_without_a_file_writes_the_default_file(run, tmp_path, monkeypatch):
    default = tmp_path / "default.json"
    monkeypatch.setattr(run, "DEFAULT_JSON", default)
    run.main(
        ["--shapes", "RMSNorm:8x16", "--dtypes", "float32", "--seconds", "0.01"]
        + ["--min-repeats", "2", "--no-memory", "--no-weight-norms", "--json"]
    )
    assert [r["layer"] for r in json.loads(default.read_text())["records"]] == ["RMSNorm"] * 2


def test_resnet_training_step_memory_is_reported_for_both_batch_norms(run):
    import flax.linen as nn

    import jaxnorm.linen

    ours = run.training_step_memory(jaxnorm.linen.BatchNorm, (), 2, 8, np.float32)
    theirs = run.training_step_memory(nn.BatchNorm, (), 2, 8, np.float32)
    for memory in (ours, theirs):
        assert memory["argument_bytes"] > 0 and memory["output_bytes"] > 0


def test_weight_norm_comparison_times_both_wrappers_and_both_passes(run):
    records = run.weight_norm_comparison(quick=True, seconds=0.05)
    assert [(r["layer"].split("(")[0], r["pass"]) for r in records] == [
        ("WeightNorm", "forward"), ("WeightNorm", "forward+backward"),
        ("SpectralNorm", "forward"), ("SpectralNorm", "forward+backward"),
    ]
    assert all(r["jaxnorm_ms"] > 0 and r["flax_ms"] > 0 and r["ratio"] > 0 for r in records)
    assert "| WeightNorm(Dense 1024) | 256×1024 | forward |" in run.format_weight_norms(records)


# --------------------------------------------------------------------------------------
# The shared sweep (benchmarks/sweep.py) and the GPU benchmark (benchmarks/gpu_bench.py)

BENCHMARKS = RUN_PATH.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep():
    return _load("sweep")


@pytest.fixture(scope="module")
def gpu_bench():
    return _load("gpu_bench")


def test_sweep_holds_the_real_model_shapes(sweep):
    shapes = {(case.layer, case.shape) for case in sweep.SWEEP}
    resnet = [(112, 64), (56, 64), (56, 256), (28, 128), (28, 512), (14, 256), (14, 1024),
              (7, 512), (7, 2048)]
    expected = {("BatchNorm", (64, s, s, c)) for s, c in resnet}
    expected |= {("GroupNorm", (8, s, s, c)) for s, c in ((64, 320), (32, 640), (16, 1280),
                                                          (8, 1280))}
    expected |= {("InstanceNorm", (8, s, s, c)) for s, c in ((256, 32), (128, 64), (64, 128))}
    expected |= {(layer, (8192, width)) for layer in ("LayerNorm", "RMSNorm")
                 for width in (2048, 4096, 5120, 8192)}
    expected |= {(layer, (50176, 768)) for layer in ("LayerNorm", "RMSNorm")}
    assert expected <= shapes
    three_d = [c for c in sweep.SWEEP if len(c.shape) == 3]
    assert any(c.param_dtype == "input" for c in three_d)
    assert any(c.param_dtype == "float32" for c in three_d)


def test_sweep_pairs_every_case_with_both_dtypes_without_repeats(sweep):
    pairs = list(sweep.with_dtypes(sweep.SWEEP))
    keys = [(c.layer, c.shape, d, c.param_dtype_for(d)) for c, d in pairs]
    assert len(keys) == len(set(keys))
    assert {d for _, d in pairs} == {"float32", "bfloat16"}
    assert ("LayerNorm", (8, 1024, 4096), "bfloat16", "bfloat16") in keys
    assert sorted(map(str, sweep.interleaved(sweep.SWEEP))) == sorted(map(str, sweep.SWEEP))


def test_cpu_quick_cases_are_sweep_cases_scaled_down(run, sweep):
    assert run.QUICK_CASES == tuple((c.layer, c.shape) for c in sweep.cpu_subset())
    sweep_cases = {(c.layer, c.shape[1:]): c.shape[0] for c in sweep.SWEEP}
    for layer, shape in run.QUICK_CASES:
        full_leading = sweep_cases[(layer, shape[1:])]
        assert full_leading % shape[0] == 0
        assert np.prod(shape) <= sweep.CPU_MAX_ELEMENTS
    assert {layer for layer, _ in run.QUICK_CASES} == set(sweep.LAYERS)
    as_keys = lambda cases: [(c.layer, c.shape, c.param_dtype) for c in cases]  # noqa: E731
    assert as_keys(run.FULL_CASES) == as_keys(sweep.SWEEP)


def test_run_says_its_timings_are_cpu_host_wall_clock(run):
    assert "CPU-only" in run.__doc__ and "wall-clock" in run.__doc__
    assert "CPU-only" in run.environment()["timing"]


def test_gpu_kernels_are_attributed_to_the_jitted_function_that_ran_them(gpu_bench):
    events = [
        ("Stream #14(Compute)", "fusion_2", 1000.0, "jit_flax__fwd"),
        ("Stream #14(Compute)", "fusion_2", 3000.0, "jit_flax__fwd"),
        ("Stream #14(Compute)", "loop_reduce", 500.0, "jit_jaxnorm_module__fwdbwd"),
        ("Stream #14(Compute)", "memcpy", 7.0, ""),
    ]
    names = ["flax__fwd", "jaxnorm_module__fwd", "jaxnorm_module__fwdbwd"]
    grouped, unclaimed = gpu_bench.kernels_by_owner(events, names)
    assert unclaimed == 7.0
    assert [(k.name, k.count, k.nanoseconds) for k in grouped["flax__fwd"]] == [
        ("fusion_2", 2, 4000.0)]
    assert grouped["jaxnorm_module__fwd"] == []
    assert [k.name for k in grouped["jaxnorm_module__fwdbwd"]] == ["loop_reduce"]
    everything, none_left = gpu_bench.kernels_by_owner(events, ["flax__fwd"], "flax__fwd")
    assert none_left == 0 and sum(k.count for k in everything["flax__fwd"]) == 4


def test_gpu_bench_tiny_writes_the_records_and_the_report(tmp_path):
    out = tmp_path / "tiny.json"
    command = [sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--tiny", "--max-cases", "2",
               "--no-torch-compile", "--budget-s", "150", "--workers", "2", "--out", str(out)]
    subprocess.run(command, check=True, timeout=240, capture_output=True)
    document = json.loads(out.read_text())
    records = document["records"]
    assert {(r["dtype"], r["pass"], r["api"]) for r in records} == {
        (d, p, a) for d in ("float32", "bfloat16") for p in ("forward", "forward+backward")
        for a in ("module", "functional")}
    required = {"layer", "shape", "dtype", "pass", "api", "jaxnorm_us", "flax_us",
                "torch_eager_us", "torch_compile_us", "floor_us", "kernels"}
    for record in records:
        assert required <= set(record)
        assert record["jaxnorm_us"] > 0 and record["flax_us"] > 0 and record["floor_us"] > 0
        assert record["ratio"] > 0 and record["errors"] == {}
        assert record["timing"].startswith("wall")  # a CPU trace has no GPU plane
    assert document["environment"]["copy"]["gbps"] > 0
    assert document["errors"] == [] and document["skipped"] == []
    if importlib.util.find_spec("torch") is not None:
        assert all(r["torch_eager_us"] > 0 for r in records)
    markdown = out.with_suffix(".md").read_text()
    assert "jaxnorm/Flax geomean" in markdown and records[0]["layer"] in markdown


SYNTHETIC_HLO = """HloModule jit_case, is_scheduled=true

%fused_sub (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %n = f32[4,8]{1,0} negate(f32[4,8]{1,0} %p0)
}

ENTRY %main.9 (x: f32[4,8]) -> (f32[32], f32[8]) {
  %x = f32[4,8]{1,0} parameter(0)
  %sub = f32[4,8]{1,0} fusion(f32[4,8]{1,0} %x), kind=kLoop, calls=%fused_sub
  %red = f32[8]{0} fusion(f32[4,8]{1,0} %sub), kind=kInput, calls=%fused_sub
  %multi = (f32[4,8]{1,0}, f32[4,8]{1,0}) fusion(%x, %red), kind=kLoop, calls=%fused_sub
  %gte = f32[4,8]{1,0} get-tuple-element((f32[4,8]{1,0}, f32[4,8]{1,0}) %multi), index=0
  %bc = f32[32]{0} bitcast(f32[4,8]{1,0} %gte)
  ROOT %out = (f32[32]{0}, f32[8]{0}) tuple(f32[32]{0} %bc, f32[8]{0} %red)
}
"""


def test_structural_check_finds_the_x_sized_writes_the_graph_does_not_return():
    accelerators = _load("accelerators")
    found = accelerators.x_sized_intermediates(SYNTHETIC_HLO, 32)
    assert [(w["instruction"], w["array"], w["bytes"]) for w in found] == [
        ("sub", "f32[4,8]", 128), ("multi{1}", "f32[4,8]", 128)]
    assert accelerators.x_sized_intermediates(SYNTHETIC_HLO, 33) == []


def test_structural_passes_count_every_x_sized_read_and_write():
    accelerators = _load("accelerators")
    # sub: reads x, writes sub (2); red: reads sub (1); multi: reads x, writes two (3)
    assert accelerators.x_sized_passes(SYNTHETIC_HLO, 32) == 6


@pytest.mark.parametrize("with_modules", [True, False])
def test_gpu_bench_device_path_turns_trace_events_into_per_implementation_times(
        gpu_bench, sweep, tmp_path, monkeypatch, with_modules):
    """The GPU-only path, fed fake GPU stream events: each implementation's device time is
    its kernels' sum per call; without hlo_module stats each gets a trace of its own."""
    traced = []

    def fake_trace(calls, repeats):
        traced.append(sorted(calls))
        return [("Stream #7(Compute)", f"fusion_{i}", 1000.0 * (i + 1),
                 f"jit_{name}" if with_modules else "")
                for name in calls for _ in range(repeats) for i in range(2)]

    monkeypatch.setattr(gpu_bench, "trace_events", fake_trace)
    settings = gpu_bench.Settings(out=tmp_path / "x.json", deadline=1e12, workers=2)
    case = sweep.tiny(sweep.find("BatchNorm", (64, 7, 7, 512)))
    records = gpu_bench.time_case(case, "float32", 100.0, settings)
    assert len(records) == 4 and len(traced) == (1 if with_modules else 7)
    for record in records:
        assert record["timing"] == "device"
        assert record["jaxnorm_us"] == record["flax_us"] == 3.0 and record["ratio"] == 1.0
        assert record["kernel_count"] == {"jaxnorm": 2, "flax": 2}
        assert [k["name"] for k in record["kernels"]["flax"]] == ["fusion_1", "fusion_0"]
        assert record["jaxnorm_floor_fraction"] == round(record["floor_us"] / 3.0, 4)
