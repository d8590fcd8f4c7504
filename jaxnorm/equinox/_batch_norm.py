r"""BatchNorm and BatchRenorm for Equinox: unbatched channels-first examples, the batch
from ``jax.vmap(..., axis_name=...)``, running statistics in an ``eqx.nn.State``.

The state has ``equinox.nn.BatchNorm``'s layout, so checkpoints load across:

* ``mode="batch"`` (the default here): ``batch_counter`` :math:`k` and
  ``batch_state_index`` :math:`(h_\mu, h_{\sigma^2})`, started at :math:`(0, 1)` and
  updated as :math:`h \leftarrow m h + (1-m) b`. Inference uses the bias-corrected
  averages :math:`\hat\mu = h_\mu/(1-m^k)` and
  :math:`\hat\sigma^2 = (h_{\sigma^2} - m^k)/(1-m^k)`: the initial 1 removed, so
  :math:`\hat\sigma^2` is an average of batch variances with weights summing to one
  (Equinox divides :math:`h_{\sigma^2}` by :math:`1 - m^k` with the initial 1 still in
  it: after one step :math:`\hat\sigma^2 = 99 + \sigma^2_B` for :math:`m = 0.99`).
* ``mode="ema"`` (Equinox's legacy layout): ``ema_first_time_index`` and
  ``ema_state_index`` :math:`(\hat\mu, \hat\sigma^2)`, filled by the first batch and then
  averaged with momentum. Training still normalizes with the batch statistics (Equinox
  normalizes with the running averages, which destabilizes training); the state moves
  exactly as Equinox's does.

Training statistics come from :func:`jaxnorm.batch_norm` with ``axis_name``: every
member's own stable statistics merged exactly by counts in one collective, so unequal
(masked) counts are weighted right. Ghost batches and a tuple of axis names (nested
``vmap``) merge the members' :func:`jaxnorm.moments` the same way, one ``all_gather`` per
name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

import jaxnorm
from jaxnorm.equinox._common import (
    AxisName,
    check_channels,
    default_dtype,
    ones_and_zeros,
    resolve_inference,
    static_axis_name,
)
from jaxnorm.equinox._ghost import axis_names, ghost_batch_norm, members_of

Array = jax.Array
_MODES = ("batch", "ema", "legacy")


def _debiased(hidden: jaxnorm.RunningStatistics, counter: Array,
              momentum: float) -> jaxnorm.RunningStatistics:
    r"""The bias-corrected running averages of ``mode="batch"``: with :math:`c = m^k`,
    :math:`h_\mu/(1-c)` and :math:`(h_{\sigma^2} - c)/(1-c)` (the initial mean 0 and
    variance 1 removed); the stored values while :math:`k = 0`. :math:`1 - c` is formed
    as :math:`-\mathrm{expm1}(k\log m)` with :math:`\log m` in double precision, so it
    carries no float32 rounding of :math:`m` (a relative error that would multiply the
    mean: :math:`10^{-6}` of a mean of :math:`10^4` is :math:`10^{-2}`)."""
    started = (counter > 0) & (0 < momentum < 1)
    log_momentum = math.log(momentum) if 0 < momentum < 1 else 0.0
    exponent = jnp.where(started, counter, 1).astype(hidden.mean.dtype) * log_momentum
    weight = jnp.where(started, -jnp.expm1(exponent), 1)
    decay = jnp.exp(exponent)
    mean = hidden.mean / weight
    var = jnp.where(started, (hidden.var - decay) / weight, hidden.var)
    return jaxnorm.RunningStatistics(mean, jnp.maximum(var, 0))


def _cast_like(new: jaxnorm.RunningStatistics,
               old: jaxnorm.RunningStatistics) -> tuple[Array, Array]:
    """The updated ``(mean, var)`` in the stored dtypes (``State.set`` keeps dtypes)."""
    return new.mean.astype(old.mean.dtype), new.var.astype(old.var.dtype)


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``equinox.nn.BatchNorm``.

    Called on one example under ``jax.vmap(..., axis_name=axis_name)``; in training
    :math:`y = (x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon}\cdot\gamma + \beta` with the biased
    batch statistics per channel over the mapped axis and every spatial axis, and the
    running averages :math:`h \leftarrow m\,h + (1 - m)\,b` updated in ``state``; in
    inference the running estimates replace :math:`\mu_B, \sigma^2_B` (module docstring:
    the state layouts of ``mode`` and the bias correction).

    Args:
      input_size: the number of channels :math:`C`.
      axis_name: the ``vmap``/``pmap`` axis name (or a tuple of names, for nested maps)
        the batch statistics run over; static (not a pytree leaf).
      eps: :math:`\epsilon` added to the variance.
      channelwise_affine: learn :math:`\gamma` (``weight``) and :math:`\beta` (``bias``).
      momentum: :math:`m`, the weight of the old running average.
      inference: use the running statistics (toggle with ``eqx.nn.inference_mode``).
      dtype: dtype of the parameters and running statistics; default float32.
      mode: the state layout, ``"batch"`` (default) or ``"ema"`` (``"legacy"`` is
        ``"ema"``); training always normalizes with the batch statistics.
      unbiased_running_var: average the unbiased :math:`\tfrac{n}{n-1}\sigma^2_B`
        (:math:`n`: elements per channel over all members), as PyTorch; default the
        biased one, as Equinox (whose docstring calls it unbiased).
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017): statistics per group of
        this many consecutive members of the mapped axis; it must divide the axis size.

    Attributes:
      weight: :math:`\gamma`, shape ``(C,)``, or None.
      bias: :math:`\beta`, shape ``(C,)``, or None.
      ema_first_time_index: ``mode="ema"``: the "no batch seen" flag's state index.
      ema_state_index: ``mode="ema"``: the running ``(mean, var)``'s state index.
      batch_counter: ``mode="batch"``: the number of training batches :math:`k`.
      batch_state_index: ``mode="batch"``: :math:`(h_\mu, h_{\sigma^2})`'s state index.
    """

    weight: Array | None
    bias: Array | None
    ema_first_time_index: eqx.nn.StateIndex | None
    ema_state_index: eqx.nn.StateIndex | None
    batch_counter: eqx.nn.StateIndex | None
    batch_state_index: eqx.nn.StateIndex | None
    inference: bool
    axis_name: AxisName = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    virtual_batch_size: int | None = eqx.field(static=True)

    def __init__(
        self, input_size: int, axis_name: AxisName, eps: float = 1e-5,
        channelwise_affine: bool = True, momentum: float = 0.99, inference: bool = False,
        dtype: Any = None, mode: str = "batch", *, unbiased_running_var: bool = False,
        virtual_batch_size: int | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        dtype = default_dtype(dtype)
        self.mode = "ema" if mode == "legacy" else mode
        self.weight, self.bias = ones_and_zeros(
            (input_size,), dtype, channelwise_affine, channelwise_affine)
        initial = (jnp.zeros((input_size,), dtype), jnp.ones((input_size,), dtype))
        ema = self.mode == "ema"
        self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True)) if ema else None
        self.ema_state_index = eqx.nn.StateIndex(initial) if ema else None
        self.batch_counter = None if ema else eqx.nn.StateIndex(jnp.array(0))
        self.batch_state_index = None if ema else eqx.nn.StateIndex(initial)
        self.inference = inference
        self.axis_name = static_axis_name(axis_name)
        self.input_size, self.eps, self.momentum = input_size, eps, momentum
        self.channelwise_affine = channelwise_affine
        self.unbiased_running_var = unbiased_running_var
        self.virtual_batch_size = virtual_batch_size

    def __call__(
        self, x: Array, state: eqx.nn.State, *, key: Any = None,
        inference: bool | None = None, mask: Array | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """Normalizes one example; in training also updates the running statistics.

        Args:
          x: one example, channels first: shape ``(C, *spatial)``, any number of spatial
            axes (none included).
          state: the ``eqx.nn.State`` holding the running statistics.
          key: ignored (Equinox's call protocol).
          inference: overrides the ``inference`` attribute when not None.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            batch statistics (beyond Equinox; counts may then differ across members).

        Returns:
          ``(y, state)``: ``y`` the shape of ``x``, and the updated state.
        """
        del key
        check_channels(x, self.input_size, type(self).__name__)
        running = self.running_statistics(state)
        if resolve_inference(self.inference, inference):
            y = jaxnorm.batch_norm_inference(x, running.mean, running.var, self.weight,
                                             self.bias, axis=0, eps=self.eps)
            return y, state
        y, moments = self._normalize_batch(x, running, state, mask)
        return y, self._updated(state, moments)

    def running_statistics(self, state: eqx.nn.State) -> jaxnorm.RunningStatistics:
        r"""The running mean and variance inference normalizes with.

        ``mode="batch"``: the bias-corrected :math:`h_\mu/(1-m^k)`,
        :math:`(h_{\sigma^2}-m^k)/(1-m^k)` (the stored :math:`(0, 1)` before the first
        batch); ``mode="ema"``: the stored averages, or :math:`(0, 1)` before the first
        batch (Equinox: its uninitialised buffers).

        Args:
          state: the ``eqx.nn.State`` of this layer's model.

        Returns:
          A :class:`jaxnorm.RunningStatistics` of ``(C,)`` arrays.
        """
        if self.mode == "ema":
            first = state.get(self.ema_first_time_index)
            mean, var = state.get(self.ema_state_index)
            return jaxnorm.RunningStatistics(jnp.where(first, 0, mean), jnp.where(first, 1, var))
        hidden = jaxnorm.RunningStatistics(*state.get(self.batch_state_index))
        return _debiased(hidden, state.get(self.batch_counter), self.momentum)

    def _renorm(self, running: jaxnorm.RunningStatistics,
                state: eqx.nn.State) -> jaxnorm.Renorm | None:
        """Batch renormalization's inputs; None for plain BatchNorm."""
        return None

    def _normalize_batch(
        self, x: Array, running: jaxnorm.RunningStatistics, state: eqx.nn.State,
        mask: Array | None,
    ) -> tuple[Array, jaxnorm.BatchMoments]:
        """``(y, batch moments)``: the exact statistics over the mapped axis (or its
        ghost batches), the members' own statistics merged in one collective."""
        renorm = self._renorm(running, state)
        nested = len(axis_names(self.axis_name)) > 1 and renorm is None
        if self.virtual_batch_size is not None or nested:
            if renorm is not None:
                raise ValueError("BatchRenorm takes no virtual_batch_size")
            size = self.virtual_batch_size or members_of(self.axis_name)
            return ghost_batch_norm(x, self.weight, self.bias, eps=self.eps,
                                    axis_name=self.axis_name, size=size, mask=mask)
        return jaxnorm.batch_norm(
            x, self.weight, self.bias, axis=0, eps=self.eps, mask=mask,
            axis_name=self.axis_name, renorm=renorm,
            allow_single_value=True, return_moments=True,
        )

    def _updated(self, state: eqx.nn.State, batch: jaxnorm.BatchMoments) -> eqx.nn.State:
        """``state`` with the running statistics moved by ``batch``."""
        def update(old: jaxnorm.RunningStatistics, momentum: float) -> tuple[Array, Array]:
            new = jaxnorm.update_running_statistics(
                old, batch, momentum=momentum, unbiased=self.unbiased_running_var)
            return _cast_like(new, old)

        if self.mode == "ema":
            old = jaxnorm.RunningStatistics(*state.get(self.ema_state_index))
            first = state.get(self.ema_first_time_index)
            filled, averaged = update(old, 0.0), update(old, self.momentum)
            new = tuple(jnp.where(first, f, a) for f, a in zip(filled, averaged, strict=True))
            state = state.set(self.ema_first_time_index, jnp.array(False))
            return state.set(self.ema_state_index, new)
        old = jaxnorm.RunningStatistics(*state.get(self.batch_state_index))
        state = state.set(self.batch_counter, state.get(self.batch_counter) + 1)
        return state.set(self.batch_state_index, update(old, self.momentum))


Limit = float | Callable[[Array], Any]


class BatchRenorm(BatchNorm):
    r"""Batch renormalization (Ioffe 2017): :class:`BatchNorm` whose training output is
    :math:`y = \big((x-\mu_B)/\sigma_B\cdot r + d\big)\gamma + \beta` with
    :math:`r = \mathrm{clip}(\sigma_B/\hat\sigma, 1/r_{max}, r_{max})` and
    :math:`d = \mathrm{clip}((\mu_B-\hat\mu)/\hat\sigma, -d_{max}, d_{max})` from the
    running estimates (under ``stop_gradient``); state and inference as ``mode="batch"``
    BatchNorm, so its checkpoints load both ways. ``r_max=1, d_max=0`` is BatchNorm.

    Args:
      input_size: the number of channels :math:`C`.
      axis_name: the mapped axis name(s) of the batch; static.
      eps: :math:`\epsilon` added to the variance.
      channelwise_affine: learn :math:`\gamma` and :math:`\beta`.
      momentum: :math:`m`, the weight of the old running average.
      inference: use the running statistics.
      dtype: dtype of the parameters and running statistics.
      r_max: :math:`r_{max}` (at least 1), or a function of the training step :math:`k`
        (``batch_counter``, e.g. ``optax.linear_schedule(1.0, 3.0, 5000)``).
      d_max: :math:`d_{max}` (at least 0), or a function of :math:`k`.
      unbiased_running_var: average the unbiased batch variance, as PyTorch.

    Attributes:
      weight: :math:`\gamma`, shape ``(C,)``, or None.
      bias: :math:`\beta`, shape ``(C,)``, or None.
    """

    r_max: Limit = eqx.field(static=True)
    d_max: Limit = eqx.field(static=True)

    def __init__(
        self, input_size: int, axis_name: AxisName, eps: float = 1e-5,
        channelwise_affine: bool = True, momentum: float = 0.99, inference: bool = False,
        dtype: Any = None, *, r_max: Limit = 3.0, d_max: Limit = 5.0,
        unbiased_running_var: bool = False,
    ) -> None:
        super().__init__(input_size, axis_name, eps, channelwise_affine, momentum, inference,
                         dtype, "batch", unbiased_running_var=unbiased_running_var)
        self.r_max, self.d_max = r_max, d_max

    def _renorm(self, running: jaxnorm.RunningStatistics,
                state: eqx.nn.State) -> jaxnorm.Renorm | None:
        """The running estimates and the limits at the current step."""
        step = state.get(self.batch_counter)
        r_max = self.r_max(step) if callable(self.r_max) else self.r_max
        d_max = self.d_max(step) if callable(self.d_max) else self.d_max
        return jaxnorm.Renorm(lax.stop_gradient(running.mean),
                              lax.stop_gradient(running.var), r_max, d_max)
