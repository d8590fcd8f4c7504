r"""Precise BatchNorm: exact population statistics over a dataset (Wu & Johnson 2021,
"Rethinking 'Batch' in BatchNorm"; PyTorch's ``swa_utils.update_bn``).

The exponential running average of training is a lagging, noisy estimate of the statistics
the final weights produce. :func:`recompute_batch_stats` replaces it with the exact mean and
variance of every BatchNorm layer's input over all examples of the given batches. Each
batch runs one training-mode forward pass with the given (fixed) variables, so every layer
sees the activations the final weights produce, later layers included; each
:class:`jaxnorm.linen.BatchNorm` reports its batch's per-channel count :math:`n_b`, mean
:math:`\mu_b` and biased variance :math:`\sigma^2_b`, and the batches are combined with
Chan et al. (1979)'s exact parallel formula in float64,

.. math::
    n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad
    \mu = \mu_a + \delta\,n_b/n,\quad
    M_2 = M_{2,a} + n_b\sigma^2_b + \delta^2 n_a n_b / n,

giving :math:`\sigma^2 = M_2/n` (or :math:`M_2/(n-1)` for layers with
``unbiased_running_var``). :func:`jaxnorm.nnx.recompute_batch_stats` does the same for
NNX models, in place. Layers with ``momentum=None`` get ``count`` = the number of
batches. For ghost-batch layers (``virtual_batch_size``) the per-batch variance is the
pooled within-ghost-batch variance, and the combination adds the spread between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from jaxnorm._running import MOMENTS_COLLECTION, BatchMoments, merge_moments


class PooledMoments:
    """Count, mean and sum of squared deviations, merged batch by batch in float64 with
    Chan et al.'s formula (shared with :func:`jaxnorm.nnx.recompute_batch_stats`)."""

    def __init__(self) -> None:
        self.count: np.ndarray | float = 0.0
        self.mean: np.ndarray | float = 0.0
        self.m2: np.ndarray | float = 0.0

    def add(self, count: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
        total = self.count + count
        safe_total = np.maximum(total, 1.0)
        delta = mean - self.mean
        self.m2 = self.m2 + count * var + delta * delta * self.count * count / safe_total
        self.mean = self.mean + delta * count / safe_total
        self.count = total

    def variance(self, unbiased: bool) -> np.ndarray:
        denominator = self.count - 1.0 if unbiased else self.count
        return np.asarray(self.m2 / np.maximum(denominator, 1.0))


def recompute_batch_stats(
    apply_fn: Callable[..., tuple[Any, Any]],
    variables: Any,
    batches: Iterable[Any],
) -> Any:
    """Replaces every BatchNorm layer's ``batch_stats`` by exact population statistics.

    Args:
      apply_fn: runs the model in training mode, called as
        ``apply_fn(variables, batch, mutable=[...])`` — for example
        ``functools.partial(model.apply, train=True)``. It is jitted once.
      variables: the model's variables (``params``, ``batch_stats``, ...); not modified.
      batches: an iterable of model inputs, each passed as the one positional input.

    Layers report their batch moments in the ``"batch_moments"`` collection; inside
    lifted transforms (``nn.scan``, ``nn.vmap``) give it the same ``variable_axes`` entry
    as ``batch_stats``. A layer called several times per forward pass pools every call.

    Returns:
      ``variables`` with each :class:`jaxnorm.linen.BatchNorm` / ``BatchRenorm`` layer's
      ``mean``/``var`` (and ``count``) recomputed; everything else unchanged.
    """
    def moments_of(variables: Any, batch: Any) -> Any:
        # moments left in `variables` by an earlier apply would be pooled with this batch's
        variables = {k: v for k, v in variables.items() if k != MOMENTS_COLLECTION}
        _, mutated = apply_fn(variables, batch, mutable=["batch_stats", MOMENTS_COLLECTION])
        return mutated.get(MOMENTS_COLLECTION, {})

    pooled, unbiased, num_batches = _pool_linen_moments(jax.jit(moments_of), variables, batches)
    if not pooled:
        raise ValueError(
            "recompute_batch_stats saw no BatchNorm batch moments: batches must be non-empty "
            "and apply_fn must run the model in training mode (e.g. "
            "functools.partial(model.apply, train=True)) with jaxnorm.linen BatchNorm layers; "
            f"layers inside nn.scan / nn.vmap need the {MOMENTS_COLLECTION!r} collection in "
            "their variable_axes"
        )
    stats = traverse_util.flatten_dict(unfreeze(variables["batch_stats"]))
    for layer, accumulated in pooled.items():
        mean_path, var_path = layer + ("mean",), layer + ("var",)
        stats[mean_path] = np.asarray(accumulated.mean).astype(stats[mean_path].dtype)
        stats[var_path] = accumulated.variance(unbiased[layer]).astype(stats[var_path].dtype)
        if layer + ("count",) in stats:
            stats[layer + ("count",)] = np.asarray(num_batches, stats[layer + ("count",)].dtype)
    new_stats = jax.tree.map(jax.numpy.asarray, traverse_util.unflatten_dict(stats))
    result = {**unfreeze(variables), "batch_stats": new_stats}
    return freeze(result) if isinstance(variables, FrozenDict) else result


def _pool_linen_moments(
    forward: Callable[[Any, Any], Any], variables: Any, batches: Iterable[Any]
) -> tuple[dict[tuple[str, ...], PooledMoments], dict[tuple[str, ...], bool], int]:
    """Runs ``forward`` on every batch and pools each layer's reported moments."""
    pooled: dict[tuple[str, ...], PooledMoments] = {}
    unbiased: dict[tuple[str, ...], bool] = {}
    num_batches = 0
    for batch in batches:
        captured = traverse_util.flatten_dict(unfreeze(forward(variables, batch)))
        num_batches += 1
        for path in (p for p in captured if p[-1] == "mean"):
            layer = path[:-1]
            moments = {k: np.asarray(captured[layer + (k,)], np.float64)
                       for k in ("count", "mean", "var")}
            pooled.setdefault(layer, PooledMoments()).add(
                moments["count"], moments["mean"], moments["var"]
            )
            unbiased[layer] = bool(np.all(captured[layer + ("unbiased",)]))
    return pooled, unbiased, num_batches


def record_linen_moments(module: Any, batch: BatchMoments, unbiased: bool) -> None:
    """Puts a Linen BatchNorm call's batch moments in the ``batch_moments`` collection when
    ``apply`` named it mutable (pooling both calls of a layer called twice)."""
    scope_mutable = module.scope.mutable if module.scope is not None else False
    # `mutable=True` alone does not ask for it, so the variables stay Flax's
    if scope_mutable is True or not module.is_mutable_collection(MOMENTS_COLLECTION):
        return
    if module.has_variable(MOMENTS_COLLECTION, "mean"):
        earlier = BatchMoments(*(module.get_variable(MOMENTS_COLLECTION, name)
                                 for name in ("mean", "var", "count")))
        batch = merge_moments(earlier, batch)
    for name in ("mean", "var", "count"):
        module.put_variable(MOMENTS_COLLECTION, name, getattr(batch, name))
    module.put_variable(MOMENTS_COLLECTION, "unbiased", jnp.asarray(unbiased))


def _pool_nnx_moments(
    model: nnx.Module, paths: Sequence[Any], layers: Sequence[Any], batches: Iterable[Any]
) -> tuple[list[PooledMoments], int]:
    """Runs ``model`` in training mode on every batch, statistics held fixed, and pools
    each layer's sown moments (one entry per call of the layer)."""
    fixed = nnx.clone(nnx.state(model, nnx.BatchStat))
    pools = [PooledMoments() for _ in layers]

    @nnx.jit
    def forward(module: nnx.Module, batch: Any) -> nnx.State:
        return nnx.capture(module, nnx.Intermediate)(batch)[1]

    num_batches = 0
    for batch in batches:
        captured = forward(model, batch)
        num_batches += 1
        for path, pool in zip(paths, pools, strict=True):
            moments = captured
            for key in (*path, "batch_moments"):
                moments = moments[key]
            for mean, var, count in moments.get_value():
                pool.add(np.asarray(count), np.asarray(mean), np.asarray(var))
        nnx.update(model, fixed)
    return pools, num_batches


def recompute_nnx_batch_stats(
    model: nnx.Module, batches: Iterable[Any], layer_type: type
) -> nnx.Module:
    """Precise BatchNorm for NNX, in place (see :func:`jaxnorm.nnx.recompute_batch_stats`):
    every ``layer_type`` layer in ``model`` gets the exact population statistics."""
    found = [(path, layer) for path, layer in nnx.iter_modules(model)
             if isinstance(layer, layer_type)]
    if not found:
        raise ValueError("recompute_batch_stats found no jaxnorm.nnx BatchNorm in the model")
    paths, layers = zip(*found, strict=True)
    modes = [layer.use_running_average for layer in layers]
    try:
        for layer in layers:
            layer.use_running_average, layer.report_batch_moments = False, True
        pools, num_batches = _pool_nnx_moments(model, paths, layers, batches)
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.use_running_average, layer.report_batch_moments = mode, False
    if not num_batches:
        raise ValueError("recompute_batch_stats needs at least one batch")
    for layer, pool in zip(layers, pools, strict=True):
        layer.mean[...] = jnp.asarray(pool.mean, layer.mean.dtype)
        layer.var[...] = jnp.asarray(pool.variance(layer.unbiased_running_var), layer.var.dtype)
        if layer.count is not None:
            layer.count[...] = jnp.asarray(num_batches, layer.count.dtype)
    return model
