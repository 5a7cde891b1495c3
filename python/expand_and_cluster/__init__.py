"""Expand-and-Cluster: recover the hidden-layer sizes and weights of an MLP from input-output
queries (Martinelli, Simsek, Gerstner, Brea, ICML 2024), with fused C++ student kernels.

The public face::

    from expand_and_cluster import RecoverConfig, recover, build_report
    result = recover(X, Y, RecoverConfig(activation="tanh"))   # X [P, d_in], Y [P, d_out]
    result.network                                             # the recovered Network

Modules: :mod:`.ops` (kernels), :mod:`.pipeline` (the method's stages), :mod:`.io` (files,
reports, figures), :mod:`.config` (settings), :mod:`.teachers`, :mod:`.metrics`, :mod:`.suite`,
:mod:`.cli`.
"""

from __future__ import annotations

from ._version import __version__
from .activations import ACTIVATIONS, Activation, SymmetryClass, get_activation
from .config import (
    ClusterConfig,
    ExpansionSearchConfig,
    RecoverConfig,
    RepairConfig,
    TrainConfig,
)
from .errors import InputError, NoClusterError
from .io.files import load_network, load_queries, save_network, save_queries
from .io.report import build_report, write_run
from .network import Network
from .ops import backends, resolve_device
from .pipeline.recover import RecoveryResult, recover
from .teachers import planted_teacher, probe

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "ClusterConfig",
    "ExpansionSearchConfig",
    "InputError",
    "Network",
    "NoClusterError",
    "RecoverConfig",
    "RecoveryResult",
    "RepairConfig",
    "SymmetryClass",
    "TrainConfig",
    "__version__",
    "backends",
    "build_report",
    "get_activation",
    "load_network",
    "load_queries",
    "planted_teacher",
    "probe",
    "recover",
    "resolve_device",
    "save_network",
    "save_queries",
    "write_run",
]
