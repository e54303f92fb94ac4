"""Every ``SALA_*`` environment variable lives here, read at call time (never cached at import)."""

from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("auto", "naive", "cpu", "triton")


def op_backend() -> str:
    """Backend forced for all ops by ``SALA_BACKEND`` (``auto`` | ``naive`` | ``cpu`` | ``triton``); default ``auto``."""
    value = os.environ.get("SALA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SALA_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


SPARSE_BACKWARDS = ("auto", "torch", "triton")


def sparse_backward() -> str:
    """Backward of the Triton block-sparse attention, from ``SALA_SPARSE_BACKWARD``: ``auto`` (default: the
    Triton kernels on CUDA, 39-45x faster than the recompute on an H200; the recompute in the CPU interpreter),
    ``torch`` (recompute in PyTorch) or ``triton`` (the kernels everywhere)."""
    value = os.environ.get("SALA_SPARSE_BACKWARD", "auto").strip().lower() or "auto"
    if value not in SPARSE_BACKWARDS:
        raise ValueError(f"SALA_SPARSE_BACKWARD must be one of {SPARSE_BACKWARDS}, got {value!r}")
    return value


def triton_interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cache_dir() -> Path:
    """Root of sala's caches (dequantised GGUF sources, the demo's conversions): ``SALA_CACHE_DIR``, default
    ``~/.cache/sala``."""
    base = os.environ.get("SALA_CACHE_DIR", "").strip()
    return Path(base).expanduser() if base else Path.home() / ".cache" / "sala"


def corpus_dir() -> Path | None:
    """The text corpus folder forced by ``SALA_CORPUS_DIR`` (None: the default location)."""
    value = os.environ.get("SALA_CORPUS_DIR", "").strip()
    return Path(value).expanduser() if value else None
