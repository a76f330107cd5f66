"""Exceptions shared by the layers (bottom of the package: imports nothing of it)."""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """A known backend cannot run on this machine; the message says why."""
