r"""Weight normalization (Salimans & Kingma 2016) as a pure function.

The weight is reparametrized by a direction :math:`v` and a magnitude :math:`g`:

.. math:: w = g \cdot \frac{v}{\lVert v \rVert},\qquad
   \lVert v \rVert = \sqrt{\textstyle\sum_{i \in R} v_i^2 + \epsilon}

where :math:`R` is every axis of :math:`v` except the output-feature axes, so each output
feature gets its own norm and its own :math:`g`. The :math:`\epsilon` inside the square root
is Flax's convention (``flax.linen.WeightNorm``); PyTorch's ``weight_norm`` has none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._weight_axes import WeightAxes, check_epsilon, other_axes, reduction_dtype, weight_axes

Array = jax.Array


def _broadcast_magnitude(
    g: Array, v_shape: tuple[int, ...], features: tuple[int, ...]
) -> Array:
    """``g`` reshaped to broadcast against ``v``: accepts the feature shape
    (``v.shape`` at ``features``, Flax's layout) or the kept-dims shape (1 on every reduced
    axis, PyTorch's layout)."""
    compact = tuple(v_shape[axis] for axis in features)
    kept = tuple(size if axis in features else 1 for axis, size in enumerate(v_shape))
    if g.shape == compact:
        return g.reshape(kept)
    if g.shape == kept:
        return g
    raise ValueError(
        f"g must have shape {compact} (v's shape at feature_axes) or {kept}, got {g.shape}"
    )


def weight_norm(
    v: Array,
    g: Array | None = None,
    *,
    feature_axes: WeightAxes | None = -1,
    eps: float = 1e-12,
    dtype: jnp.dtype | None = None,
) -> Array:
    r"""The weight-normalized weight :math:`w = g\,v / \sqrt{\sum_{i\in R} v_i^2+\epsilon}`.

    The norm runs over every axis of ``v`` not in ``feature_axes`` (for a Flax ``Dense``
    kernel ``(in, out)`` or ``Conv`` kernel ``(..., in, out)``: all but the last), in at
    least float32. Differentiable in ``v`` and ``g``:
    :math:`\partial L/\partial g = \hat v \cdot \partial L/\partial w` and
    :math:`\partial L/\partial v = \frac{g}{\lVert v\rVert}(I - \hat v\hat v^\top)\,
    \partial L/\partial w` per output feature, with :math:`\hat v = v/\lVert v\rVert`.

    Args:
      v: the direction parameter, any shape.
      g: the magnitude, shaped as ``v`` at ``feature_axes`` (Flax) or with size-1 reduced
        axes (PyTorch's ``weight_g``); ``None`` for unit norm (``use_scale=False``).
      feature_axes: the output-feature axes of ``v``, one norm per feature; ``None`` for a
        single norm over the whole tensor (``g`` then a scalar).
      eps: added to the squared norm before the square root (>= 0).
      dtype: the result dtype; default the promoted dtype of ``v`` and ``g``.

    Returns:
      ``w``, shaped as ``v``.
    """
    v = jnp.asarray(v)
    check_epsilon(eps)
    features = () if feature_axes is None else weight_axes(feature_axes, v.ndim, "feature_axes")
    operands = (v,) if g is None else (v, jnp.asarray(g))
    out_dtype = jnp.result_type(*operands) if dtype is None else dtype
    compute = reduction_dtype(*(a.dtype for a in operands))
    v_compute = v.astype(compute)
    squared_norm = jnp.sum(
        jnp.square(v_compute), axis=other_axes(v.ndim, features), keepdims=True
    )
    w = v_compute * lax.rsqrt(squared_norm + jnp.asarray(eps, compute))
    if g is not None:
        w = w * _broadcast_magnitude(jnp.asarray(g), v.shape, features).astype(compute)
    return w.astype(out_dtype)
