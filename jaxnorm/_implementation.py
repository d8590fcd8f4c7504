"""``implementation=``: which path computes a normalization, the XLA graph or a Pallas kernel."""

from __future__ import annotations

IMPLEMENTATIONS = ("xla", "pallas")
"""The values of ``implementation=`` besides None (automatic)."""


def resolve_implementation(implementation: str | None) -> str:
    """The path an ``implementation=`` argument selects: ``"xla"`` or ``"pallas"``.

    None (automatic) is ``"xla"``: no committed real-GPU timing shows a Pallas kernel
    faster yet. ``"pallas"`` runs the Pallas kernel (in interpret mode off a GPU).

    Args:
      implementation: ``"xla"``, ``"pallas"`` or None.
    """
    if implementation is None:
        return "xla"
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    return implementation
