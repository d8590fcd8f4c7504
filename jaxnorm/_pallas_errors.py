"""What the Pallas kernels do not take: clear errors that name ``implementation``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._axes import check_eps, check_floating

Array = jax.Array


def unsupported(what: str) -> ValueError:
    """The error for an argument the kernels do not take: it names ``implementation``."""
    return ValueError(
        f"implementation='pallas' does not support {what}; use implementation='xla' "
        "(or None) for it"
    )


def check_pallas_arguments(x: Any, eps: Any, *, mask: Any = None, axis_name: Any = None
                           ) -> Array:
    """Returns ``x`` as an array after checking what every kernel needs: real floating
    ``x``, a concrete ``eps``, no ``mask`` and no ``axis_name``.

    Args:
      x: the input.
      eps: :math:`\\epsilon`; a traced value is refused (the kernel bakes it in).
      mask: must be None.
      axis_name: must be None.
    """
    x = check_floating(x, allow_complex=True)
    if jnp.iscomplexobj(x):
        raise unsupported(f"complex x (got dtype {x.dtype})")
    check_eps(eps)
    if isinstance(eps, jax.core.Tracer):
        raise unsupported("a traced eps")
    if mask is not None:
        raise unsupported("mask")
    if axis_name is not None:
        raise unsupported(f"axis_name (got {axis_name!r})")
    return x
