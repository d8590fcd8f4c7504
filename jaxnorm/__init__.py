"""jaxnorm: normalization layers for JAX and Flax, from one functional core.

Every normalization is ``normalize`` over a choice of reduction axes (see DESIGN.md).
Flax modules live in ``jaxnorm.linen`` and ``jaxnorm.nnx``.
"""

from jaxnorm._spectral_norm import power_iteration, spectral_norm
from jaxnorm._torch_checkpoint import flax_variables_from_torch
from jaxnorm._weight_norm import weight_norm
from jaxnorm._weight_standardization import standardize_weight
from jaxnorm.fold import fold_batch_norm
from jaxnorm.functional import (
    adaptive_instance_norm,
    batch_norm,
    batch_norm_inference,
    group_norm,
    instance_norm,
    layer_norm,
    local_response_norm,
    normalize,
    rms_norm,
)
from jaxnorm.precise import recompute_batch_stats
from jaxnorm.stats import moments

__version__ = "0.1.0"

__all__ = [
    "adaptive_instance_norm",
    "batch_norm",
    "batch_norm_inference",
    "flax_variables_from_torch",
    "fold_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "local_response_norm",
    "moments",
    "normalize",
    "power_iteration",
    "recompute_batch_stats",
    "rms_norm",
    "spectral_norm",
    "standardize_weight",
    "weight_norm",
]
