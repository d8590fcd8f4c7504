r"""Equinox normalization layers, thin over jaxnorm's functional core.

Drop-in replacements for ``equinox.nn``'s ``BatchNorm``, ``LayerNorm``, ``RMSNorm``,
``GroupNorm``, ``SpectralNorm`` and ``WeightNorm``: the same constructor arguments, call
signatures (one unbatched, channels-first example; the batch from ``jax.vmap`` with
``axis_name``), pytree leaves and ``eqx.nn.State`` layout, so a model switches by changing
one import and keeps its ``eqx.tree_serialise_leaves`` files. Plus the layers Equinox
lacks: :class:`InstanceNorm` (optional running statistics), :class:`LocalResponseNorm`,
:class:`AdaptiveInstanceNorm`, :class:`ConditionalInstanceNorm`, :class:`BatchRenorm` and
ghost batch norm (``BatchNorm(..., virtual_batch_size=k)``).

Where they differ from Equinox (``docs/guides/equinox.md``): BatchNorm normalizes training
batches with the batch statistics in both modes (default ``mode="batch"``), syncs with one
count-weighted collective, bias-corrects the running variance correctly, offers
``unbiased_running_var``, takes a static ``axis_name`` and a ``mask``.

Needs ``pip install jaxnorm[equinox]``.
"""

from __future__ import annotations

try:
    import equinox  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without equinox
    raise ImportError(
        "jaxnorm.equinox needs Equinox: pip install 'jaxnorm[equinox]'"
    ) from error

from jaxnorm.equinox._batch_norm import BatchNorm, BatchRenorm
from jaxnorm.equinox._instance_norm import (
    AdaptiveInstanceNorm,
    ConditionalInstanceNorm,
    InstanceNorm,
    LocalResponseNorm,
)
from jaxnorm.equinox._layer_norm import GroupNorm, LayerNorm, RMSNorm
from jaxnorm.equinox._weight import SpectralNorm, WeightNorm

__all__ = [
    "AdaptiveInstanceNorm",
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
]
