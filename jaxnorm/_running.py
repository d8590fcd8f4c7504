r"""Running statistics: the ``batch_stats`` a BatchNorm layer keeps between batches.

* :class:`BatchMoments` — what one training batch reports: per-channel mean, biased
  variance, element count (over every device) and number of groups with their own mean;
* :func:`update_running_statistics` — the running averages
  :math:`ra \leftarrow m\,ra + (1-m)\,b` (Flax's momentum convention), or with
  ``momentum=None`` the exact cumulative average :math:`ra_k = ra_{k-1} + (b_k -
  ra_{k-1})/k` over the ``k`` batches seen (PyTorch's ``momentum=None``); ``unbiased``
  stores :math:`n/(n-1)\,\sigma^2_B` like PyTorch;
* :func:`merge_moments` — two batches' moments as one (a layer called twice per step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._axes import check_momentum

Array = jax.Array

MOMENTS_COLLECTION = "batch_moments"
"""Linen collection where BatchNorm layers put their batch moments when it is mutable
(used by :func:`jaxnorm.recompute_batch_stats`)."""


class BatchMoments(NamedTuple):
    r"""Per-channel statistics of one training batch: mean, biased variance, the number of
    elements (over every device) they were computed from, and the number of (non-empty)
    groups with their own mean: 1, or the ghost batches. For ghost batches ``var`` is the
    pooled within-group variance :math:`\sum_g n_g\sigma_g^2 / \sum_g n_g`.

    ``jaxnorm.batch_norm(..., return_moments=True)`` returns one;
    :func:`update_running_statistics` and :func:`merge_moments` take them.

    Attributes:
      mean: the batch mean :math:`\mu_B` per channel, feature shape (the shape of
        ``scale``); for ghost batches the count-weighted mean of the groups' means, which
        is the mean of the whole batch.
      var: the biased batch variance :math:`\sigma^2_B = \frac{1}{n}\sum (x -
        \mu_B)^2` per channel, feature shape; for ghost batches the pooled within-group
        variance above.
      count: :math:`n`, the number of (unmasked) elements behind each channel's
        statistics, summed over ``axis_name``; feature shape, floating. A channel with
        ``count == 0`` (fully masked) leaves the running statistics unchanged.
      groups: the number of groups :math:`G` with their own mean among those ``count``
        elements: ``1`` (default) for plain BatchNorm, the non-empty ghost batches with
        ``virtual_batch_size``; the unbiased variance divides by :math:`n - G`.
    """

    mean: Array
    var: Array
    count: Array
    groups: Array | int = 1


class RunningStatistics(NamedTuple):
    r"""The ``batch_stats`` of a BatchNorm layer; ``count`` (batches seen) only when
    ``momentum=None``.

    :func:`update_running_statistics` maps it and a batch's :class:`BatchMoments` to the
    next one: :math:`\hat\mu \leftarrow m\,\hat\mu + (1-m)\,\mu_B`, likewise
    :math:`\hat\sigma^2`; evaluation normalizes with
    :math:`(x - \hat\mu)/\sqrt{\hat\sigma^2 + \epsilon}`.

    Attributes:
      mean: the running mean :math:`\hat\mu` per channel, feature shape (Flax's
        ``batch_stats['mean']``, PyTorch's ``running_mean``); the layers start it at 0.
      var: the running variance :math:`\hat\sigma^2` per channel, feature shape (Flax's
        ``batch_stats['var']``, PyTorch's ``running_var``): an average of biased batch
        variances, or of unbiased ones with ``unbiased=True``; the layers start it at 1.
      count: the number of batches averaged so far (an integer scalar; a batch in which
        no channel counted an element is not counted), needed by the cumulative average
        of ``momentum=None``; ``None`` (default) otherwise.
    """

    mean: Array
    var: Array
    count: Array | None = None


def merge_moments(first: BatchMoments, second: BatchMoments) -> BatchMoments:
    r"""The moments of two batches together (Chan et al. 1979): with :math:`n = n_a + n_b`
    and :math:`\delta = \mu_b - \mu_a`, :math:`\mu = \mu_a + \delta n_b/n` and
    :math:`\sigma^2 = (n_a\sigma_a^2 + n_b\sigma_b^2 + \delta^2 n_a n_b/n)/n`. Used when
    one layer runs more than once in a forward pass (shared weights).

    Args:
      first: the :class:`BatchMoments` of batch :math:`a` (:math:`\mu_a`,
        :math:`\sigma^2_a`, :math:`n_a`), feature shape.
      second: the :class:`BatchMoments` of batch :math:`b`, the same feature shape. A
        channel with no elements in one batch (count 0) takes the other's moments.

    Returns:
      The :class:`BatchMoments` of the union: mean and biased variance as above, count
      :math:`n_a + n_b`, and ``groups`` :math:`G_a + G_b` (so
      :func:`update_running_statistics` with ``unbiased=True`` divides by
      :math:`n - G_a - G_b`).
    """
    total = first.count + second.count
    safe_total = jnp.maximum(total, 1)
    delta = second.mean - first.mean
    mean = first.mean + delta * second.count / safe_total
    spread = first.count * first.var + second.count * second.var
    var = (spread + delta * delta * first.count * second.count / safe_total) / safe_total
    return BatchMoments(mean, var, total, first.groups + second.groups)


def update_running_statistics(
    running: RunningStatistics, batch: BatchMoments, *, momentum: float | None,
    unbiased: bool = False,
) -> RunningStatistics:
    r"""The new ``batch_stats`` after one training batch.

    :math:`ra \leftarrow m\,ra + (1-m)\,b` for ``momentum`` :math:`m`, or with
    ``momentum=None`` the cumulative average :math:`ra_k = ra_{k-1} + (b_k - ra_{k-1})/k`.
    The update runs in at least float32 and is stored in the promoted dtype of the running
    and batch statistics (as Flax's update does), so small steps are not rounded away in a
    half-precision ``param_dtype``. A channel with nothing counted in the batch (fully
    masked, or an empty batch) keeps its running mean and variance; ``count`` advances
    only when some channel counted.

    Args:
      running: the current :class:`RunningStatistics` (``count`` needed with
        ``momentum=None``).
      batch: the batch's :class:`BatchMoments` (``jaxnorm.batch_norm(...,
        return_moments=True)``).
      momentum: the decay :math:`m \in [0, 1]` of the running average, or None for the
        cumulative average.
      unbiased: store :math:`n/(n-1)\,\sigma^2_B` (:math:`n`: the batch's element count
        per channel over all devices; for ghost batches the pooled
        :math:`\sum_g n_g\sigma_g^2/\sum_g(n_g-1)`), PyTorch's convention.

    Returns:
      The new :class:`RunningStatistics`, without gradient.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> running = jaxnorm.RunningStatistics(jnp.zeros(1), jnp.ones(1))
      >>> batch = jaxnorm.BatchMoments(jnp.ones(1), jnp.ones(1), jnp.full(1, 8.0))
      >>> float(jaxnorm.update_running_statistics(running, batch, momentum=0.9).mean[0])
      0.1
    """
    check_momentum(momentum)
    # the mean may be complex (complex input); the variance, of |x - mu|^2, is real
    def at_least_float32(*dtypes: Any) -> Any:
        return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)

    # the mean may be complex (complex input); the variance, of |x - mu|^2, is real
    var_dtype = at_least_float32(running.var.dtype, batch.var.dtype)
    counted = batch.count > 0
    var = batch.var
    if unbiased:
        var = var * batch.count / jnp.maximum(batch.count - batch.groups, 1)
    seen, average = _averaging(running.count, momentum, jnp.any(counted), var_dtype)

    def blend(old: Array, new: Array, dtype: Any) -> Array:
        old = old.astype(dtype)
        return lax.stop_gradient(jnp.where(counted, average(old, new.astype(dtype)), old))

    return RunningStatistics(
        blend(running.mean, batch.mean, at_least_float32(running.mean.dtype, batch.mean.dtype)),
        blend(running.var, var, var_dtype), seen,
    )


def _averaging(
    count: Array | None, momentum: float | None, counted: Array, dtype: Any
) -> tuple[Array | None, Any]:
    """``(new count, average(old, new))``: the exponential average of ``momentum``, or
    with ``momentum=None`` the cumulative one, its count advanced when ``counted``."""
    if momentum is not None:
        return count, lambda old, new: momentum * old + (1 - momentum) * new
    if count is None:
        raise ValueError("momentum=None needs a batch count in the running statistics")
    seen = count + counted.astype(count.dtype)
    weight = 1 / jnp.maximum(seen, 1).astype(dtype)  # real, also for a complex mean
    return seen, lambda old, new: old + (new - old) * weight
