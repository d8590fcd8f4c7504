r"""Mosaic GPU kernels of GroupNorm and InstanceNorm on channels-last inputs (Hopper+).

The same computation as the Triton group kernels (:mod:`jaxnorm._pallas_group_norm`):
``x`` viewed as ``(B, S, C)``, :math:`G` groups of :math:`C/G` channels, each set
:math:`(b, g)` shifted by its first element :math:`p`, float32 arithmetic. Forward: a
*moments* kernel, then a *normalize* kernel :math:`y = ((x - p) - \bar m)\,r\gamma + \beta`;
backward: a *sums* kernel (:math:`\sum\bar y`, :math:`\sum\bar y\hat x` per example and
channel), then a :math:`\bar x` kernel, with the small per-set steps between them in XLA.

**Arrangement.** Each example's :math:`S C` values are cut into tiles of ``rows`` whole
spatial rows, viewed ``(rows C / L, L)`` with :math:`L` the largest power of two up to 128
dividing :math:`C` (one TMA copy a tile: at most 256 along each dimension). Every tile
starts at a multiple of :math:`C`, so an element's channel is the same in every tile, and
per-channel vectors (:math:`p`, :math:`\bar m`, :math:`r\gamma`, ...) become tile-shaped
arrays held in shared memory: every kernel is elementwise. The :math:`P` programs (one
warpgroup each) of an example take its tiles :math:`k, k + P, \dots`, copies pipelined.

- *moments*: each tile position keeps Welford's running mean and :math:`M_2` of
  :math:`x - p` over the program's tiles, :math:`\delta = v - m`,
  :math:`m \mathrel{+}= \delta / j`, :math:`M_2 \mathrel{+}= \delta (v - m)` (exact 0 for a
  constant set); XLA merges the positions and programs of a set with Chan et al.'s formula
  (:func:`jaxnorm._pallas_group_norm.merge_moments`).
- *sums*: each tile position accumulates :math:`\bar y` and :math:`\bar y\hat x`; XLA adds
  the positions of each channel.
- *normalize* and :math:`\bar x = a\bar y + b((x - p) - \bar m) + c` with
  :math:`a = r\gamma`, :math:`b = -r^2 c_2`, :math:`c = -r c_1`, elementwise.

The kernels take inputs whose :math:`S` has a power-of-two divisor giving tiles of a
multiple of 128 values (:func:`takes`); other shapes go to the Triton kernels. Off a GPU
they run in Mosaic GPU interpret mode (each warpgroup simulated as one thread). Their
device time is unmeasured (no GPU was available when they were written);
``benchmarks/mosaic_lowering.py`` compiles them for an H200 without one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxnorm._pallas_group_norm import merge_moments, per_channel, set_means
from jaxnorm._pallas_mosaic_rows import (
    BLOCK_SHARED_MEMORY,
    LANES,
    InterpretGPUParams,
    available,
    plgpu,
    release_slots,
    streaming_multiprocessors,
)
from jaxnorm._pallas_tuning import tuned_settings

Array = jax.Array

DEFAULT_TILE_ELEMENTS = {"forward": 2048, "backward": 1024}
"""The values of ``x`` a tile holds (whole spatial rows; at least one valid tile), where
neither :data:`TILE_ELEMENTS` nor a measured setting (``tile``) says. Planned for shared
memory: a program holds its float32 vector tiles (normalize 4; backward sums 3 and 2
accumulators, ``dx`` 5) and :data:`DEFAULT_STAGES` copies of its input tiles, about 57 KiB
forward and 44 KiB backward, so that 3 to 5 programs fit an SM's 227 KiB."""

MAX_TILE_ELEMENTS = 4096
"""The largest tile: the backward's ``dx`` kernel then takes 44 bytes a value, 176 KiB."""

DEFAULT_STAGES = 3
"""Tile copies in flight in each program's pipeline, where neither :data:`STAGES` nor a
measured setting (``stages``) says."""

PROGRAMS_PER_SM = 4
"""Programs (warpgroups) of a kernel for each SM, spread over the examples, where neither
:data:`PROGRAMS` nor a measured setting (``programs``, per example) says."""

MAX_TILE_ROWS = 256
"""The most rows of the ``(rows C / L, L)`` view of a tile (a TMA copy's limit)."""

TILE_ELEMENTS: int | None = None
"""Overrides the tile size (tests and ``benchmarks/pallas_tune.py``)."""

PROGRAMS: int | None = None
"""Overrides the programs of each example."""

STAGES: int | None = None
"""Overrides the pipeline depth."""


@dataclasses.dataclass(frozen=True)
class MosaicGroupConfig:
    r"""The static settings of one Mosaic GPU group normalization.

    Args:
      eps: :math:`\epsilon`.
      dtype: the dtype of ``y``.
      batch: :math:`B`.
      spatial: :math:`S`.
      channels: :math:`C`.
      groups: :math:`G` (InstanceNorm: :math:`C`).
      interpret: run in Mosaic GPU interpret mode (off a GPU).
      tile_elements: the most values of a tile.
      target_programs: programs of each example, or None for :data:`PROGRAMS_PER_SM` a
        streaming multiprocessor over the batch.
      stages: tile copies in flight.
    """

    eps: float
    dtype: Any
    batch: int
    spatial: int
    channels: int
    groups: int
    interpret: bool
    tile_elements: int = DEFAULT_TILE_ELEMENTS["forward"]
    target_programs: int | None = None
    stages: int = DEFAULT_STAGES

    @property
    def lanes(self) -> int:
        """:math:`L`: the largest power of two up to 128 dividing :math:`C`."""
        return _lanes(self.channels)

    @property
    def rows(self) -> int:
        """Spatial rows of a tile."""
        return _tile_rows(self.spatial, self.channels, self.tile_elements)

    @property
    def tiles(self) -> int:
        """Tiles of an example, :math:`S / \\text{rows}`."""
        return self.spatial // self.rows

    @property
    def tile_shape(self) -> tuple[int, int]:
        """``(rows C / L, L)``: the view of a tile."""
        return self.rows * self.channels // self.lanes, self.lanes

    @property
    def programs(self) -> int:
        """:math:`P`, the programs of each example."""
        wanted = self.target_programs or pl.cdiv(
            PROGRAMS_PER_SM * streaming_multiprocessors(), self.batch)
        return max(1, min(self.tiles, wanted))

    @property
    def steps(self) -> int:
        """Pipeline steps of a program, :math:`\\lceil \\text{tiles} / P \\rceil`."""
        return pl.cdiv(self.tiles, self.programs)

    @property
    def vector(self) -> int:
        """Consecutive elements a thread holds: 4, 2 or 1, whichever divides the tile."""
        size = self.rows * self.channels
        return next(v for v in (4, 2, 1) if size % (LANES * v) == 0)


def _lanes(channels: int) -> int:
    """The largest power of two up to 128 dividing ``channels``."""
    return min(LANES, channels & -channels)


def _tile_rows(spatial: int, channels: int, tile_elements: int) -> int:
    """Spatial rows of a tile: a power of two dividing ``spatial`` whose tile is a multiple
    of 128 values, at most :data:`MAX_TILE_ELEMENTS` and at most :data:`MAX_TILE_ROWS`
    rows of :math:`L` in its view; the most whose tile holds at most ``tile_elements``,
    else the fewest; 0 if there is none."""
    valid, rows = [], 1
    while spatial % rows == 0 and rows * channels <= MAX_TILE_ELEMENTS:
        if rows * channels % LANES == 0 and rows * channels // _lanes(channels) <= MAX_TILE_ROWS:
            valid.append(rows)
        rows *= 2
    within = [r for r in valid if r * channels <= tile_elements]
    return max(within) if within else min(valid, default=0)


def takes(spatial: int, channels: int, dtype: Any, out_dtype: Any = None) -> bool:
    """Whether the Mosaic GPU kernels take ``(B, spatial, channels)`` inputs of ``dtype``
    whose normalization (and gradient, streamed in the backward) is ``out_dtype`` (None:
    ``dtype``): 2- or 4-byte values, TMA rows of at least 16 bytes of both, and a tile
    (:func:`_tile_rows`)."""
    itemsizes = [jnp.dtype(d).itemsize for d in (dtype, out_dtype or dtype)]
    return (available() and all(size in (2, 4) for size in itemsizes)
            and _lanes(channels) * min(itemsizes) >= 16
            and _tile_rows(spatial, channels, MAX_TILE_ELEMENTS) > 0)


def stage_config(config: MosaicGroupConfig, dtype: Any, stage: str) -> MosaicGroupConfig:
    """``config`` with the settings of ``stage`` (``"forward"`` or ``"backward"``) for
    inputs of ``dtype``: the overrides, else the measured ones
    (:mod:`jaxnorm._pallas_tuning`), else the defaults; the stages capped to what fits
    (:func:`_fitting_stages`)."""
    kernel = "mosaic_instance_norm" if config.groups == config.channels else "mosaic_group_norm"
    width = 1 << max(0, (config.channels - 1).bit_length())
    tuned = tuned_settings(kernel, jnp.dtype(dtype).name, width, stage)
    tile = TILE_ELEMENTS or tuned.get("tile") or DEFAULT_TILE_ELEMENTS[stage]
    staged = dataclasses.replace(config, tile_elements=tile,
                                 target_programs=PROGRAMS or tuned.get("programs"))
    stages = STAGES or tuned.get("stages") or DEFAULT_STAGES
    return dataclasses.replace(staged, stages=min(stages, _fitting_stages(staged, dtype, stage)))


def _fitting_stages(config: MosaicGroupConfig, dtype: Any, stage: str) -> int:
    """The most pipelined tile copies the heaviest kernel of ``stage`` fits in a block's
    shared memory (:data:`BLOCK_SHARED_MEMORY`): forward, normalize's 4 float32 vector
    tiles and ``x``; backward, ``dx``'s 5 and ``x`` and a float32 ``dy``."""
    tile = config.rows * config.channels
    vectors, streamed = (4, jnp.dtype(dtype).itemsize) if stage == "forward" else (
        5, jnp.dtype(dtype).itemsize + 4)
    return max(1, (BLOCK_SHARED_MEMORY - 4 * vectors * tile) // (streamed * tile))


def _in_layout(value: Array, config: MosaicGroupConfig) -> Array:
    """``value`` (a tile) in the strided register layout every tile value shares."""
    if config.interpret:
        return value
    layout = plgpu.Layout.WG_STRIDED(config.tile_shape, vec_size=config.vector)
    return plgpu.layout_cast(value, layout)


def _load(ref: Any, config: MosaicGroupConfig) -> Array:
    """A tile from shared memory, float32, in the shared layout."""
    return _in_layout(ref[...], config).astype(jnp.float32)


Step = Callable[[Array, list[Array], list[Array], list[Array]], tuple[Array | None, list[Array]]]
"""``step(j, tiles, vectors, accumulators) -> (output tile or None, accumulators)``: one
pipeline step ``j`` (0-based) of a program, on float32 tiles in the shared layout."""


def _elementwise_kernel(config: MosaicGroupConfig, step: Step, streamed: Sequence[Array],
                        vectors: Sequence[Array], accumulators: int, out_dtype: Any | None
                        ) -> tuple[Array | None, list[Array]]:
    """Runs ``step`` over every tile of every example.

    Args:
      config: the settings.
      step: the elementwise work of one tile.
      streamed: ``(B S, C)`` arrays read tile by tile.
      vectors: per-example ``(B, C)`` or shared ``(C,)`` float32 vectors, given to
        ``step`` as tiles (each channel's value at its positions).
      accumulators: float32 tiles each program keeps, starting at 0.
      out_dtype: the dtype of the ``(B S, C)`` output ``step`` makes, or None.

    Returns:
      ``(output, partials)``: the output (or None) and, per accumulator, its final value
      in every program, ``(B, P, rows, C)``.
    """
    tile_shape = config.tile_shape
    view = (config.batch, config.tiles, *tile_shape)
    replicated = [jnp.tile(v.astype(jnp.float32), config.rows).reshape(*v.shape[:-1], *tile_shape)
                  for v in vectors]

    outputs = (1 if out_dtype is not None else 0) + accumulators

    def body(*refs: Any) -> None:
        streamed_refs = refs[:len(streamed)]
        vector_refs = refs[len(streamed):len(refs) - outputs]
        out_refs = refs[len(refs) - outputs:]
        output_ref = out_refs[0] if out_dtype is not None else None
        partial_refs = out_refs[1:] if out_dtype is not None else out_refs
        program = lax.axis_index("programs")

        def scoped(*scratch: Any) -> None:
            vector_smem, accumulator_smem = scratch[:len(vectors)], scratch[len(vectors):]
            _stage_vectors(vector_refs, vector_smem, program // config.programs, config)
            zeros = _in_layout(jnp.zeros(tile_shape, jnp.float32), config)
            for accumulator in accumulator_smem:
                accumulator[...] = zeros
            _pipeline(config, step, len(streamed), program, vector_smem, accumulator_smem,
                      output_ref)(*streamed_refs)
            for partial, accumulator in zip(partial_refs, accumulator_smem):
                partial[program] = _load(accumulator, config)

        pl.run_scoped(scoped, *[plgpu.SMEM(tile_shape, jnp.float32)
                                for _ in range(len(vectors) + accumulators)])

    out_type = [jax.ShapeDtypeStruct(view, out_dtype)] if out_dtype is not None else []
    out_type += [jax.ShapeDtypeStruct((config.batch * config.programs, *tile_shape),
                                      jnp.float32)] * accumulators
    results = plgpu.kernel(
        body, out_type=tuple(out_type), grid=(config.batch * config.programs,),
        grid_names=("programs",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=InterpretGPUParams() if config.interpret else None,
    )(*(a.reshape(view) for a in streamed), *replicated)
    output = results[0].reshape(-1, config.channels) if out_dtype is not None else None
    partials = results[1:] if out_dtype is not None else results
    shape = (config.batch, config.programs, config.rows, config.channels)
    return output, [p.reshape(shape) for p in partials]


def _pipeline(config: MosaicGroupConfig, step: Step, streams: int, program: Array,
              vector_smem: Sequence[Any], accumulator_smem: Sequence[Any],
              output_ref: Any | None) -> Callable[..., Any]:
    r"""The pipeline of one program over its example's tiles :math:`k, k + P, \dots` of
    ``streams`` inputs: each step runs ``step`` on the tiles, stores its output (if any)
    and keeps its accumulators where the tile exists (the clamped one past the end is
    read, never used)."""
    programs, tiles = config.programs, config.tiles
    example, share = program // programs, program % programs

    def pipeline_step(indices: tuple[Array, ...], *tile_smem: Any) -> None:
        tile = share + indices[0] * programs
        output, updated = step(indices[0], [_load(t, config) for t in tile_smem],
                               [_load(v, config) for v in vector_smem],
                               [_load(a, config) for a in accumulator_smem])

        @pl.when(tile < tiles)
        def _store() -> None:
            if output is not None:
                output_ref[example, tile] = output.astype(output_ref.dtype)
            for accumulator, value in zip(accumulator_smem, updated):
                accumulator[...] = value

        release_slots()

    def tile_index(j: Array) -> tuple[Array, ...]:
        return example, jnp.minimum(share + j * programs, tiles - 1), 0, 0

    spec = pl.BlockSpec((None, None, *config.tile_shape), tile_index)
    return plgpu.emit_pipeline(pipeline_step, grid=(config.steps,),
                               in_specs=[spec] * streams,
                               max_concurrent_steps=min(config.stages, config.steps))


def _stage_vectors(vector_refs: Sequence[Any], vector_smem: Sequence[Any], example: Array,
                   config: MosaicGroupConfig) -> None:
    """Copies each vector tile (the example's, for a per-example one) into shared memory,
    in the shared layout (each thread later reads what it wrote); every thread is done
    with the staging copy before its memory is reused."""
    if not vector_refs:
        return

    def copy(_: Any, *staged: Any) -> None:
        for ref, shared in zip(staged, vector_smem):
            shared[...] = _in_layout(ref[...], config)
        release_slots()

    def spec(ref: Any) -> Any:
        if len(ref.shape) == 2:
            return pl.BlockSpec(config.tile_shape, lambda i: (0, 0))
        return pl.BlockSpec((None, *config.tile_shape), lambda i: (example, 0, 0))

    plgpu.emit_pipeline(copy, grid=(1,), in_specs=[spec(r) for r in vector_refs])(*vector_refs)


def _moments_step(j: Array, tiles: list[Array], vectors: list[Array], sums: list[Array]
                  ) -> tuple[None, list[Array]]:
    """Welford's update of each position's mean and :math:`M_2` of :math:`x - p`."""
    [x], [pivot], [mean, m2] = tiles, vectors, sums
    shifted = x - pivot
    delta = shifted - mean
    mean = mean + delta * (1.0 / (j + 1).astype(jnp.float32))
    return None, [mean, m2 + delta * (shifted - mean)]


def _normalize_step(j: Array, tiles: list[Array], vectors: list[Array], sums: list[Array]
                    ) -> tuple[Array, list[Array]]:
    r""":math:`y = ((x - p) - \bar m)\,r\gamma + \beta`."""
    [x], [pivot, shift, multiplier, bias] = tiles, vectors
    return ((x - pivot) - shift) * multiplier + bias, []


def _sums_step(j: Array, tiles: list[Array], vectors: list[Array], sums: list[Array]
               ) -> tuple[None, list[Array]]:
    r"""Each position's running :math:`\sum\bar y` and :math:`\sum\bar y\hat x`."""
    [x, dy], [pivot, shift, rstd], [dbias, dscale] = tiles, vectors, sums
    x_hat = ((x - pivot) - shift) * rstd
    return None, [dbias + dy, dscale + dy * x_hat]


def _dx_step(j: Array, tiles: list[Array], vectors: list[Array], sums: list[Array]
             ) -> tuple[Array, list[Array]]:
    r""":math:`\bar x = a\bar y + b((x - p) - \bar m) + c`."""
    [x, dy], [pivot, shift, a, b, c] = tiles, vectors
    return a * dy + b * ((x - pivot) - shift) + c, []


def _program_counts(config: MosaicGroupConfig) -> np.ndarray:
    """Tiles each program of an example visits, ``(P,)``."""
    shares = np.arange(config.programs)
    return np.maximum(0, -(-(config.tiles - shares) // config.programs)).astype(np.float32)


def _statistics(x: Array, config: MosaicGroupConfig) -> tuple[Array, Array, Array]:
    r"""``(pivot, shift, rstd)`` per example and channel ``(B, C)`` float32."""
    channels, group_size = config.channels, config.channels // config.groups
    pivot = x.reshape(config.batch, config.spatial, channels)[:, 0, ::group_size]
    pivot = per_channel(pivot.astype(jnp.float32), channels)
    _, (mean, m2) = _elementwise_kernel(config, _moments_step, [x], [pivot], 2, None)
    parts = (config.batch, config.programs * config.rows, channels)
    count = jnp.broadcast_to(jnp.asarray(_program_counts(config))[None, :, None, None],
                             mean.shape).reshape(parts)
    shifted_mean, var = merge_moments(count, mean.reshape(parts), m2.reshape(parts),
                                      config.groups)
    rstd = lax.rsqrt(var + jnp.float32(config.eps))
    return pivot, per_channel(shifted_mean, channels), per_channel(rstd, channels)


def _normalize(x: Array, statistics: tuple[Array, Array, Array], scale: Array, bias: Array,
               config: MosaicGroupConfig) -> Array:
    """``y`` of the ``(B S, C)`` view from ``(pivot, shift, rstd)``."""
    pivot, shift, rstd = statistics
    multiplier = rstd * scale.astype(jnp.float32)[None, :]
    y, _ = _elementwise_kernel(config, _normalize_step, [x], [pivot, shift, multiplier, bias],
                               0, config.dtype)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def mosaic_group_norm_rows(x: Array, scale: Array, bias: Array, config: MosaicGroupConfig
                           ) -> Array:
    r"""GroupNorm of ``x`` viewed as ``(B S, C)`` rows by Mosaic GPU.

    Args:
      x: ``(B S, C)``, floating, a shape :func:`takes` accepts.
      scale: :math:`\gamma`, ``(C,)``.
      bias: :math:`\beta`, ``(C,)``.
      config: the static settings.

    Returns:
      ``y``, ``(B S, C)`` in ``config.dtype``.
    """
    config = stage_config(config, x.dtype, "forward")
    return _normalize(x, _statistics(x, config), scale, bias, config)


def _group_norm_fwd(x: Array, scale: Array, bias: Array, config: MosaicGroupConfig
                    ) -> tuple[Array, tuple[Array, ...]]:
    """The forward, keeping ``x``, the parameters and the statistics."""
    config = stage_config(config, x.dtype, "forward")
    statistics = _statistics(x, config)
    return _normalize(x, statistics, scale, bias, config), (x, scale, bias, *statistics)


def _group_norm_bwd(config: MosaicGroupConfig, residuals: tuple[Array, ...], dy: Array
                    ) -> tuple[Array, Array, Array]:
    """The sums kernel, the per-set sums in XLA, then the ``dx`` kernel."""
    x, scale, bias, pivot, shift, rstd = residuals
    config = stage_config(config, x.dtype, "backward")
    _, partials = _elementwise_kernel(config, _sums_step, [x, dy], [pivot, shift, rstd], 2,
                                      None)
    dbias, dscale = (jnp.sum(p, axis=(1, 2)) for p in partials)
    c1, c2 = set_means(dbias, dscale, scale, config.groups, config.spatial)
    vectors = [pivot, shift, rstd * scale.astype(jnp.float32)[None, :], -rstd * rstd * c2,
               -rstd * c1]
    dx, _ = _elementwise_kernel(config, _dx_step, [x, dy], vectors, 0, x.dtype)
    return (dx, jnp.sum(dscale, axis=0).astype(scale.dtype),
            jnp.sum(dbias, axis=0).astype(bias.dtype))


mosaic_group_norm_rows.defvjp(_group_norm_fwd, _group_norm_bwd)
