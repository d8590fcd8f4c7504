r"""What the Pallas kernels of jaxnorm share: the Triton kernels' backend, tile sizes and
masked tiles; for every kernel, interpret mode off a GPU and the ``custom_vjp`` of a row
kernel whose backward writes partial sums (:func:`with_partial_sums_backward`). The Mosaic
GPU kernels (:mod:`jaxnorm._pallas_mosaic_rows`, :mod:`jaxnorm._pallas_mosaic_groups`)
keep their own arrangement.

**Backend.** The kernels of :mod:`jaxnorm._pallas_layer_norm` and
:mod:`jaxnorm._pallas_group_norm` are written for the Pallas *Triton* backend
(``jax.experimental.pallas.triton``: ``load``/``store`` with masks, ``CompilerParams``),
which compiles for any CUDA GPU JAX supports and, unlike Mosaic GPU, takes tiles of any
row length through masked loads. JAX calls that backend deprecated in favour of Mosaic GPU
(Hopper and later); it still ships and runs in JAX 0.10 and 0.11 (0.11 warns with a
``DeprecationWarning`` when a kernel is lowered). The kernels were compiled, checked
against the XLA path and timed on an H200 with JAX 0.11.2 by ``benchmarks/pallas_check.py``.
On a backend other than GPU the same kernel bodies run in Pallas interpret mode, which is
how the test suite checks them.

**Tiles.** A kernel holds ``block_rows`` whole rows on chip, padded to a power of two
(Triton's tensor sizes must be powers of two); elements past the row end or past the last
row are masked: loaded as 0 and never stored.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the Triton backend's masked load/store (JAX 0.4.31+; still present in 0.11)
    from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - a JAX without the Triton backend
    pl_triton = None

Array = jax.Array

MAX_FEATURES = 65536
"""The longest row a kernel holds on chip (in elements)."""

DEFAULT_TILE_ELEMENTS = 4096
"""Elements of one tile of ``x`` a program holds (rows times padded row length), where
neither :data:`TILE_ELEMENTS` nor a measured setting (:mod:`jaxnorm._pallas_tuning`) says."""

TILE_ELEMENTS: int | None = None
"""Overrides every tile size (``benchmarks/pallas_tune.py`` sets it); None: measured or
default."""

MAX_BLOCK_ROWS = 16
"""The most rows one program holds."""

NUM_WARPS: int | None = None
"""Overrides the warps of every program; None: measured, else :func:`warps_for`."""


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a ``(rows, features)`` array is cut into tiles.

    Args:
      rows: number of rows :math:`R`.
      features: row length :math:`N`.
      block_rows: rows per tile (a power of two).
      block_features: the row length padded to a power of two.
      num_warps: warps per program (Triton).
      interpret: run in Pallas interpret mode (off a GPU).
    """

    rows: int
    features: int
    block_rows: int
    block_features: int
    num_warps: int
    interpret: bool

    @property
    def row_blocks(self) -> int:
        """Number of row tiles, :math:`\\lceil R / \\text{block\\_rows} \\rceil`."""
        return pl.cdiv(self.rows, self.block_rows)

    def compiler_params(self) -> object | None:
        """The Triton compiler parameters (None in interpret mode)."""
        if self.interpret or pl_triton is None:
            return None
        return pl_triton.CompilerParams(num_warps=self.num_warps)


def interpret_mode() -> bool:
    """True unless JAX's default backend is a GPU: the kernels then run interpreted."""
    return jax.default_backend() != "gpu"


def check_backend_available() -> None:
    """Raises ``RuntimeError`` when this JAX has no Pallas Triton backend."""
    if pl_triton is None:
        raise RuntimeError(
            "implementation='pallas' needs jax.experimental.pallas.triton, which this JAX "
            "lacks; use implementation='xla'"
        )


def make_tiling(rows: int, features: int, interpret: bool | None = None, *,
                tuned: dict[str, int] | None = None) -> Tiling:
    """The tiling of a ``(rows, features)`` array: whole rows, about
    :data:`TILE_ELEMENTS` (else ``tuned["tile"]``, else :data:`DEFAULT_TILE_ELEMENTS`)
    elements a tile.

    Args:
      rows: number of rows.
      features: row length, at most :data:`MAX_FEATURES`.
      interpret: force interpret mode on or off; None: :func:`interpret_mode`.
      tuned: measured settings (``tile``, ``warps``) of :mod:`jaxnorm._pallas_tuning`.
    """
    if features > MAX_FEATURES:
        raise ValueError(
            f"implementation='pallas' holds whole rows on chip: at most {MAX_FEATURES} "
            f"features, got {features}; use implementation='xla'"
        )
    block_features = pl.next_power_of_2(max(features, 1))
    tuned = tuned or {}
    tile_elements = TILE_ELEMENTS or tuned.get("tile") or DEFAULT_TILE_ELEMENTS
    block_rows = max(1, min(MAX_BLOCK_ROWS, tile_elements // block_features))
    block_rows = min(block_rows, pl.next_power_of_2(max(rows, 1)))
    num_warps = NUM_WARPS or tuned.get("warps") or warps_for(block_rows * block_features)
    interpret = interpret_mode() if interpret is None else interpret
    return Tiling(rows, features, block_rows, block_features, num_warps, interpret)


def warps_for(tile_elements: int) -> int:
    """The default warps of a program holding ``tile_elements``: one per 256, 1 to 8."""
    return min(8, max(1, tile_elements // 256))


def row_indices(start: Array, size: int) -> Array:
    """``start + [0, size)``: the row (or column) indices of a tile."""
    return start + jnp.arange(size)


def tile_mask(rows: Array, cols: Array, num_rows: int, num_cols: int) -> Array:
    """Boolean ``(len(rows), len(cols))``: the tile's elements inside the array."""
    return (rows < num_rows)[:, None] & (cols < num_cols)[None, :]


def load_tile(ref: object, row_start: Array, tiling: Tiling, mask: Array) -> Array:
    """The ``(block_rows, block_features)`` tile of ``ref`` from row ``row_start`` in
    float32, 0 outside the array."""
    view = ref.at[pl.ds(row_start, tiling.block_rows), pl.ds(0, tiling.block_features)]
    return pl_triton.load(view, mask=mask, other=0).astype(jnp.float32)


def store_tile(ref: object, row_start: Array, tiling: Tiling, mask: Array, value: Array) -> None:
    """Writes ``value`` (a tile) into ``ref`` from row ``row_start``, inside the array only."""
    view = ref.at[pl.ds(row_start, tiling.block_rows), pl.ds(0, tiling.block_features)]
    pl_triton.store(view, value.astype(ref.dtype), mask=mask)


def load_vector(ref: object, tiling: Tiling, row: Array | None = None) -> Array:
    """A length-``features`` vector (``scale``/``bias``; with ``row``, that row of a
    ``(rows, features)`` array), padded with 0, as float32 ``(1, block_features)``."""
    cols = jnp.arange(tiling.block_features)
    # one indexer: the Triton lowering takes no chained ``.at``
    span = pl.ds(0, tiling.block_features)
    view = ref.at[span] if row is None else ref.at[row, span]
    value = pl_triton.load(view, mask=cols < tiling.features, other=0)
    return value.astype(jnp.float32)[None, :]


def with_partial_sums_backward(forward: Callable[..., Array],
                               backward: Callable[..., tuple[Array, Array, Array]]
                               ) -> Callable[..., Array]:
    r"""``norm(x, scale, bias, config)`` computing ``forward(x, scale, bias, config)``, with
    a ``custom_vjp`` whose backward kernel ``backward(x, scale, dy, config)`` returns
    ``(dx, dscale_partials, dbias_partials)``: float32 partial sums of
    :math:`\bar y\hat x` and :math:`\bar y`, one row a program (at least :math:`N` wide),
    which XLA adds into :math:`\bar\gamma`, :math:`\bar\beta`. ``config`` is static.

    Args:
      forward: the forward kernel's wrapper.
      backward: the backward kernel's wrapper.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def norm(x: Array, scale: Array, bias: Array, config: Any) -> Array:
        return forward(x, scale, bias, config)

    def norm_fwd(x: Array, scale: Array, bias: Array, config: Any
                 ) -> tuple[Array, tuple[Array, Array, Array]]:
        return forward(x, scale, bias, config), (x, scale, bias)

    def norm_bwd(config: Any, residuals: tuple[Array, Array, Array], dy: Array
                 ) -> tuple[Array, Array, Array]:
        x, scale, bias = residuals
        dx, dscale, dbias = backward(x, scale, dy, config)
        features = x.shape[-1]
        return (dx, jnp.sum(dscale, axis=0)[:features].astype(scale.dtype),
                jnp.sum(dbias, axis=0)[:features].astype(bias.dtype))

    norm.defvjp(norm_fwd, norm_bwd)
    return norm
