r"""Local response normalization across channels (Krizhevsky et al. 2012)."""

from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxnorm._axes import canonicalize_axis, check_floating
from jaxnorm._sharding import explicit_shards
from jaxnorm._stats import statistics_dtype

Array = jax.Array


def _unsharded(spec: PartitionSpec, axis: int, ndim: int) -> PartitionSpec:
    """``spec`` (padded to ``ndim`` entries) with ``axis`` not sharded."""
    entries = list(tuple(spec) + (None,) * (ndim - len(tuple(spec))))
    entries[axis] = None
    return PartitionSpec(*entries)


def local_response_norm(
    x: Array,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    feature_axis: int = -1,
) -> Array:
    r"""Local response normalization across channels (Krizhevsky et al. 2012).

    :math:`b_c = a_c\,(k + \tfrac{\alpha}{n}\sum_{c' = c - \lfloor n/2 \rfloor}^{c +
    \lfloor (n-1)/2 \rfloor} a_{c'}^2)^{-\beta}`, zero-padded, as ``torch.nn.LocalResponseNorm``.
    With the channel axis explicitly sharded, the squares are gathered along it for the
    window (one all-gather); other sharded axes need nothing.

    Args:
      x: floating input.
      size: the window :math:`n`, in channels (a positive int).
      alpha: the multiplier :math:`\alpha`.
      beta: the exponent :math:`\beta`.
      k: the additive constant :math:`k`.
      feature_axis: the channel axis.

    Returns:
      ``b``, the shape and dtype of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.local_response_norm(jnp.ones((1, 3)), size=1, alpha=1.0, beta=1.0)
      >>> y.tolist()
      [[0.5, 0.5, 0.5]]
    """
    x = check_floating(x)
    axis = canonicalize_axis(feature_axis, x.ndim, "feature_axis")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    size = int(size)
    compute = statistics_dtype(x.dtype)
    xc = x.astype(compute)
    window = [1] * x.ndim
    window[axis] = size
    padding = [(0, 0)] * x.ndim
    padding[axis] = (size // 2, (size - 1) // 2)
    squares = xc * xc
    sharding = jax.typeof(xc).sharding if axis in explicit_shards(xc) else None
    if sharding is not None:  # a window across shards: gather the channels for it
        squares = jax.sharding.reshard(squares, _unsharded(sharding.spec, axis, x.ndim))
    square_sum = lax.reduce_window(
        squares, 0.0, lax.add, window, [1] * x.ndim, padding  # a Python 0 keeps jit'd grad-of-grad
    )
    if sharding is not None:
        square_sum = jax.sharding.reshard(square_sum, sharding.spec)
    denominator = k + (alpha / size) * square_sum
    return (xc * denominator ** (-beta)).astype(x.dtype)
