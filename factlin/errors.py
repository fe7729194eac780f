"""Exceptions raised by factlin.

Every error a user can trigger subclasses :class:`ValueError` or :class:`TypeError`, so existing
``except ValueError`` code keeps working, and says which argument was wrong, what was received
and what was expected.
"""

from __future__ import annotations

__all__ = ["FactlinError", "RankError", "ShapeError", "InputError", "describe"]


class FactlinError(ValueError):
    """Base class of factlin's value errors."""


class RankError(FactlinError):
    """A ``rank`` argument that cannot be turned into concrete ranks."""


class ShapeError(FactlinError):
    """Tensorized features, feature counts or input shapes that do not fit."""


class InputError(FactlinError):
    """An input tensor (``x`` or a weight) that the layer cannot use."""


def describe(value: object) -> str:
    """Short ``repr`` of a user value with its type, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(value).__name__})"
