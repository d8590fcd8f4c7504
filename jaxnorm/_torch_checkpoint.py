r"""PyTorch checkpoints of normalization layers as Flax variables.

:func:`flax_variables_from_torch` reads a ``state_dict`` (tensors or NumPy arrays; PyTorch
itself is not imported) and returns, for every normalization module in it, the variables
of the matching ``jaxnorm.linen`` module. Conventions:

* **Channels first.** PyTorch's norms take ``(N, C, ...)``; the converted ``scale``,
  ``bias``, ``mean``, ``var`` are per channel and fit ``jaxnorm.linen`` modules built with
  ``axis=1`` (BatchNorm), ``feature_axis=1`` (GroupNorm) or ``feature_axes=1``
  (InstanceNorm) on NCHW input, or with the defaults on input moved to channels-last.
  Weight-norm / spectral-norm ``Linear`` and ``Conv`` weights ``(out, in, *window)`` become
  Flax kernels ``(*window, in, out)`` for ``nn.Dense`` / ``nn.Conv`` (channels-last input).
* **Running variance.** PyTorch stores the *unbiased* batch variance
  :math:`\frac{n}{n-1}\sigma_B^2` in ``running_var`` and evaluates with it as it is, so
  ``var`` is copied unchanged: evaluation matches for any ``unbiased_running_var``. To keep
  training with PyTorch's update rule, build the BatchNorm with
  ``unbiased_running_var=True`` and ``momentum = 1 - torch_momentum``.
* **Batch count.** ``num_batches_tracked`` only matters for PyTorch's ``momentum=None``
  (cumulative average :math:`1/t`); with ``cumulative_average=True`` it becomes
  ``batch_stats['count']`` of a BatchNorm with ``momentum=None``, which then continues the
  same average. Otherwise it is dropped.
* **Weight norm** (``parametrizations.weight.original0/1`` or the older ``weight_g`` /
  ``weight_v``): :math:`v` becomes the layer's ``kernel`` and :math:`g` the wrapper's
  ``scale`` for ``jaxnorm.linen.WeightNorm`` (``dim=0`` → ``feature_axes=-1``;
  ``dim=None`` → ``feature_axes=None``).
* **Spectral norm** (``parametrizations.weight.original`` with ``0._u``, ``0._v``, or the
  older ``weight_orig`` / ``weight_u`` / ``weight_v``): the unnormalized weight becomes the
  ``kernel``, ``_u`` the ``u`` of shape ``(1, out)``, and ``sigma`` is PyTorch's eval-mode
  :math:`\sigma = u^\top W v` from the stored vectors. A ``jaxnorm.linen.SpectralNorm``
  with ``use_stored_sigma=True`` then evaluates exactly as PyTorch; in training both run
  power iteration from ``u``.

For ``jaxnorm.nnx`` modules the same arrays load with ``nnx.update``: a norm takes
``{**v['params'], **v.get('batch_stats', {})}``; ``nnx`` ``WeightNorm`` takes
``{'layer_instance': params['layer_instance'], 'scales': {('kernel',): g}}`` and
``SpectralNorm`` ``{'layer_instance': ..., 'batch_stats': {('kernel', 'u'): u,
('kernel', 'sigma'): sigma}}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

WEIGHT_NORM_KEYS = (
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ("weight_g", "weight_v"),
)
SPECTRAL_NORM_KEYS = (
    ("parametrizations.weight.original", "parametrizations.weight.0._u",
     "parametrizations.weight.0._v"),
    ("weight_orig", "weight_u", "weight_v"),
)
FlaxVariables = dict[str, dict[str, Any]]


def _to_numpy(value: Any) -> np.ndarray:
    """A copy of a tensor (any device, bfloat16 widened to float32) or array as a NumPy
    array: later in-place updates of the PyTorch module do not reach it."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy().copy()
    return np.array(value, copy=True)


def _module_prefix(key: str) -> tuple[str, str]:
    """``key`` split into ``(module path, name within the module)``."""
    if key.startswith("parametrizations."):
        return "", key
    head, found, tail = key.partition(".parametrizations.")
    if found:
        return head, "parametrizations." + tail
    head, _, name = key.rpartition(".")
    return head, name


def _group_by_module(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """``{module path: {name within the module: array}}``."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        prefix, name = _module_prefix(key)
        modules.setdefault(prefix, {})[name] = _to_numpy(value)
    return modules


def _flax_kernel(weight: np.ndarray) -> np.ndarray:
    """A PyTorch ``Linear``/``ConvNd`` weight ``(out, in, *window)`` as a Flax kernel
    ``(*window, in, out)``."""
    if weight.ndim < 2:
        raise ValueError(f"a layer weight needs at least 2 dimensions, got {weight.shape}")
    return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


def _weight_norm_variables(
    entries: dict[str, np.ndarray], g_key: str, v_key: str, layer_name: str, prefix: str
) -> FlaxVariables:
    """A weight-norm layer's variables for ``WeightNorm(Dense/Conv)``: ``v`` as the kernel,
    ``g`` flattened to the feature shape as the scale."""
    g, v = entries[g_key], entries[v_key]
    if g.shape == (v.shape[0],) + (1,) * (v.ndim - 1):
        scale = g.reshape(v.shape[0])
    elif g.size == 1 and g.ndim in (0, v.ndim):
        scale = g.reshape(())
    else:
        raise ValueError(
            f"{prefix!r}: weight norm over dim other than 0 or None is not supported "
            f"(g {g.shape}, v {v.shape})"
        )
    layer = {"kernel": _flax_kernel(v)}
    if "bias" in entries:
        layer["bias"] = entries["bias"]
    return {"params": {layer_name: layer, f"{layer_name}/kernel/scale": scale}}


def _spectral_norm_variables(
    entries: dict[str, np.ndarray], keys: tuple[str, str, str], layer_name: str, prefix: str
) -> FlaxVariables:
    """A spectral-norm layer's variables for ``SpectralNorm(Dense/Conv)``: the raw weight as
    the kernel, ``u`` as ``(1, out)`` and PyTorch's eval-mode :math:`\\sigma = u^\\top W v`."""
    weight, u, v = (entries[key] for key in keys)
    if u.shape != weight.shape[:1]:
        raise ValueError(
            f"{prefix!r}: spectral norm over dim other than 0 (e.g. ConvTranspose) is not "
            f"supported (u {u.shape}, weight {weight.shape})"
        )
    sigma = u @ (weight.reshape(weight.shape[0], -1) @ v)
    layer = {"kernel": _flax_kernel(weight)}
    if "bias" in entries:
        layer["bias"] = entries["bias"]
    return {
        "params": {layer_name: layer},
        "batch_stats": {
            f"{layer_name}/kernel/u": u[None, :],
            f"{layer_name}/kernel/sigma": np.asarray(sigma, weight.dtype),
        },
    }


def _affine_params(entries: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch's ``weight``/``bias`` as Flax's ``scale``/``bias`` (those present)."""
    params = {}
    if "weight" in entries:
        params["scale"] = entries["weight"]
    if "bias" in entries:
        params["bias"] = entries["bias"]
    return params


def _batch_norm_variables(
    entries: dict[str, np.ndarray], cumulative_average: bool
) -> FlaxVariables:
    """A batch norm's variables: running statistics as stored, the count if asked for."""
    stats: dict[str, np.ndarray] = {"mean": entries["running_mean"], "var": entries["running_var"]}
    if cumulative_average:
        if "num_batches_tracked" not in entries:
            raise ValueError("cumulative_average=True needs num_batches_tracked in the state")
        stats["count"] = np.asarray(entries["num_batches_tracked"], np.int32).reshape(())
    variables: FlaxVariables = {"batch_stats": stats}
    params = _affine_params(entries)
    if params:
        variables["params"] = params
    return variables


def _is_affine_norm(entries: dict[str, np.ndarray], explicit: bool) -> bool:
    """LayerNorm, GroupNorm, InstanceNorm, RMSNorm: ``weight`` shaped as ``bias`` (a
    ``Linear``/``Conv`` weight is at least 2-d, unlike its bias), or a ``weight`` alone:
    1-d, or any shape when the module was named explicitly."""
    if set(entries) - {"weight", "bias"} or "weight" not in entries:
        return False
    if "bias" in entries:
        return entries["weight"].shape == entries["bias"].shape
    return explicit or entries["weight"].ndim == 1


def _module_variables(
    prefix: str,
    entries: dict[str, np.ndarray],
    *,
    explicit: bool,
    cumulative_average: bool,
    layer_name: str,
) -> FlaxVariables | None:
    """The Flax variables of one module, or ``None`` when it is not a normalization."""
    for g_key, v_key in WEIGHT_NORM_KEYS:
        if g_key in entries and v_key in entries:
            return _weight_norm_variables(entries, g_key, v_key, layer_name, prefix)
    for keys in SPECTRAL_NORM_KEYS:
        if all(key in entries for key in keys):
            return _spectral_norm_variables(entries, keys, layer_name, prefix)
    if any(name.startswith("parametrizations.") for name in entries):
        if explicit:
            raise ValueError(f"{prefix!r}: unsupported parametrization {sorted(entries)}")
        return None
    if "running_mean" in entries and "running_var" in entries:
        return _batch_norm_variables(entries, cumulative_average)
    if _is_affine_norm(entries, explicit):
        return {"params": _affine_params(entries)}
    if explicit:
        raise ValueError(f"{prefix!r} is not a normalization module: {sorted(entries)}")
    return None


def flax_variables_from_torch(
    state_dict: Mapping[str, Any],
    *,
    modules: Iterable[str] | None = None,
    cumulative_average: bool = False,
    layer_name: str = "layer_instance",
) -> dict[str, FlaxVariables]:
    """The Flax variables of every normalization module in a PyTorch ``state_dict``.

    Recognized by their entries: batch norm (and instance norm with running statistics)
    by ``running_mean``/``running_var`` → ``{'params': {'scale', 'bias'},
    'batch_stats': {'mean', 'var'[, 'count']}}``; LayerNorm, GroupNorm, InstanceNorm
    (affine) and RMSNorm by a ``weight`` shaped as their ``bias`` (or a 1-d ``weight``
    alone) → ``{'params': {'scale'[, 'bias']}}``; weight-norm and spectral-norm
    parametrized layers → the variables of ``jaxnorm.linen.WeightNorm`` /
    ``SpectralNorm`` wrapping a Flax ``Dense``/``Conv`` named ``layer_name``. Layouts and
    the running-variance and count conventions are in the module docstring. Arrays are
    NumPy, in the checkpoint's dtype (bfloat16 widened to float32).

    Args:
      state_dict: ``module.state_dict()``: names to tensors or arrays.
      modules: convert exactly these module paths (e.g. ``["bn1", "layer1.0.ln"]``;
        ``""`` for a lone module's own entries), raising for one that is not a
        normalization; default every module recognized as one.
      cumulative_average: the target BatchNorms use ``momentum=None`` (PyTorch's
        ``momentum=None``): store ``num_batches_tracked`` as ``batch_stats['count']``.
      layer_name: the name of the wrapped layer for weight-norm / spectral-norm modules,
        ``"layer_instance"`` when the wrapper is the top module, or the layer's own name
        (e.g. ``"Dense_0"``) when it was created in the parent (then move
        ``params[layer_name]`` to the parent's params).

    Returns:
      ``{module path: Flax variables}``, e.g. ``{"bn1": {"params": ..., "batch_stats": ...}}``
      for use as ``jaxnorm.linen.BatchNorm(axis=1, ...).apply(variables["bn1"], x)``.
    """
    grouped = _group_by_module(state_dict)
    wanted = None if modules is None else list(modules)
    if wanted is not None:
        missing = [prefix for prefix in wanted if prefix not in grouped]
        if missing:
            raise KeyError(f"modules not in state_dict: {missing}")
    result = {}
    for prefix in grouped if wanted is None else wanted:
        variables = _module_variables(
            prefix, grouped[prefix], explicit=wanted is not None,
            cumulative_average=cumulative_average, layer_name=layer_name,
        )
        if variables is not None:
            result[prefix] = variables
    return result
