r"""Normalization with its statistics, and its closed-form derivative.

The hot path of every variant: :math:`\mu, \sigma^2` from :func:`jaxnorm.moments`, then
:math:`y = \hat x \gamma + \beta` with :math:`\hat x = (x - \mu)\,r`,
:math:`r = (\sigma^2 + \epsilon)^{-1/2}`. Differentiating that graph op by op would carry
the derivative through the branches and shifts of the stable statistics; instead a
``custom_jvp`` states the linearization in closed form (Ioffe & Szegedy 2015, section 3),
per reduction set :math:`S` of :math:`n` unmasked elements (weights :math:`w`):

.. math::
    \dot{\hat x} = r\,(\dot x - m_1 - \hat x\, m_2),\quad
    m_1 = \tfrac1n\textstyle\sum_S w\dot x,\quad m_2 = \tfrac1n\sum_S w\hat x\dot x,
    \qquad \dot\mu = m_1,\quad \dot{\sigma^2} = 2 m_2 / r,

(:math:`m_1 = 0` without centring). JAX transposes it for reverse mode, which gives the
textbook backward :math:`\bar x = r\gamma\bar y - \frac{w}{n}(\sum r\gamma\bar y + \hat x
\sum r\gamma\bar y\hat x)`; being a JVP it also serves forward mode (``jvp``,
``jacfwd``, ``hessian``), and it is plain ``jax.numpy``, so every order differentiates.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._affine import NormSpec, compute_dtype, standardize
from jaxnorm._sharding import explicit_shards
from jaxnorm._stats import chunk_view, element_count, gpu_chunks, shifted_moments

Array = jax.Array


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def normalize_with_statistics(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    mask: Array | None,
    spec: NormSpec,
) -> tuple[Array, Array, Array]:
    r"""``(y, mean, var)``: ``x`` normalized over ``spec.reduction`` with its own statistics.

    Args:
      x: floating input.
      scale: :math:`\gamma` broadcastable to ``x``, or None.
      bias: :math:`\beta` broadcastable to ``x``, or None.
      mask: boolean of ``x``'s shape, or None.
      spec: the static settings; ``spec.fast_variance`` changes the statistics, not the
        derivative.

    Returns:
      ``y`` in ``spec.dtype``; ``mean``/``var`` keep the reduced axes, at least float32.
    """
    return _forward(x, scale, bias, mask, spec)[0]


def _forward(
    x: Array, scale: Array | None, bias: Array | None, mask: Array | None, spec: NormSpec,
    differentiated: bool = False, per_set_derivative: bool = False,
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array]]:
    r"""The outputs, and ``(mean, r)`` for the tangent, with
    :math:`r = (\sigma^2 + \epsilon)^{-1/2}`; a set with nothing counted gets
    :math:`r = 0` and outputs exactly ``bias``. ``differentiated``: inside the derivative
    (single-pass statistics); ``per_set_derivative``: for :func:`_tangent_per_set`."""
    compute = compute_dtype(x.dtype, spec.dtype)
    stats = shifted_moments(
        x, spec.reduction, mask,
        centered=spec.centered, fast_variance=spec.fast_variance, single_pass=differentiated,
    )
    mean = stats.mean.astype(compute)
    rstd = lax.rsqrt(stats.var.astype(compute) + jnp.asarray(spec.eps, compute))
    counted = None
    if mask is not None:
        counted = stats.count > 0
        rstd = jnp.where(counted, rstd, 0)
    # x - mean, not (x - pivot) - offset: a difference shared with the statistics' pass
    # would be stored full-size by XLA (GPU) instead of recomputed in each kernel
    centre = mean if spec.centered else None
    if per_set_derivative and scale is not None:
        from_x_hat = functools.partial(_output_from_x_hat, dtype=spec.dtype)
        from_multiplier = functools.partial(_output_from_multiplier, dtype=spec.dtype)
        y = lax.platform_dependent(x, centre, rstd, scale, bias, counted, cpu=from_multiplier,
                                   default=from_x_hat)
    else:
        y = _output_from_multiplier(x, centre, rstd, scale, bias, counted, dtype=spec.dtype)
    return (y, stats.mean, stats.var), (mean, rstd)


def _output_from_multiplier(x: Array, mean: Array | None, rstd: Array, scale: Array | None,
                            bias: Array | None, counted: Array | None, *, dtype: Any
                            ) -> Array:
    r""":math:`y = (x - \mu)(r\gamma) + \beta`: one multiplier per set and channel."""
    multiplier = rstd if scale is None else rstd * scale.astype(rstd.dtype)
    return standardize(x, mean, multiplier, bias, dtype, counted)


def _output_from_x_hat(x: Array, mean: Array | None, rstd: Array, scale: Array,
                       bias: Array | None, counted: Array | None, *, dtype: Any) -> Array:
    r""":math:`y = \hat x\gamma + \beta` with :math:`\hat x = (x - \mu) r`, the
    :math:`\hat x` the per-set derivative's sums also form: XLA:TPU then computes ``y`` in
    the backward's pass over ``x`` and the cotangent, as it does for Flax's graph (v5e
    BatchNorm 32x56x56x64 bfloat16 forward+backward: 4 full passes to 3; H200: the same
    bytes either way; XLA:CPU keeps :func:`_output_from_multiplier`). A set with
    nothing counted has :math:`\hat x = 0`, so ``y`` is exactly ``bias``."""
    x_hat = standardize(x, mean, rstd, None, rstd.dtype, counted)
    y = x_hat * scale.astype(rstd.dtype)
    return (y if bias is None else y + bias.astype(rstd.dtype)).astype(dtype)


class _Linearization(NamedTuple):
    """What every form of the tangent needs: the primal pieces and the input tangent."""

    x: Array
    scale: Array | None
    mean: Array
    rstd: Array
    count: Array
    dx: Array
    dx_counted: Array  # dx with masked positions zeroed, in the compute dtype
    mask: Array | None

    def centred(self, x: Array, mean: Array, centered: bool) -> Array:
        r""":math:`x - \mu` in the compute dtype (``x`` itself without centring)."""
        x = x.astype(self.rstd.dtype)
        return x - mean if centered else x


def _tangent(
    spec: NormSpec, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
    r"""The closed-form linearization (module docstring), in one of two arrangements
    chosen so that its transpose is cheap: :func:`_tangent_per_set` when the parameters
    are constant over each reduction set (BatchNorm, InstanceNorm, GroupNorm),
    :func:`_tangent_per_element` when they vary along every reduction axis (LayerNorm,
    RMSNorm)."""
    x, scale, bias, mask = primals
    dx, dscale, dbias, _ = tangents
    parameter = scale if scale is not None else bias
    per_element = parameter is not None and all(parameter.shape[a] != 1
                                                for a in spec.reduction)
    (y, mean, var), (compute_mean, rstd) = _forward(x, scale, bias, mask, spec, True,
                                                    not per_element)
    compute = rstd.dtype
    count = jnp.maximum(element_count(x.shape, spec.reduction, mask, compute), 1)
    dx_counted = dx.astype(compute) if mask is None else jnp.where(mask, dx, 0).astype(compute)
    lin = _Linearization(x, scale, compute_mean, rstd, count, dx, dx_counted, mask)
    dscale = None if scale is None else _as_compute(dscale, compute)
    dbias = None if bias is None else _as_compute(dbias, compute)
    if per_element:
        dy, dmean, dvar = _tangent_per_element(lin, dscale, dbias, spec)
    else:
        dy, dmean, dvar = _tangent_per_set(lin, dscale, dbias, spec)
    return (y, mean, var), (dy.astype(spec.dtype), dmean.astype(mean.dtype),
                            dvar.astype(var.dtype))


def _tangent_per_set(
    lin: _Linearization, dscale: Array | None, dbias: Array | None, spec: NormSpec
) -> tuple[Array, Array, Array]:
    r"""With :math:`m_1 = \frac1n\sum_S w\,\dot x`, :math:`m_2 = \frac1n\sum_S w\,\hat
    x\,\dot x` and :math:`a = r\gamma`: :math:`\dot y = a\,\dot x + \hat x\,(\dot\gamma
    - a m_2) + (\dot\beta - a m_1)`, :math:`\dot\mu = m_1`, :math:`\dot{\sigma^2} = 2 m_2
    / r`. The bracketed coefficients live on the small shape of statistics and parameters
    together, so the transpose (reverse mode) reads ``x`` and the cotangent in just two
    sums, :math:`\sum \bar y\hat x` and :math:`\sum \bar y`, shared by the parameter
    gradients and the gradient through the statistics."""
    compute = lin.rstd.dtype
    x_hat = lin.centred(lin.x, lin.mean, spec.centered) * lin.rstd
    m2 = jnp.sum(_counted(x_hat * lin.dx_counted, lin.mask), axis=spec.reduction,
                 keepdims=True) / lin.count
    a = lin.rstd if lin.scale is None else lin.rstd * lin.scale.astype(compute)
    slope = -a * m2 if dscale is None else dscale - a * m2
    if spec.centered:
        m1 = jnp.sum(lin.dx_counted, axis=spec.reduction, keepdims=True) / lin.count
        offset = -a * m1 if dbias is None else dbias - a * m1
    else:
        m1, offset = jnp.zeros_like(lin.mean), dbias
    dy = a * lin.dx.astype(compute) + _per_set_terms(x_hat, slope, offset)
    return dy, m1, 2 * m2 / lin.rstd


def _per_set_terms(x_hat: Array, slope: Array, offset: Array | None) -> Array:
    r""":math:`\hat x \cdot s + o` for coefficients :math:`s, o` constant over each set's
    parameter-free axes. Its transpose sums :math:`\bar y\hat x` and :math:`\bar y` over
    those axes; on GPU, where one such column reduction would store its product full-size
    (:func:`jaxnorm._stats.gpu_chunks`), :func:`_chunked_per_set_terms`."""
    shape = jnp.broadcast_shapes(slope.shape, slope.shape if offset is None else offset.shape)
    spread_axes = tuple(a for a in range(x_hat.ndim)
                        if shape[a] == 1 and x_hat.shape[a] != 1)
    # a chunk view of an explicitly sharded array is undefined
    plan = None if explicit_shards(x_hat) else gpu_chunks(x_hat.shape, spread_axes)
    if plan is None:
        return _direct_per_set_terms(x_hat, slope, offset)
    chunked = functools.partial(_chunked_per_set_terms, plan=plan)
    return lax.platform_dependent(x_hat, slope, offset, cuda=chunked, rocm=chunked,
                                  default=_direct_per_set_terms)


def _direct_per_set_terms(x_hat: Array, slope: Array, offset: Array | None) -> Array:
    r""":math:`\hat x \cdot s + o` with the coefficients broadcast as they are."""
    return x_hat * slope if offset is None else x_hat * slope + offset


def _chunked_per_set_terms(x_hat: Array, slope: Array, offset: Array | None, *,
                           plan: tuple[int, int, int]) -> Array:
    r"""The same value through the chunk view of ``plan`` (``(lead, end, k)``, the
    coefficients constant over ``lead..end``): the coefficients are broadcast to the ``k``
    chunks behind a barrier, so the transpose sums each chunk, its products fused, and
    then, separately, the ``k`` chunks. Slope and offset go as one stacked coefficient
    against ``(x_hat, 1)``, so the transpose forms :math:`\sum\bar y\hat x` and
    :math:`\sum\bar y` in one reduction (as two, XLA:GPU stored one product full-size
    for bfloat16 input)."""
    lead, end, chunks = plan
    shape = jnp.broadcast_shapes(slope.shape, slope.shape if offset is None else offset.shape)
    per_set = chunk_view(shape, (lead, end, 1))
    spread = per_set[:lead] + (chunks,) + per_set[lead + 1:]

    def per_chunk(coefficient: Array) -> Array:
        extra = coefficient.shape[len(shape):]
        coefficient = jnp.broadcast_to(coefficient, shape + extra).reshape(per_set + extra)
        return lax.optimization_barrier(jnp.broadcast_to(coefficient, spread + extra))

    view = x_hat.reshape(chunk_view(x_hat.shape, plan))
    if offset is None:
        return (view * per_chunk(slope)).reshape(x_hat.shape)
    # one stacked coefficient: the transpose forms both sums in one reduction
    coefficients = per_chunk(jnp.stack([jnp.broadcast_to(slope, shape),
                                        jnp.broadcast_to(offset, shape)], axis=-1))
    terms = jnp.stack([view, jnp.ones_like(view)], axis=-1)
    return jnp.sum(terms * coefficients, axis=-1).reshape(x_hat.shape)


def _views(values: tuple[Any, ...], copies: int) -> tuple[tuple[Any, ...], ...]:
    """``copies`` views of ``values``. On CPU each is barrier-separated: XLA:CPU stores any
    full-size value that several fusions share as an array of its own, while separate views
    make every fusion recompute it from ``x`` as it streams (LayerNorm forward+backward
    measured ~1.5x faster). Elsewhere (GPU, TPU) the barrier would only block fusion."""

    def separated(values: tuple[Any, ...]) -> tuple[tuple[Any, ...], ...]:
        # one barrier per value (not per tuple), so a replicated value stays replicated
        # under shard_map
        per_value = [None if v is None else lax.optimization_barrier((v,) * copies)
                     for v in values]
        return tuple(tuple(None if v is None else v[i] for v in per_value)
                     for i in range(copies))

    return lax.platform_dependent(
        values, cpu=separated, default=lambda values: (values,) * copies
    )


def _tangent_per_element(
    lin: _Linearization, dscale: Array | None, dbias: Array | None, spec: NormSpec
) -> tuple[Array, Array, Array]:
    r"""The same linearization when the parameters vary along every reduction axis
    (LayerNorm, RMSNorm): there the coefficients would be full-size, so the tangent is
    formed term by term, :math:`\dot y = a\dot x - a\,(m_1 + \hat x\, m_2) + \hat x
    \dot\gamma + \dot\beta` with :math:`a = r\gamma`, each group of consumers reading its
    own view of ``(x, mu, r, gamma)`` (:func:`_views`)."""
    compute = lin.rstd.dtype
    views = _views((lin.x, lin.mean, lin.rstd, lin.scale), 3)

    def centred_and_slope(view: tuple[Any, ...]) -> tuple[Array, Array, Array]:
        x_view, mean_view, rstd_view, scale_view = view
        centred_x = lin.centred(x_view, mean_view, spec.centered)
        slope = rstd_view if scale_view is None else rstd_view * scale_view.astype(compute)
        return centred_x, rstd_view, slope

    # dx and the sum for the variance's tangent (one sweep in the transpose).
    centred_x, _, slope = centred_and_slope(views[0])
    reduction = spec.reduction
    dvar = 2 * jnp.sum(_counted(centred_x * lin.dx_counted, lin.mask), axis=reduction,
                       keepdims=True) / lin.count
    dy = slope * lin.dx.astype(compute)
    # The terms through the statistics (the two row sums of the transpose).
    centred_x, rstd_view, slope = centred_and_slope(views[1])
    dy = dy - _variance_term(centred_x, rstd_view, slope, views[1][3], dvar, spec.centered)
    dmean = jnp.zeros_like(lin.mean)
    if spec.centered:
        dmean = jnp.sum(lin.dx_counted, axis=reduction, keepdims=True) / lin.count
        dy = dy - slope * dmean
    # The parameters' terms (their column sums in the transpose).
    if dscale is not None:
        centred_x, rstd_view, _ = centred_and_slope(views[2])
        dy = dy + (centred_x * rstd_view) * dscale
    if dbias is not None:
        dy = dy + dbias
    return dy, dmean, dvar


def _variance_term(centred_x: Array, rstd: Array, slope: Array, scale: Array | None,
                   dvar: Array, centered: bool) -> Array:
    r""":math:`\tfrac12 r^2\dot{\sigma^2}\,(x - \mu)\,r\gamma` (:func:`_factored_term`);
    without centring on GPU :func:`_statistics_free_term`, the same value."""
    if centered:
        return _factored_term(centred_x, rstd, slope, dvar)
    gpu = functools.partial(_statistics_free_term, scale=scale)
    return lax.platform_dependent(centred_x, rstd, slope, dvar, cuda=gpu, rocm=gpu,
                                  default=_factored_term)


def _factored_term(centred_x: Array, rstd: Array, slope: Array, dvar: Array) -> Array:
    """``(r^2 dvar / 2) ((x - mu) r gamma)``: what XLA:TPU and XLA:CPU run fastest
    (TPU v5e RMSNorm forward+backward: 0.89 of Flax's estimated cycles, against 1.00)."""
    return (0.5 * rstd * rstd * dvar) * (centred_x * slope)


def _statistics_free_term(centred_x: Array, rstd: Array, slope: Array, dvar: Array, *,
                          scale: Array | None) -> Array:
    """``(r^3 dvar / 2) (x gamma)``: the transpose's row sum is then ``sum(y_bar x gamma)``,
    free of the statistics, which XLA:GPU adds up in the statistics' own pass over ``x``
    (H200 RMSNorm forward+backward: 7 passes to 6, Flax's count). ``slope`` is unused."""
    del slope
    scaled_x = centred_x if scale is None else centred_x * scale.astype(rstd.dtype)
    return (0.5 * rstd * rstd * rstd * dvar) * scaled_x


def _counted(product: Array, mask: Array | None) -> Array:
    """``product`` with masked positions zeroed: a non-finite ``x`` there reaches no sum."""
    return product if mask is None else jnp.where(mask, product, 0)


def _as_compute(tangent: Any, compute: Any) -> Array:
    """A tangent in the compute dtype (symbolic zeros arrive instantiated)."""
    return jnp.asarray(tangent).astype(compute)


normalize_with_statistics.defjvp(_tangent)
