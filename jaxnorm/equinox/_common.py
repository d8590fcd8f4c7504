"""Helpers shared by the Equinox layers: dtypes, the inference flag, shape checks."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
AxisName = Hashable | Sequence[Hashable]


class _NoState:
    """The default of a stateless layer's ``state`` argument: not passed (Equinox's
    optional-state rule returns ``y`` then, and ``(y, state)`` for any passed value, ``None``
    included)."""

    def __repr__(self) -> str:
        return "NO_STATE"


NO_STATE: Any = _NoState()


def with_state(y: Array, state: Any) -> Any:
    """``y``, or ``(y, state)`` when a state was passed (``None`` included, as Equinox)."""
    return y if state is NO_STATE else (y, state)


def default_dtype(dtype: Any) -> Any:
    """``dtype``, or Equinox's default floating dtype (float64 with ``jax_enable_x64``)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype


def resolve_inference(attribute: bool, argument: bool | None) -> bool:
    """The call's ``inference`` argument when given, else the layer's attribute."""
    return attribute if argument is None else argument


def static_axis_name(axis_name: Any) -> AxisName:
    """``axis_name`` as a hashable static value: a list of names becomes a tuple."""
    if isinstance(axis_name, list):
        return tuple(axis_name)
    return axis_name


def ones_and_zeros(
    shape: tuple[int, ...], dtype: Any, use_weight: bool, use_bias: bool
) -> tuple[Array | None, Array | None]:
    """The initial ``(weight, bias)``: ones and zeros of ``shape``, or None when unused."""
    weight = jnp.ones(shape, dtype) if use_weight else None
    bias = jnp.zeros(shape, dtype) if use_bias else None
    return weight, bias


def check_input_shape(x: Array, shape: tuple[int, ...], layer: str) -> None:
    """Raises ``ValueError`` unless ``x.shape == shape`` (Equinox's LayerNorm rule: a batch
    comes from ``vmap``, never from extra leading axes)."""
    if x.shape != shape:
        raise ValueError(
            f"{layer}(shape={shape}) needs x of exactly that shape, got {x.shape}; "
            f"for a batch use jax.vmap({layer.lower()})(x)"
        )


def check_channels(x: Array, channels: int, layer: str) -> None:
    """Raises ``ValueError`` unless ``x`` is channels-first with ``channels`` channels."""
    if x.ndim < 1 or x.shape[0] != channels:
        raise ValueError(
            f"{layer} with {channels} channels needs unbatched channels-first x of shape "
            f"({channels}, *spatial), got {x.shape}; for a batch use jax.vmap"
        )
