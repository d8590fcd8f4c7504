r"""The layers Equinox lacks, in its style (unbatched channels-first examples, a batch from
``jax.vmap``): InstanceNorm (optional running statistics in an ``eqx.nn.State``),
AdaptiveInstanceNorm, ConditionalInstanceNorm and LocalResponseNorm, each calling the
function of the same name in :mod:`jaxnorm` on the example as a batch of one."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

import jaxnorm
from jaxnorm.equinox._common import (
    NO_STATE,
    AxisName,
    check_channels,
    ones_and_zeros,
    resolve_inference,
    static_axis_name,
    with_state,
)

Array = jax.Array


def _batch_of_one(mask: Array | None, shape: tuple[int, ...]) -> Array | None:
    return None if mask is None else jnp.broadcast_to(mask, shape)[None]


def _pooled(moments: jaxnorm.BatchMoments, axis_name: AxisName | None) -> jaxnorm.BatchMoments:
    r"""The instances' moments pooled over the mapped axis in one ``psum``: mean
    :math:`\sum_i n_i\mu_i/\sum_i n_i`, variance :math:`\sum_i n_i\sigma^2_i/\sum_i n_i`."""
    if axis_name is None:
        return moments
    count = moments.count
    groups = jnp.broadcast_to(jnp.asarray(moments.groups, count.dtype), count.shape)
    sums = lax.psum(jnp.stack([count, count * moments.mean, count * moments.var, groups]),
                    axis_name)
    safe = jnp.maximum(sums[0], 1)
    return jaxnorm.BatchMoments(sums[1] / safe, sums[2] / safe, sums[0], sums[3])


class InstanceNorm(eqx.nn.StatefulLayer):
    r"""Instance normalization (Ulyanov et al. 2016) of one channels-first example:
    :math:`y = (x - \mu_c)/\sqrt{\sigma^2_c + \epsilon}\cdot\gamma_c + \beta_c`, statistics
    per channel over every spatial axis (:func:`jaxnorm.instance_norm`).

    With ``track_running_stats`` (PyTorch's option) training also averages the
    instances' statistics, pooled over ``axis_name`` (mean :math:`\sum_i n_i\mu_i/\sum_i
    n_i`, variance :math:`\sum_i n_i\sigma^2_i/\sum_i n_i`), into the state as
    :math:`h \leftarrow m\,h + (1-m)\,b` from :math:`(0, 1)`; inference then normalizes
    with them.

    Args:
      channels: the number of channels :math:`C`.
      eps: :math:`\epsilon` added to the variance.
      channelwise_affine: learn :math:`\gamma` (``weight``) and :math:`\beta` (``bias``).
      momentum: :math:`m`, the weight of the old running average.
      track_running_stats: keep running statistics in the state (then call with one).
      axis_name: the mapped axis whose examples the running statistics pool over; static.
      inference: normalize with the running statistics (with ``track_running_stats``).
      dtype: dtype of the parameters and running statistics; default float32.
      unbiased_running_var: average :math:`\sum_i n_i\sigma^2_i/\sum_i (n_i - 1)`, the
        instances' unbiased variances (PyTorch's convention).

    Attributes:
      weight: :math:`\gamma`, shape ``(C,)``, or None.
      bias: :math:`\beta`, shape ``(C,)``, or None.
      state_index: the running ``(mean, var)``'s state index, or None.
    """

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex | None
    inference: bool
    channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    track_running_stats: bool = eqx.field(static=True)
    axis_name: AxisName | None = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)

    def __init__(
        self, channels: int, eps: float = 1e-5, channelwise_affine: bool = True,
        momentum: float = 0.99, track_running_stats: bool = False,
        axis_name: AxisName | None = None, inference: bool = False, dtype: Any = None, *,
        unbiased_running_var: bool = False,
    ) -> None:
        self.weight, self.bias = ones_and_zeros(
            (channels,), dtype, channelwise_affine, channelwise_affine)
        initial = (jnp.zeros((channels,), dtype), jnp.ones((channels,), dtype))
        self.state_index = eqx.nn.StateIndex(initial) if track_running_stats else None
        self.inference = inference
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.channelwise_affine = channelwise_affine
        self.track_running_stats = track_running_stats
        self.axis_name = static_axis_name(axis_name)
        self.unbiased_running_var = unbiased_running_var

    def is_stateful(self) -> bool:
        """Whether ``eqx.nn.Sequential`` passes a state: with ``track_running_stats``."""
        return self.track_running_stats

    def __call__(
        self, x: Array, state: eqx.nn.State | None = NO_STATE, *, key: Any = None,
        inference: bool | None = None, mask: Array | None = None,
    ) -> Array | tuple[Array, eqx.nn.State]:
        """Normalizes one example per channel.

        Args:
          x: channels first, shape ``(C, *spatial)`` with at least one spatial axis.
          state: the ``eqx.nn.State`` (needed with ``track_running_stats``; else passed
            through when given).
          key: ignored (Equinox's call protocol).
          inference: overrides the ``inference`` attribute when not None.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count.

        Returns:
          ``y``, or ``(y, state)`` when ``state`` was given.
        """
        del key
        check_channels(x, self.channels, "InstanceNorm")
        if not self.track_running_stats:
            y = jaxnorm.instance_norm(x[None], self.weight, self.bias, feature_axes=1,
                                      eps=self.eps, mask=_batch_of_one(mask, x.shape))[0]
            return with_state(y, state)
        if state is None or state is NO_STATE:
            raise ValueError("InstanceNorm(track_running_stats=True) needs a state")
        mean, var = state.get(self.state_index)
        if resolve_inference(self.inference, inference):
            return jaxnorm.batch_norm_inference(x, mean, var, self.weight, self.bias,
                                                axis=0, eps=self.eps), state
        y, moments = jaxnorm.instance_norm(
            x[None], self.weight, self.bias, feature_axes=1, eps=self.eps,
            mask=_batch_of_one(mask, x.shape), return_moments=True)
        old = jaxnorm.RunningStatistics(mean, var)
        new = jaxnorm.update_running_statistics(
            old, _pooled(moments, self.axis_name), momentum=self.momentum,
            unbiased=self.unbiased_running_var)
        return y[0], state.set(self.state_index,
                               (new.mean.astype(mean.dtype), new.var.astype(var.dtype)))


class AdaptiveInstanceNorm(eqx.Module):
    r"""Adaptive instance normalization (Huang & Belongie 2017), called as
    ``(content, style)`` on one channels-first example each:
    :math:`y = \sigma_s\,(c - \mu_c)/\sigma_c + \mu_s` per channel, with
    :math:`\sigma = \sqrt{\text{biased var} + \epsilon}` over the spatial axes (content and
    style may differ in spatial size; :func:`jaxnorm.adaptive_instance_norm`). No
    parameters.

    Args:
      eps: :math:`\epsilon` added to both variances.
    """

    eps: float = eqx.field(static=True)

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = eps

    def __call__(self, content: Array, style: Array, *, key: Any = None) -> Array:
        """Gives ``content`` the per-channel mean and deviation of ``style``.

        Args:
          content: ``(C, *spatial)``, at least one spatial axis.
          style: ``(C, *spatial')``, the same number of axes.
          key: ignored (Equinox's call protocol).

        Returns:
          ``y``, the shape of ``content``.
        """
        del key
        return jaxnorm.adaptive_instance_norm(content[None], style[None], feature_axes=1,
                                              eps=self.eps)[0]


class ConditionalInstanceNorm(eqx.Module):
    r"""Conditional instance normalization (Dumoulin et al. 2017): one
    :math:`(\gamma_s, \beta_s)` per style, :math:`y = \gamma_s\,\mathrm{IN}(x) + \beta_s`
    (:func:`jaxnorm.conditional_instance_norm`).

    Args:
      num_styles: the number of styles :math:`S`.
      channels: the number of channels :math:`C`.
      eps: :math:`\epsilon` added to the variance.
      dtype: dtype of ``weight`` and ``bias``; default float32.

    Attributes:
      weight: the :math:`\gamma` table, shape ``(S, C)``, ones.
      bias: the :math:`\beta` table, shape ``(S, C)``, zeros.
    """

    weight: Array
    bias: Array
    num_styles: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, num_styles: int, channels: int, eps: float = 1e-5,
                 dtype: Any = None) -> None:
        self.weight, self.bias = ones_and_zeros((num_styles, channels), dtype, True, True)
        self.num_styles, self.channels, self.eps = num_styles, channels, eps

    def __call__(self, x: Array, style_id: Array | int, *, key: Any = None) -> Array:
        """Normalizes one example with the parameters of its style.

        Args:
          x: channels first, ``(C, *spatial)``, at least one spatial axis.
          style_id: an integer id in ``[0, S)``, or float mixing weights of shape ``(S,)``.
          key: ignored (Equinox's call protocol).

        Returns:
          ``y``, the shape of ``x``.
        """
        del key
        check_channels(x, self.channels, "ConditionalInstanceNorm")
        style = jnp.asarray(style_id)
        style = style if jnp.issubdtype(style.dtype, jnp.integer) else style[None]
        return jaxnorm.conditional_instance_norm(x[None], style, self.weight, self.bias,
                                                 feature_axes=1, eps=self.eps)[0]


class LocalResponseNorm(eqx.Module):
    r"""Local response normalization across channels (Krizhevsky et al. 2012) of one
    channels-first example: :math:`b_c = a_c\,(k + \tfrac{\alpha}{n}\sum_{c'} a_{c'}^2)
    ^{-\beta}` over the window of :math:`n` channels around :math:`c`, zero-padded, as
    ``torch.nn.LocalResponseNorm`` (:func:`jaxnorm.local_response_norm`). No parameters.

    Args:
      size: the window :math:`n`, in channels.
      alpha: the multiplier :math:`\alpha`.
      beta: the exponent :math:`\beta`.
      k: the additive constant :math:`k`.
    """

    size: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    beta: float = eqx.field(static=True)
    k: float = eqx.field(static=True)

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 1.0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def __call__(self, x: Array, *, key: Any = None) -> Array:
        """Normalizes each channel by its neighbours' energy.

        Args:
          x: channels first, ``(C, *spatial)`` (no spatial axis needed).
          key: ignored (Equinox's call protocol).

        Returns:
          ``b``, the shape and dtype of ``x``.
        """
        del key
        return jaxnorm.local_response_norm(x, size=self.size, alpha=self.alpha,
                                           beta=self.beta, k=self.k, feature_axis=0)
