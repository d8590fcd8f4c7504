r"""The affine every normalization ends with, its static settings and its dtype rules.

:math:`y = (x - \mu)\,r\gamma + \beta` with :math:`r = (\sigma^2 + \epsilon)^{-1/2}`
(:func:`standardize` after :func:`scaled_rstd`), or folded, :math:`y = x a + b`
(:func:`affine_coefficients`); outputs in :func:`output_dtype`, arithmetic in
:func:`compute_dtype`. Written once here; the derivative, the dispatcher, evaluation-mode
BatchNorm and folding all call it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._implementation import check_implementation
from jaxnorm._stats import statistics_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class NormSpec:
    r"""What to normalize over and how: the static settings of one normalization.

    Args:
      reduction: the reduction axes (sorted, non-negative).
      eps: the :math:`\epsilon` added to the variance.
      dtype: the output dtype.
      centered: subtract the mean (``False``: RMS normalization, :math:`\mu = 0`,
        :math:`\sigma^2 = E[x^2]`).
      fast_variance: Flax's one-pass :math:`E[x^2] - \mu^2` (see :func:`jaxnorm.moments`).
      implementation: ``"xla"``, ``"pallas"`` or None (automatic): the caller's
        ``implementation=`` (checked here), read by the Pallas backend
        (:mod:`jaxnorm._pallas_dispatch`).
      layer: the named normalization whose Pallas kernel may compute this one:
        ``"LayerNorm"``/``"RMSNorm"`` (rows over trailing axes), ``"GroupNorm"`` (``x``
        viewed grouped, ``(B, ..., G, C/G)``), ``"InstanceNorm"``; None: no kernel does.
    """

    reduction: tuple[int, ...]
    eps: float
    dtype: Any
    centered: bool = True
    fast_variance: bool = False
    implementation: str | None = None
    layer: str | None = None

    def __post_init__(self) -> None:
        check_implementation(self.implementation)


def output_dtype(dtype: Any, *arrays: Array | None) -> jnp.dtype:
    """``dtype`` if given, else the promoted dtype of the non-None ``arrays`` (as Flax)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*(a for a in arrays if a is not None))


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype the affine runs in: the promoted dtype of ``dtypes``, at least float32."""
    return statistics_dtype(jnp.result_type(*dtypes))


def scaled_rstd(var: Array, scale: Array | None, eps: Any, compute: Any) -> Array:
    r""":math:`r\gamma = \gamma / \sqrt{\sigma^2 + \epsilon}` in ``compute`` (:math:`r`
    alone without ``scale``)."""
    multiplier = lax.rsqrt(var.astype(compute) + jnp.asarray(eps, compute))
    return multiplier if scale is None else multiplier * scale.astype(compute)


def standardize(
    x: Array,
    mean: Array | None,
    multiplier: Array,
    bias: Array | None,
    dtype: Any,
    counted: Array | None = None,
) -> Array:
    r""":math:`y = (x - \mu)\,m + \beta` in ``multiplier``'s dtype, returned in ``dtype``;
    ``mean=None`` skips centring, ``bias=None`` the shift. Where ``counted`` (keepdims,
    boolean) is False the set had no counted element and ``y`` is exactly :math:`\beta`
    (0 without bias), whatever ``x`` holds there."""
    compute = multiplier.dtype
    y = x.astype(compute)
    if mean is not None:
        y = y - mean.astype(compute)
    y = y * multiplier
    if bias is not None:
        y = y + bias.astype(compute)
    if counted is not None:
        y = jnp.where(counted, y, jnp.zeros((), compute) if bias is None else bias.astype(compute))
    return y.astype(dtype)


def affine_coefficients(
    mean: Array,
    var: Array,
    scale: Array | None,
    bias: Array | None,
    eps: Any,
    compute: Any,
) -> tuple[Array, Array]:
    r"""The folded affine :math:`(a, b)` with :math:`y = x a + b`:
    :math:`a = \gamma / \sqrt{\sigma^2 + \epsilon}`, :math:`b = \beta - \mu a`
    (evaluation-mode BatchNorm and folding into a preceding layer)."""
    multiplier = scaled_rstd(var, scale, eps, compute)
    offset = -mean.astype(compute) * multiplier
    if bias is not None:
        offset = offset + bias.astype(compute)
    return multiplier, offset


