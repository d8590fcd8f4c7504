r"""Flax Linen normalization modules, thin over jaxnorm's functional core.

Drop-in replacements for the ``flax.linen`` classes of the same name: the same
constructor arguments and defaults, the same variables (``params``: ``scale``, ``bias``;
``batch_stats``: ``mean``, ``var``), so a model switches by changing one import and keeps
its checkpoints. Where they differ from Flax:

* statistics come from :func:`jaxnorm.moments` with two-pass accuracy, in at least
  float32: ``use_fast_variance=False`` is the default. ``True`` selects Flax's one-pass
  :math:`E[x^2]-E[x]^2`, which cancels when :math:`|\mu| \gg \sigma`.
* across ``axis_name`` the statistics are combined weighted by element counts, exact when
  devices hold different numbers of unmasked elements.
* ``force_float32_reductions`` is accepted; reductions always run in at least float32.
  ``False`` only initialises BatchNorm's running statistics in ``param_dtype`` as Flax
  does; the update runs in float32 and, as in Flax, stores the promoted dtype.
* integer inputs are promoted to float32 (as Flax does); the functional API
  (:mod:`jaxnorm`) takes floating inputs only.

BatchNorm adds ``unbiased_running_var``, ``momentum=None`` (exact cumulative average with a
``count`` entry) and ``virtual_batch_size`` (ghost batch norm); see :func:`jaxnorm.batch_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

import jaxnorm
from jaxnorm._add_and_norm import check_kind
from jaxnorm._axes import (
    Axes,
    as_floating,
    canonicalize_axes,
    canonicalize_axis,
    check_momentum,
    feature_shape,
    renorm_limits_at,
)
from jaxnorm._linen_weight import SpectralNorm, WeightNorm, WeightStandardization
from jaxnorm._precise import record_linen_moments

__all__ = [
    "AdaptiveInstanceNorm",
    "AddAndNorm",
    "BatchNorm",
    "BatchRenorm",
    "ConditionalInstanceNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LocalResponseNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "WeightStandardization",
]

_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def _scale_and_bias(
    module: nn.Module, shape: tuple[int, ...], use_scale: bool = True, use_bias: bool = True
) -> tuple[jax.Array | None, jax.Array | None]:
    """The module's ``scale`` and ``bias`` params of ``shape`` (None when unused), as Flax;
    a zero-centred scale left at the default initializer (ones) starts at zeros."""
    scale_init = module.scale_init
    if getattr(module, "zero_centered_scale", False) and scale_init is _ones:
        scale_init = _zeros
    scale = (module.param("scale", scale_init, shape, module.param_dtype)
             if use_scale else None)
    bias = (module.param("bias", module.bias_init, shape, module.param_dtype)
            if use_bias else None)
    return scale, bias


class BatchNorm(nn.Module):
    r"""Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``flax.linen.BatchNorm``.

    Training: statistics over every axis except ``axis``; running statistics in
    ``batch_stats`` follow ``ra = momentum * ra + (1 - momentum) * batch`` (not moved by
    ``init``). Evaluation (``use_running_average=True``) uses them. A batch of one value per
    channel trains as in Flax (output ``bias``, variance 0).

    Attributes:
      use_running_average: evaluation mode (may also be given at call time).
      axis: the feature axes.
      momentum: decay of the running averages; ``None`` keeps the exact cumulative
        average over all batches so far (PyTorch's ``momentum=None``) with the batch count
        in ``batch_stats['count']``.
      epsilon: :math:`\epsilon` added to the variance.
      dtype: output dtype (default: promoted input and parameter dtypes).
      param_dtype: dtype of ``scale``/``bias``.
      use_bias: learn a :math:`\beta`.
      use_scale: learn a :math:`\gamma`.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: combine batch statistics across this mapped axis, count-weighted.
      axis_index_groups: groups within ``axis_name``.
      use_fast_variance: Flax's one-pass variance (off: two-pass accuracy).
      force_float32_reductions: ``False`` initialises the running statistics in
        ``param_dtype`` (reductions run in float32 regardless).
      unbiased_running_var: store ``n/(n-1)·var`` in ``var`` (PyTorch's convention).
      virtual_batch_size: ghost batch norm: training statistics per consecutive group of
        this many examples along axis 0; the running statistics average the groups'.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None

    @nn.nowrap
    def _renorm(self, running: jaxnorm.RunningStatistics) -> jaxnorm.Renorm | None:
        """Batch renormalization's inputs; None for plain BatchNorm."""
        return None

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x`` with batch statistics (training) or running ones (evaluation).

        Args:
          x: the input.
          use_running_average: evaluation mode; overrides the attribute.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = as_floating(x)
        shape = feature_shape(x.shape, canonicalize_axes(self.axis, x.ndim, "axis"))
        running = self._running_statistics(shape)
        scale, bias = _scale_and_bias(self, shape, self.use_scale, self.use_bias)
        if use_running_average:
            return jaxnorm.batch_norm_inference(
                x, running.mean.value, running.var.value, scale, bias,
                axis=self.axis, eps=self.epsilon, dtype=self.dtype,
            )
        initializing = self.is_initializing()
        values = jaxnorm.RunningStatistics(*(None if v is None else v.value for v in running))
        y, batch = jaxnorm.batch_norm(
            x, scale, bias, axis=self.axis, eps=self.epsilon, mask=mask,
            # As Flax: `init` may run outside the mapped axis, so it does not sync.
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            dtype=self.dtype, virtual_batch_size=self.virtual_batch_size,
            renorm=self._renorm(values), fast_variance=self.use_fast_variance,
            allow_single_value=True, return_moments=True,
        )
        if not initializing:  # as Flax, `init` does not move the statistics
            updated = jaxnorm.update_running_statistics(
                values, batch, momentum=self.momentum, unbiased=self.unbiased_running_var
            )
            for variable, value in zip(running, updated, strict=True):
                if variable is not None:
                    variable.value = value
            record_linen_moments(self, batch, self.unbiased_running_var)
        return y

    @nn.nowrap
    def _running_statistics(self, shape: tuple[int, ...]) -> Any:
        """The ``batch_stats`` variables (``count`` only with ``momentum=None``)."""
        return _running_variables(self, shape, self.momentum)


class BatchRenorm(BatchNorm):
    r"""Batch renormalization (Ioffe 2017), BatchNorm's arguments plus ``r_max``, ``d_max``.

    Training: :math:`y = ((x-\mu_B)/\sigma_B\cdot r + d)\,\gamma + \beta` with
    :math:`r = \mathrm{clip}(\sigma_B/\sigma, 1/r_{max}, r_{max})` and
    :math:`d = \mathrm{clip}((\mu_B-\mu)/\sigma, -d_{max}, d_{max})` from the running
    statistics, both under ``stop_gradient``; running statistics and evaluation as
    BatchNorm, with the same variables. ``r_max=1, d_max=0`` is BatchNorm.

    Either limit may be a schedule, a function of the training step :math:`k` such as
    ``optax.linear_schedule(1.0, 3.0, 5000)`` (Ioffe 2017 relaxes them from BatchNorm's
    :math:`r_{max} = 1, d_{max} = 0`): then ``batch_stats`` also holds ``step`` (int32,
    0 after ``init``), the :math:`k`-th training call (counting from 0) uses the limits at
    :math:`k` and advances ``step`` to :math:`k + 1`; ``init`` and evaluation leave it.

    Attributes:
      r_max: the largest correction :math:`r` (at least 1), or a schedule of the step.
      d_max: the largest correction :math:`|d|` (at least 0), or a schedule of the step.
    """

    r_max: float | Callable[[jax.Array], Any] = 3.0
    d_max: float | Callable[[jax.Array], Any] = 5.0

    @nn.nowrap
    def _running_statistics(self, shape: tuple[int, ...]) -> Any:
        """BatchNorm's ``batch_stats`` variables, and ``step`` when a limit is scheduled."""
        running = super()._running_statistics(shape)
        if callable(self.r_max) or callable(self.d_max):
            self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        return running

    @nn.nowrap
    def _renorm(self, running: jaxnorm.RunningStatistics) -> jaxnorm.Renorm | None:
        step = None
        if callable(self.r_max) or callable(self.d_max):  # the variable of _running_statistics
            step = self.get_variable("batch_stats", "step")
            if not self.is_initializing():
                self.put_variable("batch_stats", "step", step + 1)
        r_max, d_max = renorm_limits_at(self.r_max, self.d_max, step)
        return jaxnorm.Renorm(running.mean, running.var, r_max, d_max)


class LayerNorm(nn.Module):
    r"""Layer normalization (Ba et al. 2016), a drop-in for ``flax.linen.LayerNorm``:
    statistics over ``reduction_axes``, ``scale``/``bias`` on ``feature_axes``
    (:func:`jaxnorm.layer_norm`).

    Attributes:
      reduction_axes: the axes of the statistics.
      feature_axes: the axes of ``scale`` and ``bias``.
      epsilon: :math:`\epsilon` added to the variance.
      dtype: output dtype (default: promoted input and parameter dtypes).
      param_dtype: dtype of the parameters.
      use_bias: learn a :math:`\beta`.
      use_scale: learn a :math:`\gamma`.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: combine statistics across this mapped axis, count-weighted.
      axis_index_groups: groups within ``axis_name``.
      use_fast_variance: Flax's one-pass variance (off: two-pass accuracy).
      force_float32_reductions: accepted for Flax compatibility; reductions always run in
        at least float32.
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma` (Gemma, Transformer Engine's ``zero_centered_gamma``); the
        default ``scale_init`` (ones) then starts it at zeros, the identity.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernel, interpreted off a
        GPU; trailing axes only, no ``mask``/``axis_name``) or None (automatic: XLA for
        now); see :func:`jaxnorm.layer_norm`.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    zero_centered_scale: bool = False
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        r"""Normalizes ``x``: :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}\,\gamma + \beta`
        with :math:`\mu, \sigma^2` per example over ``reduction_axes``.

        Args:
          x: the input, any rank; its sizes along ``feature_axes`` fix the shape of
            ``scale`` and ``bias`` at ``init``. Integers are promoted to float32.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x = as_floating(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, bias = _scale_and_bias(
            self, feature_shape(x.shape, features), self.use_scale, self.use_bias
        )
        return jaxnorm.layer_norm(
            x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=features,
            eps=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            fast_variance=self.use_fast_variance, zero_centered_scale=self.zero_centered_scale,
            implementation=self.implementation,
        )


class RMSNorm(nn.Module):
    r"""RMS normalization (Zhang & Sennrich 2019), a drop-in for ``flax.linen.RMSNorm``:
    :math:`y = x / \sqrt{E[x^2] + \epsilon}\cdot\gamma` (:func:`jaxnorm.rms_norm`).

    Attributes:
      reduction_axes: the axes of the mean square.
      feature_axes: the axes of ``scale``.
      epsilon: :math:`\epsilon` added to the variance.
      dtype: output dtype (default: promoted input and parameter dtypes).
      param_dtype: dtype of the parameters.
      use_scale: learn a :math:`\gamma`.
      scale_init: initializer of ``scale``.
      axis_name: combine statistics across this mapped axis, count-weighted.
      axis_index_groups: groups within ``axis_name``.
      use_fast_variance: Flax's one-pass variance (off: two-pass accuracy).
      force_float32_reductions: accepted for Flax compatibility; reductions always run in
        at least float32.
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma` (Gemma's RMSNorm); the default ``scale_init`` (ones) then
        starts it at zeros, the identity.
      use_bias: learn a :math:`\beta` added after scaling (default False, as Flax has none).
      bias_init: initializer of ``bias``.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernel, interpreted off a
        GPU; trailing axes only, no ``mask``/``axis_name``) or None (automatic: XLA for
        now); see :func:`jaxnorm.layer_norm`.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = _ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    zero_centered_scale: bool = False
    use_bias: bool = False
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        r"""Normalizes ``x``: :math:`y = x/\sqrt{E[x^2] + \epsilon}\,\gamma`, the mean square
        per example over ``reduction_axes`` (no centring).

        Args:
          x: the input, any rank; its sizes along ``feature_axes`` fix the shape of
            ``scale`` at ``init``. Integers are promoted to float32.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x = as_floating(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, bias = _scale_and_bias(
            self, feature_shape(x.shape, features), self.use_scale, self.use_bias
        )
        return jaxnorm.rms_norm(
            x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=features,
            eps=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            zero_centered_scale=self.zero_centered_scale, implementation=self.implementation,
        )


class AddAndNorm(nn.Module):
    r"""A residual addition and the LayerNorm or RMSNorm of the sum, for pre-norm blocks:
    called as ``(x, residual)``, returns ``(norm(x + residual), x + residual)``
    (:func:`jaxnorm.add_and_norm`).

    .. math::
        s = x + r,\qquad y = \frac{s - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta
        \ \ (\texttt{kind="layer"})\quad\text{or}\quad
        y = \frac{s}{\sqrt{E[s^2] + \epsilon}}\,\gamma + \beta\ \ (\texttt{kind="rms"}).

    The parameters are :class:`LayerNorm`'s (or :class:`RMSNorm`'s): ``scale`` and
    ``bias`` in ``params``, so a pre-norm model that normalized ``x + residual`` with one
    of them keeps its checkpoint when it switches.

    Attributes:
      kind: ``"layer"`` or ``"rms"``.
      epsilon: :math:`\epsilon` added to the variance.
      dtype: dtype of ``y`` (default: promoted dtype of the sum and the parameters); the
        sum keeps the promoted dtype of ``x`` and ``residual``.
      param_dtype: dtype of the parameters.
      use_bias: learn a :math:`\beta`; ``None`` (default): LayerNorm's yes, RMSNorm's no.
      use_scale: learn a :math:`\gamma`.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale`` (zeros for a zero-centred scale left at ones).
      reduction_axes: the axes of the statistics.
      feature_axes: the axes of ``scale`` and ``bias``.
      axis_name: combine statistics across this mapped axis, count-weighted.
      axis_index_groups: groups within ``axis_name``.
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma` (Gemma, Transformer Engine).
    """

    kind: str = "layer"
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool | None = None
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    zero_centered_scale: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, residual: jax.Array, *, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(norm(x + residual), x + residual)``.

        Args:
          x: the sublayer's output; integers are promoted to float32.
          residual: the residual stream, ``x``'s shape.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics. ``None`` (default): every element counts.

        Returns:
          The normalized sum and the sum (the new residual stream).
        """
        kind = check_kind(self.kind)
        x, residual = as_floating(x), as_floating(residual)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        use_bias = kind == "layer" if self.use_bias is None else self.use_bias
        scale, bias = _scale_and_bias(
            self, feature_shape(x.shape, features), self.use_scale, use_bias
        )
        return jaxnorm.add_and_norm(
            x, residual, scale, bias, kind=kind, reduction_axes=self.reduction_axes,
            feature_axes=features, eps=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            zero_centered_scale=self.zero_centered_scale,
        )


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He 2018), a drop-in for ``flax.linen.GroupNorm``
    (:func:`jaxnorm.group_norm`). Adds ``feature_axis`` (Flax: always the last axis).

    Attributes:
      num_groups: the number of groups (exactly one of ``num_groups``/``group_size``).
      group_size: channels per group.
      reduction_axes: the axes of the statistics, including the channel axis (default:
        every axis except 0).
      feature_axis: the channel axis (``1`` serves NCHW).
      epsilon: :math:`\epsilon` added to the variance.
      dtype: output dtype (default: promoted input and parameter dtypes).
      param_dtype: dtype of the parameters.
      use_bias: learn a :math:`\beta`.
      use_scale: learn a :math:`\gamma`.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: combine statistics across this mapped axis, count-weighted.
      axis_index_groups: groups within ``axis_name``.
      use_fast_variance: Flax's one-pass variance (off: two-pass accuracy).
      force_float32_reductions: accepted for Flax compatibility; reductions always run in
        at least float32.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernels, interpreted off a
        GPU; channels-last, statistics over every axis but 0, no ``mask``/``axis_name``)
        or None (automatic: XLA for now); see :func:`jaxnorm.group_norm`.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    reduction_axes: Axes | None = None
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    feature_axis: int = -1
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        r"""Normalizes ``x``: :math:`y = (x - \mu_{n,g})/\sqrt{\sigma^2_{n,g} + \epsilon}\,
        \gamma_c + \beta_c`, statistics per example and group of channels over
        ``reduction_axes``.

        Args:
          x: the input with its channels :math:`C` on ``feature_axis`` (``scale`` and
            ``bias`` have shape ``(C,)``; the number of groups must divide :math:`C`).
            Integers are promoted to float32.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x = as_floating(x)
        axis = canonicalize_axis(self.feature_axis, x.ndim, "feature_axis")
        scale, bias = _scale_and_bias(self, (x.shape[axis],), self.use_scale, self.use_bias)
        return jaxnorm.group_norm(
            x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
            feature_axis=axis, reduction_axes=self.reduction_axes, eps=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, fast_variance=self.use_fast_variance,
            implementation=self.implementation,
        )


class InstanceNorm(nn.Module):
    r"""Instance normalization (Ulyanov et al. 2016), a drop-in for
    ``flax.linen.InstanceNorm`` (:func:`jaxnorm.instance_norm`).

    With ``track_running_stats`` (PyTorch's ``InstanceNorm2d(track_running_stats=True)``)
    training also keeps running averages of the instance statistics in ``batch_stats``
    (``mean``, ``var``; not moved by ``init``), :math:`ra \leftarrow m\,ra + (1-m)\,b`
    with :math:`b` the batch average of the instances' means and of their unbiased
    variances (PyTorch's convention; ``momentum`` :math:`m` is 1 - PyTorch's
    ``momentum``), and evaluation (``use_running_average=True``) normalizes with them:
    :math:`y = (x - \hat\mu_c)/\sqrt{\hat\sigma^2_c + \epsilon}\,\gamma_c + \beta_c`.

    Attributes:
      feature_axes: the channel axes (never the batch axis 0).
      epsilon: :math:`\epsilon` added to the variance.
      dtype: output dtype (default: promoted input and parameter dtypes).
      param_dtype: dtype of the parameters.
      use_bias: learn a :math:`\beta`.
      use_scale: learn a :math:`\gamma`.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: combine statistics across this mapped axis, count-weighted.
      axis_index_groups: groups within ``axis_name``.
      use_fast_variance: Flax's one-pass variance (off: two-pass accuracy).
      force_float32_reductions: accepted for Flax compatibility; reductions always run in
        at least float32 (``False`` initialises the running statistics in
        ``param_dtype``).
      track_running_stats: keep running statistics and use them in evaluation (default
        False: instance statistics always, and ``use_running_average`` is ignored, as in
        PyTorch).
      momentum: decay :math:`m` of the running averages (PyTorch's ``momentum=0.1`` is
        0.9 here); ``None`` keeps the exact cumulative average, with the batch count in
        ``batch_stats['count']``, as BatchNorm (PyTorch's InstanceNorm ignores
        ``momentum=None``: its statistics stay at their initial values).
      use_running_average: evaluation mode with ``track_running_stats`` (may also be given
        at call time).
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernels, interpreted off a
        GPU; channels-last, no ``mask``/``axis_name``, not in training with
        ``track_running_stats``) or None (automatic: XLA for now); see
        :func:`jaxnorm.instance_norm`.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    track_running_stats: bool = False
    momentum: float | None = 0.99
    use_running_average: bool | None = None
    implementation: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        r"""Normalizes ``x``: :math:`y = (x - \mu_{n,c})/\sqrt{\sigma^2_{n,c} + \epsilon}\,
        \gamma_c + \beta_c`, statistics per example :math:`n` and channel :math:`c` over
        every axis except 0 and ``feature_axes`` (the running ones in evaluation with
        ``track_running_stats``).

        Args:
          x: the input, batch axis 0, channels on ``feature_axes`` and at least one other
            (spatial) axis, e.g. ``(N, H, W, C)``. Integers are promoted to float32.
          use_running_average: evaluation mode with ``track_running_stats``; overrides the
            attribute (ignored without ``track_running_stats``).
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x = as_floating(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        shape = feature_shape(x.shape, features)
        scale, bias = _scale_and_bias(self, shape, self.use_scale, self.use_bias)
        options = {"feature_axes": features, "eps": self.epsilon, "mask": mask,
                   "axis_name": self.axis_name, "axis_index_groups": self.axis_index_groups,
                   "dtype": self.dtype, "fast_variance": self.use_fast_variance,
                   "implementation": self.implementation,
                   "allow_single_value": True}  # (N, C) input: output bias, as Flax
        if not self.track_running_stats:
            return jaxnorm.instance_norm(x, scale, bias, **options)
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        running = _running_variables(self, shape, self.momentum)
        if use_running_average:
            return jaxnorm.batch_norm_inference(
                x, running.mean.value, running.var.value, scale, bias, axis=features,
                eps=self.epsilon, dtype=self.dtype,
            )
        y, batch = jaxnorm.instance_norm(x, scale, bias, return_moments=True, **options)
        if not self.is_initializing():  # as BatchNorm, `init` does not move the statistics
            values = jaxnorm.RunningStatistics(*(None if v is None else v.value for v in running))
            updated = jaxnorm.update_running_statistics(
                values, batch, momentum=self.momentum, unbiased=True
            )
            for variable, value in zip(running, updated, strict=True):
                if variable is not None:
                    variable.value = value
        return y


def _running_variables(module: nn.Module, shape: tuple[int, ...], momentum: Any) -> Any:
    """A module's ``batch_stats`` variables ``mean`` (zeros), ``var`` (ones) and, with
    ``momentum=None``, ``count``, as :class:`jaxnorm.RunningStatistics`."""
    check_momentum(momentum)
    dtype = jnp.float32 if module.force_float32_reductions else module.param_dtype
    count = None
    if momentum is None:
        count = module.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
    return jaxnorm.RunningStatistics(
        module.variable("batch_stats", "mean", lambda: jnp.zeros(shape, dtype)),
        module.variable("batch_stats", "var", lambda: jnp.ones(shape, dtype)),
        count,
    )


class LocalResponseNorm(nn.Module):
    r"""Local response normalization across channels (Krizhevsky et al. 2012), as
    ``torch.nn.LocalResponseNorm`` (:func:`jaxnorm.local_response_norm`).

    Attributes:
      size: the window, in channels.
      alpha: the multiplier.
      beta: the exponent.
      k: the additive constant.
      feature_axis: the channel axis.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0
    feature_axis: int = -1

    def __call__(self, x: jax.Array) -> jax.Array:
        r"""Normalizes ``x`` by its neighbouring channels' squares:
        :math:`b_c = a_c\,(k + \tfrac{\alpha}{n}\sum_{c'} a_{c'}^2)^{-\beta}` over the
        window of ``size`` :math:`n` channels around :math:`c` (zero-padded).

        Args:
          x: the input :math:`a`, channels on ``feature_axis``; integers are promoted to
            float32.

        Returns:
          ``b``, the shape and dtype of ``x`` (float32 for integer ``x``).
        """
        return jaxnorm.local_response_norm(
            as_floating(x), size=self.size, alpha=self.alpha, beta=self.beta, k=self.k,
            feature_axis=self.feature_axis,
        )


class AdaptiveInstanceNorm(nn.Module):
    r"""Adaptive instance normalization (Huang & Belongie 2017), called as
    ``(content, style)``; no parameters (:func:`jaxnorm.adaptive_instance_norm`).

    Attributes:
      epsilon: :math:`\epsilon` in both standard deviations.
      feature_axes: the channel axes.
    """

    epsilon: float = 1e-5
    feature_axes: Axes = -1

    def __call__(self, content: jax.Array, style: jax.Array) -> jax.Array:
        r"""``content`` with the per-channel mean and standard deviation of ``style``:
        :math:`\sigma(s)\,(c - \mu(c))/\sigma(c) + \mu(s)`.

        Args:
          content: the floating input :math:`c` whose statistics are replaced: batch axis
            0, channels on ``feature_axes`` and at least one spatial axis.
          style: the floating input :math:`s` whose statistics are imposed: the rank and
            channels of ``content``, any spatial size, batch size that of ``content`` or 1
            (one style for every example).

        Returns:
          The shape and dtype of ``content``.
        """
        return jaxnorm.adaptive_instance_norm(
            content, style, feature_axes=self.feature_axes, eps=self.epsilon
        )


class ConditionalInstanceNorm(nn.Module):
    r"""Conditional instance normalization (Dumoulin et al. 2017), called as ``(x, style_id)``
    (:func:`jaxnorm.conditional_instance_norm`): ``scale``/``bias`` params of shape
    ``(num_styles, *features)``.

    Attributes:
      num_styles: the number of styles.
      feature_axes: the channel axes.
      epsilon: :math:`\epsilon` added to the variance.
      dtype: output dtype (default: promoted input and parameter dtypes).
      param_dtype: dtype of the parameters.
      use_bias: learn a :math:`\beta`.
      use_scale: learn a :math:`\gamma`.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
    """

    num_styles: int
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = _zeros
    scale_init: Initializer = _ones
    feature_axes: Axes = -1

    @nn.compact
    def __call__(
        self, x: jax.Array, style_id: jax.Array, *, mask: jax.Array | None = None
    ) -> jax.Array:
        r"""Normalizes ``x`` with the parameters of ``style_id`` (ids or mixing weights):
        :math:`y = \gamma_s\,\mathrm{IN}(x) + \beta_s`.

        Args:
          x: the input, batch axis 0 (size :math:`N`), channels on ``feature_axes`` and at
            least one spatial axis. Integers are promoted to float32.
          style_id: integer style ids in ``[0, num_styles)``, a scalar (one style for the
            batch) or shape ``(N,)``; or float mixing weights of shape
            ``(N, num_styles)``, whose rows mix the styles' ``scale``/``bias`` linearly.
            An id out of range raises ``ValueError`` eagerly and gives NaN outputs for
            that example under ``jit``.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x = as_floating(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, bias = _scale_and_bias(
            self, (self.num_styles, *feature_shape(x.shape, features)), self.use_scale,
            self.use_bias,
        )
        return jaxnorm.conditional_instance_norm(
            x, style_id, scale, bias, feature_axes=features, eps=self.epsilon, mask=mask,
            dtype=self.dtype,
        )
