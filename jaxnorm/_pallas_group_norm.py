r"""Pallas kernels of GroupNorm and InstanceNorm on channels-last inputs.

``x`` is viewed as ``(B, S, C)``: batch, every spatial position, channels; the
:math:`C` channels form :math:`G` groups of :math:`C_g = C/G` (InstanceNorm:
:math:`G = C`), and each set :math:`(b, g)` holds :math:`n = S C_g` elements. Every kernel
holds tiles of whole channel rows (:mod:`jaxnorm._pallas_common`), all arithmetic float32.

Forward (3 passes over ``x``):

1. *moments*: each program walks its share of the rows of one example, shifted by the
   set's first element :math:`p` (so a constant set is exactly 0), and keeps per channel
   the count, mean and centred sum of squares :math:`M_2` of its tiles, each tile's own
   two-pass moments merged into the running ones by Chan et al.'s update
   :math:`\delta = m_b - m_a`, :math:`m = m_a + \delta n_b/n`,
   :math:`M_2 = M_{2a} + M_{2b} + \delta^2 n_a n_b / n`;
   a small XLA step merges the programs' and the group's channels' moments the same way
   (:func:`merge_moments`): :math:`\mu = p + \bar m`, :math:`\sigma^2 = M_2 / n`.
2. *normalize*: :math:`y = ((x - p) - \bar m)\,r\gamma + \beta`,
   :math:`r = (\sigma^2+\epsilon)^{-1/2}` (a constant set gives exactly :math:`\beta`).

Backward (a ``custom_vjp``; 5 passes): one kernel reads ``x`` and :math:`\bar y` and sums
per example and channel :math:`\sum \bar y` and :math:`\sum \bar y\hat x`; XLA forms from
them :math:`\bar\beta`, :math:`\bar\gamma` and the two per-set sums
:math:`c_1 = \tfrac1n\sum g`, :math:`c_2 = \tfrac1n\sum g\hat x` (:math:`g = \bar y\gamma`);
a last kernel writes :math:`\bar x = r\,(g - c_1 - \hat x c_2)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxnorm._pallas_common import (
    Tiling,
    load_tile,
    load_vector,
    make_tiling,
    store_tile,
    warps_for,
)
from jaxnorm._pallas_tuning import tuned_settings

Array = jax.Array

DEFAULTS = {"programs": 1024, "tile": 4096, "rows": 16}
"""Where neither an override below nor a measured setting (:mod:`jaxnorm._pallas_tuning`)
says: about how many programs the reducing kernels (moments, backward sums) launch,
elements of one tile (spatial rows times padded channels), the most spatial rows a tile."""

TARGET_PROGRAMS: int | None = None
"""Overrides ``DEFAULTS["programs"]`` (``benchmarks/pallas_tune.py`` sets these four)."""

TILE_ELEMENTS: int | None = None
"""Overrides ``DEFAULTS["tile"]``."""

MAX_BLOCK_ROWS: int | None = None
"""Overrides ``DEFAULTS["rows"]``."""

NUM_WARPS: int | None = None
"""Overrides the warps per program (else measured, else
:func:`jaxnorm._pallas_common.warps_for` of the tile)."""


@dataclasses.dataclass(frozen=True)
class GroupTiling:
    """How a ``(B, S, C)`` array is cut: tiles of ``tile.block_rows`` spatial rows of all
    channels; the reducing kernels run ``programs`` programs per example, each over
    ``steps`` tiles.

    Args:
      batch: :math:`B`.
      spatial: :math:`S`.
      groups: :math:`G`.
      tile: the tiling of the ``(B S, C)`` view (``tile.rows`` is :math:`B S`).
      programs: programs per example of the reducing kernels.
    """

    batch: int
    spatial: int
    groups: int
    tile: Tiling
    programs: int

    @property
    def row_tiles(self) -> int:
        """Tiles per example: :math:`\\lceil S / \\text{block\\_rows} \\rceil`."""
        return pl.cdiv(self.spatial, self.tile.block_rows)

    @property
    def steps(self) -> int:
        """Tiles each program of a reducing kernel visits."""
        return pl.cdiv(self.row_tiles, self.programs)


def _setting(name: str, override: int | None, tuned: dict[str, int]) -> int:
    """A tile setting: the module's override, else the measured one, else the default."""
    return override or tuned.get(name) or DEFAULTS[name]


def make_group_tiling(batch: int, spatial: int, channels: int, groups: int,
                      interpret: bool | None = None, tuned: dict[str, int] | None = None
                      ) -> GroupTiling:
    """The tiling of a ``(batch, spatial, channels)`` array with ``groups`` groups.

    Args:
      batch: :math:`B`.
      spatial: :math:`S`.
      channels: :math:`C`.
      groups: :math:`G`.
      interpret: force interpret mode on or off; None: off a GPU.
      tuned: measured settings (``tile``, ``rows``, ``warps``, ``programs``).
    """
    tuned = tuned or {}
    tile = make_tiling(batch * spatial, channels, interpret)
    tile_elements = _setting("tile", TILE_ELEMENTS, tuned)
    block_rows = max(1, min(_setting("rows", MAX_BLOCK_ROWS, tuned),
                            tile_elements // tile.block_features,
                            pl.next_power_of_2(max(spatial, 1))))
    warps = NUM_WARPS or tuned.get("warps") or warps_for(block_rows * tile.block_features)
    tile = dataclasses.replace(tile, block_rows=block_rows, num_warps=warps)
    tiles = pl.cdiv(spatial, tile.block_rows)
    programs = max(1, min(tiles, pl.cdiv(_setting("programs", TARGET_PROGRAMS, tuned), batch)))
    return GroupTiling(batch, spatial, groups, tile, programs)


@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """The static settings of one group normalization.

    Args:
      eps: :math:`\\epsilon`.
      dtype: the dtype of ``y``.
      tiling: the tiles.
    """

    eps: float
    dtype: Any
    tiling: GroupTiling


def stage_config(config: GroupNormConfig, dtype: Any, stage: str) -> GroupNormConfig:
    """``config`` tiled with the measured settings of ``stage`` (``"forward"`` or
    ``"backward"``) for ``dtype``."""
    base = config.tiling
    channels = base.tile.features
    kernel = "instance_norm" if base.groups == channels else "group_norm"
    tuned = tuned_settings(kernel, jnp.dtype(dtype).name, base.tile.block_features, stage)
    tiling = make_group_tiling(base.batch, base.spatial, channels, base.groups,
                               base.tile.interpret, tuned)
    return dataclasses.replace(config, tiling=tiling)


def _tile(tiling: GroupTiling, example: Array, index: Array) -> tuple[Array, Array, Array]:
    """``(row_start, mask, valid_rows)`` of tile ``index`` of ``example`` in the
    ``(B S, C)`` view: rows past the example's :math:`S` are masked."""
    block_rows = tiling.tile.block_rows
    local = index * block_rows + jnp.arange(block_rows)
    inside = local < tiling.spatial
    cols = jnp.arange(tiling.tile.block_features)
    mask = inside[:, None] & (cols < tiling.tile.features)[None, :]
    start = example * tiling.spatial + index * block_rows
    return start, mask, jnp.sum(inside.astype(jnp.float32))


def _channel_vector(ref: Any, example: Array, tiling: GroupTiling) -> Array:
    """Row ``example`` of a ``(B, C)`` float32 array as ``(1, block_features)``."""
    return load_vector(ref, tiling.tile, example)


def _moments_kernel(x_ref: Any, pivot_ref: Any, count_ref: Any, mean_ref: Any, m2_ref: Any,
                    *, tiling: GroupTiling) -> None:
    r"""Per channel, the count, mean and :math:`M_2` of ``x - pivot`` over this program's
    tiles of one example (Chan et al.'s merge from tile to tile)."""
    program = pl.program_id(0)
    example, share = program // tiling.programs, program % tiling.programs
    pivot = _channel_vector(pivot_ref, example, tiling)

    def step(k: Array, running: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        count_a, mean_a, m2_a = running
        start, mask, count_b = _tile(tiling, example, share + k * tiling.programs)
        shifted = jnp.where(mask, load_tile(x_ref, start, tiling.tile, mask) - pivot, 0.0)
        mean_b = jnp.sum(shifted, axis=0) / jnp.maximum(count_b, 1.0)
        centred = jnp.where(mask, shifted - mean_b[None, :], 0.0)
        count = count_a + count_b
        weight = count_b / jnp.maximum(count, 1.0)
        delta = mean_b - mean_a
        m2 = m2_a + jnp.sum(centred * centred, axis=0) + delta * delta * count_a * weight
        return count, mean_a + delta * weight, m2

    zeros = jnp.zeros((tiling.tile.block_features,), jnp.float32)
    count, mean, m2 = lax.fori_loop(0, tiling.steps, step, (jnp.float32(0), zeros, zeros))
    count_ref[program, :] = jnp.full((tiling.tile.block_features,), count, jnp.float32)
    mean_ref[program, :] = mean
    m2_ref[program, :] = m2


def _centred(x_ref: Any, pivot_ref: Any, shift_ref: Any, example: Array, start: Array,
             mask: Array, tiling: GroupTiling) -> Array:
    r"""A tile of :math:`x - \mu` as :math:`(x - p) - \bar m`: the set's element :math:`p`
    taken out first (exact for nearby values), so :math:`|\mu| \gg \sigma` keeps its
    digits and a constant set gives exactly 0; 0 outside ``mask``."""
    x = load_tile(x_ref, start, tiling.tile, mask)
    shifted = x - _channel_vector(pivot_ref, example, tiling)
    return jnp.where(mask, shifted - _channel_vector(shift_ref, example, tiling), 0.0)


def _normalize_kernel(x_ref: Any, pivot_ref: Any, shift_ref: Any, multiplier_ref: Any,
                      bias_ref: Any, y_ref: Any, *, config: GroupNormConfig) -> None:
    r"""One tile: :math:`y = (x - \mu)\,m + \beta` with :math:`m = r\gamma` per example and
    channel."""
    tiling = config.tiling
    program = pl.program_id(0)
    example, index = program // tiling.row_tiles, program % tiling.row_tiles
    start, mask, _ = _tile(tiling, example, index)
    centred = _centred(x_ref, pivot_ref, shift_ref, example, start, mask, tiling)
    y = centred * _channel_vector(multiplier_ref, example, tiling)
    store_tile(y_ref, start, tiling.tile, mask, y + load_vector(bias_ref, tiling.tile))


def _sums_kernel(x_ref: Any, dy_ref: Any, pivot_ref: Any, shift_ref: Any, rstd_ref: Any,
                 dbias_ref: Any, dscale_ref: Any, *, tiling: GroupTiling) -> None:
    r"""Per channel, :math:`\sum \bar y` and :math:`\sum \bar y\hat x` over this program's
    tiles of one example."""
    program = pl.program_id(0)
    example, share = program // tiling.programs, program % tiling.programs
    rstd = _channel_vector(rstd_ref, example, tiling)

    def step(k: Array, sums: tuple[Array, Array]) -> tuple[Array, Array]:
        start, mask, _ = _tile(tiling, example, share + k * tiling.programs)
        x_hat = _centred(x_ref, pivot_ref, shift_ref, example, start, mask, tiling) * rstd
        dy = load_tile(dy_ref, start, tiling.tile, mask)
        return sums[0] + jnp.sum(dy, axis=0), sums[1] + jnp.sum(dy * x_hat, axis=0)

    zeros = jnp.zeros((tiling.tile.block_features,), jnp.float32)
    dbias, dscale = lax.fori_loop(0, tiling.steps, step, (zeros, zeros))
    dbias_ref[program, :] = dbias
    dscale_ref[program, :] = dscale


def _dx_kernel(x_ref: Any, dy_ref: Any, pivot_ref: Any, shift_ref: Any, rstd_ref: Any,
               c1_ref: Any, c2_ref: Any, scale_ref: Any, dx_ref: Any, *,
               tiling: GroupTiling) -> None:
    r"""One tile: :math:`\bar x = r\,(\bar y\gamma - c_1 - \hat x c_2)`."""
    program = pl.program_id(0)
    example, index = program // tiling.row_tiles, program % tiling.row_tiles
    start, mask, _ = _tile(tiling, example, index)
    rstd = _channel_vector(rstd_ref, example, tiling)
    x_hat = _centred(x_ref, pivot_ref, shift_ref, example, start, mask, tiling) * rstd
    g = load_tile(dy_ref, start, tiling.tile, mask) * load_vector(scale_ref, tiling.tile)
    dx = g - _channel_vector(c1_ref, example, tiling) - x_hat * _channel_vector(
        c2_ref, example, tiling)
    store_tile(dx_ref, start, tiling.tile, mask, dx * rstd)


def _call(kernel: Any, programs: int, out_shape: Any, tiling: GroupTiling, name: str,
          *args: Array) -> Any:
    """``pallas_call`` of ``kernel`` on a one-dimensional grid of ``programs``."""
    return pl.pallas_call(
        kernel, grid=(programs,), out_shape=out_shape, interpret=tiling.tile.interpret,
        compiler_params=tiling.tile.compiler_params(), name=name,
    )(*args)


def _partials(tiling: GroupTiling, count: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """``count`` float32 ``(B programs, block_features)`` outputs of a reducing kernel."""
    shape = (tiling.batch * tiling.programs, tiling.tile.block_features)
    return (jax.ShapeDtypeStruct(shape, jnp.float32),) * count


def _per_program(partial: Array, tiling: GroupTiling) -> Array:
    """``(B, programs, C)`` view of a reducing kernel's output."""
    channels = tiling.tile.features
    return partial.reshape(tiling.batch, tiling.programs, -1)[:, :, :channels]


def merge_moments(count: Array, mean: Array, m2: Array, groups: int) -> tuple[Array, Array]:
    r"""``(mean, var)`` per ``(B, G)`` from per-part moments ``(B, P, C)``: the parts are
    every program and every channel of a group, merged exactly,
    :math:`\bar m = \sum n_i m_i / n`, :math:`M_2 = \sum M_{2,i} + \sum n_i (m_i - \bar m)^2`,
    :math:`\sigma^2 = M_2 / n` (Chan et al.'s pairwise update, all parts at once).

    Args:
      count: elements per part, ``(B, P, C)``.
      mean: per-part means, ``(B, P, C)``.
      m2: per-part centred sums of squares, ``(B, P, C)``.
      groups: :math:`G`.
    """
    shape = (mean.shape[0], mean.shape[1], groups, mean.shape[2] // groups)
    count, mean, m2 = (a.reshape(shape) for a in (count, mean, m2))
    total = jnp.maximum(jnp.sum(count, axis=(1, 3)), 1.0)
    merged = jnp.sum(count * mean, axis=(1, 3)) / total
    spread = jnp.sum(count * jnp.square(mean - merged[:, None, :, None]), axis=(1, 3))
    return merged, (jnp.sum(m2, axis=(1, 3)) + spread) / total


def per_channel(value: Array, channels: int) -> Array:
    """``(B, G)`` → ``(B, C)``: each group's value on its channels."""
    return jnp.repeat(value, channels // value.shape[1], axis=1)


def set_means(dbias: Array, dscale: Array, scale: Array, groups: int, spatial: int
              ) -> tuple[Array, Array]:
    r"""``(c1, c2)`` per example and channel ``(B, C)``: the set means
    :math:`c_1 = \tfrac1n\sum g`, :math:`c_2 = \tfrac1n\sum g\hat x` (:math:`g = \bar y\gamma`)
    from the per-channel sums :math:`\sum\bar y` (``dbias``) and :math:`\sum\bar y\hat x`
    (``dscale``), each ``(B, C)``.

    Args:
      dbias: :math:`\sum\bar y` per example and channel.
      dscale: :math:`\sum\bar y\hat x` per example and channel.
      scale: :math:`\gamma`, ``(C,)``.
      groups: :math:`G`.
      spatial: :math:`S`.
    """
    batch, channels = dbias.shape
    gamma = scale.astype(jnp.float32)[None, :]
    count = spatial * (channels // groups)
    return tuple(per_channel(jnp.sum((gamma * s).reshape(batch, groups, -1), axis=2) / count,
                              channels) for s in (dbias, dscale))


def _statistics(x: Array, config: GroupNormConfig) -> tuple[Array, Array, Array]:
    r"""``(pivot, shift, rstd)`` per example and channel ``(B, C)`` float32, each the
    set's: :math:`\mu = p + \bar m` kept as the pair :math:`(p, \bar m)`."""
    tiling = config.tiling
    channels = tiling.tile.features
    group_size = channels // tiling.groups
    pivot = x.reshape(tiling.batch, tiling.spatial, channels)[:, 0, ::group_size]
    pivot = per_channel(pivot.astype(jnp.float32), channels)
    outputs = _call(functools.partial(_moments_kernel, tiling=tiling),
                    tiling.batch * tiling.programs, _partials(tiling, 3), tiling,
                    "jaxnorm_group_norm_moments", x, pivot)
    shifted_mean, var = merge_moments(*(_per_program(o, tiling) for o in outputs),
                                      tiling.groups)
    rstd = lax.rsqrt(var + jnp.float32(config.eps))
    return pivot, per_channel(shifted_mean, channels), per_channel(rstd, channels)


def _normalize(x: Array, statistics: tuple[Array, Array, Array], scale: Array, bias: Array,
               config: GroupNormConfig) -> Array:
    """``y`` of the ``(B S, C)`` view from ``(pivot, shift, rstd)``."""
    pivot, shift, rstd = statistics
    tiling = config.tiling
    multiplier = rstd * scale.astype(jnp.float32)[None, :]
    return _call(functools.partial(_normalize_kernel, config=config),
                 tiling.batch * tiling.row_tiles, jax.ShapeDtypeStruct(x.shape, config.dtype),
                 tiling, "jaxnorm_group_norm_normalize", x, pivot, shift, multiplier, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def group_norm_rows(x: Array, scale: Array, bias: Array, config: GroupNormConfig) -> Array:
    r"""GroupNorm of ``x`` viewed as ``(B S, C)`` rows (``config.tiling`` gives
    :math:`B, S, G`).

    Args:
      x: ``(B S, C)``, floating.
      scale: :math:`\gamma`, ``(C,)``.
      bias: :math:`\beta`, ``(C,)``.
      config: the static settings.

    Returns:
      ``y``, ``(B S, C)`` in ``config.dtype``.
    """
    config = stage_config(config, x.dtype, "forward")
    return _normalize(x, _statistics(x, config), scale, bias, config)


def _group_norm_fwd(x: Array, scale: Array, bias: Array, config: GroupNormConfig
                    ) -> tuple[Array, tuple[Array, ...]]:
    """The forward, keeping ``x``, the parameters and the statistics."""
    config = stage_config(config, x.dtype, "forward")
    statistics = _statistics(x, config)
    return _normalize(x, statistics, scale, bias, config), (x, scale, bias, *statistics)


def _group_norm_bwd(config: GroupNormConfig, residuals: tuple[Array, ...], dy: Array
                    ) -> tuple[Array, Array, Array]:
    """The sums kernel, the per-set sums in XLA, then the ``dx`` kernel."""
    x, scale, bias, pivot, shift, rstd = residuals
    config = stage_config(config, x.dtype, "backward")
    tiling = config.tiling
    dbias, dscale = (jnp.sum(_per_program(o, tiling), axis=1) for o in _call(
        functools.partial(_sums_kernel, tiling=tiling), tiling.batch * tiling.programs,
        _partials(tiling, 2), tiling, "jaxnorm_group_norm_sums", x, dy, pivot, shift, rstd))
    c1, c2 = set_means(dbias, dscale, scale, tiling.groups, tiling.spatial)
    dx = _call(functools.partial(_dx_kernel, tiling=tiling), tiling.batch * tiling.row_tiles,
               jax.ShapeDtypeStruct(x.shape, x.dtype), tiling, "jaxnorm_group_norm_dx",
               x, dy, pivot, shift, rstd, c1, c2, scale)
    return (dx, jnp.sum(dscale, axis=0).astype(scale.dtype),
            jnp.sum(dbias, axis=0).astype(bias.dtype))


group_norm_rows.defvjp(_group_norm_fwd, _group_norm_bwd)
