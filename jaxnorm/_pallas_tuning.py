r"""Tile settings of the Pallas kernels, as measured fastest on a real GPU.

``benchmarks/pallas_tune.py`` times every kernel under a set of tile settings (elements a
tile holds, warps a program, programs of the reducing kernels) on each case of the GPU
sweep and, with ``--write-table``, regenerates :data:`TUNED` below from that run: per
kernel, dtype, row width (padded to a power of two) and stage (``"forward"``,
``"backward"``) the fastest setting that passed its check against the XLA path. A shape
that was not measured takes the entry of the same kernel, dtype and stage whose width is
nearest in :math:`\log_2`; a kernel or dtype without entries takes the defaults of
:mod:`jaxnorm._pallas_common`.

The same run regenerates :data:`MEASURED_FASTER`: for each measured kernel, dtype and
width, whether the tuned kernel beat the XLA path on that GPU, forward and
forward+backward alike. Automatic selection (``implementation=None``) uses a kernel only
where it did (:func:`measured_faster`).

Kernels run on two Pallas backends. The Mosaic GPU kernels have their own entries
(``"mosaic_layer_norm"``, ``"mosaic_rms_norm"``, ``"mosaic_group_norm"``,
``"mosaic_instance_norm"``), and :data:`PREFERRED_BACKEND` records which of the two
backends the run measured faster for each kernel, dtype and width
(:func:`preferred_backend`).
"""

from __future__ import annotations

import math

MEASURED_ON = "not measured: the defaults of jaxnorm._pallas_common apply"
"""The run :data:`TUNED` comes from (device, JAX version, date, command)."""

TUNED: list[dict] = []
"""Entries ``{"kernel", "dtype", "width", "stage", "settings"}``; for the Triton kernels
``settings`` holds ``tile`` (elements a tile), ``warps``, and ``partials`` (row kernels'
backward programs) or ``rows``/``programs`` (group kernels' most rows a tile, programs of
the reducing kernels); for the Mosaic GPU ones (``"mosaic_<kernel>"``) ``programs``
(rows: all; groups: per example), ``stages`` and, for groups, ``tile``."""


MEASURED_FASTER: list[dict] = []
"""Entries ``{"kernel", "dtype", "width", "pallas"}``: ``pallas`` is True where the tuned
kernel's device time was below the XLA path's, forward and forward+backward, by at least
``benchmarks/pallas_tune.py``'s margin."""


PREFERRED_BACKEND: list[dict] = []
"""Entries ``{"kernel", "dtype", "width", "backend"}``: the backend (``"triton"`` or
``"mosaic_gpu"``) whose tuned kernel took less forward+backward device time relative to
XLA's, summed over the cases of that kernel, dtype and width, among the backends whose
kernel beat XLA there (if any did)."""


def _nearest(entries: list[dict], width: int) -> dict:
    r"""The entry whose ``width`` is nearest to ``width`` in :math:`\log_2`."""
    return min(entries, key=lambda e: abs(math.log2(e["width"]) - math.log2(max(width, 1))))


def _nearest_within_two(table: list[dict], kernel: str, dtype: str, width: int
                        ) -> dict | None:
    r"""The entry of ``table`` for ``kernel`` and ``dtype`` nearest to ``width``, if within
    a factor of two (in :math:`\log_2`, at most 1 apart); else None."""
    entries = [e for e in table if (e["kernel"], e["dtype"]) == (kernel, dtype)]
    if not entries:
        return None
    nearest = _nearest(entries, width)
    close = abs(math.log2(nearest["width"]) - math.log2(max(width, 1))) <= 1
    return nearest if close else None


def preferred_backend(kernel: str, dtype: str, width: int) -> str | None:
    """The backend measured faster for a call, or None where nothing was measured near it.

    Args:
      kernel: ``"layer_norm"``, ``"rms_norm"``, ``"group_norm"`` or ``"instance_norm"``.
      dtype: the input's dtype name.
      width: the padded row width (features, or channels).
    """
    entry = _nearest_within_two(PREFERRED_BACKEND, kernel, dtype, width)
    return None if entry is None else entry["backend"]


def measured_faster(kernel: str, dtype: str, width: int) -> bool:
    r"""True where the measurements say the kernel beats XLA: the measured width of the same
    kernel and dtype nearest to ``width``, if within a factor of two, was faster.

    Args:
      kernel: ``"layer_norm"``, ``"rms_norm"``, ``"group_norm"`` or ``"instance_norm"``.
      dtype: the input's dtype name.
      width: the padded row width (features, or channels).
    """
    entry = _nearest_within_two(MEASURED_FASTER, kernel, dtype, width)
    return entry is not None and entry["pallas"]


def tuned_settings(kernel: str, dtype: str, width: int, stage: str) -> dict[str, int]:
    """The measured settings nearest to a call, or ``{}`` (the defaults).

    Args:
      kernel: ``"layer_norm"``, ``"rms_norm"``, ``"group_norm"`` or ``"instance_norm"``.
      dtype: the input's dtype name, e.g. ``"bfloat16"``.
      width: the padded row width (features, or channels) the kernel holds.
      stage: ``"forward"`` or ``"backward"``.
    """
    entries = [e for e in TUNED
               if (e["kernel"], e["dtype"], e["stage"]) == (kernel, dtype, stage)]
    if not entries:
        return {}
    return dict(_nearest(entries, width)["settings"])
