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
  ``False`` only stores BatchNorm's running statistics in ``param_dtype`` as Flax does.

BatchNorm adds ``unbiased_running_var``, ``momentum=None`` (exact cumulative average with a
``count`` entry) and ``virtual_batch_size`` (ghost batch norm); see :mod:`jaxnorm.running`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from jaxnorm._axes import (
    Axes,
    canonicalize_axes,
    canonicalize_axis,
    complement_axes,
    feature_shape,
)
from jaxnorm.functional import (
    adaptive_instance_norm,
    batch_norm_inference,
    local_response_norm,
    normalize,
)
from jaxnorm.running import (
    MOMENTS_COLLECTION,
    BatchMoments,
    RunningStatistics,
    batch_norm_train,
    conditional_instance_norm,
    group_normalize,
    merge_moments,
    update_running_statistics,
)

Array = jax.Array
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def _scale_and_bias(
    module: nn.Module,
    shape: tuple[int, ...],
    use_scale: bool,
    use_bias: bool,
    scale_init: Initializer,
    bias_init: Initializer,
    param_dtype: Dtype,
) -> tuple[Array | None, Array | None]:
    """The ``scale`` and ``bias`` params of ``shape`` (``None`` when not used), as Flax."""
    scale = module.param("scale", scale_init, shape, param_dtype) if use_scale else None
    bias = module.param("bias", bias_init, shape, param_dtype) if use_bias else None
    return scale, bias


def _moments_requested(module: nn.Module) -> bool:
    """Whether ``apply`` named the batch-moments collection as mutable (as
    :func:`jaxnorm.recompute_batch_stats` does); ``mutable=True`` alone does not ask for it,
    so the variables stay Flax's."""
    mutable = module.scope.mutable if module.scope is not None else False
    return mutable is not True and module.is_mutable_collection(MOMENTS_COLLECTION)


class BatchNorm(nn.Module):
    """Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``flax.linen.BatchNorm``.

    Training: statistics over every axis except ``axis``; running statistics in
    ``batch_stats`` follow ``ra = momentum * ra + (1 - momentum) * batch`` (not moved by
    ``init``). Evaluation (``use_running_average=True``) uses them.

    Attributes beyond Flax's:
      unbiased_running_var: store ``n/(n-1)·var`` in ``var`` (PyTorch's convention).
      momentum: ``None`` keeps the exact cumulative average over all batches so far
        (PyTorch's ``momentum=None``) with the batch count in ``batch_stats['count']``.
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
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None

    def _renorm_limits(self) -> tuple[float, float] | None:
        """``(r_max, d_max)`` for batch renormalization; ``None`` for plain BatchNorm."""
        return None

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x`` with batch statistics (training) or running ones (evaluation)."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        features = canonicalize_axes(self.axis, x.ndim, "axis")
        shape = feature_shape(x.shape, features)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, stats_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, stats_dtype))
        ra_count = None
        if self.momentum is None:
            ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        scale, bias = _scale_and_bias(
            self, shape, self.use_scale, self.use_bias, self.scale_init, self.bias_init,
            self.param_dtype,
        )

        if use_running_average:
            return batch_norm_inference(
                x, ra_mean.value, ra_var.value, scale, bias,
                axis=features, eps=self.epsilon, dtype=self.dtype,
            )

        initializing = self.is_initializing()
        limits = self._renorm_limits()
        y, batch = batch_norm_train(
            x,
            scale,
            bias,
            axis=features,
            eps=self.epsilon,
            mask=mask,
            # As Flax: `init` may run outside the mapped axis, so it does not sync.
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            dtype=self.dtype,
            virtual_batch_size=self.virtual_batch_size,
            renorm=None if limits is None else (ra_mean.value, ra_var.value, *limits),
            # `init` does not move the statistics: a batch of one may initialize, as in Flax.
            require_spread=not initializing,
            fast_variance=self.use_fast_variance,
        )
        if not initializing:
            running = update_running_statistics(
                RunningStatistics(ra_mean.value, ra_var.value,
                                  None if ra_count is None else ra_count.value),
                batch,
                momentum=self.momentum,
                unbiased=self.unbiased_running_var,
            )
            ra_mean.value, ra_var.value = running.mean, running.var
            if ra_count is not None:
                ra_count.value = running.count
            if _moments_requested(self):
                if self.has_variable(MOMENTS_COLLECTION, "mean"):
                    # called again in this forward pass (shared layer): pool both calls
                    batch = merge_moments(
                        BatchMoments(*(self.get_variable(MOMENTS_COLLECTION, name)
                                       for name in ("mean", "var", "count"))),
                        batch,
                    )
                self.put_variable(MOMENTS_COLLECTION, "mean", batch.mean)
                self.put_variable(MOMENTS_COLLECTION, "var", batch.var)
                self.put_variable(MOMENTS_COLLECTION, "count", batch.count)
                self.put_variable(
                    MOMENTS_COLLECTION, "unbiased", jnp.asarray(self.unbiased_running_var)
                )
        return y


class BatchRenorm(BatchNorm):
    r"""Batch renormalization (Ioffe 2017), BatchNorm's arguments plus ``r_max``, ``d_max``.

    Training: :math:`y = ((x-\mu_B)/\sigma_B\cdot r + d)\,\gamma + \beta` with
    :math:`r = \mathrm{clip}(\sigma_B/\sigma, 1/r_{max}, r_{max})` and
    :math:`d = \mathrm{clip}((\mu_B-\mu)/\sigma, -d_{max}, d_{max})` from the running
    statistics, both under ``stop_gradient``; running statistics and evaluation as
    BatchNorm, with the same variables. ``r_max=1, d_max=0`` is BatchNorm.
    """

    r_max: float = 3.0
    d_max: float = 5.0

    def _renorm_limits(self) -> tuple[float, float] | None:
        return (self.r_max, self.d_max)


class LayerNorm(nn.Module):
    """Layer normalization (Ba et al. 2016), a drop-in for ``flax.linen.LayerNorm``:
    statistics over ``reduction_axes``, ``scale``/``bias`` on ``feature_axes``."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        x = jnp.asarray(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, bias = _scale_and_bias(
            self, feature_shape(x.shape, features), self.use_scale, self.use_bias,
            self.scale_init, self.bias_init, self.param_dtype,
        )
        return normalize(
            x, self.reduction_axes, scale, bias,
            feature_axes=features, eps=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            fast_variance=self.use_fast_variance,
        )


class RMSNorm(nn.Module):
    r"""RMS normalization (Zhang & Sennrich 2019), a drop-in for ``flax.linen.RMSNorm``:
    :math:`y = x / \sqrt{E[x^2] + \epsilon}\cdot\gamma`."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        x = jnp.asarray(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, _ = _scale_and_bias(
            self, feature_shape(x.shape, features), self.use_scale, False,
            self.scale_init, zeros, self.param_dtype,
        )
        return normalize(
            x, self.reduction_axes, scale,
            feature_axes=features, eps=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype, centered=False,
        )


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018), a drop-in for ``flax.linen.GroupNorm``.

    Exactly one of ``num_groups`` / ``group_size``. Statistics per group of channels over
    ``reduction_axes`` (default: every axis except 0). Adds ``feature_axis`` (Flax: always
    the last axis); ``feature_axis=1`` serves NCHW.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    reduction_axes: Axes | None = None
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    feature_axis: int = -1

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        x = jnp.asarray(x)
        axis = canonicalize_axis(self.feature_axis, x.ndim, "feature_axis")
        scale, bias = _scale_and_bias(
            self, (x.shape[axis],), self.use_scale, self.use_bias,
            self.scale_init, self.bias_init, self.param_dtype,
        )
        return group_normalize(
            x, scale, bias,
            num_groups=self.num_groups, group_size=self.group_size, feature_axis=axis,
            reduction_axes=self.reduction_axes, eps=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, fast_variance=self.use_fast_variance,
        )


class InstanceNorm(nn.Module):
    """Instance normalization (Ulyanov et al. 2016), a drop-in for
    ``flax.linen.InstanceNorm``: statistics per example and channel over every axis except
    0 and ``feature_axes``."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    feature_axes: Axes = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        x = jnp.asarray(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        if 0 in features:
            raise ValueError("feature_axes must not contain the batch axis 0")
        scale, bias = _scale_and_bias(
            self, feature_shape(x.shape, features), self.use_scale, self.use_bias,
            self.scale_init, self.bias_init, self.param_dtype,
        )
        return normalize(
            x, complement_axes(x.ndim, (0,), features), scale, bias,
            feature_axes=features, eps=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            fast_variance=self.use_fast_variance,
        )


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels (Krizhevsky et al. 2012), as
    ``torch.nn.LocalResponseNorm``; see :func:`jaxnorm.local_response_norm`."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0
    feature_axis: int = -1

    def __call__(self, x: Array) -> Array:
        return local_response_norm(
            x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k,
            feature_axis=self.feature_axis,
        )


class AdaptiveInstanceNorm(nn.Module):
    """Adaptive instance normalization (Huang & Belongie 2017), called as
    ``(content, style)``; no parameters. See :func:`jaxnorm.adaptive_instance_norm`."""

    epsilon: float = 1e-5
    feature_axes: Axes = -1

    def __call__(self, content: Array, style: Array) -> Array:
        return adaptive_instance_norm(
            content, style, feature_axes=self.feature_axes, eps=self.epsilon
        )


class ConditionalInstanceNorm(nn.Module):
    r"""Conditional instance normalization (Dumoulin et al. 2017), called as ``(x, style_id)``.

    :math:`y = \gamma_s \cdot \mathrm{IN}(x) + \beta_s` with ``scale``/``bias`` params of
    shape ``(num_styles, *features)``. ``style_id`` is an integer style id (a scalar, or one
    per example, shape ``(N,)``) or float style weights of shape ``(N, num_styles)`` that
    mix the styles' :math:`\gamma, \beta` linearly.
    """

    num_styles: int
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    feature_axes: Axes = -1

    @nn.compact
    def __call__(self, x: Array, style_id: Array, *, mask: Array | None = None) -> Array:
        x = jnp.asarray(x)
        features = canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, bias = _scale_and_bias(
            self, (self.num_styles, *feature_shape(x.shape, features)), self.use_scale,
            self.use_bias, self.scale_init, self.bias_init, self.param_dtype,
        )
        return conditional_instance_norm(
            x, style_id, scale, bias,
            feature_axes=features, eps=self.epsilon, mask=mask, dtype=self.dtype,
        )
