"""The shape sweep every jaxnorm benchmark draws from: normalization layers as real models use them.

One list, shared by the CPU benchmark (``run.py``, a scaled-down subset), the compile-only
accelerator benchmark (``accelerators.py``) and the GPU benchmark (``gpu_bench.py``), so
that no benchmark tunes to a handful of shapes of its own. All shapes are channels-last
(NHWC for images, tokens × features for sequences):

- ResNet-50 BatchNorm at batch 64: every distinct activation of its stages;
- Stable-Diffusion UNet GroupNorm(32) at batch 8: its four resolutions;
- style-transfer (Johnson et al.) InstanceNorm at batch 8 on 256² images;
- transformer LayerNorm / RMSNorm on 8192 tokens × the hidden sizes of common LLMs, and
  ViT-B/16's 50176 tokens (batch 256 × 196) × 768;
- 3-D activations (batch × sequence × features), also with bfloat16 parameters, which the
  functional API sees as often as the modules.

Every case runs in float32 and bfloat16, forward and forward+backward. This module is
plain data: it imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

DTYPES: tuple[str, ...] = ("float32", "bfloat16")
PASSES: tuple[str, ...] = ("forward", "forward+backward")
LAYERS: tuple[str, ...] = ("LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm")

# Passes over an x-sized array the floor counts (one pass: one read or one write of x's
# bytes): LayerNorm-like layers keep a row in registers (forward: read x, write y;
# backward: read x and dy, write dx); statistics across the batch or a whole image do not
# stay on chip, so x is read once more in the forward and x, dy once more in the backward.
FLOOR_PASSES: dict[str, dict[str, int]] = {
    "LayerNorm": {"forward": 2, "forward+backward": 5},
    "RMSNorm": {"forward": 2, "forward+backward": 5},
    "BatchNorm": {"forward": 3, "forward+backward": 8},
    "GroupNorm": {"forward": 3, "forward+backward": 8},
    "InstanceNorm": {"forward": 3, "forward+backward": 8},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer on one activation shape.

    Attributes:
      layer: the normalization's class name (``LAYERS``).
      shape: the input shape, features last.
      model: where the shape comes from.
      param_dtype: ``"float32"``, or ``"input"`` for parameters in the input's dtype.
    """

    layer: str
    shape: tuple[int, ...]
    model: str
    param_dtype: str = "float32"

    def param_dtype_for(self, dtype: str) -> str:
        """The parameters' dtype when the input is ``dtype``."""
        return dtype if self.param_dtype == "input" else self.param_dtype

    def elements(self) -> int:
        """Number of elements of the input."""
        return math.prod(self.shape)

    def label(self, dtype: str | None = None) -> str:
        """``"LayerNorm 8x1024x4096 bfloat16 (bfloat16 params)"``-style name."""
        text = f"{self.layer} {'x'.join(map(str, self.shape))}"
        if dtype is not None:
            text += f" {dtype}"
            if self.param_dtype_for(dtype) != "float32":
                text += f" ({self.param_dtype_for(dtype)} params)"
        return text


def _images(layer: str, model: str, batch: int, sizes: Sequence[tuple[int, int]]) -> list[Case]:
    """NHWC cases ``batch × s × s × c`` for each ``(s, c)``."""
    return [Case(layer, (batch, s, s, c), model) for s, c in sizes]


def _tokens(model: str, tokens: int, widths: Sequence[int]) -> list[Case]:
    """LayerNorm and RMSNorm cases ``tokens × width``."""
    return [Case(layer, (tokens, w), model) for w in widths for layer in ("LayerNorm", "RMSNorm")]


RESNET50_BATCH_NORM = _images(
    "BatchNorm", "ResNet-50, batch 64", 64,
    [(112, 64), (56, 64), (56, 256), (28, 128), (28, 512), (14, 256), (14, 1024), (7, 512),
     (7, 2048)],
)
SD_UNET_GROUP_NORM = _images(
    "GroupNorm", "Stable Diffusion UNet, batch 8", 8, [(64, 320), (32, 640), (16, 1280), (8, 1280)]
)
STYLE_INSTANCE_NORM = _images(
    "InstanceNorm", "style transfer 256², batch 8", 8, [(256, 32), (128, 64), (64, 128)]
)
LLM_TOKENS = _tokens("LLM, 8192 tokens", 8192, (2048, 4096, 5120, 8192))
VIT_B_TOKENS = _tokens("ViT-B/16, batch 256", 50176, (768,))
SEQUENCE_3D = [
    Case("LayerNorm", (8, 1024, 4096), "LLM, batch 8 × 1024 tokens"),
    Case("LayerNorm", (8, 1024, 4096), "LLM, batch 8 × 1024 tokens", param_dtype="input"),
    Case("RMSNorm", (8, 1024, 4096), "LLM, batch 8 × 1024 tokens", param_dtype="input"),
]

SWEEP: tuple[Case, ...] = tuple(
    RESNET50_BATCH_NORM + SD_UNET_GROUP_NORM + STYLE_INSTANCE_NORM + LLM_TOKENS + VIT_B_TOKENS
    + SEQUENCE_3D
)


def interleaved(cases: Iterable[Case]) -> list[Case]:
    """``cases`` reordered round-robin over their layers (and parameter dtypes), so that a
    run stopped early by its time budget has still covered every layer."""
    groups: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.layer, case.param_dtype), []).append(case)
    rounds = itertools.zip_longest(*groups.values())
    return [case for round_ in rounds for case in round_ if case is not None]


def with_dtypes(cases: Iterable[Case],
                dtypes: Sequence[str] = DTYPES) -> Iterator[tuple[Case, str]]:
    """``(case, dtype)`` pairs, without the repeats that ``param_dtype="input"`` would give
    when the input is float32 and a float32-parameter twin of the case exists."""
    cases = list(cases)
    seen: set[tuple[str, tuple[int, ...], str, str]] = set()
    for case in cases:
        for dtype in dtypes:
            key = (case.layer, case.shape, dtype, case.param_dtype_for(dtype))
            if key not in seen:
                seen.add(key)
                yield case, dtype


def scaled(case: Case, max_elements: int) -> Case:
    """``case`` with its leading (batch or token) axis halved until the input has at most
    ``max_elements`` elements (at least one example is kept)."""
    shape = list(case.shape)
    while math.prod(shape) > max_elements and shape[0] > 1:
        shape[0] = max(1, shape[0] // 2)
    return dataclasses.replace(case, shape=tuple(shape))


# The CPU subset: one or two shapes per layer from the sweep, the batch or token axis
# scaled so the input is at most 4 Mi elements (16 MiB in float32): still more than a
# CPU's last-level cache, and a few milliseconds a call on two cores.
CPU_MAX_ELEMENTS = 1 << 22
_CPU_PICKS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("LayerNorm", (8192, 2048)),
    ("RMSNorm", (8192, 2048)),
    ("BatchNorm", (64, 56, 56, 64)),
    ("BatchNorm", (64, 7, 7, 2048)),
    ("GroupNorm", (8, 64, 64, 320)),
    ("InstanceNorm", (8, 128, 128, 64)),
)


def find(layer: str, shape: tuple[int, ...], param_dtype: str = "float32") -> Case:
    """The sweep's case of ``layer`` on ``shape`` (``KeyError`` if the sweep has none)."""
    for case in SWEEP:
        if (case.layer, case.shape, case.param_dtype) == (layer, tuple(shape), param_dtype):
            return case
    raise KeyError(f"no {layer} {shape} ({param_dtype} params) in the sweep")


def cpu_subset(max_elements: int = CPU_MAX_ELEMENTS) -> tuple[Case, ...]:
    """The cases ``run.py --quick`` times on a CPU: sweep cases, scaled down."""
    return tuple(scaled(find(layer, shape), max_elements) for layer, shape in _CPU_PICKS)


def tiny(case: Case) -> Case:
    """A few-kilobyte version of ``case`` (same layer, rank and parameter dtype) for smoke
    tests on a CPU: batch 2, 4×4 images, 16 tokens, at most 64 features (a multiple of 32
    for GroupNorm(32))."""
    *lead, features = case.shape
    features = 64 if case.layer == "GroupNorm" else min(features, 64)
    if len(case.shape) == 4:
        shape = (2, min(lead[1], 4), min(lead[2], 4), features)
    elif len(case.shape) == 3:
        shape = (2, 8, features)
    else:
        shape = (16, features)
    return dataclasses.replace(case, shape=shape)


def floor_bytes(case: Case, dtype_itemsize: int, pass_name: str) -> int:
    """Bytes of the pass floor: ``FLOOR_PASSES`` × the input's bytes."""
    return FLOOR_PASSES[case.layer][pass_name] * case.elements() * dtype_itemsize
