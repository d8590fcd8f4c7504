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
"""

from __future__ import annotations

import math

MEASURED_ON = "not measured: the defaults of jaxnorm._pallas_common apply"
"""The run :data:`TUNED` comes from (device, JAX version, date, command)."""

TUNED: list[dict] = []
"""Entries ``{"kernel", "dtype", "width", "stage", "settings"}``; ``settings`` holds
``tile`` (elements a tile), ``warps``, and ``partials`` (row kernels' backward programs) or
``rows``/``programs`` (group kernels' most rows a tile, programs of the reducing kernels)."""


MEASURED_FASTER: list[dict] = []
"""Entries ``{"kernel", "dtype", "width", "pallas"}``: ``pallas`` is True where the tuned
kernel's device time was below the XLA path's, forward and forward+backward, by at least
``benchmarks/pallas_tune.py``'s margin."""


def _nearest(entries: list[dict], width: int) -> dict:
    r"""The entry whose ``width`` is nearest to ``width`` in :math:`\log_2`."""
    return min(entries, key=lambda e: abs(math.log2(e["width"]) - math.log2(max(width, 1))))


def measured_faster(kernel: str, dtype: str, width: int) -> bool:
    r"""True where the measurements say the kernel beats XLA: the measured width of the same
    kernel and dtype nearest to ``width``, if within a factor of two, was faster.

    Args:
      kernel: ``"layer_norm"``, ``"rms_norm"``, ``"group_norm"`` or ``"instance_norm"``.
      dtype: the input's dtype name.
      width: the padded row width (features, or channels).
    """
    entries = [e for e in MEASURED_FASTER if (e["kernel"], e["dtype"]) == (kernel, dtype)]
    if not entries:
        return False
    nearest = _nearest(entries, width)
    return abs(math.log2(nearest["width"]) - math.log2(max(width, 1))) <= 1 and nearest["pallas"]


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
