"""Axis canonicalisation and argument validation: every clear error the library raises."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    """Returns ``axes`` as sorted non-negative ints; raises ``ValueError`` naming ``name``."""
    if isinstance(axes, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axes!r}")
    if isinstance(axes, (int, np.integer)):
        raw = (axes,)
    elif isinstance(axes, (tuple, list, range, np.ndarray)):
        raw = tuple(axes)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axes!r}")
    canonical = []
    for axis in raw:
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"{name} must contain ints, got {axis!r} in {axes!r}")
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{name}={axes!r} is out of range for an input with {ndim} dimensions"
            )
        canonical.append(int(axis) % ndim)
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"{name}={axes!r} contains duplicate axes")
    return tuple(sorted(canonical))


def canonicalize_axis(axis: Any, ndim: int, name: str) -> int:
    """A single axis (an int, negative allowed) as a non-negative int; errors name ``name``."""
    if isinstance(axis, (tuple, list)) and len(axis) == 1:
        axis = axis[0]
    if isinstance(axis, (tuple, list)):
        raise ValueError(f"{name} must be a single axis, got {len(axis)} axes: {axis!r}")  # noqa: TRY004 (a wrong count of axes)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        # a TypeError, like every axis argument that is not made of ints
        raise TypeError(f"{name} must be a single int axis, got {axis!r}")
    (canonical,) = canonicalize_axes(axis, ndim, name)
    return canonical


def complement_axes(ndim: int, *excluded: Sequence[int]) -> tuple[int, ...]:
    """The axes of an ``ndim``-dimensional array not in any of ``excluded``."""
    skip = {a for group in excluded for a in group}
    return tuple(a for a in range(ndim) if a not in skip)


def check_floating(x: Any, name: str = "x", allow_complex: bool = False) -> jax.Array:
    """Returns ``x`` as an array; raises ``TypeError`` unless its dtype is floating (or
    complex, with ``allow_complex``)."""
    x = jnp.asarray(x)
    if allow_complex and jnp.issubdtype(x.dtype, jnp.complexfloating):
        return x
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def as_floating(x: Any) -> jax.Array:
    """``x`` as an array, integers and booleans promoted to float32 (the modules accept
    them as Flax's do; the functional API asks for floating input)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.float32)
    return x


def check_eps(eps: Any, name: str = "eps") -> None:
    """Raises unless ``eps`` is a non-negative real scalar: ``TypeError`` for None, strings,
    booleans and non-real values, ``ValueError`` for arrays with more than one value,
    negative numbers and NaN (tracers must be scalars and pass unchecked otherwise)."""
    if isinstance(eps, jax.core.Tracer):
        if eps.shape != ():
            raise ValueError(f"{name} must be a scalar, got a traced array of shape {eps.shape}")
        return
    if eps is None or isinstance(eps, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a non-negative real number, got {eps!r}")
    value = np.asarray(eps)
    if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        raise TypeError(f"{name} must be a non-negative real number, got {eps!r}")
    if value.shape != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {value.shape}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative number, got {eps!r}")


def _concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0


def check_momentum(momentum: Any) -> None:
    """Raises ``ValueError`` unless ``momentum`` is None or a number in ``[0, 1]`` (traced
    values, e.g. schedules, pass unchecked)."""
    if momentum is None or not _concrete(momentum):
        return
    if isinstance(momentum, (str, bytes, bool)) or not 0 <= float(momentum) <= 1:
        raise ValueError(
            f"momentum must lie in [0, 1] (the weight of the old running average; PyTorch's "
            f"momentum m is 1 - m here) or be None, got {momentum!r}"
        )


def check_renorm_limits(r_max: Any, d_max: Any) -> None:
    """Raises ``ValueError`` unless ``r_max >= 1`` and ``d_max >= 0`` (traced values and
    schedules, callables of the step, pass)."""
    if not callable(r_max) and _concrete(r_max) and not float(r_max) >= 1:
        raise ValueError(f"r_max must be at least 1 (1 disables the r correction), got {r_max!r}")
    if not callable(d_max) and _concrete(d_max) and not float(d_max) >= 0:
        raise ValueError(f"d_max must be at least 0 (0 disables the d correction), got {d_max!r}")


def renorm_limits_at(r_max: Any, d_max: Any, step: Any) -> tuple[Any, Any]:
    """Batch renormalization's ``(r_max, d_max)`` at ``step``: a schedule (a callable, e.g.
    an optax schedule) is evaluated there, a number kept; both checked."""
    check_renorm_limits(r_max, d_max)
    limits = tuple(limit(step) if callable(limit) else limit for limit in (r_max, d_max))
    check_renorm_limits(*limits)
    return limits  # type: ignore[return-value]


def check_shape(value: Any, expected: tuple[int, ...], name: str) -> jax.Array | None:
    """Returns ``value`` as an array after checking its shape equals ``expected``."""
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.shape != tuple(expected):
        raise ValueError(
            f"{name} has shape {value.shape} but the feature shape is {tuple(expected)}"
        )
    return value


def broadcast_mask(mask: Any, shape: tuple[int, ...], name: str = "mask") -> jax.Array | None:
    """Returns ``mask`` as a boolean array of ``shape``; ``ValueError`` if it does not broadcast."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise TypeError(f"{name} must be boolean (or 0/1 integers), got dtype {mask.dtype}")
    try:
        np.broadcast_shapes(mask.shape, shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {mask.shape} is not broadcastable to the input shape {shape}"
        ) from None
    if np.broadcast_shapes(mask.shape, shape) != tuple(shape):
        raise ValueError(
            f"{name} of shape {mask.shape} would broadcast the input shape {shape} to a larger one"
        )
    return jnp.broadcast_to(mask.astype(bool), shape)


def feature_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of per-feature parameters: ``tuple(shape[a] for a in feature_axes)``."""
    return tuple(shape[a] for a in feature_axes)


def expand_to_rank(value: jax.Array, ndim: int, axes: tuple[int, ...]) -> jax.Array:
    """Reshapes a feature-shaped ``value`` so it broadcasts against an ``ndim`` array on ``axes``."""
    shape = [1] * ndim
    for axis, size in zip(axes, value.shape, strict=True):
        shape[axis] = size
    return value.reshape(shape)
