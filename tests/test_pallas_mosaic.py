"""The Mosaic GPU kernels (LayerNorm/RMSNorm rows, GroupNorm/InstanceNorm tiles), in Mosaic
GPU interpret mode off a GPU: values and gradients against float64 references and the XLA
path, work spread over fewer programs than rows or tiles (several pipeline steps, a ragged
last step), mixed dtypes, exact bias for constant rows and sets, accuracy far from zero,
the planned settings, and how the dispatcher chooses the backend. Shapes are small: the
interpreter simulates every thread."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import _pallas_dispatch, _pallas_mosaic_groups, _pallas_mosaic_rows, _pallas_tuning
from jaxnorm._implementation import KernelCase
from jaxnorm._pallas_mosaic_groups import MosaicGroupConfig, mosaic_group_norm_rows
from jaxnorm._pallas_mosaic_rows import MosaicRowConfig, mosaic_row_norm
from tests import reference

pytestmark = pytest.mark.skipif(
    _pallas_mosaic_rows.plgpu is None or _pallas_mosaic_rows.InterpretGPUParams is None
    or not _pallas_mosaic_rows.available(),
    reason="this JAX lacks Mosaic GPU or its interpret mode, or the GPU predates Hopper")

EPS = 1e-5


def _reference(x, scale, bias, dy, centered: bool):
    """float64 ``(y, dx, dscale, dbias)`` of a row normalization over the last axis (the
    hand-derived formulas of ``tests/reference.py``)."""
    x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
    if centered:
        return (reference.layer_norm(x, scale, bias, eps=EPS),
                *reference.layer_norm_vjp(dy, x, scale, bias, eps=EPS))
    dx, dscale = reference.rms_norm_vjp(dy, x, scale, eps=EPS)
    return reference.rms_norm(x, scale, eps=EPS) + bias, dx, dscale, dy.sum(0)


def _inputs(rows: int, features: int, dtype, param_dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = (jax.random.normal(keys[0], (rows, features)) * 2 + 1).astype(dtype)
    scale = (1 + 0.5 * jax.random.normal(keys[1], (features,))).astype(param_dtype)
    bias = jax.random.normal(keys[2], (features,)).astype(param_dtype)
    out_dtype = jnp.promote_types(dtype, param_dtype)
    dy = jax.random.normal(keys[3], (rows, features)).astype(out_dtype)
    return x, scale, bias, dy


def _value_and_grads(config: MosaicRowConfig, x, scale, bias, dy):
    y, pullback = jax.vjp(lambda *a: mosaic_row_norm(*a, config), x, scale, bias)
    return (y, *pullback(dy))


@pytest.fixture
def three_programs(monkeypatch):
    """Every kernel runs 3 programs, so that 10 rows take 4 pipeline steps, the last one
    ragged (a row past the end is read again and never stored)."""
    monkeypatch.setattr(_pallas_mosaic_rows, "PROGRAMS", 3)


@pytest.mark.parametrize("centered,rows,features,dtype,param_dtype,tol", [
    (True, 10, 256, jnp.float32, jnp.float32, 2e-6),
    (False, 10, 384, jnp.float32, jnp.float32, 2e-6),
    (True, 7, 640, jnp.bfloat16, jnp.float32, 1e-2),
    (False, 5, 512, jnp.bfloat16, jnp.bfloat16, 2e-2),
])
def test_values_and_gradients_match_float64(three_programs, centered, rows, features, dtype,
                                            param_dtype, tol) -> None:
    inputs = _inputs(rows, features, dtype, param_dtype)
    out_dtype = jnp.promote_types(dtype, param_dtype)
    config = MosaicRowConfig(EPS, centered, out_dtype, rows, features, interpret=True)
    ours = _value_and_grads(config, *inputs)
    for value, expected_dtype in zip(ours, (out_dtype, dtype, param_dtype, param_dtype)):
        assert value.dtype == expected_dtype
    for value, exact in zip(ours, _reference(*inputs, centered=centered)):
        value = np.asarray(value, np.float64)
        np.testing.assert_allclose(value, exact, rtol=tol, atol=tol * max(1.0, np.abs(exact).max()))


def test_constant_rows_give_exactly_bias_and_far_rows_stay_accurate(three_programs) -> None:
    features = 256
    bias = jnp.linspace(-2.0, 2.0, features)
    scale = jnp.full((features,), 1.5)
    rows = jnp.stack([jnp.full((features,), c) for c in (0.0, 3.25, -1e4, 12345.678)])
    config = MosaicRowConfig(EPS, True, jnp.float32, 4, features, interpret=True)
    np.testing.assert_array_equal(mosaic_row_norm(rows, scale, bias, config),
                                  np.broadcast_to(bias, rows.shape))
    # far from zero: mean 1e4, spread 1 - the shift by the first element keeps the variance
    x = 1e4 + jax.random.normal(jax.random.key(3), (4, features))
    y = mosaic_row_norm(x, scale, bias, config)
    exact = _reference(x, scale, bias, np.zeros(x.shape), centered=True)[0]
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, atol=2e-3)


def test_the_dispatcher_runs_mosaic_where_asked_and_triton_for_other_widths(
        monkeypatch, three_programs) -> None:
    calls: list[str] = []
    kernel = _pallas_dispatch.mosaic_row_norm
    monkeypatch.setattr(_pallas_dispatch, "mosaic_row_norm",
                        lambda *a: calls.append("mosaic") or kernel(*a))
    monkeypatch.setenv("JAXNORM_PALLAS_BACKEND", "mosaic_gpu")
    x = jax.random.normal(jax.random.key(0), (2, 3, 256)) * 3 + 2
    scale, bias = jnp.linspace(0.5, 1.5, 256), jnp.linspace(-1.0, 1.0, 256)

    def loss(implementation, x, scale, bias):
        return jnp.sum(jnp.sin(jaxnorm.layer_norm(x, scale, bias, implementation=implementation)))

    ours = jax.value_and_grad(loss, argnums=(1, 2, 3))("pallas", x, scale, bias)
    xla = jax.value_and_grad(loss, argnums=(1, 2, 3))("xla", x, scale, bias)
    assert calls == ["mosaic"]
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5)
    for a, b in zip(ours[1], xla[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # shapes the Mosaic kernels do not take go to the Triton kernel
    takes = _pallas_mosaic_rows.takes
    assert not takes(1000, jnp.float32) and not takes(16384, jnp.float32)
    assert takes(256, jnp.float32) and takes(8192, jnp.bfloat16)
    case = KernelCase("row", "float32", True, 256, 6)
    assert _pallas_dispatch.kernel_backend(case, takes(1000, jnp.float32)) == "triton"
    assert _pallas_dispatch.kernel_backend(case, takes(256, jnp.float32)) == "mosaic_gpu"
    monkeypatch.setenv("JAXNORM_PALLAS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="JAXNORM_PALLAS_BACKEND.*'cuda'"):
        jaxnorm.rms_norm(x, implementation="pallas")
    with pytest.raises(ValueError, match="JAXNORM_PALLAS_BACKEND.*'cuda'"):
        jaxnorm.rms_norm(x)  # automatic selection too: a bad name is not silently ignored
    monkeypatch.delenv("JAXNORM_PALLAS_BACKEND")
    monkeypatch.setattr(_pallas_tuning, "PREFERRED_BACKEND", [])
    assert _pallas_dispatch.kernel_backend(case, True) == "triton"
    # without a choice, on a GPU, the backend measured faster near the case's width
    monkeypatch.setattr(_pallas_tuning, "PREFERRED_BACKEND", [
        {"kernel": "layer_norm", "dtype": "float32", "width": 512, "backend": "mosaic_gpu"}])
    assert _pallas_dispatch.kernel_backend(case, True) == "triton"  # interpreted: Triton
    monkeypatch.setattr(_pallas_dispatch, "interpret_mode", lambda: False)
    assert _pallas_dispatch.kernel_backend(case, True) == "mosaic_gpu"
    assert _pallas_dispatch.kernel_backend(case, False) == "triton"
    far = dataclasses.replace(case, features=4096)
    assert _pallas_dispatch.kernel_backend(far, True) == "triton"
    rms = dataclasses.replace(case, centered=False)
    assert _pallas_dispatch.kernel_backend(rms, True) == "triton"
    monkeypatch.setattr(_pallas_dispatch, "BACKEND", "triton")
    assert _pallas_dispatch.kernel_backend(case, True) == "triton"


def test_rms_norm_module_under_vmap_and_jit(monkeypatch, three_programs) -> None:
    monkeypatch.setattr(_pallas_dispatch, "BACKEND", "mosaic_gpu")
    x = jax.random.normal(jax.random.key(1), (2, 5, 128), jnp.bfloat16)
    scale = jnp.linspace(0.5, 1.5, 128)

    @jax.jit
    def per_example(x, scale):
        return jax.vmap(lambda row: jaxnorm.rms_norm(row, scale, implementation="pallas"))(x)

    np.testing.assert_allclose(np.asarray(per_example(x, scale), np.float32),
                               np.asarray(jaxnorm.rms_norm(x, scale, implementation="xla"),
                                          np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("stage", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_planned_settings_fit_an_sm(monkeypatch, stage: str, dtype) -> None:
    # Hopper: 227 KiB of shared memory a block, 64K registers an SM. The plan must fit one
    # program's parameters (and backward accumulators) and its pipelined row copies.
    monkeypatch.setattr(_pallas_mosaic_rows, "streaming_multiprocessors", lambda: 132)
    monkeypatch.setattr(_pallas_tuning, "TUNED", [])
    for features in range(128, _pallas_mosaic_rows.MAX_FEATURES + 1, 128):
        config = MosaicRowConfig(EPS, True, dtype, 100_000, features, interpret=False)
        programs, stages = _pallas_mosaic_rows._settings(config, dtype, stage)
        fixed = features * 4 * (3 if stage == "backward" else 2)
        rows = features * (jnp.dtype(dtype).itemsize + (4 if stage == "backward" else 0))
        assert 2 <= stages <= 4, (features, stages)
        assert fixed + stages * rows <= 227 * 1024, (features, stages)
        assert 132 <= programs <= 8 * 132, (features, programs)
    # a measured (or forced) deeper pipeline is capped to what fits
    monkeypatch.setattr(_pallas_tuning, "TUNED", [
        {"kernel": "mosaic_layer_norm", "dtype": jnp.dtype(dtype).name, "width": 1024,
         "stage": stage, "settings": {"stages": 4}}])
    config = MosaicRowConfig(EPS, True, dtype, 100_000, 8192, interpret=False)
    _, stages = _pallas_mosaic_rows._settings(config, dtype, stage)
    fixed = 8192 * 4 * (3 if stage == "backward" else 2)
    rows = 8192 * (jnp.dtype(dtype).itemsize + (4 if stage == "backward" else 0))
    assert 1 <= stages and fixed + stages * rows <= 227 * 1024, stages


def _group_reference(x, scale, bias, dy, batch: int, groups: int):
    """float64 ``(y, dx, dscale, dbias)`` of GroupNorm of ``(B S, C)`` rows
    (``tests/reference.py``)."""
    x, scale, bias, dy = (np.asarray(a, np.float64).reshape(batch, -1, x.shape[-1])
                          if a.ndim == 2 else np.asarray(a, np.float64)
                          for a in (x, scale, bias, dy))
    y = reference.group_norm(x, scale, bias, num_groups=groups, eps=EPS)
    dx, dscale, dbias = reference.group_norm_vjp(dy, x, scale, bias, num_groups=groups, eps=EPS)
    return y.reshape(-1, x.shape[-1]), dx.reshape(-1, x.shape[-1]), dscale, dbias


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of at most 640 values and 2 programs an example: several steps each."""
    monkeypatch.setattr(_pallas_mosaic_groups, "TILE_ELEMENTS", 640)
    monkeypatch.setattr(_pallas_mosaic_groups, "PROGRAMS", 2)


@pytest.mark.parametrize("batch,spatial,channels,groups,dtype,tile,tol", [
    (2, 16, 64, 8, jnp.float32, 320, 2e-6),     # GroupNorm: 4 tiles an example
    (2, 6, 320, 32, jnp.float32, 640, 2e-6),    # 320 channels (64 lanes), 3 tiles: ragged
    (3, 32, 32, 32, jnp.bfloat16, 320, 1e-2),   # InstanceNorm, bfloat16
])
def test_group_values_and_gradients_match_float64(monkeypatch, small_tiles, batch, spatial,
                                                  channels, groups, dtype, tile, tol) -> None:
    monkeypatch.setattr(_pallas_mosaic_groups, "TILE_ELEMENTS", tile)
    keys = jax.random.split(jax.random.key(4), 4)
    x = (jax.random.normal(keys[0], (batch * spatial, channels)) * 2 + 3).astype(dtype)
    scale = 1 + 0.3 * jax.random.normal(keys[1], (channels,))
    bias = jax.random.normal(keys[2], (channels,))
    dy = jax.random.normal(keys[3], x.shape)
    config = MosaicGroupConfig(EPS, jnp.float32, batch, spatial, channels, groups, True)
    staged = _pallas_mosaic_groups.stage_config(config, dtype, "forward")
    assert staged.tiles > 1 and staged.steps > 1
    y, pullback = jax.vjp(lambda *a: mosaic_group_norm_rows(*a, config), x, scale, bias)
    ours = (y, *pullback(dy))
    for value, exact in zip(ours, _group_reference(x, scale, bias, dy, batch, groups)):
        value = np.asarray(value, np.float64)
        np.testing.assert_allclose(value, exact, rtol=tol, atol=tol * max(1.0, np.abs(exact).max()))


def test_group_constant_sets_give_exactly_bias_through_the_dispatcher(
        monkeypatch, small_tiles) -> None:
    monkeypatch.setattr(_pallas_dispatch, "BACKEND", "mosaic_gpu")
    calls: list[str] = []
    kernel = _pallas_dispatch.mosaic_group_norm_rows
    monkeypatch.setattr(_pallas_dispatch, "mosaic_group_norm_rows",
                        lambda *a: calls.append("mosaic") or kernel(*a))
    # two examples, 4 groups: constant sets (one far from zero), and a set of mean 1e4
    values = jnp.asarray([3.25, -1e4, 12345.678, 0.5], jnp.float32)
    x = jnp.broadcast_to(jnp.repeat(values, 8), (2, 4, 4, 32))
    x = x.at[1, ..., 24:].add(jax.random.normal(jax.random.key(5), (4, 4, 8)))
    scale, bias = jnp.full((32,), 1.5), jnp.linspace(-2.0, 2.0, 32)
    y = jaxnorm.group_norm(x, scale, bias, num_groups=4, implementation="pallas")
    assert calls == ["mosaic"]
    np.testing.assert_array_equal(y[0], np.broadcast_to(bias, (4, 4, 32)))
    np.testing.assert_array_equal(y[1, ..., :24], np.broadcast_to(bias[:24], (4, 4, 24)))
    xla = jaxnorm.group_norm(x, scale, bias, num_groups=4, implementation="xla")
    np.testing.assert_allclose(y, xla, atol=1e-4)
    # InstanceNorm (a group per channel) takes the same kernel
    np.testing.assert_allclose(
        jaxnorm.instance_norm(x, scale, bias, implementation="pallas"),
        jaxnorm.instance_norm(x, scale, bias, implementation="xla"), atol=1e-4)
    assert calls == ["mosaic", "mosaic"]
    # shapes the Mosaic kernels do not take: 2-byte rows, odd spatial sizes
    assert not _pallas_mosaic_groups.takes(16, 4, jnp.bfloat16)
    assert not _pallas_mosaic_groups.takes(49, 64, jnp.float32)
    assert _pallas_mosaic_groups.takes(64 * 64, 320, jnp.bfloat16)


def test_no_races_between_copies_and_compute(monkeypatch, three_programs, small_tiles) -> None:
    # Mosaic GPU interpret mode's happens-before race detector (it simulates a warpgroup as
    # one thread: it checks the pipelined copies against the shared-memory accesses, not
    # the warps of a warpgroup against each other), after each kernel: the detector's
    # state lives for one kernel call.
    gpu_callbacks = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks")
    params = _pallas_mosaic_rows.InterpretGPUParams(detect_races=True)
    for module in (_pallas_mosaic_rows, _pallas_mosaic_groups):
        monkeypatch.setattr(module, "InterpretGPUParams", lambda: params)
    monkeypatch.setattr(_pallas_mosaic_groups, "TILE_ELEMENTS", 256)

    def race_free(value) -> None:
        jax.block_until_ready(value)
        assert not gpu_callbacks.get_races().races_found

    x = jax.random.normal(jax.random.key(6), (10, 256))
    config = MosaicRowConfig(EPS, True, jnp.float32, 10, 256, interpret=True)
    race_free(_pallas_mosaic_rows._forward(x, jnp.ones(256), jnp.zeros(256), config))
    race_free(_pallas_mosaic_rows._backward(x, jnp.ones(256), x, config))
    x = jax.random.normal(jax.random.key(7), (32, 64))
    config = MosaicGroupConfig(EPS, jnp.float32, 2, 16, 64, 8, interpret=True, tile_elements=256,
                               target_programs=2)
    vectors = [jnp.ones((2, 64)), jnp.zeros((2, 64)), jnp.ones((2, 64))]
    groups = _pallas_mosaic_groups
    for step, streamed, count, accumulators, out in (
            (groups._moments_step, [x], 1, 2, None),
            (groups._normalize_step, [x], 4, 0, jnp.float32),
            (groups._sums_step, [x, x], 3, 2, None),
            (groups._dx_step, [x, x], 5, 0, jnp.float32)):
        vector_tiles = (vectors * 2)[:count]
        race_free(groups._elementwise_kernel(config, step, streamed, vector_tiles,
                                             accumulators, out))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_planned_group_tiles_fit_an_sm(dtype) -> None:
    # Hopper: 227 KiB of shared memory a block. The heaviest kernel of each stage must fit:
    # normalize (4 vector tiles) forward; dx (5 vector tiles, x and dy streamed) backward.
    itemsize = jnp.dtype(dtype).itemsize
    for channels in (8, 16, 32, 64, 96, 128, 320, 640, 1280, 1920, 2560, 4096):
        for spatial in (1, 7, 49, 64, 3136, 4096, 65536):
            if not _pallas_mosaic_groups.takes(spatial, channels, dtype):
                continue
            config = MosaicGroupConfig(EPS, dtype, 8, spatial, channels, 32, interpret=False)
            for stage, vectors, streamed in (("forward", 4, itemsize),
                                              ("backward", 5, itemsize + 4)):
                staged = _pallas_mosaic_groups.stage_config(config, dtype, stage)
                tile = staged.rows * channels
                assert tile % 128 == 0 and staged.tile_shape[0] <= 256, (channels, spatial)
                smem = 4 * vectors * tile + staged.stages * streamed * tile
                assert smem <= 227 * 1024, (channels, spatial, stage, smem)
    # the sweep's shapes are all taken
    for spatial, channels in ((4096, 320), (1024, 640), (256, 1280), (64, 1280),
                              (65536, 32), (16384, 64), (4096, 128)):
        assert _pallas_mosaic_groups.takes(spatial, channels, dtype)


def test_mosaic_kernels_need_hopper_on_a_gpu(monkeypatch) -> None:
    # on a GPU (no interpret mode) the kernels are offered only from compute capability 9.0
    class Device:
        def __init__(self, capability):
            self.compute_capability = capability

    monkeypatch.setattr(_pallas_mosaic_rows, "interpret_mode", lambda: False)
    for capability, expected in (("8.0", False), ("8.9", False), ("9.0", True),
                                 ("10.0", True), (None, False)):
        monkeypatch.setattr(jax, "devices", lambda c=capability: [Device(c)])
        assert _pallas_mosaic_rows.available() is expected, capability
        assert _pallas_mosaic_rows.takes(256, jnp.float32) is expected
        assert _pallas_mosaic_groups.takes(64, 64, jnp.float32) is expected
