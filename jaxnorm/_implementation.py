"""``implementation=``: which path computes a normalization, the XLA graph or a Pallas kernel.

:func:`select_implementation` is the one place that decides. An explicit ``"xla"`` or
``"pallas"`` is obeyed; None (automatic) takes the Pallas kernel only on a GPU, only for a
case a kernel takes (:class:`KernelCase`, built by :mod:`jaxnorm._pallas_dispatch`), and
only where :data:`AUTOMATIC_PALLAS` says a committed GPU timing shows the kernel faster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

IMPLEMENTATIONS = ("xla", "pallas")
"""The values of ``implementation=`` besides None (automatic)."""


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """What a Pallas kernel would compute, for automatic selection: the kernel and the
    size of the ``(rows, features)`` view of ``x`` it takes.

    Args:
      kernel: ``"row"`` (LayerNorm/RMSNorm over trailing axes) or ``"group"``
        (channels-last GroupNorm/InstanceNorm).
      dtype: the name of ``x``'s dtype (``"float32"``, ``"bfloat16"``, ...).
      centered: subtract the mean (False: RMSNorm; always True for ``"group"``).
      features: the row length :math:`N` (``"row"``) or the channels :math:`C`
        (``"group"``).
      rows: the rows of the view: :math:`R` (``"row"``) or :math:`B S` (``"group"``).
      groups: :math:`G` (``"group"``; InstanceNorm: :math:`C`); 1 for ``"row"``.
      spatial: :math:`S`, the rows of one example (``"group"``); 1 for ``"row"``.
    """

    kernel: str
    dtype: str
    centered: bool
    features: int
    rows: int
    groups: int = 1
    spatial: int = 1


AUTOMATIC_PALLAS: tuple[Callable[[KernelCase], bool], ...] = ()
"""The cases automatic selection gives to the Pallas kernel on a GPU: predicates on a
:class:`KernelCase`, each backed by a committed GPU timing (``benchmarks/gpu/``) showing
the kernel faster than XLA over a whole forward+backward pass. Empty: no such timing yet
(``benchmarks/gpu/h200-2026-12-04-pallas-check.md``), so automatic is always XLA."""


def check_implementation(implementation: str | None) -> str | None:
    """``implementation`` itself after checking it is ``"xla"``, ``"pallas"`` or None.

    Args:
      implementation: the argument as given.
    """
    if implementation is not None and (
        not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS
    ):
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    return implementation


def gpu_backend() -> bool:
    """True when JAX's default backend is a GPU (where the kernels compile)."""
    return jax.default_backend() == "gpu"


def select_implementation(requested: str | None, case: KernelCase | None) -> str:
    """The path that computes a normalization: ``"xla"`` or ``"pallas"``.

    An explicit ``requested`` is returned as it is (``"pallas"`` runs the kernel in
    interpret mode off a GPU). None (automatic) is ``"pallas"`` only on a GPU, for a
    ``case`` a kernel takes, which an entry of :data:`AUTOMATIC_PALLAS` accepts; else
    ``"xla"``. Automatic never raises.

    Args:
      requested: ``"xla"``, ``"pallas"`` or None (automatic).
      case: what the kernel would compute, or None where no kernel takes the case.
    """
    requested = check_implementation(requested)
    if requested is not None:
        return requested
    if case is None or not gpu_backend():
        return "xla"
    return "pallas" if any(accepts(case) for accepts in AUTOMATIC_PALLAS) else "xla"
