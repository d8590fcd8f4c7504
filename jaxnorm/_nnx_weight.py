r"""Flax NNX wrappers that normalize a layer's weights on every call.

``WeightNorm(layer, rngs=...)``, ``SpectralNorm(layer, rngs=...)`` and
``WeightStandardization(layer)`` take an NNX layer and, on each call, run a copy of it whose
``nnx.Param`` values are the normalized weights; the layer's own params are never written
(``flax.nnx.WeightNorm`` and ``flax.nnx.SpectralNorm`` overwrite them in place, so each
call normalizes the already-normalized weight again, flax#5576). Non-param state the layer
changes during the call (RNG counters, batch statistics) is copied back. Gradients flow to
the raw params (:math:`v`, :math:`W`) and to the wrapper's ``nnx.Param`` scales.
The constructors take ``flax.nnx``'s arguments; the variables have Flax's names
(``scales[path]``; ``batch_stats[path + ('u',)]`` and ``[path + ('sigma',)]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import filterlib
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer

from jaxnorm._spectral_norm import spectral_norm
from jaxnorm._weight_axes import WeightAxes, weight_axes
from jaxnorm._weight_norm import weight_norm
from jaxnorm._weight_standardization import standardize_weight

Array = jax.Array
Path = tuple[Any, ...]
ParamTransform = Callable[[Path, Array], Array]
PromoteDtypeFn = Any
KERNELS = nnx.PathContains("kernel")


def _flat_params(layer: nnx.Module) -> list[tuple[Path, nnx.Variable]]:
    """The layer's ``nnx.Param`` variables with their paths."""
    return list(nnx.to_flat_state(nnx.state(layer, nnx.Param)))


def _call_with_transformed_params(
    layer: nnx.Module, transform: ParamTransform, args: tuple, kwargs: dict
) -> Any:
    """Calls a copy of ``layer`` whose params are ``transform(path, value)``; the layer's
    params are left as they are and its other state is updated from the copy."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    transformed = nnx.from_flat_state([
        (path, variable.replace(transform(path, variable[...])))
        for path, variable in nnx.to_flat_state(params)
    ])
    view = nnx.merge(graphdef, transformed, rest)
    out = view(*args, **kwargs)
    nnx.update(layer, nnx.state(view, nnx.Not(nnx.Param)))
    return out


def _feature_shape(shape: tuple[int, ...], feature_axes: WeightAxes | None) -> tuple[int, ...]:
    """The shape of :math:`g` for a param of ``shape``: its sizes at ``feature_axes``."""
    if feature_axes is None:
        return ()
    return tuple(shape[axis] for axis in weight_axes(feature_axes, len(shape), "feature_axes"))


class WeightNorm(nnx.Module):
    r"""Weight normalization (Salimans & Kingma 2016) of a layer's params, with
    ``flax.nnx.WeightNorm``'s arguments; the params are not overwritten.

    Each selected param :math:`v` is used as :math:`g\,v/\sqrt{\sum_R v^2 + \epsilon}`,
    the sum over every axis except ``feature_axes`` (see :func:`jaxnorm.weight_norm`);
    :math:`g` is ``scales[path]``, an ``nnx.Param`` shaped as :math:`v` at
    ``feature_axes`` (Flax stores plain arrays there, which optimizers skip).

    Args:
      layer_instance: the wrapped module.
      feature_axes: the output-feature axes of each param (one norm per feature);
        ``None`` for one norm over the whole param.
      use_scale: learn :math:`g` (else :math:`g = 1`).
      scale_init: initializer of :math:`g`.
      epsilon: added to the squared norm.
      dtype: the dtype of the normalized weights (default: promoted from :math:`v, g`).
      param_dtype: the dtype of the scales.
      variable_filter: an NNX filter of the params to normalize (default: paths
        containing ``'kernel'``).
      promote_dtype: promotes :math:`(v, g)` to a common dtype given ``dtype``.
      rngs: the ``params`` stream initializes the scales.
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: WeightAxes | None = -1,
        use_scale: bool = True,
        scale_init: Initializer = nnx.initializers.ones,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        variable_filter: filterlib.Filter = KERNELS,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = feature_axes
        self.use_scale = use_scale
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = filterlib.to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        self.scales = nnx.data(None)
        if use_scale:
            self.scales = nnx.data({
                path: nnx.Param(scale_init(
                    rngs.params(), _feature_shape(param.shape, feature_axes), param_dtype
                ))
                for path, param in _flat_params(layer_instance)
                if self.variable_filter(path, param)
            })

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its weights normalized.

        Args:
          *args: positional arguments of the wrapped layer's call.
          **kwargs: keyword arguments of the wrapped layer's call.
        """
        selected = {
            path for path, param in _flat_params(self.layer_instance)
            if self.variable_filter(path, param)
        }

        def transform(path: Path, v: Array) -> Array:
            if path not in selected:
                return v
            g = None
            if self.use_scale:
                if path not in self.scales:
                    raise RuntimeError(f"no scale for param {path}: the layer's params changed")
                v, g = self.promote_dtype((v, self.scales[path][...]), dtype=self.dtype)
            return weight_norm(
                v, g, feature_axes=self.feature_axes, eps=self.epsilon, dtype=self.dtype
            )

        return _call_with_transformed_params(self.layer_instance, transform, args, kwargs)


class SpectralNorm(nnx.Module):
    r"""Spectral normalization (Miyato et al. 2018) of a layer's params, with
    ``flax.nnx.SpectralNorm``'s arguments and state; the params are not overwritten.

    Every param with at least 2 dimensions is viewed as the matrix ``(-1, out)`` and used
    as :math:`W/\sigma(W)` (see :func:`jaxnorm.spectral_norm`). ``batch_stats[path +
    ('u',)]`` (shape ``(1, out)``, initialized from a normal with standard deviation 0.01
    as Flax NNX) and ``batch_stats[path + ('sigma',)]`` are ``nnx.BatchStat``. Training
    (``update_stats=True``, ``model.train()``) stores the new :math:`u, \sigma`;
    evaluation (``model.eval()``) stores nothing and iterates from the stored :math:`u`,
    or divides by the stored :math:`\sigma` with ``use_stored_sigma``.

    Args:
      layer_instance: the wrapped module.
      n_steps: power-iteration steps per call; below 1 the params are used unchanged.
      epsilon: added to each squared norm in the iteration.
      dtype: the dtype of the normalized weights (default: promoted from :math:`W, u`).
      param_dtype: the dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise for params with more than 2 dimensions instead of
        flattening their leading axes.
      update_stats: the default of the call's ``update_stats`` (``model.eval()`` sets
        ``use_running_average = not update_stats`` to ``True``).
      rngs: the ``params`` stream initializes ``u``.
      use_stored_sigma: evaluation divides by the stored :math:`\sigma`, as PyTorch's
        eval mode (see :class:`jaxnorm.linen.SpectralNorm`).
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: nnx.Rngs,
        use_stored_sigma: bool = False,
    ):
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        self.use_running_average = not update_stats
        self.use_stored_sigma = use_stored_sigma
        batch_stats = {}
        for path, param in _flat_params(layer_instance):
            if self._skips(path, param.shape):
                continue
            u = nnx.initializers.normal()(rngs.params(), (1, param.shape[-1]), param_dtype)
            batch_stats[(*path, "u")] = nnx.BatchStat(u)
            batch_stats[(*path, "sigma")] = nnx.BatchStat(jnp.ones((), param_dtype))
        self.batch_stats = nnx.data(batch_stats)

    def _skips(self, path: Path, shape: tuple[int, ...]) -> bool:
        """Whether a param is used unchanged (scalars, vectors, ``n_steps < 1``)."""
        if len(shape) <= 1 or self.n_steps < 1:
            return True
        if len(shape) > 2 and self.error_on_non_matrix:
            raise ValueError(f"param {path} is {len(shape)}-d but error_on_non_matrix is True")
        return False

    def __call__(self, x: Any, update_stats: bool | None = None, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its weights spectrally normalized.

        Args:
          x: the input of the wrapped layer.
          update_stats: store the new ``u`` and ``sigma`` (training); default
            ``not self.use_running_average``.
          **kwargs: keyword arguments of the wrapped layer's call.
        """
        update_stats = first_from(
            update_stats,
            None if self.use_running_average is None else not self.use_running_average,
            error_msg="pass update_stats to SpectralNorm (constructor or call)",
        )
        return _call_with_transformed_params(
            self.layer_instance,
            lambda path, w: self._normalized(path, w, update_stats),
            (x,),
            kwargs,
        )

    def _normalized(self, path: Path, w: Array, update_stats: bool) -> Array:
        """The param at ``path`` as used: :math:`w/\\sigma` for matrices (storing the new
        ``u``, ``sigma`` when ``update_stats``), else ``w``."""
        if self._skips(path, w.shape):
            return w
        key_u, key_sigma = (*path, "u"), (*path, "sigma")
        if key_u not in self.batch_stats:
            raise RuntimeError(f"no u for param {path}: the layer's params changed")
        u, stored_sigma = self.batch_stats[key_u], self.batch_stats[key_sigma]
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(w, u[...])
        if self.use_stored_sigma and not update_stats:
            sigma = jax.lax.stop_gradient(stored_sigma[...])
            return (w / jnp.where(sigma != 0, sigma, 1)).astype(out_dtype)
        w_normalized, new_u, sigma = spectral_norm(
            w, u[...], n_steps=self.n_steps, eps=self.epsilon, dtype=out_dtype
        )
        if update_stats:
            u[...] = new_u
            stored_sigma[...] = jax.lax.stop_gradient(sigma).astype(stored_sigma[...].dtype)
        return w_normalized

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: ``use_running_average=True`` is evaluation.

        Args:
          use_running_average: ``not update_stats``; ``None`` leaves it unchanged.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class WeightStandardization(nnx.Module):
    r"""Weight standardization (Qiao et al. 2019) of a layer's kernels, e.g.
    ``WeightStandardization(nnx.Conv(3, 64, (3, 3), rngs=rngs))`` for BiT's conv.

    Each selected param :math:`w` with at least 2 dimensions is used as
    :math:`(w-\mu)/\sqrt{\sigma^2+\epsilon}`, mean and biased variance per output channel
    over ``input_axes`` (see :func:`jaxnorm.standardize_weight`). No state of its own.

    Args:
      layer_instance: the wrapped module.
      input_axes: the axes to standardize over; default every axis but the last.
      epsilon: added to the variance.
      dtype: the dtype of the standardized weights (default: the param's).
      variable_filter: an NNX filter of the params to standardize (default: paths
        containing ``'kernel'``).
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        input_axes: WeightAxes | None = None,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        variable_filter: filterlib.Filter = KERNELS,
    ):
        self.layer_instance = layer_instance
        self.input_axes = input_axes
        self.epsilon = epsilon
        self.dtype = dtype
        self.variable_filter = filterlib.to_predicate(variable_filter)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its kernels standardized.

        Args:
          *args: positional arguments of the wrapped layer's call.
          **kwargs: keyword arguments of the wrapped layer's call.
        """
        selected = {
            path for path, param in _flat_params(self.layer_instance)
            if param.ndim >= 2 and self.variable_filter(path, param)
        }

        def transform(path: Path, w: Array) -> Array:
            if path not in selected:
                return w
            return standardize_weight(
                w, input_axes=self.input_axes, eps=self.epsilon, dtype=self.dtype
            )

        return _call_with_transformed_params(self.layer_instance, transform, args, kwargs)
