"""Expand-and-Cluster: recover the hidden-layer sizes and weights of an MLP from input-output
queries (Martinelli, Simsek, Gerstner, Brea, ICML 2024), with fused C++ student kernels."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("expand-and-cluster")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

from .activations import ACTIVATIONS, Activation, SymmetryClass, get_activation


def backends() -> list[str]:
    """Backends compiled into ``expand_and_cluster._C``: ``["cpu"]`` or ``["cpu", "cuda"]``."""
    from . import _C

    return list(_C.backends())


__all__ = [
    "ACTIVATIONS",
    "Activation",
    "SymmetryClass",
    "backends",
    "get_activation",
    "__version__",
]
