"""Errors of conversion, in a module of their own so every convert module can raise them without importing
another (``gguf`` and ``adapters`` imported each other for them)."""

from __future__ import annotations


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names what, what was expected, and the fix."""


class UnsupportedArchitectureError(ConversionError):
    """The source ``model_type`` (or one of its features) has no SALA equivalent."""


class SourceTensorError(ConversionError):
    """A source tensor is missing, unexpected, or has a shape its config does not imply."""
