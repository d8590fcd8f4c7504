r"""Flax Linen wrappers that normalize a layer's weights on every call.

``WeightNorm(layer)``, ``SpectralNorm(layer)`` and ``WeightStandardization(layer)`` take a
Linen layer (``nn.Dense``, ``nn.Conv``, or any module) and run it with its ``params``
replaced by the normalized weights, through :func:`flax.linen.map_variables`. The stored
parameters are never overwritten: ``params`` keeps the raw weight (:math:`v`, or
:math:`W`) and the wrapper's own variables (``scale`` = :math:`g`; ``u``, ``sigma``) sit
next to them under the names ``flax.linen.WeightNorm`` / ``flax.linen.SpectralNorm`` use,
so checkpoints move between the two. Unlike Flax, ``init`` stores the layer's initial
weight as its initializer made it (Flax stores the normalized one); the effective weight
and the outputs are the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from jaxnorm._spectral_norm import spectral_norm
from jaxnorm._weight_axes import WeightAxes, weight_axes
from jaxnorm._weight_norm import weight_norm
from jaxnorm._weight_standardization import standardize_weight

Array = jax.Array
ParamTransform = Callable[[str, Array], Array]


def _variable_name(layer: nn.Module, path: tuple[Any, ...]) -> str:
    """Flax's name for a wrapped variable: ``"<layer name>/<key>/<key>"``."""
    keys = jax.tree_util.keystr(path, simple=True, separator="/")
    return f"{layer.name}/{keys}"


def _call_with_transformed_params(
    wrapper: nn.Module, transform: ParamTransform, args: tuple, kwargs: dict
) -> Any:
    """Calls ``wrapper.layer_instance(*args, **kwargs)`` with each of its params replaced by
    ``transform(name, value)``; the stored params stay as they are.

    At ``init`` the layer is first called directly so its params are created untransformed.
    """
    layer = wrapper.layer_instance
    if wrapper.is_initializing():
        layer(*args, **kwargs)

    def transform_tree(variables: dict) -> dict:
        params = variables.get("params", {})
        variables["params"] = jax.tree_util.tree_map_with_path(
            lambda path, value: transform(_variable_name(layer, path), jnp.asarray(value)),
            params,
        )
        return variables

    def forward(module: nn.Module) -> Any:
        return module(*args, **kwargs)

    return nn.map_variables(forward, "params", trans_in_fn=transform_tree)(layer)


def _selected(name: str, variable_filter: Iterable[str] | None) -> bool:
    """Flax's ``variable_filter`` rule: no filter, or some entry is a substring of the
    variable's ``/``-joined name."""
    return not variable_filter or any(entry in name for entry in variable_filter)


class WeightNorm(nn.Module):
    r"""Weight normalization (Salimans & Kingma 2016) of a layer's params, a drop-in for
    ``flax.linen.WeightNorm`` (same attributes and variables).

    Each selected param :math:`v` is used as :math:`g\,v/\sqrt{\sum_R v^2 + \epsilon}`,
    the sum over every axis except ``feature_axes`` (see :func:`jaxnorm.weight_norm`);
    :math:`g` is the param ``"<layer>/<path>/scale"`` of this module, shaped as :math:`v`
    at ``feature_axes``. The effective weight is computed on each call.

    Attributes:
      layer_instance: the wrapped module.
      epsilon: added to the squared norm.
      dtype: the dtype of the normalized weights (default: promoted from :math:`v, g`).
      param_dtype: the dtype of the ``scale`` params.
      use_scale: learn :math:`g` (else :math:`g = 1`).
      scale_init: initializer of :math:`g`.
      feature_axes: the output-feature axes of each param (one norm per feature);
        ``None`` for one norm over the whole param.
      variable_filter: normalize only params whose ``/``-joined path (starting with the
        layer's name) contains one of these strings; ``None`` or empty for all params.
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = nn.initializers.ones
    feature_axes: WeightAxes | None = -1
    variable_filter: Iterable[str] | None = dataclasses.field(
        default_factory=lambda: {"kernel"}
    )

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its weights normalized.

        Args:
          *args: positional arguments of the wrapped layer's call.
          **kwargs: keyword arguments of the wrapped layer's call.
        """
        return _call_with_transformed_params(self, self._normalized, args, kwargs)

    def _normalized(self, name: str, v: Array) -> Array:
        """The param ``name`` with value ``v`` as used: weight-normalized if selected."""
        if not _selected(name, self.variable_filter):
            return v
        g = None
        if self.use_scale:
            features = (
                () if self.feature_axes is None
                else weight_axes(self.feature_axes, v.ndim, "feature_axes")
            )
            shape = tuple(v.shape[axis] for axis in features)
            g = self.param(f"{name}/scale", self.scale_init, shape, self.param_dtype)
        return weight_norm(
            v, g, feature_axes=self.feature_axes, eps=self.epsilon, dtype=self.dtype
        )


class SpectralNorm(nn.Module):
    r"""Spectral normalization (Miyato et al. 2018) of a layer's params, a drop-in for
    ``flax.linen.SpectralNorm`` (same attributes, call and variables).

    Every param with at least 2 dimensions is viewed as the matrix ``(-1, out)`` and used
    as :math:`W/\sigma(W)` (see :func:`jaxnorm.spectral_norm`): ``n_steps`` power-iteration
    steps from the stored vector :math:`u`, :math:`\sigma = v^\top W u` with :math:`u, v`
    constant for the gradient. In ``collection_name`` (``batch_stats``) this module keeps
    ``"<layer>/<path>/u"`` of shape ``(1, out)`` (initialized from a standard normal with
    the ``params`` rng) and ``"<layer>/<path>/sigma"``. ``update_stats=True`` (training)
    stores the new :math:`u` and :math:`\sigma` (make the collection mutable);
    ``update_stats=False`` (evaluation) stores nothing and, as Flax, still iterates from the
    stored :math:`u` — or divides by the stored :math:`\sigma` with ``use_stored_sigma``.

    Attributes:
      layer_instance: the wrapped module.
      n_steps: power-iteration steps per call; below 1 the params are used unchanged.
      epsilon: added to each squared norm in the iteration.
      dtype: the dtype of the normalized weights (default: promoted from :math:`W, u`).
      param_dtype: the dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise for params with more than 2 dimensions instead of
        flattening their leading axes.
      collection_name: the collection of ``u`` and ``sigma``.
      use_stored_sigma: evaluation divides by the stored :math:`\sigma` without power
        iteration, as PyTorch's ``spectral_norm`` in eval mode does with its stored
        :math:`u, v` (a checkpoint from :func:`jaxnorm.flax_variables_from_torch` then
        gives PyTorch's eval outputs exactly). :math:`\sigma` is 1 until stored.
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"
    use_stored_sigma: bool = False

    @nn.compact
    def __call__(self, *args: Any, update_stats: bool, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its weights spectrally normalized.

        Args:
          *args: positional arguments of the wrapped layer's call.
          update_stats: training: store the new ``u`` and ``sigma``; evaluation: ``False``.
          **kwargs: keyword arguments of the wrapped layer's call.
        """

        def transform(name: str, w: Array) -> Array:
            return self._normalized(name, w, update_stats)

        return _call_with_transformed_params(self, transform, args, kwargs)

    def _normalized(self, name: str, w: Array, update_stats: bool) -> Array:
        """The param ``name`` with value ``w`` as used: :math:`w/\\sigma` for matrices
        (storing the new ``u``, ``sigma`` when ``update_stats``), else ``w``."""
        if w.ndim <= 1 or self.n_steps < 1:
            return w
        if w.ndim > 2 and self.error_on_non_matrix:
            raise ValueError(
                f"{name} is {w.ndim}-d but error_on_non_matrix is True"
            )
        u = self.variable(
            self.collection_name,
            f"{name}/u",
            jax.random.normal,
            None if self.has_variable(self.collection_name, f"{name}/u")
            else self.make_rng("params"),
            (1, w.shape[-1]),
            self.param_dtype,
        )
        stored_sigma = self.variable(
            self.collection_name, f"{name}/sigma", jnp.ones, (), self.param_dtype
        )
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(w, u.value)
        if self.use_stored_sigma and not update_stats:
            sigma = jax.lax.stop_gradient(stored_sigma.value)
            return (w / jnp.where(sigma != 0, sigma, 1)).astype(out_dtype)
        w_normalized, new_u, sigma = spectral_norm(
            w, u.value, n_steps=self.n_steps, eps=self.epsilon, dtype=out_dtype
        )
        if update_stats:
            u.value = new_u
            sigma_dtype = jnp.asarray(stored_sigma.value).dtype
            stored_sigma.value = jax.lax.stop_gradient(sigma).astype(sigma_dtype)
        return w_normalized


class WeightStandardization(nn.Module):
    r"""Weight standardization (Qiao et al. 2019) of a layer's kernels, e.g.
    ``WeightStandardization(nn.Conv(64, (3, 3)))`` for BiT's standardized conv.

    Each selected param :math:`w` is used as :math:`(w-\mu)/\sqrt{\sigma^2+\epsilon}` with
    the mean and biased variance per output channel over ``input_axes`` (see
    :func:`jaxnorm.standardize_weight`). No variables of its own.

    Attributes:
      layer_instance: the wrapped module.
      epsilon: added to the variance.
      input_axes: the axes to standardize over; default every axis but the last (Flax's
        kernels keep output features last).
      dtype: the dtype of the standardized weights (default: the param's).
      variable_filter: standardize only params whose ``/``-joined path contains one of
        these strings; ``None`` or empty for all params (1-d ones are left unchanged).
    """

    layer_instance: nn.Module
    epsilon: float = 1e-6
    input_axes: WeightAxes | None = None
    dtype: Dtype | None = None
    variable_filter: Iterable[str] | None = dataclasses.field(
        default_factory=lambda: {"kernel"}
    )

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its kernels standardized.

        Args:
          *args: positional arguments of the wrapped layer's call.
          **kwargs: keyword arguments of the wrapped layer's call.
        """
        return _call_with_transformed_params(self, self._standardized, args, kwargs)

    def _standardized(self, name: str, w: Array) -> Array:
        """The param ``name`` with value ``w`` as used: standardized if selected."""
        if w.ndim < 2 or not _selected(name, self.variable_filter):
            return w
        return standardize_weight(
            w, input_axes=self.input_axes, eps=self.epsilon, dtype=self.dtype
        )
