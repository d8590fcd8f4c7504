r"""Spectral normalization (Miyato et al. 2018) as pure functions.

A weight is viewed as the matrix :math:`W \in \mathbb{R}^{m \times n}` whose columns are the
``n`` output features (Flax's kernel layout ``(..., in, out)`` flattened to
``(-1, out)``). Its largest singular value :math:`\sigma(W)` is estimated by power iteration
on a persistent output-space vector :math:`u`:

.. math:: v \leftarrow \frac{W u}{\lVert W u\rVert},\qquad
   u \leftarrow \frac{W^\top v}{\lVert W^\top v\rVert},\qquad
   \sigma = v^\top W u,

with :math:`\lVert x\rVert = \sqrt{\sum x_i^2 + \epsilon}` (Flax's convention; PyTorch
divides by :math:`\max(\lVert x\rVert, \epsilon)`). The normalized weight is
:math:`W/\sigma`. As in the paper (Algorithm 1) and Flax, the persistent vector lives in the
output space and :math:`u` and :math:`v` are constants for the gradient:
:math:`\partial\sigma/\partial W = v u^\top`.

PyTorch's ``parametrizations.spectral_norm`` runs the same iteration on its ``(out, in)``
matrix with the persistent vector on the *input* side (its ``_v``; its ``_u`` is recomputed
from it first), so one of its training steps is exactly
``spectral_norm(weight.reshape(out, -1), _v, n_steps=n_power_iterations)``: the
normalized weight (reshape it back), the new ``_v`` and :math:`\sigma`.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._weight_axes import check_epsilon, reduction_dtype, weight_axes

Array = jax.Array


def _l2_normalized(x: Array, eps: float) -> Array:
    """:math:`x / \\sqrt{\\sum x^2 + \\epsilon}`."""
    return x * lax.rsqrt(jnp.sum(jnp.square(x)) + jnp.asarray(eps, x.dtype))


def _check_steps(n_steps: int) -> int:
    """``n_steps`` as an int, or ``TypeError``/``ValueError`` naming it unless an int >= 1."""
    if isinstance(n_steps, bool):
        raise TypeError(f"n_steps must be an int >= 1, got {n_steps!r}")
    try:
        n_steps = operator.index(n_steps)
    except TypeError:
        raise TypeError(f"n_steps must be an int >= 1, got {n_steps!r}") from None
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return n_steps


def power_iteration(
    matrix: Array, u: Array, *, n_steps: int = 1, eps: float = 1e-12
) -> tuple[Array, Array]:
    r"""``n_steps`` power-iteration steps for the top singular vectors of ``matrix``.

    Each step is :math:`v \leftarrow \mathrm{normalize}(W u)`,
    :math:`u \leftarrow \mathrm{normalize}(W^\top v)`; then :math:`v^\top W u` estimates
    :math:`\sigma_{\max}(W)` from below and converges to it at the rate
    :math:`(\sigma_2/\sigma_1)^{2k}`.

    Args:
      matrix: :math:`W`, shape ``(m, n)``: rows the input space, columns the outputs.
      u: the current output-space vector, shape ``(n,)``; need not be normalized.
      n_steps: the number of steps (>= 1).
      eps: added to each squared norm before the square root (>= 0).

    Returns:
      ``(u, v)``: the new unit output-space vector ``(n,)`` and input-space vector
      ``(m,)``, in ``matrix``'s dtype.
    """
    matrix = jnp.asarray(matrix)
    u = jnp.asarray(u)
    n_steps = _check_steps(n_steps)
    check_epsilon(eps)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-d, got shape {matrix.shape}")
    if u.shape != (matrix.shape[1],):
        raise ValueError(f"u must have shape ({matrix.shape[1]},), got {u.shape}")
    u = u.astype(matrix.dtype)

    def step(_: int, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        u, _v = carry
        v = _l2_normalized(matrix @ u, eps)
        return _l2_normalized(matrix.T @ v, eps), v

    initial_v = jnp.zeros(matrix.shape[:1], matrix.dtype)
    return lax.fori_loop(0, n_steps, step, (u, initial_v))


def spectral_norm(
    w: Array,
    u: Array,
    *,
    n_steps: int = 1,
    eps: float = 1e-12,
    output_axis: int = -1,
    dtype: jnp.dtype | None = None,
) -> tuple[Array, Array, Array]:
    r"""The spectrally normalized weight :math:`w / \sigma(w)` by power iteration.

    ``w`` is viewed as the matrix :math:`W` of shape ``(-1, n)`` with ``output_axis``
    (size ``n``) moved last; ``n_steps`` power-iteration steps start from ``u`` (see
    :func:`power_iteration`); :math:`\sigma = v^\top W u` with the new :math:`u, v`
    held constant for the gradient. A zero :math:`\sigma` leaves ``w`` unchanged.

    Args:
      w: the weight, at least 2-d: a Flax kernel ``(..., in, out)`` with
        ``output_axis=-1`` or a PyTorch weight ``(out, in, ...)`` with ``output_axis=0``.
      u: the persistent output-space vector, shape ``(n,)`` or ``(1, n)`` (Flax's
        ``batch_stats`` layout).
      n_steps: power-iteration steps for this call (>= 1).
      eps: added to each squared norm in the iteration (>= 0).
      output_axis: the axis of ``w`` that indexes output features.
      dtype: the dtype of the normalized weight; default ``w``'s. The iteration runs in
        at least float32.

    Returns:
      ``(w_normalized, new_u, sigma)``: ``w / sigma`` shaped as ``w``; the updated ``u``
      in ``u``'s shape and dtype (store it for the next training call); the scalar
      :math:`\sigma` in the computation dtype.
    """
    w = jnp.asarray(w)
    u = jnp.asarray(u)
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 dimensions, got shape {w.shape}")
    (axis,) = weight_axes(output_axis, w.ndim, "output_axis")
    outputs = w.shape[axis]
    if u.shape not in ((outputs,), (1, outputs)):
        raise ValueError(f"u must have shape ({outputs},) or (1, {outputs}), got {u.shape}")
    compute = reduction_dtype(w.dtype, u.dtype)
    matrix = jnp.moveaxis(w, axis, -1).reshape(-1, outputs).astype(compute)
    start = u.reshape(outputs).astype(compute)
    n_steps = _check_steps(n_steps)
    if n_steps > 1:
        start, _ = power_iteration(lax.stop_gradient(matrix), start, n_steps=n_steps - 1,
                                   eps=eps)
    # The last step shares its product with sigma: W^T v normalized is the new u, and
    # sigma = v^T W u = (W^T v) . u (u, v constant for the gradient): one matrix product
    # fewer than forming v^T W u afresh.
    v = lax.stop_gradient(_l2_normalized(lax.stop_gradient(matrix) @ start, eps))
    transposed_v = matrix.T @ v
    new_u = lax.stop_gradient(_l2_normalized(lax.stop_gradient(transposed_v), eps))
    sigma = transposed_v @ new_u
    w_normalized = w.astype(compute) / jnp.where(sigma != 0, sigma, 1)
    out_dtype = w.dtype if dtype is None else dtype
    return w_normalized.astype(out_dtype), new_u.reshape(u.shape).astype(u.dtype), sigma
