"""Flax NNX normalization modules, thin over jaxnorm's functional core.

The same set as :mod:`jaxnorm.linen`, in ``flax.nnx`` style and drop-in for the
``flax.nnx`` classes of the same name: constructors take ``num_features`` and ``rngs``;
``scale``/``bias`` are ``nnx.Param``; running statistics are ``nnx.BatchStat`` variables
``mean`` and ``var`` (and ``count`` with ``momentum=None``); ``model.train()`` /
``model.eval()`` (or ``nnx.view``) toggle ``use_running_average``. Each module holds its
parameters and calls the same :mod:`jaxnorm` function as its Linen twin; see
:mod:`jaxnorm.linen` for how the statistics differ from Flax's (stable by default;
``use_fast_variance=True`` selects Flax's one-pass formula).
:func:`recompute_batch_stats` (precise BN) recomputes a model's statistics in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer

import jaxnorm
from jaxnorm._add_and_norm import check_kind
from jaxnorm._axes import Axes, as_floating, check_momentum, check_renorm_limits, renorm_limits_at
from jaxnorm._group_norm import resolve_num_groups
from jaxnorm._nnx_weight import SpectralNorm, WeightNorm, WeightStandardization
from jaxnorm._precise import recompute_nnx_batch_stats

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
    "recompute_batch_stats",
]

Array = jax.Array
PromoteDtypeFn = Any
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _param(
    use: bool,
    init: Initializer,
    shape: tuple[int, ...],
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    metadata: Mapping[str, Any],
) -> nnx.Param | None:
    """An ``nnx.Param`` initialised as Flax NNX does, or an empty slot when unused."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, param_dtype), **metadata)


def _scale_init(init: Initializer, zero_centered: bool) -> Initializer:
    """``init``, or zeros for a zero-centred scale left at the default ones."""
    return _zeros if zero_centered and init is _ones else init


def _value(variable: nnx.Variable | None) -> Array | None:
    return None if variable is None else variable[...]


def _shape(num_features: int | Sequence[int]) -> tuple[int, ...]:
    return (num_features,) if isinstance(num_features, int) else tuple(num_features)


class BatchNorm(nnx.Module):
    r"""Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``flax.nnx.BatchNorm``.

    Training (``use_running_average=False``, ``model.train()``): batch statistics over
    every axis except ``axis``; ``mean``/``var`` follow ``ra = momentum * ra +
    (1 - momentum) * batch``. Evaluation (``model.eval()``) uses them. Beyond Flax:
    ``unbiased_running_var`` (PyTorch's ``n/(n-1)`` convention), ``momentum=None`` (exact
    cumulative average with a ``count`` BatchStat) and ``virtual_batch_size`` (ghost
    batch norm), as :class:`jaxnorm.linen.BatchNorm`.

    Training: :math:`y = (x - \mu_B)/\sqrt{\sigma^2_B + \epsilon}\,\gamma + \beta`, then
    :math:`\hat\mu \leftarrow m\,\hat\mu + (1-m)\,\mu_B` and likewise :math:`\hat\sigma^2`;
    evaluation: :math:`y = (x - \hat\mu)/\sqrt{\hat\sigma^2 + \epsilon}\,\gamma + \beta`.

    Args:
      num_features: the number of channels :math:`C`, the size of ``x`` along ``axis``
        (a tuple of sizes when ``axis`` names several axes): the shape of ``scale``,
        ``bias``, ``mean`` and ``var``.
      use_running_average: False (default, as Flax NNX): training, normalize with the batch
        statistics and update ``mean``/``var``; True: evaluation with the running
        statistics; None: the call must say. ``model.train()`` / ``model.eval()`` set it;
        the call's argument overrides it.
      axis: the feature axis or axes (default -1, channels last; ``1`` for NCHW); the
        statistics are taken over every other axis.
      momentum: the decay :math:`m` of the running averages (default 0.99, Flax's;
        PyTorch's ``momentum=0.1`` is ``0.9`` here); None: the exact cumulative average
        over all batches so far, counted in the ``count`` BatchStat (PyTorch's
        ``momentum=None``).
      epsilon: :math:`\epsilon` added to the variance (default 1e-5, as Flax and PyTorch).
      dtype: the dtype of the computation: ``promote_dtype`` casts ``x``, ``scale`` and
        ``bias`` to it and the output has it; default ``None``: their promoted dtype
        (statistics are computed in at least float32 either way).
      param_dtype: the dtype ``scale`` and ``bias`` are initialised in (default float32);
        ``mean`` and ``var`` start in float32 and are updated in at least float32.
      use_bias: learn the shift :math:`\beta` (the ``bias`` Param; default True). False:
        ``bias`` is None and nothing is added.
      use_scale: learn the gain :math:`\gamma` (the ``scale`` Param; default True). False:
        ``scale`` is None, as when the next layer is linear and absorbs it.
      bias_init: the initializer of ``bias``, called as ``bias_init(key, shape,
        param_dtype)`` with a key from ``rngs.params()``; default zeros.
      scale_init: the initializer of ``scale``, called likewise; default ones.
      axis_name: the name of a mapped axis (``jax.pmap``, ``shard_map``, ``vmap``) across
        which the batch statistics are combined (synchronized BatchNorm), weighted by
        element counts; default None: each device alone.
      axis_index_groups: groups of indices within ``axis_name`` that combine separately,
        as in ``lax.psum`` (``[[0, 1], [2, 3]]``: two pairs of devices); default None: all.
      use_fast_variance: True: Flax's one-pass :math:`E[x^2] - E[x]^2`, which cancels when
        :math:`|\mu| \gg \sigma`; default False: the two-pass :math:`E[(x - \mu)^2]`.
      promote_dtype: Flax NNX's dtype hook, called as ``promote_dtype((x, scale, bias),
        dtype=dtype)`` (an unused ``scale``/``bias`` as None) and returning the three
        cast (Flax's BatchNorm also passes ``mean`` and ``var``; here they stay in their
        own dtype); default ``flax.nnx.nn.dtypes.promote_dtype``.
      rngs: an ``nnx.Rngs`` (required, as in Flax); its ``params`` stream gives the keys
        of ``scale_init`` and ``bias_init``.
      bias_metadata: keyword arguments of the ``bias`` ``nnx.Param`` (e.g. sharding
        annotations), as in Flax; default none.
      scale_metadata: keyword arguments of the ``scale`` ``nnx.Param``, likewise.
      unbiased_running_var: store :math:`n/(n-1)\,\sigma^2_B` in ``var`` (PyTorch's
        convention); the batch itself is normalized with the biased :math:`\sigma^2_B`
        either way. Default False (Flax's).
      virtual_batch_size: ghost batch norm: training statistics per consecutive group of
        this many examples along axis 0 (must divide the batch size; axis 0 must not be
        a feature axis); the running statistics take the groups' pooled moments
        (:class:`jaxnorm.BatchMoments`). Default None: the whole batch.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: Axes = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        unbiased_running_var: bool = False,
        virtual_batch_size: int | None = None,
    ):
        check_momentum(momentum)
        shape = _shape(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.count = (
            nnx.BatchStat(jnp.zeros((), jnp.int32)) if momentum is None else nnx.data(None)
        )
        self.scale = _param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var
        self.virtual_batch_size = virtual_batch_size
        # Set by jaxnorm.nnx.recompute_batch_stats: sow each batch's moments.
        self.report_batch_moments = False

    def _renorm(self) -> jaxnorm.Renorm | None:
        """Batch renormalization's inputs; None for plain BatchNorm."""
        return None

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x``; the call's ``use_running_average`` overrides the attribute.

        Args:
          x: the input.
          use_running_average: evaluation mode; overrides the attribute.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
        """
        use_running_average = first_from(
            use_running_average,
            self.use_running_average,
            error_msg="pass use_running_average to BatchNorm (constructor or call), or "
            "use model.train() / model.eval()",
        )
        x, scale, bias = self.promote_dtype(
            (as_floating(x), _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        if use_running_average:
            return jaxnorm.batch_norm_inference(
                x, self.mean[...], self.var[...], scale, bias,
                axis=self.axis, eps=self.epsilon, dtype=self.dtype,
            )
        y, batch = jaxnorm.batch_norm(
            x, scale, bias, axis=self.axis, eps=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, virtual_batch_size=self.virtual_batch_size,
            renorm=self._renorm(), fast_variance=self.use_fast_variance,
            allow_single_value=True, return_moments=True,
        )
        running = jaxnorm.update_running_statistics(
            jaxnorm.RunningStatistics(self.mean[...], self.var[...], _value(self.count)),
            batch, momentum=self.momentum, unbiased=self.unbiased_running_var,
        )
        self.mean[...], self.var[...] = running.mean, running.var
        if self.count is not None:
            self.count[...] = running.count
        if self.report_batch_moments:
            self.sow(nnx.Intermediate, "batch_moments", (batch.mean, batch.var, batch.count))
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given.

        Args:
          use_running_average: if True, use the running statistics (evaluation); if False,
            the batch statistics (training); None leaves the mode unchanged.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    r"""Batch renormalization (Ioffe 2017): BatchNorm's arguments plus ``r_max``, ``d_max``.

    Training: :math:`y = ((x-\mu_B)/\sigma_B\cdot r + d)\,\gamma + \beta` with ``r``, ``d``
    from the running statistics, clipped and under ``stop_gradient``
    (:func:`jaxnorm.batch_norm`). ``r_max=1, d_max=0`` is BatchNorm. With
    :math:`\sigma_B = \sqrt{\sigma^2_B + \epsilon}` and
    :math:`\hat\sigma = \sqrt{\hat\sigma^2 + \epsilon}`:
    :math:`r = \mathrm{clip}(\sigma_B/\hat\sigma, 1/r_{max}, r_{max})`,
    :math:`d = \mathrm{clip}((\mu_B - \hat\mu)/\hat\sigma, -d_{max}, d_{max})`. Running
    statistics and evaluation as :class:`BatchNorm`, with the same variables.

    Args:
      num_features: the number of channels, as :class:`BatchNorm`'s.
      r_max: the largest correction :math:`r`, at least 1 (default 3.0).
      d_max: the largest correction :math:`|d|`, at least 0 (default 5.0).
      rngs: an ``nnx.Rngs``, as :class:`BatchNorm`'s.
      **batch_norm_kwargs: every other keyword argument of :class:`BatchNorm`
        (``momentum``, ``axis``, ``epsilon``, ``use_running_average``, ...), with its
        default there.

    ``r_max`` and ``d_max`` may be schedules, functions of the training step such as
    ``optax.linear_schedule(1.0, 3.0, 5000)``, as in :class:`jaxnorm.linen.BatchRenorm`:
    then a ``step`` BatchStat (int32, 0 at construction) counts the training calls, the
    :math:`k`-th (from 0) uses the limits at :math:`k`, and evaluation leaves it.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        r_max: float | Callable[[Array], Any] = 3.0,
        d_max: float | Callable[[Array], Any] = 5.0,
        rngs: nnx.Rngs,
        **batch_norm_kwargs: Any,
    ):
        check_renorm_limits(r_max, d_max)
        super().__init__(num_features, rngs=rngs, **batch_norm_kwargs)
        self.r_max = r_max
        self.d_max = d_max
        scheduled = callable(r_max) or callable(d_max)
        self.step = nnx.BatchStat(jnp.zeros((), jnp.int32)) if scheduled else nnx.data(None)

    def _renorm(self) -> jaxnorm.Renorm | None:
        step = _value(self.step)
        if step is not None:
            self.step[...] = step + 1
        r_max, d_max = renorm_limits_at(self.r_max, self.d_max, step)
        return jaxnorm.Renorm(self.mean[...], self.var[...], r_max, d_max)


class LayerNorm(nnx.Module):
    r"""Layer normalization (Ba et al. 2016), a drop-in for ``flax.nnx.LayerNorm``:
    :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}\,\gamma + \beta` with :math:`\mu,
    \sigma^2` over ``reduction_axes`` (:func:`jaxnorm.layer_norm`).

    Args:
      num_features: the shape of ``scale`` and ``bias``: the size of ``x`` along
        ``feature_axes`` (an int for one axis, a tuple for several).
      epsilon: :math:`\epsilon` added to the variance (default 1e-6, as Flax; PyTorch's
        is 1e-5).
      dtype: the dtype of the computation: ``promote_dtype`` casts ``x``, ``scale`` and
        ``bias`` to it and the output has it; default ``None``: their promoted dtype
        (statistics are computed in at least float32 either way).
      param_dtype: the dtype ``scale`` and ``bias`` are initialised in (default float32).
      use_bias: learn the shift :math:`\beta` (the ``bias`` Param; default True). False:
        ``bias`` is None and nothing is added.
      use_scale: learn the gain :math:`\gamma` (the ``scale`` Param; default True). False:
        ``scale`` is None, as when the next layer is linear and absorbs it.
      bias_init: the initializer of ``bias``, called as ``bias_init(key, shape,
        param_dtype)`` with a key from ``rngs.params()``; default zeros.
      scale_init: the initializer of ``scale``, called likewise; default ones.
      reduction_axes: the axes the statistics are taken over, separately for every
        index of the others (default -1, the last).
      feature_axes: the axes of ``scale`` and ``bias`` (default -1).
      axis_name: the name of a mapped axis across which the statistics are combined
        (e.g. a sequence sharded over devices), weighted by element counts; default None.
      axis_index_groups: groups of indices within ``axis_name`` that combine separately,
        as in ``lax.psum`` (``[[0, 1], [2, 3]]``: two pairs of devices); default None: all.
      use_fast_variance: True: Flax's one-pass :math:`E[x^2] - E[x]^2`, which cancels when
        :math:`|\mu| \gg \sigma`; default False: the two-pass :math:`E[(x - \mu)^2]`.
      promote_dtype: Flax NNX's dtype hook, called as ``promote_dtype((x, scale, bias),
        dtype=dtype)`` (an unused ``scale``/``bias`` as None) and returning the three
        cast; default ``flax.nnx.nn.dtypes.promote_dtype``.
      rngs: an ``nnx.Rngs`` (required, as in Flax); its ``params`` stream gives the keys
        of ``scale_init`` and ``bias_init``.
      bias_metadata: keyword arguments of the ``bias`` ``nnx.Param`` (e.g. sharding
        annotations), as in Flax; default none.
      scale_metadata: keyword arguments of the ``scale`` ``nnx.Param``, likewise.

    Args beyond Flax's:
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma` (Gemma, Transformer Engine's ``zero_centered_gamma``); the
        default ``scale_init`` (ones) then starts it at zeros, the identity.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernel, interpreted off a
        GPU; trailing axes only, no ``mask``/``axis_name``) or None (automatic: XLA for
        now); see :func:`jaxnorm.layer_norm`.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        zero_centered_scale: bool = False,
        implementation: str | None = None,
    ):
        shape = _shape(num_features)
        scale_init = _scale_init(scale_init, zero_centered_scale)
        self.scale = _param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.zero_centered_scale = zero_centered_scale
        self.implementation = implementation

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (formula above).

        Args:
          x: the input, any rank; its sizes along ``feature_axes`` must be
            ``num_features``. Integers are promoted to float32.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x, scale, bias = self.promote_dtype(
            (as_floating(x), _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        return jaxnorm.layer_norm(
            x, scale, bias, reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes, eps=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, fast_variance=self.use_fast_variance,
            zero_centered_scale=self.zero_centered_scale, implementation=self.implementation,
        )


class RMSNorm(nnx.Module):
    r"""RMS normalization (Zhang & Sennrich 2019), a drop-in for ``flax.nnx.RMSNorm``:
    :math:`y = x / \sqrt{E[x^2] + \epsilon}\cdot\gamma`, the mean square over
    ``reduction_axes`` (:func:`jaxnorm.rms_norm`).

    Args:
      num_features: the shape of ``scale``: the size of ``x`` along ``feature_axes`` (an
        int for one axis, a tuple for several).
      epsilon: :math:`\epsilon` added to the mean square (default 1e-6, as Flax).
      dtype: the dtype of the computation: ``promote_dtype`` casts ``x`` and ``scale`` to
        it and the output has it; default ``None``: their promoted dtype (the mean square
        is computed in at least float32 either way).
      param_dtype: the dtype ``scale`` is initialised in (default float32).
      use_scale: learn the gain :math:`\gamma` (the ``scale`` Param; default True). False:
        ``scale`` is None.
      scale_init: the initializer of ``scale``, called as ``scale_init(key, shape,
        param_dtype)`` with a key from ``rngs.params()``; default ones.
      reduction_axes: the axes of the mean square, separately for every index of the
        others (default -1, the last).
      feature_axes: the axes of ``scale`` (default -1).
      axis_name: the name of a mapped axis (``jax.pmap``, ``shard_map``, ``vmap``) across
        which the statistics are combined, weighted by element counts (exact when devices
        hold different numbers of unmasked elements); default None: each device alone.
      axis_index_groups: groups of indices within ``axis_name`` that combine separately,
        as in ``lax.psum`` (``[[0, 1], [2, 3]]``: two pairs of devices); default None: all.
      use_fast_variance: accepted for Flax compatibility; RMS normalization takes no
        variance, so it changes nothing.
      promote_dtype: Flax NNX's dtype hook, called as ``promote_dtype((x, scale),
        dtype=dtype)`` (an unused ``scale`` as None) and returning both cast; default
        ``flax.nnx.nn.dtypes.promote_dtype``.
      rngs: an ``nnx.Rngs`` (required, as in Flax); its ``params`` stream gives the key
        of ``scale_init``.
      scale_metadata: keyword arguments of the ``scale`` ``nnx.Param``, likewise.

    Args beyond Flax's:
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma` (Gemma's RMSNorm); the default ``scale_init`` (ones) then
        starts it at zeros, the identity.
      use_bias: learn a :math:`\beta` added after scaling, the ``bias`` Param (default
        False, as Flax has none).
      bias_init: the initializer of ``bias``; default zeros.
      bias_metadata: keyword arguments of the ``bias`` ``nnx.Param``.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernel, interpreted off a
        GPU; trailing axes only, no ``mask``/``axis_name``) or None (automatic: XLA for
        now); see :func:`jaxnorm.layer_norm`.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = _ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        zero_centered_scale: bool = False,
        use_bias: bool = False,
        bias_init: Initializer = _zeros,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        implementation: str | None = None,
    ):
        shape = _shape(num_features)
        scale_init = _scale_init(scale_init, zero_centered_scale)
        self.scale = _param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.zero_centered_scale = zero_centered_scale
        self.use_bias = use_bias
        self.implementation = implementation

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (formula above).

        Args:
          x: the input, any rank; its sizes along ``feature_axes`` must be
            ``num_features``. Integers are promoted to float32.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x, scale, bias = self.promote_dtype(
            (as_floating(x), _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        return jaxnorm.rms_norm(
            x, scale, bias, reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes, eps=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, zero_centered_scale=self.zero_centered_scale,
            implementation=self.implementation,
        )


class AddAndNorm(nnx.Module):
    r"""A residual addition and the LayerNorm or RMSNorm of the sum, for pre-norm blocks:
    called as ``(x, residual)``, returns ``(norm(x + residual), x + residual)``
    (:func:`jaxnorm.add_and_norm`, :class:`jaxnorm.linen.AddAndNorm`).

    .. math::
        s = x + r,\qquad y = \frac{s - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta
        \ \ (\texttt{kind="layer"})\quad\text{or}\quad
        y = \frac{s}{\sqrt{E[s^2] + \epsilon}}\,\gamma + \beta\ \ (\texttt{kind="rms"}).

    Args:
      num_features: the shape of ``scale`` and ``bias``: the size of ``x`` along
        ``feature_axes`` (an int for one axis, a tuple for several).
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
      rngs: an ``nnx.Rngs``; its ``params`` stream initialises ``scale`` and ``bias``.
      bias_metadata: keyword arguments of the ``bias`` ``nnx.Param``.
      scale_metadata: keyword arguments of the ``scale`` ``nnx.Param``.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        kind: str = "layer",
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool | None = None,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        zero_centered_scale: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self.kind = check_kind(kind)
        use_bias = kind == "layer" if use_bias is None else use_bias
        shape = _shape(num_features)
        scale_init = _scale_init(scale_init, zero_centered_scale)
        self.scale = _param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.zero_centered_scale = zero_centered_scale

    def __call__(
        self, x: Array, residual: Array, *, mask: Array | None = None
    ) -> tuple[Array, Array]:
        """``(norm(x + residual), x + residual)``.

        Args:
          x: the sublayer's output; integers are promoted to float32.
          residual: the residual stream, ``x``'s shape.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics. ``None`` (default): every element counts.

        Returns:
          The normalized sum and the sum (the new residual stream).
        """
        return jaxnorm.add_and_norm(
            as_floating(x), as_floating(residual), _value(self.scale), _value(self.bias),
            kind=self.kind, reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes, eps=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, zero_centered_scale=self.zero_centered_scale,
        )


class GroupNorm(nnx.Module):
    r"""Group normalization (Wu & He 2018), a drop-in for ``flax.nnx.GroupNorm``; adds
    ``feature_axis`` (``1`` serves NCHW). Exactly one of ``num_groups``/``group_size``.

    The :math:`C` channels form :math:`G` groups of :math:`C/G` consecutive channels;
    :math:`y = (x - \mu_{n,g})/\sqrt{\sigma^2_{n,g} + \epsilon}\,\gamma_c + \beta_c` with
    statistics per example and group (:func:`jaxnorm.group_norm`).

    Args:
      num_features: the number of channels :math:`C`, the size of ``x`` along
        ``feature_axis``; ``scale`` and ``bias`` have shape ``(C,)``.
      num_groups: :math:`G`, dividing :math:`C` (default 32, as Flax); pass None to give
        ``group_size`` instead.
      group_size: :math:`C/G`, the channels per group, dividing :math:`C` (default None:
        from ``num_groups``).
      epsilon: :math:`\epsilon` added to the variance (default 1e-6, as Flax; PyTorch's
        is 1e-5).
      dtype: the dtype of the computation: ``promote_dtype`` casts ``x``, ``scale`` and
        ``bias`` to it and the output has it; default ``None``: their promoted dtype
        (statistics are computed in at least float32 either way).
      param_dtype: the dtype ``scale`` and ``bias`` are initialised in (default float32).
      use_bias: learn the shift :math:`\beta` (the ``bias`` Param; default True). False:
        ``bias`` is None and nothing is added.
      use_scale: learn the gain :math:`\gamma` (the ``scale`` Param; default True). False:
        ``scale`` is None, as when the next layer is linear and absorbs it.
      bias_init: the initializer of ``bias``, called as ``bias_init(key, shape,
        param_dtype)`` with a key from ``rngs.params()``; default zeros.
      scale_init: the initializer of ``scale``, called likewise; default ones.
      reduction_axes: the axes the statistics span, including the channel axis (Flax's
        argument); default None: every axis except the batch axis 0. Axes outside it are
        batch axes.
      axis_name: the name of a mapped axis (``jax.pmap``, ``shard_map``, ``vmap``) across
        which the statistics are combined, weighted by element counts (exact when devices
        hold different numbers of unmasked elements); default None: each device alone.
      axis_index_groups: groups of indices within ``axis_name`` that combine separately,
        as in ``lax.psum`` (``[[0, 1], [2, 3]]``: two pairs of devices); default None: all.
      use_fast_variance: True: Flax's one-pass :math:`E[x^2] - E[x]^2`, which cancels when
        :math:`|\mu| \gg \sigma`; default False: the two-pass :math:`E[(x - \mu)^2]`.
      promote_dtype: Flax NNX's dtype hook, called as ``promote_dtype((x, scale, bias),
        dtype=dtype)`` (an unused ``scale``/``bias`` as None) and returning the three
        cast; default ``flax.nnx.nn.dtypes.promote_dtype``.
      rngs: an ``nnx.Rngs`` (required, as in Flax); its ``params`` stream gives the keys
        of ``scale_init`` and ``bias_init``.
      bias_metadata: keyword arguments of the ``bias`` ``nnx.Param`` (e.g. sharding
        annotations), as in Flax; default none.
      scale_metadata: keyword arguments of the ``scale`` ``nnx.Param``, likewise.
      feature_axis: the channel axis (default -1, channels last as Flax; ``1`` for NCHW
        as ``torch.nn.GroupNorm``).
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernels, interpreted off a
        GPU; channels-last, statistics over every axis but 0, no ``mask``/``axis_name``)
        or None (automatic: XLA for now); see :func:`jaxnorm.group_norm`.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        reduction_axes: Axes | None = None,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        feature_axis: int = -1,
        implementation: str | None = None,
    ):
        self.num_groups = resolve_num_groups(num_features, num_groups, group_size)
        self.group_size = num_features // self.num_groups
        shape = (num_features,)
        self.scale = _param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.feature_axis = feature_axis
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.implementation = implementation

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (formula above).

        Args:
          x: the input with its ``num_features`` channels on ``feature_axis``. Integers
            are promoted to float32.
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
            ``None`` (default): every element counts.

        Returns:
          ``y``, the shape of ``x``, in ``dtype`` (default: the promoted dtype of ``x`` and
          the parameters).
        """
        x, scale, bias = self.promote_dtype(
            (as_floating(x), _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        return jaxnorm.group_norm(
            x, scale, bias, num_groups=self.num_groups, group_size=None,
            feature_axis=self.feature_axis, reduction_axes=self.reduction_axes,
            eps=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            fast_variance=self.use_fast_variance, implementation=self.implementation,
        )


class InstanceNorm(nnx.Module):
    r"""Instance normalization (Ulyanov et al. 2016), a drop-in for
    ``flax.nnx.InstanceNorm``: statistics per example and channel over every axis except 0
    and ``feature_axes``,
    :math:`y = (x - \mu_{n,c})/\sqrt{\sigma^2_{n,c} + \epsilon}\,\gamma_c + \beta_c`
    (:func:`jaxnorm.instance_norm`).

    Args:
      num_features: the shape of ``scale`` and ``bias``: the size of ``x`` along
        ``feature_axes`` (an int for one axis, a tuple for several).
      epsilon: :math:`\epsilon` added to the variance (default 1e-6, as Flax; PyTorch's
        is 1e-5).
      dtype: the dtype of the computation: ``promote_dtype`` casts ``x``, ``scale`` and
        ``bias`` to it and the output has it; default ``None``: their promoted dtype
        (statistics are computed in at least float32 either way).
      param_dtype: the dtype ``scale`` and ``bias`` are initialised in (default float32).
      use_bias: learn the shift :math:`\beta` (the ``bias`` Param; default True). False:
        ``bias`` is None and nothing is added.
      use_scale: learn the gain :math:`\gamma` (the ``scale`` Param; default True). False:
        ``scale`` is None, as when the next layer is linear and absorbs it.
      bias_init: the initializer of ``bias``, called as ``bias_init(key, shape,
        param_dtype)`` with a key from ``rngs.params()``; default zeros.
      scale_init: the initializer of ``scale``, called likewise; default ones.
      feature_axes: the channel axes (default -1; never the batch axis 0).
      axis_name: the name of a mapped axis across which the statistics are combined
        (a spatially sharded input), weighted by element counts; default None.
      axis_index_groups: groups of indices within ``axis_name`` that combine separately,
        as in ``lax.psum`` (``[[0, 1], [2, 3]]``: two pairs of devices); default None: all.
      use_fast_variance: True: Flax's one-pass :math:`E[x^2] - E[x]^2`, which cancels when
        :math:`|\mu| \gg \sigma`; default False: the two-pass :math:`E[(x - \mu)^2]`.
      promote_dtype: Flax NNX's dtype hook, called as ``promote_dtype((x, scale, bias),
        dtype=dtype)`` (an unused ``scale``/``bias`` as None) and returning the three
        cast; default ``flax.nnx.nn.dtypes.promote_dtype``.
      rngs: an ``nnx.Rngs`` (required, as in Flax); its ``params`` stream gives the keys
        of ``scale_init`` and ``bias_init``.
      bias_metadata: keyword arguments of the ``bias`` ``nnx.Param`` (e.g. sharding
        annotations), as in Flax; default none.
      scale_metadata: keyword arguments of the ``scale`` ``nnx.Param``, likewise.

    With ``track_running_stats`` (PyTorch's ``InstanceNorm2d(track_running_stats=True)``)
    training also updates ``mean``/``var`` BatchStats, :math:`ra \leftarrow m\,ra +
    (1-m)\,b` with :math:`b` the batch average of the instances' means and unbiased
    variances, and evaluation (``model.eval()``) normalizes with them, as
    :class:`jaxnorm.linen.InstanceNorm`.

    Args beyond Flax's:
      track_running_stats: keep running statistics and use them in evaluation (default
        False: instance statistics always, ``use_running_average`` ignored, as PyTorch).
      momentum: decay :math:`m` of the running averages (PyTorch's ``momentum=0.1`` is
        0.9 here); ``None``: the exact cumulative average, with a ``count`` BatchStat.
      use_running_average: evaluation mode with ``track_running_stats`` (default False,
        training, as Flax NNX's BatchNorm); ``model.train()`` / ``model.eval()`` set it.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernels, interpreted off a
        GPU; channels-last, no ``mask``/``axis_name``, not in training with
        ``track_running_stats``) or None (automatic: XLA for now); see
        :func:`jaxnorm.instance_norm`.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        feature_axes: Axes = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        track_running_stats: bool = False,
        momentum: float | None = 0.99,
        use_running_average: bool = False,
        implementation: str | None = None,
    ):
        check_momentum(momentum)
        shape = _shape(num_features)
        self.scale = _param(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        tracked = track_running_stats
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32)) if tracked else nnx.data(None)
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32)) if tracked else nnx.data(None)
        self.count = (nnx.BatchStat(jnp.zeros((), jnp.int32)) if tracked and momentum is None
                      else nnx.data(None))
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.track_running_stats = track_running_stats
        self.momentum = momentum
        self.use_running_average = use_running_average
        self.implementation = implementation

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        r"""Normalizes ``x``: :math:`y = (x - \mu_{n,c})/\sqrt{\sigma^2_{n,c} + \epsilon}\,
        \gamma_c + \beta_c` (the running statistics in evaluation with
        ``track_running_stats``), updating ``mean``/``var`` in training.

        Args:
          x: the input, batch axis 0, channels on ``feature_axes`` and at least one other
            (spatial) axis, e.g. ``(N, H, W, C)``. Integers are promoted to float32.
          use_running_average: evaluation mode with ``track_running_stats``; overrides the
            attribute (ignored without ``track_running_stats``).
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (they are still normalized, with the statistics of the others).
        """
        x, scale, bias = self.promote_dtype(
            (as_floating(x), _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        options = {"feature_axes": self.feature_axes, "eps": self.epsilon, "mask": mask,
                   "axis_name": self.axis_name, "axis_index_groups": self.axis_index_groups,
                   "dtype": self.dtype, "fast_variance": self.use_fast_variance,
                   "implementation": self.implementation,
                   "allow_single_value": True}  # (N, C) input: output bias, as Flax
        if not self.track_running_stats:
            return jaxnorm.instance_norm(x, scale, bias, **options)
        if first_from(use_running_average, self.use_running_average,
                      error_msg="pass use_running_average to InstanceNorm"):
            return jaxnorm.batch_norm_inference(
                x, self.mean[...], self.var[...], scale, bias, axis=self.feature_axes,
                eps=self.epsilon, dtype=self.dtype,
            )
        y, batch = jaxnorm.instance_norm(x, scale, bias, return_moments=True, **options)
        running = jaxnorm.update_running_statistics(
            jaxnorm.RunningStatistics(self.mean[...], self.var[...], _value(self.count)),
            batch, momentum=self.momentum, unbiased=True,
        )
        self.mean[...], self.var[...] = running.mean, running.var
        if self.count is not None:
            self.count[...] = running.count
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given.

        Args:
          use_running_average: if True, use the running statistics (evaluation); if False,
            the instance statistics (training); None leaves the mode unchanged.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class LocalResponseNorm(nnx.Module):
    r"""Local response normalization across channels (Krizhevsky et al. 2012), as
    ``torch.nn.LocalResponseNorm``; no parameters.

    :math:`b_c = a_c\,(k + \tfrac{\alpha}{n}\sum_{c'} a_{c'}^2)^{-\beta}`, the sum over the
    window of :math:`n` channels around :math:`c`, zero-padded
    (:func:`jaxnorm.local_response_norm`).

    Args:
      size: the window :math:`n`, in channels (a positive int; default 5, as PyTorch).
      alpha: the multiplier :math:`\alpha`, divided by :math:`n` as in PyTorch (default
        1e-4).
      beta: the exponent :math:`\beta` (default 0.75).
      k: the additive constant :math:`k` (default 1.0).
      feature_axis: the channel axis (default -1; ``1`` for PyTorch's NCHW).
    """

    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 1.0,
        feature_axis: int = -1,
    ):
        self.size = size
        self.alpha = alpha
        self.beta = beta
        self.k = k
        self.feature_axis = feature_axis

    def __call__(self, x: Array) -> Array:
        r"""Normalizes ``x`` by its neighbouring channels' squares (formula above).

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


class AdaptiveInstanceNorm(nnx.Module):
    r"""Adaptive instance normalization (Huang & Belongie 2017), called as
    ``(content, style)``; no parameters.

    :math:`\mathrm{AdaIN}(c, s) = \sigma(s)\,(c - \mu(c))/\sigma(c) + \mu(s)` with
    :math:`\sigma = \sqrt{\mathrm{var} + \epsilon}`, statistics per example and channel
    (:func:`jaxnorm.adaptive_instance_norm`).

    Args:
      epsilon: :math:`\epsilon` in both standard deviations (default 1e-5).
      feature_axes: the channel axes (default -1; never the batch axis 0); the statistics
        are taken over every other axis except 0.
    """

    def __init__(self, epsilon: float = 1e-5, feature_axes: Axes = -1):
        self.epsilon = epsilon
        self.feature_axes = feature_axes

    def __call__(self, content: Array, style: Array) -> Array:
        """``content`` with the per-channel mean and standard deviation of ``style``.

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


class ConditionalInstanceNorm(nnx.Module):
    r"""Conditional instance normalization (Dumoulin et al. 2017), called as ``(x, style_id)``:
    :math:`y = \gamma_s\,\mathrm{IN}(x) + \beta_s` with ``scale``/``bias`` of shape
    ``(num_styles, num_features)``; ``style_id`` is integer ids (scalar or ``(N,)``) or float
    mixing weights ``(N, num_styles)``.

    Args:
      num_features: the shape of one style's ``scale``/``bias``: the size of ``x`` along
        ``feature_axes`` (an int for one axis, a tuple for several).
      num_styles: the number of styles :math:`S`; ``scale`` and ``bias`` have shape
        ``(S, *num_features)``, row :math:`s` holding :math:`\gamma_s`, :math:`\beta_s`.
      epsilon: :math:`\epsilon` added to the variance (default 1e-6).
      dtype: the output dtype; default None: the promoted dtype of ``x``, ``scale`` and
        ``bias`` (statistics in at least float32 either way).
      param_dtype: the dtype ``scale`` and ``bias`` are initialised in (default float32).
      use_bias: learn the shifts :math:`\beta_s` (default True). False: ``bias`` is None.
      use_scale: learn the gains :math:`\gamma_s` (default True). False: ``scale`` is
        None.
      bias_init: the initializer of ``bias``, called as ``bias_init(key, (S,
        *num_features), param_dtype)`` with a key from ``rngs.params()``; default zeros.
      scale_init: the initializer of ``scale``, called likewise; default ones.
      feature_axes: the channel axes (default -1; never the batch axis 0).
      rngs: an ``nnx.Rngs``; its ``params`` stream gives the keys of ``scale_init`` and
        ``bias_init``.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        num_styles: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _zeros,
        scale_init: Initializer = _ones,
        feature_axes: Axes = -1,
        rngs: nnx.Rngs,
    ):
        shape = (num_styles, *_shape(num_features))
        self.scale = _param(use_scale, scale_init, shape, param_dtype, rngs, _NO_METADATA)
        self.bias = _param(use_bias, bias_init, shape, param_dtype, rngs, _NO_METADATA)
        self.num_features = num_features
        self.num_styles = num_styles
        self.epsilon = epsilon
        self.dtype = dtype
        self.feature_axes = feature_axes

    def __call__(self, x: Array, style_id: Array, *, mask: Array | None = None) -> Array:
        r"""Normalizes ``x`` with the parameters of ``style_id``:
        :math:`y = \gamma_s\,\mathrm{IN}(x) + \beta_s`.

        Args:
          x: the input, batch axis 0 (size :math:`N`), channels on ``feature_axes`` (sizes
            ``num_features``) and at least one spatial axis. Integers are promoted to
            float32.
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
        return jaxnorm.conditional_instance_norm(
            as_floating(x), style_id, _value(self.scale), _value(self.bias),
            feature_axes=self.feature_axes, eps=self.epsilon, mask=mask, dtype=self.dtype,
        )


def recompute_batch_stats(model: nnx.Module, batches: Iterable[Any]) -> nnx.Module:
    """Precise BatchNorm for NNX, in place: every :class:`BatchNorm` / :class:`BatchRenorm`
    in ``model`` gets the exact population ``mean``/``var`` over ``batches``.

    ``model(batch)`` runs once per batch (under ``nnx.jit``) with those layers in training
    mode and their statistics held fixed; other layers (Dropout, ...) keep their mode. The
    batch moments are pooled exactly as :func:`jaxnorm.recompute_batch_stats` does.

    Args:
      model: an NNX model containing :class:`BatchNorm` layers; updated in place.
      batches: an iterable of model inputs, each passed as the one positional input.

    Returns:
      ``model``.
    """
    return recompute_nnx_batch_stats(model, batches, BatchNorm)
