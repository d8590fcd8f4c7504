"""Smoke test of ``benchmarks/run.py`` on tiny shapes: every layer's jaxnorm and Flax
functions agree, and the timing, bandwidth, JSON and memory plumbing produce the records
``benchmarks/RESULTS.md`` is written from. No assertion on timings."""

from __future__ import annotations

import importlib.util
import json
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
