"""Axis arguments of the weight-side normalizations, checked with errors that name them."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax.numpy as jnp

WeightAxes = int | Sequence[int]


def weight_axes(axes: WeightAxes, ndim: int, name: str) -> tuple[int, ...]:
    """``axes`` of an ``ndim``-dimensional weight as sorted, non-negative, distinct ints.

    Args:
      axes: one axis or a sequence of axes; negative axes count from the end.
      ndim: the number of dimensions of the weight.
      name: the argument's name, for the error messages.

    Raises:
      TypeError: an axis is not an integer.
      ValueError: an axis is out of range or repeated.
    """
    items = (axes,) if not isinstance(axes, Sequence) else tuple(axes)
    result = []
    for axis in items:
        if isinstance(axis, bool):
            raise TypeError(f"{name} must be an int or a sequence of ints, got {axes!r}")
        try:
            axis = operator.index(axis)
        except TypeError:
            raise TypeError(
                f"{name} must be an int or a sequence of ints, got {axes!r}"
            ) from None
        if not -ndim <= axis < ndim:
            raise ValueError(f"{name}={axes!r} is out of range for a {ndim}-d weight")
        result.append(axis % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"{name}={axes!r} repeats an axis")
    return tuple(sorted(result))


def other_axes(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
    """Every axis of an ``ndim``-dimensional array that is not in ``axes``.

    Args:
      ndim: the number of dimensions.
      axes: the canonical axes to leave out.
    """
    return tuple(axis for axis in range(ndim) if axis not in axes)


def check_epsilon(eps: float, name: str = "eps") -> None:
    """Raises ``ValueError`` unless ``eps`` is a finite number ``>= 0``.

    Args:
      eps: the value to check.
      name: the argument's name, for the error message.
    """
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not (
        math.isfinite(eps) and eps >= 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")


def reduction_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
    """The dtype the reductions run in: the promoted floating dtype, at least float32.

    Args:
      *dtypes: the dtypes of the operands.
    """
    promoted = jnp.result_type(*dtypes)
    if not jnp.issubdtype(promoted, jnp.floating):
        raise TypeError(f"weights must be floating point, got {promoted}")
    return jnp.promote_types(promoted, jnp.float32)
