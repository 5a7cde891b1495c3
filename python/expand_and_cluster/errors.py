"""Exceptions. :class:`InputError` is a user error (bad file, bad argument): the command line
prints its message on one line and exits with code 2, without a traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a missing or malformed file, an invalid option value."""


class NoClusterError(RuntimeError):
    """No cluster survived the gamma and beta filters of a layer (nothing to reconstruct)."""
