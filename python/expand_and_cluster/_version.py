"""The installed distribution's version (``0.0.0+unknown`` when running from a source tree)."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("expand-and-cluster")
except _metadata.PackageNotFoundError:
    __version__ = "0.0.0+unknown"
