r"""Float64 NumPy references: forward passes and hand-derived backward formulas.

Nothing here uses autodiff; every backward pass is derived on paper and written out, so the
tests can hold ``jax.grad`` of :mod:`jaxnorm` against them.

Notation, per reduction set :math:`S` (one "group" of elements sharing statistics), with mask
weights :math:`w_i \in \{0, 1\}` and :math:`n = \sum_{j \in S} w_j`:

.. math::
    \mu = \frac{1}{n}\sum_j w_j x_j,\quad
    \sigma^2 = \frac{1}{n}\sum_j w_j (x_j - \mu)^2,\quad
    r = (\sigma^2 + \epsilon)^{-1/2},\quad
    \hat x_i = (x_i - \mu)\,r,\quad y_i = \hat x_i \gamma + \beta.

Every element of :math:`S` (masked or not) is normalized with these statistics, but only
unmasked elements enter them. Upstream gradient :math:`\bar y = \partial L/\partial y`,
and :math:`\bar{\hat x} = \bar y \gamma`.

Normalization backward (Ioffe & Szegedy 2015, generalised to masks): with
:math:`\partial\mu/\partial x_i = w_i/n` and :math:`\partial\sigma^2/\partial x_i =
2 w_i (x_i - \mu)/n`,

.. math::
    \bar x_i = r\,\bar{\hat x}_i - \frac{w_i r}{n}\Big(\sum_j \bar{\hat x}_j
        + \hat x_i \sum_j \bar{\hat x}_j \hat x_j\Big),

which for :math:`w \equiv 1` is the textbook
:math:`\bar x = \tfrac{r}{m}(m\bar{\hat x} - \sum \bar{\hat x} - \hat x\sum\bar{\hat x}\hat x)`;
:math:`\bar\gamma = \sum \bar y \hat x` and :math:`\bar\beta = \sum \bar y` over every
non-feature axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Axes = int | Sequence[int]
F64 = np.float64


def _canonical(axes: Axes, ndim: int) -> tuple[int, ...]:
    raw = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    return tuple(sorted(int(a) % ndim for a in raw))


def _complement(ndim: int, *excluded: Sequence[int]) -> tuple[int, ...]:
    skip = {a for group in excluded for a in group}
    return tuple(a for a in range(ndim) if a not in skip)


def _expand(value: np.ndarray | None, ndim: int, axes: tuple[int, ...]) -> np.ndarray | None:
    """Reshapes a feature-shaped ``value`` to broadcast against an ``ndim`` array on ``axes``."""
    if value is None:
        return None
    shape = [1] * ndim
    for axis, size in zip(axes, np.shape(value), strict=True):
        shape[axis] = size
    return np.asarray(value, F64).reshape(shape)


def _weights(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, F64)
    return np.broadcast_to(np.asarray(mask, bool), shape).astype(F64)


def _statistics(
    x: np.ndarray, axes: tuple[int, ...], weights: np.ndarray, centered: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-pass (mean, var, count), keepdims; ``centered=False`` gives (0, E[x²], count)."""
    count = np.maximum(weights.sum(axis=axes, keepdims=True), 1)
    if centered:
        mean = (weights * x).sum(axis=axes, keepdims=True) / count
    else:
        mean = np.zeros_like(count)
    var = (weights * (x - mean) ** 2).sum(axis=axes, keepdims=True) / count
    return mean, var, count


def _parameter_sum(value: np.ndarray, feature_axes: tuple[int, ...]) -> np.ndarray:
    """Sum over every non-feature axis; the result has the feature shape."""
    return value.sum(axis=_complement(value.ndim, feature_axes))


# --------------------------------------------------------------------------------------
# The shared core: normalization over a reduction set (LayerNorm, BatchNorm, InstanceNorm,
# GroupNorm after a reshape, RMSNorm with centered=False).
# --------------------------------------------------------------------------------------


def normalize(
    x: np.ndarray,
    reduction_axes: Axes,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    feature_axes: Axes = -1,
    eps: float = 1e-5,
    mask: np.ndarray | None = None,
    centered: bool = True,
) -> np.ndarray:
    r""":math:`y = (x - \mu)\,r\,\gamma + \beta` over ``reduction_axes`` (two-pass statistics)."""
    x = np.asarray(x, F64)
    axes = _canonical(reduction_axes, x.ndim)
    features = _canonical(feature_axes, x.ndim)
    mean, var, _ = _statistics(x, axes, _weights(mask, x.shape), centered)
    y = (x - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * _expand(scale, x.ndim, features)
    if bias is not None:
        y = y + _expand(bias, x.ndim, features)
    return y


def normalize_vjp(
    dy: np.ndarray,
    x: np.ndarray,
    reduction_axes: Axes,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    feature_axes: Axes = -1,
    eps: float = 1e-5,
    mask: np.ndarray | None = None,
    centered: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    r"""``(dx, dscale, dbias)`` of :func:`normalize`, from the formula in the module docstring.

    ``centered=False`` (RMSNorm: :math:`\mu = 0`, :math:`\sigma^2 = E[w x^2]`) drops the
    :math:`\partial\mu/\partial x` term: :math:`\bar x_i = r\bar{\hat x}_i - \frac{w_i r}{n}
    \hat x_i\sum_j\bar{\hat x}_j\hat x_j`.
    """
    x = np.asarray(x, F64)
    dy = np.asarray(dy, F64)
    axes = _canonical(reduction_axes, x.ndim)
    features = _canonical(feature_axes, x.ndim)
    weights = _weights(mask, x.shape)
    mean, var, count = _statistics(x, axes, weights, centered)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    gamma = 1.0 if scale is None else _expand(scale, x.ndim, features)
    dxhat = dy * gamma
    sum_dxhat = dxhat.sum(axis=axes, keepdims=True) if centered else 0.0
    sum_dxhat_xhat = (dxhat * xhat).sum(axis=axes, keepdims=True)
    dx = rstd * dxhat - weights * rstd / count * (sum_dxhat + xhat * sum_dxhat_xhat)
    dscale = None if scale is None else _parameter_sum(dy * xhat, features)
    dbias = None if bias is None else _parameter_sum(dy, features)
    return dx, dscale, dbias


# --------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------


def batch_norm(
    x: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode BatchNorm: ``(y, mean, var)``, statistics over every axis but ``axis``."""
    x = np.asarray(x, F64)
    features = _canonical(axis, x.ndim)
    reduction = _complement(x.ndim, features)
    mean, var, _ = _statistics(x, reduction, _weights(mask, x.shape), True)
    y = normalize(x, reduction, scale, bias, feature_axes=features, eps=eps, mask=mask)
    feature_shape = tuple(x.shape[a] for a in features)
    return y, mean.reshape(feature_shape), var.reshape(feature_shape)


def batch_norm_vjp(
    dy: np.ndarray,
    x: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
    mask: np.ndarray | None = None,
    dmean: np.ndarray | None = None,
    dvar: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    r"""``(dx, dscale, dbias)`` of :func:`batch_norm` for cotangents ``(dy, dmean, dvar)``.

    The normalized output contributes the module-level formula. The returned batch
    statistics add :math:`\bar\mu\,w_i/n + \bar\sigma^2\,2 w_i (x_i - \mu)/n`.
    """
    x = np.asarray(x, F64)
    features = _canonical(axis, x.ndim)
    reduction = _complement(x.ndim, features)
    dx, dscale, dbias = normalize_vjp(
        dy, x, reduction, scale, bias, feature_axes=features, eps=eps, mask=mask
    )
    weights = _weights(mask, x.shape)
    mean, _, count = _statistics(x, reduction, weights, True)
    if dmean is not None:
        dx = dx + weights * _expand(dmean, x.ndim, features) / count
    if dvar is not None:
        dx = dx + weights * _expand(dvar, x.ndim, features) * 2.0 * (x - mean) / count
    return dx, dscale, dbias


def batch_norm_inference(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
) -> np.ndarray:
    r"""Evaluation-mode BatchNorm: :math:`y = (x - \mu)\,\gamma/\sqrt{v + \epsilon} + \beta`."""
    x = np.asarray(x, F64)
    features = _canonical(axis, x.ndim)
    y = (x - _expand(mean, x.ndim, features)) / np.sqrt(_expand(var, x.ndim, features) + eps)
    if scale is not None:
        y = y * _expand(scale, x.ndim, features)
    if bias is not None:
        y = y + _expand(bias, x.ndim, features)
    return y


def batch_norm_inference_vjp(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
) -> tuple[np.ndarray, ...]:
    r"""``(dx, dmean, dvar, dscale, dbias)`` of :func:`batch_norm_inference`.

    The statistics are inputs, not functions of ``x``, so with :math:`r = (v+\epsilon)^{-1/2}`:
    :math:`\bar x = \bar y\gamma r`, :math:`\bar\mu = -\sum\bar y\gamma r`,
    :math:`\bar v = -\tfrac12 r^3\sum\bar y\gamma(x - \mu)`,
    :math:`\bar\gamma = \sum\bar y(x-\mu)r`, :math:`\bar\beta = \sum\bar y`.
    """
    x = np.asarray(x, F64)
    dy = np.asarray(dy, F64)
    features = _canonical(axis, x.ndim)
    centred = x - _expand(mean, x.ndim, features)
    rstd = 1.0 / np.sqrt(_expand(var, x.ndim, features) + eps)
    gamma = 1.0 if scale is None else _expand(scale, x.ndim, features)
    dx = dy * gamma * rstd
    dmean = -_parameter_sum(dx, features)
    dvar = _parameter_sum(-0.5 * rstd**3 * dy * gamma * centred, features)
    dscale = None if scale is None else _parameter_sum(dy * centred * rstd, features)
    dbias = None if bias is None else _parameter_sum(dy, features)
    return dx, dmean, dvar, dscale, dbias


# --------------------------------------------------------------------------------------
# LayerNorm, RMSNorm, InstanceNorm: the core with a choice of axes
# --------------------------------------------------------------------------------------


def layer_norm(
    x,
    scale=None,
    bias=None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask=None,
) -> np.ndarray:
    """LayerNorm (Ba et al. 2016): :func:`normalize` over ``reduction_axes``."""
    return normalize(x, reduction_axes, scale, bias, feature_axes=feature_axes, eps=eps, mask=mask)


def layer_norm_vjp(
    dy,
    x,
    scale=None,
    bias=None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask=None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(dx, dscale, dbias)``: :func:`normalize_vjp` over ``reduction_axes``."""
    return normalize_vjp(
        dy, x, reduction_axes, scale, bias, feature_axes=feature_axes, eps=eps, mask=mask
    )


def rms_norm(
    x,
    scale=None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask=None,
) -> np.ndarray:
    r"""RMSNorm (Zhang & Sennrich 2019): :math:`y = x\,(E[x^2] + \epsilon)^{-1/2}\gamma`."""
    return normalize(
        x, reduction_axes, scale, feature_axes=feature_axes, eps=eps, mask=mask, centered=False
    )


def rms_norm_vjp(
    dy,
    x,
    scale=None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""``(dx, dscale)`` of :func:`rms_norm`.

    With :math:`q = \frac1n\sum_j w_j x_j^2`, :math:`r = (q+\epsilon)^{-1/2}`,
    :math:`\hat x = x r` and :math:`\partial q/\partial x_i = 2 w_i x_i / n`:
    :math:`\bar x_i = r\bar{\hat x}_i + \sum_j \bar{\hat x}_j x_j (-\tfrac12 r^3)
    \tfrac{2 w_i x_i}{n} = r\bar{\hat x}_i - \tfrac{w_i r}{n}\hat x_i\sum_j\bar{\hat x}_j\hat x_j`;
    :math:`\bar\gamma = \sum\bar y\hat x`.
    """
    dx, dscale, _ = normalize_vjp(
        dy,
        x,
        reduction_axes,
        scale,
        feature_axes=feature_axes,
        eps=eps,
        mask=mask,
        centered=False,
    )
    return dx, dscale


def _instance_axes(ndim: int, feature_axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    features = _canonical(feature_axes, ndim)
    return _complement(ndim, (0,), features), features


def instance_norm(
    x, scale=None, bias=None, *, feature_axes: Axes = -1, eps: float = 1e-6, mask=None
) -> np.ndarray:
    """InstanceNorm (Ulyanov et al. 2016): per example and channel, over the other axes."""
    x = np.asarray(x, F64)
    reduction, features = _instance_axes(x.ndim, feature_axes)
    return normalize(x, reduction, scale, bias, feature_axes=features, eps=eps, mask=mask)


def instance_norm_vjp(
    dy, x, scale=None, bias=None, *, feature_axes: Axes = -1, eps: float = 1e-6, mask=None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(dx, dscale, dbias)``: :func:`normalize_vjp` over the instance axes."""
    x = np.asarray(x, F64)
    reduction, features = _instance_axes(x.ndim, feature_axes)
    return normalize_vjp(dy, x, reduction, scale, bias, feature_axes=features, eps=eps, mask=mask)


# --------------------------------------------------------------------------------------
# GroupNorm: reshape C into (G, C/G), then the core
# --------------------------------------------------------------------------------------


def _grouped(x: np.ndarray, num_groups: int, feature_axis: int):
    axis = feature_axis % x.ndim
    channels = x.shape[axis]
    shape = x.shape[:axis] + (num_groups, channels // num_groups) + x.shape[axis + 1 :]
    reduction = _complement(len(shape), (0, axis))
    return axis, shape, reduction


def group_norm(
    x,
    scale=None,
    bias=None,
    *,
    num_groups: int,
    feature_axis: int = -1,
    eps: float = 1e-6,
    mask=None,
) -> np.ndarray:
    """GroupNorm (Wu & He 2018): x reshaped so that channel axis C becomes (G, C/G), then
    normalized per example and group over every axis but 0 and G."""
    x = np.asarray(x, F64)
    axis, shape, reduction = _grouped(x, num_groups, feature_axis)
    params = (num_groups, x.shape[axis] // num_groups)
    y = normalize(
        x.reshape(shape),
        reduction,
        None if scale is None else np.reshape(scale, params),
        None if bias is None else np.reshape(bias, params),
        feature_axes=(axis, axis + 1),
        eps=eps,
        mask=None if mask is None else np.broadcast_to(mask, x.shape).reshape(shape),
    )
    return y.reshape(x.shape)


def group_norm_vjp(
    dy,
    x,
    scale=None,
    bias=None,
    *,
    num_groups: int,
    feature_axis: int = -1,
    eps: float = 1e-6,
    mask=None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(dx, dscale, dbias)``: :func:`normalize_vjp` on the grouped view, reshaped back."""
    x = np.asarray(x, F64)
    axis, shape, reduction = _grouped(x, num_groups, feature_axis)
    params = (num_groups, x.shape[axis] // num_groups)
    dx, dscale, dbias = normalize_vjp(
        np.reshape(dy, shape),
        x.reshape(shape),
        reduction,
        None if scale is None else np.reshape(scale, params),
        None if bias is None else np.reshape(bias, params),
        feature_axes=(axis, axis + 1),
        eps=eps,
        mask=None if mask is None else np.broadcast_to(mask, x.shape).reshape(shape),
    )
    channels = (x.shape[axis],)
    return (
        dx.reshape(x.shape),
        None if dscale is None else dscale.reshape(channels),
        None if dbias is None else dbias.reshape(channels),
    )


# --------------------------------------------------------------------------------------
# Local response normalization
# --------------------------------------------------------------------------------------


def _shifted_sum(values: np.ndarray, offsets: range) -> np.ndarray:
    """``out[..., c] = sum_o values[..., c + o]`` over ``offsets``, zero outside the array."""
    channels = values.shape[-1]
    out = np.zeros_like(values)
    for offset in offsets:
        lo, hi = max(0, -offset), min(channels, channels - offset)
        if lo < hi:
            out[..., lo:hi] += values[..., lo + offset : hi + offset]
    return out


def _lrn_window(size: int) -> range:
    """Offsets of window(c) relative to c: ``-(size//2) .. (size-1)//2`` (torch's padding)."""
    return range(-(size // 2), (size - 1) // 2 + 1)


def local_response_norm(
    x,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    feature_axis: int = -1,
) -> np.ndarray:
    r"""LRN (Krizhevsky et al. 2012): :math:`b_c = a_c d_c^{-\beta}`,
    :math:`d_c = k + \frac{\alpha}{n}\sum_{c' \in W(c)} a_{c'}^2`,
    :math:`W(c) = c - \lfloor n/2\rfloor .. c + \lfloor (n-1)/2\rfloor`, zero-padded."""
    a = np.moveaxis(np.asarray(x, F64), feature_axis, -1)
    d = k + alpha / size * _shifted_sum(a * a, _lrn_window(size))
    return np.moveaxis(a * d**-beta, -1, feature_axis)


def local_response_norm_vjp(
    dy,
    x,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    feature_axis: int = -1,
) -> np.ndarray:
    r"""``dx`` of :func:`local_response_norm`.

    :math:`\partial b_c/\partial a_i = \delta_{ci} d_c^{-\beta}
    - \beta a_c d_c^{-\beta-1}\frac{\alpha}{n} 2 a_i [i \in W(c)]`, so

    .. math::
        \bar a_i = \bar b_i d_i^{-\beta} - \frac{2\alpha\beta}{n} a_i
            \sum_{c:\, i \in W(c)} \bar b_c a_c d_c^{-\beta-1}.

    :math:`i \in W(c)` iff :math:`i - c \in [-\lfloor n/2\rfloor, \lfloor (n-1)/2\rfloor]`,
    i.e. the sum runs over :math:`c = i + o` for :math:`o` in the mirrored window.
    """
    a = np.moveaxis(np.asarray(x, F64), feature_axis, -1)
    b_bar = np.moveaxis(np.asarray(dy, F64), feature_axis, -1)
    window = _lrn_window(size)
    d = k + alpha / size * _shifted_sum(a * a, window)
    mirrored = range(-window[-1], -window[0] + 1)
    through_window = _shifted_sum(b_bar * a * d ** (-beta - 1), mirrored)
    da = b_bar * d**-beta - 2 * alpha * beta / size * a * through_window
    return np.moveaxis(da, -1, feature_axis)


# --------------------------------------------------------------------------------------
# Adaptive instance normalization
# --------------------------------------------------------------------------------------


def adaptive_instance_norm(content, style, *, feature_axes: Axes = -1, eps: float = 1e-5):
    r"""AdaIN (Huang & Belongie 2017): :math:`\sigma_s (c - \mu_c)/\sigma_c + \mu_s`,
    :math:`\sigma = \sqrt{\mathrm{var} + \epsilon}`, statistics per example and channel."""
    c = np.asarray(content, F64)
    s = np.asarray(style, F64)
    c_axes, _ = _instance_axes(c.ndim, feature_axes)
    s_axes, _ = _instance_axes(s.ndim, feature_axes)
    c_mean, c_var, _ = _statistics(c, c_axes, np.ones(c.shape), True)
    s_mean, s_var, _ = _statistics(s, s_axes, np.ones(s.shape), True)
    return np.sqrt(s_var + eps) * (c - c_mean) / np.sqrt(c_var + eps) + s_mean


def adaptive_instance_norm_vjp(
    dy, content, style, *, feature_axes: Axes = -1, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(d content, d style)`` of :func:`adaptive_instance_norm`.

    Content: the normalization backward with per-(example, channel) :math:`\gamma = \sigma_s`.
    Style: :math:`\bar\sigma_s = \sum\bar y\hat c`, :math:`\bar\mu_s = \sum\bar y` over the
    content's reduction set (and over the batch when ``style`` has batch 1), then with
    :math:`m_s` style elements per set, :math:`\partial\mu_s/\partial s_k = 1/m_s` and
    :math:`\partial\sigma_s/\partial s_k = (s_k - \mu_s)/(m_s\sigma_s)`:

    .. math::
        \bar s_k = \frac{\bar\mu_s}{m_s} + \bar\sigma_s\frac{s_k - \mu_s}{m_s \sigma_s}.
    """
    c = np.asarray(content, F64)
    s = np.asarray(style, F64)
    dy = np.asarray(dy, F64)
    c_axes, _ = _instance_axes(c.ndim, feature_axes)
    s_axes, _ = _instance_axes(s.ndim, feature_axes)
    c_mean, c_var, c_count = _statistics(c, c_axes, np.ones(c.shape), True)
    s_mean, s_var, s_count = _statistics(s, s_axes, np.ones(s.shape), True)
    s_std = np.sqrt(s_var + eps)
    rstd = 1.0 / np.sqrt(c_var + eps)
    c_hat = (c - c_mean) * rstd
    dc_hat = dy * s_std
    dc = (
        rstd
        / c_count
        * (
            c_count * dc_hat
            - dc_hat.sum(axis=c_axes, keepdims=True)
            - c_hat * (dc_hat * c_hat).sum(axis=c_axes, keepdims=True)
        )
    )
    d_std = (dy * c_hat).sum(axis=c_axes, keepdims=True)
    d_mean = dy.sum(axis=c_axes, keepdims=True)
    if s.shape[0] == 1 and c.shape[0] != 1:
        d_std = d_std.sum(axis=0, keepdims=True)
        d_mean = d_mean.sum(axis=0, keepdims=True)
    ds = d_mean / s_count + d_std * (s - s_mean) / (s_count * s_std)
    return dc, ds
