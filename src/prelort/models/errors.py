"""The error every model-loading failure raises (a leaf module, so the others can share it)."""

from __future__ import annotations

from prelort.errors import UserError

__all__ = ["ModelLoadError"]


class ModelLoadError(UserError):
    """A model name, path, package, dtype or device that cannot be used: one clear line."""
