"""The measured tile settings of the Pallas kernels (``jaxnorm._pallas_tuning``): lookup by
nearest width, the settings reaching the kernels without changing their values, and the
tuning script's table (``benchmarks/pallas_tune.py``) written and read back."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import _pallas_group_norm, _pallas_layer_norm, _pallas_tuning

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(kernel, dtype, width, stage, **settings):
    return {"kernel": kernel, "dtype": dtype, "width": width, "stage": stage,
            "settings": settings}


def test_tuned_settings_take_the_nearest_width(monkeypatch) -> None:
    monkeypatch.setattr(_pallas_tuning, "TUNED", [
        _entry("layer_norm", "float32", 1024, "forward", tile=8192),
        _entry("layer_norm", "float32", 8192, "forward", tile=16384, warps=16),
        _entry("layer_norm", "float32", 1024, "backward", partials=264),
    ])
    lookup = _pallas_tuning.tuned_settings
    assert lookup("layer_norm", "float32", 2048, "forward") == {"tile": 8192}
    assert lookup("layer_norm", "float32", 4096, "forward") == {"tile": 16384, "warps": 16}
    assert lookup("layer_norm", "float32", 65536, "backward") == {"partials": 264}
    assert lookup("layer_norm", "bfloat16", 1024, "forward") == {}
    assert lookup("rms_norm", "float32", 1024, "forward") == {}


def test_measured_faster_only_near_a_measured_width(monkeypatch) -> None:
    monkeypatch.setattr(_pallas_tuning, "MEASURED_FASTER", [
        {"kernel": "rms_norm", "dtype": "bfloat16", "width": 4096, "pallas": True},
        {"kernel": "rms_norm", "dtype": "bfloat16", "width": 1024, "pallas": False},
    ])
    faster = _pallas_tuning.measured_faster
    assert faster("rms_norm", "bfloat16", 4096)
    assert faster("rms_norm", "bfloat16", 8192)
    assert not faster("rms_norm", "bfloat16", 32768)  # more than twice the measured width
    assert not faster("rms_norm", "bfloat16", 1024)
    assert not faster("rms_norm", "float32", 4096)
    assert not faster("layer_norm", "bfloat16", 4096)


def _row_results(x, scale, bias, dy, implementation):
    def norm(*args):
        return jaxnorm.layer_norm(*args, eps=1e-5, implementation=implementation)

    y, pullback = jax.vjp(norm, x, scale, bias)
    return (y, *pullback(dy))


def test_tuned_row_settings_reach_the_kernels_and_keep_values(monkeypatch) -> None:
    monkeypatch.setattr(_pallas_tuning, "TUNED", [
        _entry("layer_norm", "float32", 16, "forward", tile=64, warps=2),
        _entry("layer_norm", "float32", 16, "backward", tile=32, partials=3),
    ])
    config = _pallas_layer_norm.RowNormConfig(
        1e-5, True, jnp.float32, _pallas_layer_norm.make_tiling(37, 13))
    forward = _pallas_layer_norm._stage_tiling(
        config, _pallas_layer_norm._tuned(config, jnp.float32, "forward"))
    backward = _pallas_layer_norm._tuned(config, jnp.float32, "backward")
    assert (forward.block_rows, forward.num_warps) == (4, 2)
    assert backward == {"tile": 32, "partials": 3}
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (37, 13)) + 3
    scale, bias = 1 + jax.random.normal(keys[1], (13,)), jax.random.normal(keys[2], (13,))
    dy = jax.random.normal(keys[3], (37, 13))
    for ours, theirs in zip(_row_results(x, scale, bias, dy, "pallas"),
                            _row_results(x, scale, bias, dy, "xla")):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5)


def test_tuned_group_settings_reach_the_kernels_and_keep_values(monkeypatch) -> None:
    monkeypatch.setattr(_pallas_tuning, "TUNED", [
        _entry("group_norm", "float32", 8, "forward", tile=64, rows=8, programs=3),
        _entry("group_norm", "float32", 8, "backward", tile=16, rows=2, programs=5),
    ])
    base = _pallas_group_norm.GroupNormConfig(
        1e-5, jnp.float32, _pallas_group_norm.make_group_tiling(2, 30, 6, 2))
    forward = _pallas_group_norm.stage_config(base, jnp.float32, "forward").tiling
    backward = _pallas_group_norm.stage_config(base, jnp.float32, "backward").tiling
    assert (forward.tile.block_rows, forward.programs) == (8, 2)  # 3 programs over 2 examples
    assert (backward.tile.block_rows, backward.programs) == (2, 3)
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (2, 5, 6, 6)) * 3 + 7
    scale, bias = 1 + jax.random.normal(keys[1], (6,)), jax.random.normal(keys[2], (6,))
    dy = jax.random.normal(keys[3], x.shape)

    def results(implementation):
        def norm(*args):
            return jaxnorm.group_norm(*args, num_groups=2, eps=1e-5,
                                      implementation=implementation)

        y, pullback = jax.vjp(norm, x, scale, bias)
        return (y, *pullback(dy))

    for ours, theirs in zip(results("pallas"), results("xla")):
        np.testing.assert_allclose(ours, theirs, rtol=5e-5, atol=5e-5)


def _case(kind, width, xla, variants):
    """A synthetic tuning record: ``variants`` as ``(fwd_us, fwdbwd_us)``."""
    records = [{"tile": 4096 * 2**i, "fwd_us": f, "fwdbwd_us": b, "ok": True}
               for i, (f, b) in enumerate(variants)]
    return {"kind": kind, "shape": [64, width], "dtype": "float32",
            "xla_fwd_us": xla[0], "xla_fwdbwd_us": xla[1], "variants": records}


def test_tuning_table_entries_and_round_trip(tmp_path: pathlib.Path) -> None:
    tune = _load("pallas_tune", BENCHMARKS / "pallas_tune.py")
    cases = [
        # forward best: variant 1; backward (fwdbwd - fwd) best: variant 2; beats XLA
        _case("layer_norm", 3000, (100.0, 300.0), [(90, 290), (80, 280), (95, 245)]),
        # no variant gains 3 %: the defaults, slower than XLA
        _case("rms_norm", 768, (50.0, 150.0), [(60, 200), (59, 199), (61, 201)]),
    ]
    tuned, faster, preferred = tune.table_entries(cases)
    assert tuned == [_entry("layer_norm", "float32", 4096, "forward", tile=8192),
                     _entry("layer_norm", "float32", 4096, "backward", tile=16384)]
    assert faster == [
        {"kernel": "layer_norm", "dtype": "float32", "width": 4096, "pallas": True},
        {"kernel": "rms_norm", "dtype": "float32", "width": 1024, "pallas": False}]
    assert preferred == [
        {"kernel": "layer_norm", "dtype": "float32", "width": 4096, "backend": "triton"},
        {"kernel": "rms_norm", "dtype": "float32", "width": 1024, "backend": "triton"}]
    path = tmp_path / "table.py"
    shutil.copy(pathlib.Path(_pallas_tuning.__file__), path)
    tune.write_table(path, cases, "a test run")
    table = _load("table", path)
    assert table.MEASURED_ON == "a test run"
    assert table.TUNED == tuned and table.MEASURED_FASTER == faster
    assert table.PREFERRED_BACKEND == preferred
    assert table.preferred_backend("layer_norm", "float32", 4096) == "triton"
    assert table.preferred_backend("layer_norm", "float32", 256) is None
    assert table.tuned_settings("layer_norm", "float32", 4096, "backward") == {"tile": 16384}
    assert table.measured_faster("layer_norm", "float32", 4096)
    assert not table.measured_faster("rms_norm", "float32", 768)
    tune.write_table(path, [], "empty")  # and back to no entries
    table = _load("table", path)
    assert table.TUNED == [] and table.MEASURED_FASTER == [] and table.MEASURED_ON == "empty"
    assert table.PREFERRED_BACKEND == []


def test_tuning_table_chooses_the_faster_backend() -> None:
    tune = _load("pallas_tune", BENCHMARKS / "pallas_tune.py")
    # Triton variants (tiles), then Mosaic GPU variants (defaults, 264 programs)
    case = _case("layer_norm", 4096, (100.0, 300.0), [(90, 290), (80, 280)])
    case["variants"] += [
        {"backend": "mosaic_gpu", "fwd_us": 70.0, "fwdbwd_us": 230.0, "ok": True},
        {"backend": "mosaic_gpu", "programs": 264, "fwd_us": 60.0, "fwdbwd_us": 250.0,
         "ok": True}]
    # a group case the Mosaic kernels did not take: Triton alone
    group = _case("group_norm", 320, (50.0, 150.0), [(60, 200), (40, 140)])
    group["variants"].append({"backend": "mosaic_gpu", "ok": False, "error": "not taken",
                              "fwd_us": float("inf"), "fwdbwd_us": float("inf")})
    # Triton is faster in total but slower than XLA forward; Mosaic GPU beats XLA: Mosaic
    rms = _case("rms_norm", 1024, (50.0, 150.0), [(55, 120)])
    rms["variants"].append({"backend": "mosaic_gpu", "fwd_us": 45.0, "fwdbwd_us": 140.0,
                            "ok": True})
    assert tune.table_entries([rms])[2] == [
        {"kernel": "rms_norm", "dtype": "float32", "width": 1024, "backend": "mosaic_gpu"}]
    tuned, faster, preferred = tune.table_entries([case, group])
    assert tuned == [
        _entry("group_norm", "float32", 512, "forward", tile=8192),
        _entry("group_norm", "float32", 512, "backward", tile=8192),
        _entry("layer_norm", "float32", 4096, "forward", tile=8192),
        _entry("mosaic_layer_norm", "float32", 4096, "forward", programs=264)]
    assert faster == [
        {"kernel": "group_norm", "dtype": "float32", "width": 512, "pallas": True},
        {"kernel": "layer_norm", "dtype": "float32", "width": 4096, "pallas": True},
        {"kernel": "mosaic_layer_norm", "dtype": "float32", "width": 4096, "pallas": True}]
    # per stage best, Triton: forward 80 (tile 8192) + backward 200 = 280 of XLA's 300;
    # Mosaic GPU: forward 60 (264 programs) + backward 160 (defaults) = 220: preferred
    assert preferred == [
        {"kernel": "group_norm", "dtype": "float32", "width": 512, "backend": "triton"},
        {"kernel": "layer_norm", "dtype": "float32", "width": 4096, "backend": "mosaic_gpu"}]


@pytest.mark.slow
def test_tune_script_cpu_path(tmp_path: pathlib.Path) -> None:
    """``benchmarks/pallas_tune.py --tiny`` times every variant interpreted and checks it."""
    tune = _load("pallas_tune", BENCHMARKS / "pallas_tune.py")
    out = tmp_path / "tune.json"
    assert tune.main([str(out), "--tiny", "--only", "rms_norm", "--calls", "1"]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 2 and all("variants" in case for case in cases)
    triton = [v for case in cases for v in case["variants"] if "backend" not in v]
    mosaic = [v for case in cases for v in case["variants"] if "backend" in v]
    assert triton and all(v["ok"] for v in triton)
    # 130 features: not a row the Mosaic GPU kernels take; their variants are not run
    assert len(mosaic) == 2 * len(tune.MOSAIC_ROW_VARIANTS)
    assert all(not v["ok"] and "do not take" in v["error"] for v in mosaic)


def test_mosaic_settings_come_from_the_table_and_the_tuning_overrides(monkeypatch) -> None:
    from jaxnorm import _pallas_dispatch, _pallas_mosaic_groups, _pallas_mosaic_rows

    monkeypatch.setattr(_pallas_tuning, "TUNED", [
        _entry("mosaic_layer_norm", "bfloat16", 4096, "backward", programs=5, stages=3),
        _entry("mosaic_group_norm", "float32", 512, "forward", tile=2048, programs=7),
    ])
    rows = _pallas_mosaic_rows.MosaicRowConfig(1e-5, True, jnp.float32, 1000, 4096, False)
    assert _pallas_mosaic_rows._settings(rows, jnp.bfloat16, "backward") == (5, 3)
    assert _pallas_mosaic_rows._settings(rows, jnp.float32, "backward") != (5, 3)
    groups = _pallas_mosaic_groups.MosaicGroupConfig(1e-5, jnp.float32, 2, 64, 320, 32, False)
    staged = _pallas_mosaic_groups.stage_config(groups, jnp.float32, "forward")
    assert (staged.tile_elements, staged.target_programs, staged.rows) == (2048, 7, 4)
    # the backward's default: tiles of at most 1024 values (2 rows of 320 channels)
    assert _pallas_mosaic_groups.stage_config(groups, jnp.float32, "backward").rows == 2
    # the tuning script's variants set (and restore) the Mosaic constants and the backend
    tune = _load("pallas_tune", BENCHMARKS / "pallas_tune.py")
    with tune.settings("rms_norm", {"backend": "mosaic_gpu", "programs": 9, "stages": 2}):
        assert _pallas_dispatch.BACKEND == "mosaic_gpu"
        assert (_pallas_mosaic_rows.PROGRAMS, _pallas_mosaic_rows.STAGES) == (9, 2)
        assert _pallas_tuning.TUNED == [] and _pallas_tuning.PREFERRED_BACKEND == []
        assert _pallas_mosaic_rows._settings(rows, jnp.float32, "forward") == (9, 2)
    with tune.settings("group_norm", {"backend": "mosaic_gpu", "tile": 4096}):
        assert _pallas_mosaic_groups.TILE_ELEMENTS == 4096
    with tune.settings("group_norm", {"tile": 8192}):
        assert _pallas_dispatch.BACKEND == "triton"
    assert _pallas_dispatch.BACKEND is None and _pallas_mosaic_rows.PROGRAMS is None
    assert _pallas_mosaic_groups.TILE_ELEMENTS is None and len(_pallas_tuning.TUNED) == 2
