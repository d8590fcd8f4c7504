r"""Mosaic GPU kernels of LayerNorm and RMSNorm over the trailing axes (Hopper and later).

The same computation as the Triton row kernels of :mod:`jaxnorm._pallas_layer_norm`, per
row of :math:`N` features in float32,

.. math::
    p = x_0,\quad s = x - p,\quad c = s - \tfrac1N\textstyle\sum s,\quad
    r = (\tfrac1N\textstyle\sum c^2 + \epsilon)^{-1/2},\quad \hat x = c\,r,\quad
    y = \hat x\gamma + \beta

(RMSNorm: :math:`c = x`), and a backward that reads ``x`` and :math:`\bar y` once and
writes :math:`\bar x = r\,(g - \tfrac1N\sum g - \hat x\,\tfrac1N\sum g\hat x)`,
:math:`g = \bar y\gamma`, with each program's float32 partial sums of :math:`\bar y\hat x`
and :math:`\bar y` over its rows, which a small XLA reduction adds into
:math:`\bar\gamma`, :math:`\bar\beta`.

**Arrangement.** ``x`` is viewed as ``(R, N / 128, 128)`` so that one TMA copy (at most
256 elements along each dimension) brings a whole row into shared memory. A program is
one warpgroup (128 threads); program :math:`p` of :math:`P` takes rows
:math:`p, p + P, \dots`, their copies pipelined ``stages`` deep
(:func:`jax.experimental.pallas.mosaic_gpu.emit_pipeline`). The row sits in registers in
a strided layout (each thread ``vector`` consecutive elements every :math:`128 \cdot`
``vector``), its sums are warpgroup reductions, and ``y`` (or :math:`\bar x`) is stored
from registers straight to global memory. :math:`\gamma`, :math:`\beta` are copied into
shared memory once per program; the backward's partial sums accumulate there.

The kernels take rows of :math:`128 k` features up to :data:`MAX_FEATURES`; other rows
go to the Triton kernels (:mod:`jaxnorm._pallas_dispatch` chooses). Off a GPU they run in
Mosaic GPU interpret mode (each warpgroup simulated as one thread, with its shared memory,
copies and barriers), which is how the test suite checks their values; the register
layouts and the barriers between a warpgroup's warps exist only in the compiled kernel. Their device time is unmeasured: no GPU was available when
they were written; ``benchmarks/mosaic_lowering.py`` compiles them for an H200 without
one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxnorm._pallas_common import interpret_mode, with_partial_sums_backward
from jaxnorm._pallas_tuning import tuned_settings

try:  # Mosaic GPU (JAX 0.5+)
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - a JAX without Mosaic GPU
    plgpu = None

try:  # its interpret mode (JAX 0.10+), which runs the kernels on a CPU
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover - moved or absent: off a GPU the kernels are not used
    InterpretGPUParams = None

Array = jax.Array

LANES = 128
"""Threads of a warpgroup, and the minor dimension of the TMA view of a row."""

MAX_FEATURES = 8192
"""The longest row a warpgroup holds in registers (64 float32 values a thread)."""

STREAMING_MULTIPROCESSORS = 132
"""SMs of an H100/H200, where the device does not say (``core_count``)."""

REGISTER_FILE = 65536
"""32-bit registers of an SM (Hopper)."""

SHARED_MEMORY = 200 * 1024
"""Shared memory of an SM the kernels plan with (Hopper has 228 KiB)."""

BLOCK_SHARED_MEMORY = 227 * 1024
"""The most shared memory one block may take on Hopper."""

PROGRAMS: int | None = None
"""Overrides the programs of every kernel (tests and ``benchmarks/pallas_tune.py``)."""

STAGES: int | None = None
"""Overrides the pipelined row copies of every kernel."""

@dataclasses.dataclass(frozen=True)
class MosaicRowConfig:
    r"""The static settings of one Mosaic GPU row normalization.

    Args:
      eps: :math:`\epsilon` added to the variance (mean square).
      centered: subtract the mean (LayerNorm); False: RMSNorm.
      dtype: the dtype of ``y``.
      rows: :math:`R`.
      features: :math:`N`, a multiple of :data:`LANES`.
      interpret: run in Mosaic GPU interpret mode (off a GPU).
    """

    eps: float
    centered: bool
    dtype: Any
    rows: int
    features: int
    interpret: bool

    @property
    def blocks(self) -> int:
        """:math:`N / 128`: the rows of a row's ``(N / 128, 128)`` view."""
        return self.features // LANES

    @property
    def vector(self) -> int:
        """Consecutive elements a thread holds: 4, 2 or 1, whichever divides the row."""
        return next(v for v in (4, 2, 1) if self.features % (LANES * v) == 0)


def available() -> bool:
    """True where this JAX can run the kernels here: Mosaic GPU, and on a GPU one of
    compute capability 9.0 or later (Hopper: TMA, warpgroups), off a GPU its interpret
    mode."""
    if plgpu is None:
        return False
    if interpret_mode():
        return InterpretGPUParams is not None
    return _compute_capability() >= (9, 0)


def _compute_capability() -> tuple[int, int]:
    """``(major, minor)`` of the default GPU; ``(0, 0)`` where it does not say."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major, minor = str(capability).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def takes(features: int, dtype: Any, out_dtype: Any = None) -> bool:
    """Whether the Mosaic GPU kernels take rows of ``features`` values of ``dtype``, whose
    normalization (and gradient, in the backward) is ``out_dtype`` (None: ``dtype``)."""
    dtypes = (dtype, dtype if out_dtype is None else out_dtype)
    return (available() and features % LANES == 0 and LANES <= features <= MAX_FEATURES
            and all(jnp.dtype(d).itemsize in (2, 4) for d in dtypes))


def streaming_multiprocessors() -> int:
    """SMs of the default device (:data:`STREAMING_MULTIPROCESSORS` off a GPU)."""
    device = jax.devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return count or STREAMING_MULTIPROCESSORS


def _settings(config: MosaicRowConfig, dtype: Any, stage: str) -> tuple[int, int]:
    r"""``(programs, stages)`` of a kernel over ``config``'s rows of ``dtype``: measured
    (:mod:`jaxnorm._pallas_tuning`), else planned for an SM: as many warpgroups as their
    registers allow (a thread holds :math:`N/128` float32 values of each live row array,
    about 3 forward and 5 backward; ``ptxas`` reports 40 to 255 registers for :math:`N` =
    768 to 8192) and their shared memory (the parameters, the backward's accumulators and
    two pipelined copies of the rows), then as many pipelined copies, 2 to 4, as fit. No
    setting takes more than :data:`BLOCK_SHARED_MEMORY`: the stages are capped."""
    kernel = "mosaic_layer_norm" if config.centered else "mosaic_rms_norm"
    width = 1 << max(0, (config.features - 1).bit_length())
    tuned = tuned_settings(kernel, jnp.dtype(dtype).name, width, stage)
    backward = stage == "backward"
    registers = min(255, 32 + (5 if backward else 3) * config.features // LANES)
    fixed = config.features * 4 * (3 if backward else 2)
    row_bytes = config.features * (jnp.dtype(dtype).itemsize + (4 if backward else 0))
    per_sm = max(1, min(8, REGISTER_FILE // (LANES * registers),
                        SHARED_MEMORY // (fixed + 2 * row_bytes)))
    programs = PROGRAMS or tuned.get("programs") or per_sm * streaming_multiprocessors()
    programs = min(config.rows, programs)
    planned = max(2, min(4, (SHARED_MEMORY // per_sm - fixed) // row_bytes))
    fitting = max(1, (BLOCK_SHARED_MEMORY - fixed) // row_bytes)
    stages = min(STAGES or tuned.get("stages") or planned, fitting)
    return programs, min(stages, pl.cdiv(config.rows, programs))


def _in_layout(value: Array, config: MosaicRowConfig) -> Array:
    """``value`` (a row's ``(N / 128, 128)`` view) in the strided register layout every
    row value of a kernel shares (interpret mode has no layouts)."""
    if config.interpret:
        return value
    layout = plgpu.Layout.WG_STRIDED((config.blocks, LANES), vec_size=config.vector)
    return plgpu.layout_cast(value, layout)


def _load(ref: Any, config: MosaicRowConfig) -> Array:
    """A row's ``(N / 128, 128)`` view from shared memory, float32, in the shared layout."""
    return _in_layout(ref[...], config).astype(jnp.float32)


def _standardize(x: Array, x_ref: Any, config: MosaicRowConfig) -> tuple[Array, Array]:
    r"""``(x_hat, r)`` of one row ``x`` (float32, loaded from ``x_ref``): shifted by its
    first element, two-pass (:math:`c = x` without centring)."""
    features = config.features
    if config.centered:
        shifted = x - x_ref[0, 0].astype(jnp.float32)
        x = shifted - jnp.sum(shifted) / features
    rstd = lax.rsqrt(jnp.sum(x * x) / features + config.eps)
    return x * rstd, rstd


def _row_spec(config: MosaicRowConfig, program: Array, programs: int) -> Any:
    """The pipeline's block of step :math:`k`: row :math:`p + kP`, the last row past the
    end (read again, never stored: no out-of-bounds copy)."""
    return pl.BlockSpec(
        (None, config.blocks, LANES),
        lambda k: (jnp.minimum(program + k * programs, config.rows - 1), 0, 0),
    )


def _stage_parameters(pairs: tuple[tuple[Any, Any], ...], config: MosaicRowConfig) -> None:
    """Copies each ``(global, shared)`` pair of ``(N / 128, 128)`` parameters into shared
    memory, in the shared layout (each thread later reads what it wrote); every thread is
    done with the staging copy before its memory is reused (:func:`release_slots`)."""
    def copy(_: Any, *staged: Any) -> None:
        for ref, (_, shared) in zip(staged, pairs):
            shared[...] = _in_layout(ref[...], config)
        release_slots()

    spec = pl.BlockSpec((config.blocks, LANES), lambda i: (0, 0))
    plgpu.emit_pipeline(copy, grid=(1,), in_specs=[spec] * len(pairs))(
        *(global_ref for global_ref, _ in pairs))


def release_slots() -> None:
    """Ends a pipeline step: every thread of the warpgroup is done reading the step's
    shared-memory slots (a fence and a warpgroup barrier), so the copy the pipeline issues
    next into a slot cannot overwrite values a lagging warp still reads."""
    plgpu.commit_smem()


def _kernel(body: Any, out_type: Any, programs: int, config: MosaicRowConfig) -> Any:
    """``body`` as a Mosaic GPU kernel of ``programs`` warpgroups (interpreted off a GPU)."""
    return plgpu.kernel(
        body, out_type=out_type, grid=(programs,), grid_names=("programs",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=InterpretGPUParams() if config.interpret else None,
    )


def _view(array: Array, config: MosaicRowConfig) -> Array:
    """``(R, N)`` or ``(N,)`` viewed with rows of ``(N / 128, 128)``."""
    return array.reshape(*array.shape[:-1], config.blocks, LANES)


def _forward(x: Array, scale: Array, bias: Array, config: MosaicRowConfig) -> Array:
    """``y`` of the ``(R, N)`` rows."""
    programs, stages = _settings(config, x.dtype, "forward")
    steps = pl.cdiv(config.rows, programs)

    def body(x_gmem: Any, scale_gmem: Any, bias_gmem: Any, y_gmem: Any) -> None:
        program = lax.axis_index("programs")

        def scoped(scale_smem: Any, bias_smem: Any) -> None:
            _stage_parameters(((scale_gmem, scale_smem), (bias_gmem, bias_smem)), config)

            def step(indices: tuple[Array, ...], x_smem: Any) -> None:
                row = program + indices[0] * programs
                x_hat, _ = _standardize(_load(x_smem, config), x_smem, config)
                y = x_hat * _load(scale_smem, config) + _load(bias_smem, config)

                @pl.when(row < config.rows)
                def _store() -> None:
                    y_gmem[row] = y.astype(y_gmem.dtype)

                release_slots()

            plgpu.emit_pipeline(step, grid=(steps,), in_specs=[_row_spec(config, program, programs)],
                                max_concurrent_steps=stages)(x_gmem)

        pl.run_scoped(scoped, plgpu.SMEM((config.blocks, LANES), scale.dtype),
                      plgpu.SMEM((config.blocks, LANES), bias.dtype))

    out_type = jax.ShapeDtypeStruct((config.rows, config.blocks, LANES), config.dtype)
    y = _kernel(body, out_type, programs, config)(
        _view(x, config), _view(scale, config), _view(bias, config))
    return y.reshape(config.rows, config.features)


def _backward(x: Array, scale: Array, dy: Array, config: MosaicRowConfig
              ) -> tuple[Array, Array, Array]:
    """``(dx, dscale_partials, dbias_partials)``: the partials ``(programs, N)`` float32."""
    programs, stages = _settings(config, x.dtype, "backward")
    steps = pl.cdiv(config.rows, programs)
    row_shape = (config.blocks, LANES)

    def body(x_gmem: Any, scale_gmem: Any, dy_gmem: Any, dx_gmem: Any, dscale_gmem: Any,
             dbias_gmem: Any) -> None:
        program = lax.axis_index("programs")

        def scoped(scale_smem: Any, dscale_smem: Any, dbias_smem: Any) -> None:
            _stage_parameters(((scale_gmem, scale_smem),), config)
            zeros = _in_layout(jnp.zeros(row_shape, jnp.float32), config)
            dscale_smem[...] = zeros
            dbias_smem[...] = zeros

            def step(indices: tuple[Array, ...], x_smem: Any, dy_smem: Any) -> None:
                row = program + indices[0] * programs
                x_hat, rstd = _standardize(_load(x_smem, config), x_smem, config)
                dy = _load(dy_smem, config)
                g = dy * _load(scale_smem, config)
                dx = g - x_hat * (jnp.sum(g * x_hat) / config.features)
                if config.centered:
                    dx = dx - jnp.sum(g) / config.features

                @pl.when(row < config.rows)
                def _store() -> None:
                    dx_gmem[row] = (dx * rstd).astype(dx_gmem.dtype)
                    dscale_smem[...] = _load(dscale_smem, config) + dy * x_hat
                    dbias_smem[...] = _load(dbias_smem, config) + dy

                release_slots()

            spec = _row_spec(config, program, programs)
            plgpu.emit_pipeline(step, grid=(steps,), in_specs=[spec, spec],
                                max_concurrent_steps=stages)(x_gmem, dy_gmem)
            dscale_gmem[program] = _load(dscale_smem, config)
            dbias_gmem[program] = _load(dbias_smem, config)

        pl.run_scoped(scoped, plgpu.SMEM(row_shape, scale.dtype),
                      plgpu.SMEM(row_shape, jnp.float32), plgpu.SMEM(row_shape, jnp.float32))

    partial = jax.ShapeDtypeStruct((programs, *row_shape), jnp.float32)
    out_type = (jax.ShapeDtypeStruct((config.rows, *row_shape), x.dtype), partial, partial)
    dx, dscale, dbias = _kernel(body, out_type, programs, config)(
        _view(x, config), _view(scale, config), _view(dy, config))
    return (dx.reshape(config.rows, config.features),
            dscale.reshape(programs, config.features), dbias.reshape(programs, config.features))


_mosaic_row_norm_vjp = with_partial_sums_backward(_forward, _backward)


def mosaic_row_norm(x: Array, scale: Array, bias: Array, config: Any) -> Array:
    r"""LayerNorm (``config.centered``) or RMSNorm of each row of ``x`` by Mosaic GPU.

    Args:
      x: ``(R, N)``, floating, :math:`N` a multiple of 128 up to :data:`MAX_FEATURES`.
      scale: :math:`\gamma`, ``(N,)``.
      bias: :math:`\beta`, ``(N,)``.
      config: the static settings.

    Returns:
      ``y``, ``(R, N)`` in ``config.dtype``.
    """
    return _mosaic_row_norm_vjp(x, scale, bias, config)
