"""Public kernel API on torch tensors, and a pure-torch reference for each op.

An *ensemble* is N independent MLPs ("students", Martinelli et al. 2024, Sec. 3, step "Expand")
with L hidden layers that all read the same input batch:

- ``weights``: list of L + 1 tensors, layer l of shape ``[N, out_l, in_l]`` (torch.nn.Linear layout
  per student), ``biases``: list of L + 1 tensors ``[N, out_l]``;
- ``x``: ``[B, d_in]``, ``y``: ``[B, d_out]``;
- hidden layers apply the activation, the output layer is linear.

Every op validates its arguments first (TypeError for a wrong dtype or type, ValueError for shapes,
devices, non-contiguous tensors and NaN/Inf inputs, each message naming the argument and what was
expected), then calls the compiled kernel in :mod:`expand_and_cluster._C` on the tensors' device
(cpu, or cuda when the build has the CUDA kernels). ``<op>_reference``
(:mod:`expand_and_cluster.ops.reference`) is a pure-torch twin used by the tests and as a
readable specification.

Modules: :mod:`~expand_and_cluster.ops.mlp` (forward, fused gradients, :class:`FusedTrainStep`),
:mod:`~expand_and_cluster.ops.optim` (Adam, the training schedule),
:mod:`~expand_and_cluster.ops.cluster` (cosine distances, average linkage).
"""

from __future__ import annotations

from ._runtime import backends, num_threads, resolve_device, set_num_threads, threads
from .cluster import average_linkage, cosine_distances
from .mlp import (
    CUDA_TORCH_PATH_MIN_LAYER_SIZE,
    TORCH_PATH_MIN_LAYER_SIZE,
    FusedTrainStep,
    mlp_forward,
    mlp_mse_grad,
    uses_torch_path,
)
from .optim import PlateauState, adam_step, plateau_step
from .reference import (
    adam_step_reference,
    average_linkage_reference,
    cosine_distances_reference,
    mlp_forward_reference,
    mlp_mse_grad_reference,
    plateau_step_reference,
)

__all__ = [
    "CUDA_TORCH_PATH_MIN_LAYER_SIZE",
    "TORCH_PATH_MIN_LAYER_SIZE",
    "FusedTrainStep",
    "PlateauState",
    "adam_step",
    "adam_step_reference",
    "average_linkage",
    "average_linkage_reference",
    "backends",
    "cosine_distances",
    "cosine_distances_reference",
    "mlp_forward",
    "mlp_forward_reference",
    "mlp_mse_grad",
    "mlp_mse_grad_reference",
    "num_threads",
    "plateau_step",
    "plateau_step_reference",
    "resolve_device",
    "set_num_threads",
    "threads",
    "uses_torch_path",
]
