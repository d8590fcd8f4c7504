r"""The Pallas GPU backend of the dispatcher: which normalizations a Pallas kernel computes.

:func:`jaxnorm._dispatch.normalize_over` offers every normalization whose
:class:`~jaxnorm._affine.NormSpec` names a ``layer`` to :func:`pallas_normalize`, which
recognizes from ``x``'s shape, the reduction axes and the parameters' shapes whether a
kernel takes it:

- the **row kernel**, LayerNorm (``centered``) and RMSNorm, by Triton
  (:mod:`jaxnorm._pallas_layer_norm`) or Mosaic GPU (:mod:`jaxnorm._pallas_mosaic_rows`;
  :func:`kernel_backend` chooses): the reduction is the last :math:`k` axes and ``scale``/``bias`` span the same
  axes; ``x`` is viewed as :math:`R` rows of :math:`N`, and per row
  :math:`y = (x - \mu)\,\gamma/\sqrt{\sigma^2 + \epsilon} + \beta` (:math:`\mu = 0` for
  RMSNorm);
- the **group kernel**, channels-last GroupNorm and InstanceNorm, by Triton
  (:mod:`jaxnorm._pallas_group_norm`) or Mosaic GPU (:mod:`jaxnorm._pallas_mosaic_groups`): statistics per example and group over every axis but the batch axis 0.
  GroupNorm arrives viewed grouped, ``(B, ..., G, C/G)``, with the group axis left out of
  the reduction; InstanceNorm as ``(B, ..., C)`` with the channel axis left out, that is
  :math:`G = C`. The kernel takes the ``(B S, C)`` rows with :math:`G`.

With ``implementation="pallas"`` a case no kernel takes (a layout, ``mask``,
``axis_name``, a traced ``eps``, complex ``x``, rows too long, returned statistics) raises
``ValueError`` naming ``implementation``; the kernels run in interpret mode off a GPU.
With None (automatic) the same checks decide silently: a case that fails any of them, or
whose ``x`` is explicitly sharded, goes to XLA, and one that passes goes to the kernel
only where :func:`jaxnorm._implementation.select_implementation` says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm import _pallas_mosaic_groups as mosaic_groups
from jaxnorm import _pallas_mosaic_rows as mosaic_rows
from jaxnorm._affine import NormSpec
from jaxnorm._implementation import KernelCase, select_implementation, table_key
from jaxnorm._pallas_common import (
    check_backend_available,
    interpret_mode,
    make_tiling,
    pl_triton,
)
from jaxnorm._pallas_errors import check_pallas_arguments, unsupported
from jaxnorm._pallas_group_norm import GroupNormConfig, group_norm_rows, make_group_tiling
from jaxnorm._pallas_layer_norm import RowNormConfig, row_norm
from jaxnorm._pallas_mosaic_groups import MosaicGroupConfig, mosaic_group_norm_rows
from jaxnorm._pallas_mosaic_rows import MosaicRowConfig, mosaic_row_norm
from jaxnorm._pallas_tuning import preferred_backend
from jaxnorm._sharding import explicit_shards

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """A kernel that takes the case: what it computes and its static settings.

    Args:
      case: the kernel and the ``(case.rows, case.features)`` view of ``x``.
      config: the kernel's settings; None for an empty ``x`` (nothing to compute).
    """

    case: KernelCase
    config: RowNormConfig | MosaicRowConfig | GroupNormConfig | None


BACKENDS = ("triton", "mosaic_gpu")
"""The Pallas GPU backends of the kernels."""

BACKEND: str | None = None
"""Which backend computes the kernels (``"triton"`` or ``"mosaic_gpu"``); None: the
environment variable ``JAXNORM_PALLAS_BACKEND``, else :func:`kernel_backend`'s default."""


def _trailing_rows(x: Array, reduction: tuple[int, ...], parameters: tuple[Array | None, ...]
                   ) -> tuple[int, int]:
    """``(R, N)``: the row view of ``x``. The reduction must be the trailing axes and the
    (broadcastable) ``parameters`` span the same axes, else ``ValueError``."""
    trailing = tuple(range(x.ndim - len(reduction), x.ndim))
    if reduction != trailing:
        raise ValueError(
            f"implementation='pallas' normalizes over trailing axes only; got "
            f"reduction_axes={reduction!r} for an input of rank {x.ndim}; use "
            "implementation='xla'"
        )
    row_shape = (1,) * (x.ndim - len(reduction)) + x.shape[x.ndim - len(reduction):]
    for parameter in parameters:
        if parameter is not None and parameter.shape != row_shape:
            features = tuple(a for a, size in enumerate(parameter.shape) if size != 1)
            raise ValueError(
                f"implementation='pallas' needs feature_axes equal to reduction_axes; got "
                f"feature_axes={features!r}, reduction_axes={reduction!r}; use "
                "implementation='xla'"
            )
    features = math.prod(row_shape)
    return x.size // max(features, 1), features


def requested_backend() -> str | None:
    """:data:`BACKEND`, else ``$JAXNORM_PALLAS_BACKEND``, else None; ``ValueError`` for a
    name not in :data:`BACKENDS`."""
    requested = BACKEND or os.environ.get("JAXNORM_PALLAS_BACKEND") or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(
            f"JAXNORM_PALLAS_BACKEND (or _pallas_dispatch.BACKEND) must be one of "
            f"{BACKENDS}, got {requested!r}"
        )
    return requested


def kernel_backend(case: KernelCase, mosaic_takes: bool) -> str:
    """The Pallas backend of a kernel call: ``"triton"`` or ``"mosaic_gpu"``.

    :data:`BACKEND` (else ``$JAXNORM_PALLAS_BACKEND``) names it. Otherwise, on a GPU, the
    backend measured faster for the case's kernel, dtype and width
    (:func:`jaxnorm._pallas_tuning.preferred_backend`), else ``"triton"``, or
    ``"mosaic_gpu"`` where this JAX has no Triton backend. ``"mosaic_gpu"`` applies only
    where its kernels take the shape (``mosaic_takes``); other shapes take Triton.

    Args:
      case: what the kernel would compute (its ``backend`` ignored).
      mosaic_takes: whether the Mosaic GPU kernel takes this call's shape and dtype
        (:func:`jaxnorm._pallas_mosaic_rows.takes`, :func:`jaxnorm._pallas_mosaic_groups.takes`).
    """
    requested = requested_backend()
    measured = None
    if requested is None and not interpret_mode():
        kernel, width = table_key(case)
        measured = preferred_backend(kernel, case.dtype, width)
    wanted = requested or measured or ("triton" if pl_triton is not None else "mosaic_gpu")
    return "mosaic_gpu" if wanted == "mosaic_gpu" and mosaic_takes else "triton"


def _row_plan(x: Array, scale: Array | None, bias: Array | None, spec: NormSpec) -> KernelPlan:
    """The row kernel's plan for LayerNorm/RMSNorm over the trailing axes."""
    rows, features = _trailing_rows(x, spec.reduction, (scale, bias))
    case = KernelCase("row", x.dtype.name, spec.centered, features, rows)
    backend = kernel_backend(case, mosaic_rows.takes(features, x.dtype, spec.dtype))
    case = dataclasses.replace(case, backend=backend)
    if backend == "triton":
        check_backend_available()
    if x.size == 0:
        return KernelPlan(case, None)
    if backend == "mosaic_gpu":
        return KernelPlan(case, MosaicRowConfig(spec.eps, spec.centered, spec.dtype, rows,
                                                features, interpret_mode()))
    return KernelPlan(
        case, RowNormConfig(spec.eps, spec.centered, spec.dtype, make_tiling(rows, features))
    )


def _group_plan(x: Array, scale: Array | None, bias: Array | None, spec: NormSpec,
                group_axis: int, what: str) -> KernelPlan:
    """The group kernel's plan when ``x`` is channels-last: the reduction is every axis but
    0 and ``group_axis``, the groups' axis (the channel axis itself for InstanceNorm, the
    axis before the channels within a group for GroupNorm's grouped view), and
    ``scale``/``bias`` span the axes from ``group_axis`` on. Else ``ValueError`` naming
    the layer, ``what``."""
    layout = tuple(a for a in range(1, x.ndim) if a != group_axis)
    channel_shape = (1,) * group_axis + x.shape[group_axis:]
    if group_axis < 1 or spec.reduction != layout or any(
        p is not None and p.shape != channel_shape for p in (scale, bias)
    ):
        raise unsupported(
            f"this {what} layout: the kernels take channels-last inputs (channels on the "
            "last axis, statistics over every axis but 0)")
    batch, spatial = x.shape[0], math.prod(x.shape[1:group_axis])
    channels, groups = math.prod(x.shape[group_axis:]), x.shape[group_axis]
    case = KernelCase("group", x.dtype.name, True, channels, batch * spatial, groups, spatial)
    backend = kernel_backend(case, mosaic_groups.takes(spatial, channels, x.dtype, spec.dtype))
    case = dataclasses.replace(case, backend=backend)
    if backend == "triton":
        check_backend_available()
    if x.size == 0:
        return KernelPlan(case, None)
    if backend == "mosaic_gpu":
        return KernelPlan(case, MosaicGroupConfig(spec.eps, spec.dtype, batch, spatial, channels,
                                                  groups, interpret_mode()))
    tiling = make_group_tiling(batch, spatial, channels, groups)
    return KernelPlan(case, GroupNormConfig(spec.eps, spec.dtype, tiling))


def _grouped_plan(x: Array, scale: Array | None, bias: Array | None, spec: NormSpec
                  ) -> KernelPlan:
    """GroupNorm's plan: ``x`` viewed ``(B, ..., G, C/G)``, the group axis second to last."""
    return _group_plan(x, scale, bias, spec, x.ndim - 2, "GroupNorm")


def _instance_plan(x: Array, scale: Array | None, bias: Array | None, spec: NormSpec
                   ) -> KernelPlan:
    """InstanceNorm's plan: ``x`` is ``(B, ..., C)``, a group per channel."""
    return _group_plan(x, scale, bias, spec, x.ndim - 1, "InstanceNorm")


LAYERS: dict[str, Callable[[Array, Array | None, Array | None, NormSpec], KernelPlan]] = {
    "LayerNorm": _row_plan,
    "RMSNorm": _row_plan,
    "GroupNorm": _grouped_plan,
    "InstanceNorm": _instance_plan,
}
"""The layers a kernel may compute (``NormSpec.layer``) and how each recognizes its case."""


def kernel_plan(
    x: Array, scale: Array | None, bias: Array | None, spec: NormSpec, *,
    mask: Array | None, axis_name: Any, eps: Any, statistics: bool,
) -> KernelPlan:
    r"""The kernel that computes this normalization; ``ValueError`` naming
    ``implementation`` (``RuntimeError`` without the Pallas backend it needs) when none
    does.

    The kernels take the two-pass variance whatever ``spec.fast_variance`` asks, and ignore
    ``axis_index_groups`` (they take no ``axis_name``).

    Args:
      x: the input, as the dispatcher has it (GroupNorm: viewed grouped).
      scale: :math:`\gamma` broadcastable to ``x`` (feature axes kept), or None.
      bias: :math:`\beta`, the same, or None.
      spec: the static settings; ``spec.layer`` names the layer.
      mask: must be None.
      axis_name: must be None.
      eps: a traced :math:`\epsilon` (refused), or None for ``spec.eps``.
      statistics: the caller returns the statistics (InstanceNorm's ``return_moments``),
        which the kernels keep on chip: refused.
    """
    if statistics:
        raise unsupported("return_moments (running statistics)")
    check_pallas_arguments(x, spec.eps if eps is None else eps, mask=mask, axis_name=axis_name)
    return LAYERS[spec.layer](x, scale, bias, spec)


def _automatic_plan(x: Array, scale: Array | None, bias: Array | None, spec: NormSpec,
                    **arguments: Any) -> KernelPlan | None:
    """:func:`kernel_plan` (``arguments``: its keyword arguments) or None where it would
    raise or ``x`` is explicitly sharded: automatic selection never raises."""
    try:
        plan = kernel_plan(x, scale, bias, spec, **arguments)
    except (ValueError, RuntimeError):
        return None
    return None if explicit_shards(x) else plan


def run_plan(plan: KernelPlan, x: Array, scale: Array | None, bias: Array | None, dtype: Any
             ) -> Array:
    """``y`` by the planned kernel: ``x`` viewed as its rows, ``scale``/``bias`` as
    vectors over a row (1 and 0 when None), the result in ``x``'s shape and ``dtype``."""
    if plan.config is None:
        return x.astype(dtype)
    rows, features = plan.case.rows, plan.case.features
    scale = jnp.ones((features,), jnp.float32) if scale is None else scale.reshape(features)
    bias = jnp.zeros((features,), jnp.float32) if bias is None else bias.reshape(features)
    kernels = {RowNormConfig: row_norm, MosaicRowConfig: mosaic_row_norm,
               GroupNormConfig: group_norm_rows, MosaicGroupConfig: mosaic_group_norm_rows}
    return kernels[type(plan.config)](x.reshape(rows, features), scale, bias, plan.config).reshape(x.shape)


def pallas_normalize(
    x: Array, scale: Array | None, bias: Array | None, spec: NormSpec, *,
    mask: Array | None = None, axis_name: Any = None, eps: Any = None, statistics: bool = True,
) -> Array | None:
    r"""``y`` by a Pallas kernel, or None where the XLA path computes it.

    None when ``spec.layer`` is None or ``spec.implementation`` is ``"xla"``. For
    ``"pallas"``, :func:`kernel_plan` picks the kernel or raises. For None (automatic), a
    case :func:`kernel_plan` refuses or an explicitly sharded ``x`` is None, silently;
    a case it takes runs the kernel where
    :func:`jaxnorm._implementation.select_implementation` says ``"pallas"``.

    Args:
      x: the input, its statistics its own (no given mean/var).
      scale: :math:`\gamma` broadcastable to ``x``, or None.
      bias: :math:`\beta` broadcastable to ``x``, or None.
      spec: the static settings, with ``implementation`` and ``layer``.
      mask: boolean of ``x``'s shape, or None.
      axis_name: the mapped axis the statistics would combine across, or None.
      eps: a traced :math:`\epsilon`, or None for ``spec.eps``.
      statistics: the caller needs the mean and variance, not only ``y``.

    Returns:
      ``y`` in ``spec.dtype``, the shape of ``x``, or None.
    """
    if spec.layer is None or spec.implementation == "xla":
        return None
    arguments = dict(mask=mask, axis_name=axis_name, eps=eps, statistics=statistics)
    requested_backend()  # a bad backend name raises, automatic selection included
    if spec.implementation == "pallas":
        plan = kernel_plan(x, scale, bias, spec, **arguments)
    else:
        plan = _automatic_plan(x, scale, bias, spec, **arguments)
    if plan is None or select_implementation(spec.implementation, plan.case) != "pallas":
        return None
    return run_plan(plan, x, scale, bias, spec.dtype)
