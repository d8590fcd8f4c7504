r"""LayerNorm, RMSNorm and GroupNorm with ``equinox.nn``'s arguments and leaves.

Each holds ``weight`` and ``bias`` and calls :func:`jaxnorm.layer_norm`,
:func:`jaxnorm.rms_norm` or :func:`jaxnorm.group_norm` on one unbatched example (a batch
comes from ``jax.vmap``). As in Equinox, ``state`` is optional and passed through, and the
output has the dtype of ``x`` (statistics in at least float32).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax

import jaxnorm
from jaxnorm.equinox._common import (
    NO_STATE,
    check_input_shape,
    default_dtype,
    ones_and_zeros,
    with_state,
)

Array = jax.Array


def _shape_tuple(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


class LayerNorm(eqx.Module):
    r"""Layer normalization over the whole (unbatched) input, a drop-in for
    ``equinox.nn.LayerNorm``: :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}\cdot\gamma +
    \beta`, with :math:`\mu, \sigma^2` (biased) over every element of ``x`` and
    :math:`\gamma, \beta` elementwise, of ``shape`` (:func:`jaxnorm.layer_norm`).

    Args:
      shape: the input's shape (an int for 1-d); ``x.shape`` must equal it.
      eps: :math:`\epsilon` added to the variance.
      use_weight: learn :math:`\gamma` (``weight``, ones).
      use_bias: learn :math:`\beta` (``bias``, zeros).
      dtype: dtype of ``weight`` and ``bias``; default float32 (float64 under x64).
      elementwise_affine: deprecated in Equinox: sets both ``use_weight`` and ``use_bias``.

    Attributes:
      weight: :math:`\gamma` of ``shape``, or None.
      bias: :math:`\beta` of ``shape``, or None.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    weight: Array | None
    bias: Array | None

    def __init__(
        self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool = True,
        use_bias: bool = True, dtype: Any = None, *, elementwise_affine: bool | None = None,
    ) -> None:
        if elementwise_affine is not None:
            warnings.warn("LayerNorm(elementwise_affine=...) is deprecated: use use_weight "
                          "and use_bias", DeprecationWarning, stacklevel=2)
            use_weight = use_bias = elementwise_affine
        self.shape = _shape_tuple(shape)
        self.eps = eps
        self.use_weight, self.use_bias = use_weight, use_bias
        self.weight, self.bias = ones_and_zeros(self.shape, dtype, use_weight, use_bias)

    def __call__(
        self, x: Array, state: eqx.nn.State | None = NO_STATE, *, key: Any = None,
        mask: Array | None = None,
    ) -> Array | tuple[Array, eqx.nn.State]:
        """Normalizes one example.

        Args:
          x: an array of shape ``shape``.
          state: passed through unchanged when given (``eqx.nn.Sequential``'s protocol).
          key: ignored (Equinox's call protocol).
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (beyond Equinox).

        Returns:
          ``y`` in the dtype of ``x``, or ``(y, state)`` when ``state`` was given.
        """
        del key
        check_input_shape(x, self.shape, "LayerNorm")
        axes = tuple(range(x.ndim))
        y = jaxnorm.layer_norm(x, self.weight, self.bias, reduction_axes=axes,
                               feature_axes=axes, eps=self.eps, mask=mask, dtype=x.dtype)
        return with_state(y, state)


class RMSNorm(eqx.Module):
    r"""RMS normalization over the whole (unbatched) input, a drop-in for
    ``equinox.nn.RMSNorm``: :math:`y = x/\sqrt{\tfrac1n\lVert x\rVert_2^2 +
    \epsilon}\cdot\gamma + \beta`, :math:`n` the number of elements
    (:func:`jaxnorm.rms_norm`). As in Equinox, a bias is learned by default.

    Args:
      shape: the input's shape (an int for 1-d); ``x.shape`` must equal it.
      eps: :math:`\epsilon` added to the mean square.
      use_weight: learn :math:`\gamma` (``weight``, ones).
      use_bias: learn :math:`\beta` (``bias``, zeros).
      dtype: dtype of ``weight`` and ``bias``; default float32 (float64 under x64).

    Attributes:
      weight: :math:`\gamma` of ``shape``, or None.
      bias: :math:`\beta` of ``shape``, or None.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    weight: Array | None
    bias: Array | None

    def __init__(
        self, shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool = True,
        use_bias: bool = True, dtype: Any = None,
    ) -> None:
        self.shape = _shape_tuple(shape)
        self.eps = eps
        self.use_weight, self.use_bias = use_weight, use_bias
        self.weight, self.bias = ones_and_zeros(
            self.shape, default_dtype(dtype), use_weight, use_bias)

    def __call__(
        self, x: Array, state: eqx.nn.State | None = NO_STATE, *, key: Any = None,
        mask: Array | None = None,
    ) -> Array | tuple[Array, eqx.nn.State]:
        """Normalizes one example by its root mean square.

        Args:
          x: an array of shape ``shape``.
          state: passed through unchanged when given.
          key: ignored (Equinox's call protocol).
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            mean square (beyond Equinox).

        Returns:
          ``y`` in the dtype of ``x``, or ``(y, state)`` when ``state`` was given.
        """
        del key
        check_input_shape(x, self.shape, "RMSNorm")
        axes = tuple(range(x.ndim))
        y = jaxnorm.rms_norm(x, self.weight, self.bias, reduction_axes=axes,
                             feature_axes=axes, eps=self.eps, mask=mask, dtype=x.dtype)
        return with_state(y, state)


class GroupNorm(eqx.Module):
    r"""Group normalization of one channels-first example, a drop-in for
    ``equinox.nn.GroupNorm``: the :math:`C` channels split into ``groups`` groups of
    :math:`C/G`, :math:`y = (x - \mu_g)/\sqrt{\sigma_g^2 + \epsilon}\cdot\gamma_c + \beta_c`
    with :math:`\mu_g, \sigma_g^2` over the group's channels and every spatial position
    (:func:`jaxnorm.group_norm`).

    Args:
      groups: the number of groups :math:`G`; it must divide the channels.
      channels: :math:`C`; may be None when ``channelwise_affine=False``.
      eps: :math:`\epsilon` added to the variance.
      channelwise_affine: learn per-channel :math:`\gamma` (``weight``) and :math:`\beta`
        (``bias``).
      dtype: dtype of ``weight`` and ``bias``; default float32 (float64 under x64).

    Attributes:
      weight: :math:`\gamma` of shape ``(C,)``, or None.
      bias: :math:`\beta` of shape ``(C,)``, or None.
    """

    groups: int = eqx.field(static=True)
    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    weight: Array | None
    bias: Array | None

    def __init__(
        self, groups: int, channels: int | None = None, eps: float = 1e-5,
        channelwise_affine: bool = True, dtype: Any = None,
    ) -> None:
        if channels is not None and channels % groups:
            raise ValueError(f"groups={groups} must divide channels={channels}")
        if channels is None and channelwise_affine:
            raise ValueError("channelwise_affine=True needs the number of channels")
        self.groups, self.channels, self.eps = groups, channels, eps
        self.channelwise_affine = channelwise_affine
        shape = () if channels is None else (channels,)
        self.weight, self.bias = ones_and_zeros(
            shape, dtype, channelwise_affine, channelwise_affine)

    def __call__(
        self, x: Array, state: eqx.nn.State | None = NO_STATE, *, key: Any = None,
        mask: Array | None = None,
    ) -> Array | tuple[Array, eqx.nn.State]:
        """Normalizes one example per group of channels.

        Args:
          x: channels first, shape ``(C, *spatial)`` with any number of spatial axes.
          state: passed through unchanged when given.
          key: ignored (Equinox's call protocol).
          mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
            statistics (beyond Equinox).

        Returns:
          ``y`` in the dtype of ``x``, or ``(y, state)`` when ``state`` was given.
        """
        del key
        batched_mask = None if mask is None else jax.numpy.broadcast_to(mask, x.shape)[None]
        y = jaxnorm.group_norm(x[None], self.weight, self.bias, num_groups=self.groups,
                               feature_axis=1, eps=self.eps, mask=batched_mask,
                               dtype=x.dtype)
        return with_state(y[0], state)
