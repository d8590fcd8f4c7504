r"""SpectralNorm and WeightNorm: wrappers that reparametrize one weight of a wrapped Equinox
layer (``weight_name``) and call the layer with it, as ``equinox.nn``'s do, with the same
leaves. Equinox's weights are ``(out, in, *kernel)``: output features on axis 0."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

from jaxnorm.equinox._common import resolve_inference

Array = jax.Array
Layer = TypeVar("Layer")
_INITIAL_ITERATIONS = 15  # power-iteration steps at construction, as Equinox


def _replaced(layer: Layer, name: str, weight: Array) -> Layer:
    """A copy of ``layer`` whose ``name`` attribute is ``weight``."""
    return eqx.tree_at(lambda module: getattr(module, name), layer, weight)


def _unit(vector: Array, eps: float) -> Array:
    r""":math:`x/\max(\lVert x\rVert, \epsilon)`, Equinox's normalization: exact for any
    norm above :math:`\epsilon` (an :math:`\epsilon` added to the squared norm would
    distort norms near :math:`\sqrt\epsilon`, i.e. weights of scale ~1e-6)."""
    return vector / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(vector))), eps)


def _power_iteration(matrix: Array, v: Array, eps: float, n_steps: int) -> tuple[Array, Array]:
    r"""``n_steps`` of :math:`u \leftarrow \widehat{Wv}`, :math:`v \leftarrow
    \widehat{W^\top u}` (as ``equinox.nn.SpectralNorm``); returns ``(u, v)``."""
    u = jnp.zeros(matrix.shape[:1], matrix.dtype)
    for _ in range(n_steps):
        u = _unit(matrix @ v, eps)
        v = _unit(matrix.T @ u, eps)
    return u, v


def _as_matrix(weight: Array) -> Array:
    """``weight`` as the ``(out, -1)`` matrix :math:`W`."""
    if weight.ndim < 2:
        raise ValueError(f"the weight must be at least 2-d, got shape {weight.shape}")
    return weight.reshape(weight.shape[0], -1)


class SpectralNorm(eqx.nn.StatefulLayer, Generic[Layer]):
    r"""Spectral normalization (Miyato et al. 2018), a drop-in for
    ``equinox.nn.SpectralNorm``: the wrapped layer runs with :math:`W/\sigma(W)`,
    :math:`\sigma = u^\top W v` from power iteration on the persistent pair
    :math:`(u, v)` in the state (:math:`u \leftarrow \widehat{Wv}`,
    :math:`v \leftarrow \widehat{W^\top u}`), advanced ``num_power_iterations`` steps per training
    call and frozen in inference; :math:`u, v` carry no gradient.

    Vectors are normalized as :math:`x/\max(\lVert x\rVert, \epsilon)`, as Equinox, so
    the result does not depend on the weight's scale. A zero :math:`\sigma` leaves
    :math:`W` unchanged (Equinox divides by it).

    Args:
      layer: the layer to wrap, e.g. an ``eqx.nn.Linear`` or ``eqx.nn.Conv2d``.
      weight_name: the name of the layer's weight (at least 2-d, outputs on axis 0).
      num_power_iterations: power-iteration steps per training call (0: none).
      eps: :math:`\epsilon` in the norms.
      inference: freeze :math:`(u, v)` (toggle with ``eqx.nn.inference_mode``).
      key: the random key of the initial :math:`v`, then iterated 15 steps (as Equinox,
        so the same key gives the same state).

    Attributes:
      uv_index: the state index of :math:`(u, v)`, shapes ``(out,)`` and ``(in·…,)``.
    """

    layer: Layer
    weight_name: str = eqx.field(static=True)
    uv_index: eqx.nn.StateIndex
    num_power_iterations: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    inference: bool

    def __init__(
        self, layer: Layer, weight_name: str, num_power_iterations: int = 1,
        eps: float = 1e-12, inference: bool = False, *, key: Array,
    ) -> None:
        self.layer, self.weight_name = layer, weight_name
        self.num_power_iterations, self.eps, self.inference = num_power_iterations, eps, inference
        matrix = _as_matrix(getattr(layer, weight_name))
        _, v_key = jr.split(key)
        v = jr.normal(v_key, matrix.shape[1:], matrix.dtype)
        u, v = _power_iteration(matrix, v, eps, _INITIAL_ITERATIONS)
        self.uv_index = eqx.nn.StateIndex((u, v))

    def __call__(
        self, x: Array, state: eqx.nn.State, *, key: Any = None, inference: bool | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """Calls the wrapped layer with the spectrally normalized weight.

        Args:
          x: the wrapped layer's input.
          state: the ``eqx.nn.State`` holding :math:`(u, v)`.
          key: ignored (Equinox's call protocol).
          inference: overrides the ``inference`` attribute when not None.

        Returns:
          ``(layer(x), state)``, the state advanced in training.
        """
        del key
        weight = getattr(self.layer, self.weight_name)
        matrix = _as_matrix(weight)
        u, v = state.get(self.uv_index)
        if not resolve_inference(self.inference, inference) and self.num_power_iterations:
            u, v = _power_iteration(lax.stop_gradient(matrix), v, self.eps,
                                    self.num_power_iterations)
            state = state.set(self.uv_index, (u, v))
        sigma = u @ matrix @ v
        normalized = (matrix / jnp.where(sigma != 0, sigma, 1)).reshape(weight.shape)
        return _replaced(self.layer, self.weight_name, normalized)(x), state


def _magnitude(weight: Array, axis: int | None, eps: float = 0.0) -> Array:
    r""":math:`\max(\lVert v\rVert, \epsilon)` over every axis except ``axis`` (all with
    None), kept dims, in at least float32; the floor applied to the squared norm, so the
    gradient stays finite at a zero direction."""
    other = tuple(a for a in range(weight.ndim) if axis is None or a != axis % weight.ndim)
    compute = jnp.promote_types(weight.dtype, jnp.float32)
    squared = jnp.sum(jnp.square(weight.astype(compute)), axis=other, keepdims=True)
    return jnp.sqrt(jnp.maximum(squared, jnp.asarray(eps, compute) ** 2))


class WeightNorm(eqx.Module, Generic[Layer]):
    r"""Weight normalization (Salimans & Kingma 2016), a drop-in for
    ``equinox.nn.WeightNorm``: the wrapped layer runs with
    :math:`w = g\,v/\max(\lVert v\rVert_R, \epsilon)`, :math:`v` the layer's weight
    (the direction), :math:`g` the learned magnitude (initially :math:`\lVert v\rVert`) and
    :math:`\lVert\cdot\rVert_R` the norm over every axis except ``axis``. Equinox has no
    :math:`\epsilon`; the floor (default :math:`10^{-12}`) changes nothing for any norm
    above it, at any weight scale, but keeps a zero direction (and its gradient) finite.

    Args:
      layer: the layer to wrap, e.g. an ``eqx.nn.Linear`` or ``eqx.nn.Conv2d``.
      weight_name: the name of the layer's weight.
      axis: the output axis, one norm per index of it; None for one norm over the whole
        weight.
      eps: :math:`\epsilon`, the floor of the norm (beyond Equinox).

    Attributes:
      g: the magnitude, shaped as the weight with size 1 on every reduced axis.
    """

    layer: Layer
    g: Array
    weight_name: str = eqx.field(static=True)
    axis: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, layer: Layer, weight_name: str = "weight", axis: int | None = 0,
                 *, eps: float = 1e-12) -> None:
        self.layer, self.weight_name, self.axis, self.eps = layer, weight_name, axis, eps
        weight = getattr(layer, weight_name)
        self.g = _magnitude(weight, axis).astype(weight.dtype)

    def __call__(self, x: Array, *, key: Any = None) -> Array:
        """Calls the wrapped layer with the weight-normalized weight.

        Args:
          x: the wrapped layer's input.
          key: ignored (Equinox's call protocol).

        Returns:
          ``layer(x)``.
        """
        del key
        v = getattr(self.layer, self.weight_name)
        w = (v * (self.g / _magnitude(v, self.axis, self.eps))).astype(
            jnp.result_type(v, self.g))
        return _replaced(self.layer, self.weight_name, w)(x)
