"""jaxnorm: normalization layers for JAX and Flax, from one functional core.

Every normalization is :func:`normalize` over a choice of reduction axes
(``docs/design.md``): one public function per variant here, and Flax modules that hold
parameters and call it in :mod:`jaxnorm.linen` and :mod:`jaxnorm.nnx`.
"""

from jaxnorm._add_and_norm import add_and_norm
from jaxnorm._batch_norm import Renorm, batch_norm, batch_norm_inference
from jaxnorm._fold import fold_batch_norm
from jaxnorm._group_norm import group_norm
from jaxnorm._instance_norm import (
    adaptive_instance_norm,
    conditional_instance_norm,
    instance_norm,
)
from jaxnorm._layer_norm import layer_norm, rms_norm
from jaxnorm._local_response_norm import local_response_norm
from jaxnorm._normalize import normalize
from jaxnorm._precise import recompute_batch_stats
from jaxnorm._running import (
    BatchMoments,
    RunningStatistics,
    merge_moments,
    update_running_statistics,
)
from jaxnorm._spectral_norm import power_iteration, spectral_norm
from jaxnorm._stats import moments
from jaxnorm._torch_checkpoint import flax_variables_from_torch
from jaxnorm._weight_norm import weight_norm
from jaxnorm._weight_standardization import standardize_weight

__version__ = "0.2.0"

__all__ = [
    "BatchMoments",
    "Renorm",
    "RunningStatistics",
    "adaptive_instance_norm",
    "add_and_norm",
    "batch_norm",
    "batch_norm_inference",
    "conditional_instance_norm",
    "flax_variables_from_torch",
    "fold_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "local_response_norm",
    "merge_moments",
    "moments",
    "normalize",
    "power_iteration",
    "recompute_batch_stats",
    "rms_norm",
    "spectral_norm",
    "standardize_weight",
    "update_running_statistics",
    "weight_norm",
]
