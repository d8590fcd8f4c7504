r"""Pallas kernels of LayerNorm and RMSNorm over the trailing axes: rows held on chip.

``x`` is viewed as :math:`R` rows of :math:`N` features. A program holds whole rows
(:mod:`jaxnorm._pallas_common`) and computes, in float32, per row

.. math::
    p = x_0,\quad s = x - p,\quad \delta = \tfrac1N\textstyle\sum s,\quad
    c = s - \delta,\quad \sigma^2 = \tfrac1N\sum c^2,\quad r = (\sigma^2 + \epsilon)^{-1/2},
    \quad \hat x = c\,r,\quad y = \hat x\gamma + \beta,

the two-pass variance of the row already on chip, shifted by its first element so that
a constant row gives :math:`c = 0` and exactly :math:`y = \beta` (RMSNorm: :math:`c = x`,
no centring). The backward (a ``custom_vjp``) reads ``x`` and :math:`\bar y` once,
recomputes the statistics from the row on chip, and writes

.. math::
    \bar x = r\,(g - \tfrac1N\textstyle\sum g - \hat x\,\tfrac1N\sum g\hat x),
    \qquad g = \bar y\gamma

(no :math:`\sum g` term for RMSNorm) together with each program's float32 partial sums
:math:`\sum \bar y\hat x` and :math:`\sum \bar y` over its rows; a small XLA reduction adds
the partials into :math:`\bar\gamma` and :math:`\bar\beta`.
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
    row_indices,
    store_tile,
    tile_mask,
    with_partial_sums_backward,
)
from jaxnorm._pallas_tuning import tuned_settings

Array = jax.Array

DEFAULT_PARTIAL_BLOCKS = 512
"""The most programs of the backward, hence rows of the dγ/dβ partial sums, where neither
:data:`MAX_PARTIAL_BLOCKS` nor a measured setting says."""

MAX_PARTIAL_BLOCKS: int | None = None
"""Overrides the backward's most programs (``benchmarks/pallas_tune.py`` sets it)."""


@dataclasses.dataclass(frozen=True)
class RowNormConfig:
    """The static settings of one row normalization.

    Args:
      eps: :math:`\\epsilon` added to the variance (mean square).
      centered: subtract the mean (LayerNorm); False: RMSNorm.
      dtype: the dtype of ``y``.
      tiling: the tiles of the ``(R, N)`` view.
    """

    eps: float
    centered: bool
    dtype: Any
    tiling: Tiling


def standardize_rows(x: Array, mask: Array, features: int, eps: float, centered: bool
                     ) -> tuple[Array, Array]:
    r"""``(x_hat, r)`` of a float32 tile (0 outside ``mask``), per row: the first element
    :math:`p` as shift, :math:`c = (x - p) - \text{mean}(x - p)` (or :math:`c = x` without
    centring), :math:`r = (\text{mean}(c^2) + \epsilon)^{-1/2}`, :math:`\hat x = c r`
    (0 outside ``mask``).

    Args:
      x: the ``(block_rows, block_features)`` tile, float32.
      mask: the tile's elements inside the array.
      features: :math:`N`, the true row length.
      eps: :math:`\epsilon`.
      centered: subtract the mean.
    """
    if centered:
        first = lax.broadcasted_iota(jnp.int32, x.shape, 1) == 0
        pivot = jnp.sum(jnp.where(first, x, 0.0), axis=1, keepdims=True)
        shifted = jnp.where(mask, x - pivot, 0.0)
        offset = jnp.sum(shifted, axis=1, keepdims=True) / features
        x = jnp.where(mask, shifted - offset, 0.0)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / features + eps)
    return x * rstd, rstd


def _tile_at(tiling: Tiling, row_tile: Array) -> tuple[Array, Array]:
    """``(row_start, mask)`` of row tile number ``row_tile``."""
    start = row_tile * tiling.block_rows
    rows = row_indices(start, tiling.block_rows)
    cols = jnp.arange(tiling.block_features)
    return start, tile_mask(rows, cols, tiling.rows, tiling.features)


def _forward_kernel(x_ref: Any, scale_ref: Any, bias_ref: Any, y_ref: Any, *,
                    config: RowNormConfig) -> None:
    r"""One row tile: :math:`y = \hat x\gamma + \beta`."""
    tiling = config.tiling
    start, mask = _tile_at(tiling, pl.program_id(0))
    x = load_tile(x_ref, start, tiling, mask)
    x_hat, _ = standardize_rows(x, mask, tiling.features, config.eps, config.centered)
    y = x_hat * load_vector(scale_ref, tiling) + load_vector(bias_ref, tiling)
    store_tile(y_ref, start, tiling, mask, y)


def _backward_kernel(x_ref: Any, scale_ref: Any, dy_ref: Any, dx_ref: Any,
                     dscale_ref: Any, dbias_ref: Any, *, config: RowNormConfig,
                     programs: int, steps: int) -> None:
    r"""Row tiles ``program, program + programs, ...``: :math:`\bar x` of each, and the
    program's partial sums :math:`\sum_{rows} \bar y\hat x` and :math:`\sum_{rows}\bar y`."""
    tiling = config.tiling
    program = pl.program_id(0)
    scale = load_vector(scale_ref, tiling)

    def step(k: Array, sums: tuple[Array, Array]) -> tuple[Array, Array]:
        start, mask = _tile_at(tiling, program + k * programs)
        x = load_tile(x_ref, start, tiling, mask)
        dy = load_tile(dy_ref, start, tiling, mask)
        x_hat, rstd = standardize_rows(x, mask, tiling.features, config.eps, config.centered)
        g = dy * scale
        dx = g - x_hat * (jnp.sum(g * x_hat, axis=1, keepdims=True) / tiling.features)
        if config.centered:
            dx = dx - jnp.sum(g, axis=1, keepdims=True) / tiling.features
        store_tile(dx_ref, start, tiling, mask, dx * rstd)
        return sums[0] + jnp.sum(dy * x_hat, axis=0), sums[1] + jnp.sum(dy, axis=0)

    zeros = jnp.zeros((tiling.block_features,), jnp.float32)
    dscale, dbias = lax.fori_loop(0, steps, step, (zeros, zeros))
    dscale_ref[program, :] = dscale
    dbias_ref[program, :] = dbias


def _tuned(config: RowNormConfig, dtype: Any, stage: str) -> dict[str, int]:
    """The measured settings of this kernel, dtype, row width and ``stage``."""
    kernel = "layer_norm" if config.centered else "rms_norm"
    return tuned_settings(kernel, jnp.dtype(dtype).name, config.tiling.block_features, stage)


def _stage_tiling(config: RowNormConfig, tuned: dict[str, int]) -> Tiling:
    """``config``'s row view tiled with the ``tuned`` settings."""
    base = config.tiling
    return make_tiling(base.rows, base.features, base.interpret, tuned=tuned)


def _forward(x: Array, scale: Array, bias: Array, config: RowNormConfig) -> Array:
    """``y`` of the ``(R, N)`` view, one program per row tile."""
    tiling = _stage_tiling(config, _tuned(config, x.dtype, "forward"))
    config = dataclasses.replace(config, tiling=tiling)
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(tiling.row_blocks,),
        out_shape=jax.ShapeDtypeStruct(x.shape, config.dtype),
        interpret=tiling.interpret,
        compiler_params=tiling.compiler_params(),
        name="jaxnorm_row_norm_forward",
    )(x, scale, bias)


def _backward(x: Array, scale: Array, dy: Array, config: RowNormConfig
              ) -> tuple[Array, Array, Array]:
    """``(dx, dscale_partials, dbias_partials)``: the partials ``(programs,
    block_features)`` float32, one row per program."""
    tuned = _tuned(config, x.dtype, "backward")
    tiling = _stage_tiling(config, tuned)
    config = dataclasses.replace(config, tiling=tiling)
    partials = MAX_PARTIAL_BLOCKS or tuned.get("partials") or DEFAULT_PARTIAL_BLOCKS
    programs = min(tiling.row_blocks, partials)
    partial = jax.ShapeDtypeStruct((programs, tiling.block_features), jnp.float32)
    kernel = functools.partial(_backward_kernel, config=config, programs=programs,
                               steps=pl.cdiv(tiling.row_blocks, programs))
    return pl.pallas_call(
        kernel,
        grid=(programs,),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), partial, partial),
        interpret=tiling.interpret,
        compiler_params=tiling.compiler_params(),
        name="jaxnorm_row_norm_backward",
    )(x, scale, dy)


_row_norm_vjp = with_partial_sums_backward(_forward, _backward)


def row_norm(x: Array, scale: Array, bias: Array, config: Any) -> Array:
    r"""LayerNorm (``config.centered``) or RMSNorm of each row of ``x``.

    Args:
      x: ``(R, N)``, floating.
      scale: :math:`\gamma`, ``(N,)``.
      bias: :math:`\beta`, ``(N,)``.
      config: the static settings.

    Returns:
      ``y``, ``(R, N)`` in ``config.dtype``.
    """
    return _row_norm_vjp(x, scale, bias, config)
