"""Backend choice for ops: ``naive`` (the pure-PyTorch reference, any device), ``cpu`` (plain PyTorch shaped for
CPUs: batched chunks, SDPA, gathered sparse blocks; any device) or ``triton`` (CUDA, or the CPU interpreter).

``auto`` picks Triton for CUDA tensors when Triton imports, ``cpu`` for CPU tensors, else the reference. An op
without a ``cpu`` implementation runs its reference under ``cpu``. ``SALA_BACKEND`` overrides ``auto`` globally;
an explicit ``backend=`` argument overrides both.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from sala.utils.env import BACKENDS, op_backend, triton_interpret

logger = logging.getLogger(__name__)


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``auto``/``naive``/``cpu``/``triton`` into the backend that will run for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = op_backend()
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "naive"
        return "cpu" if device.type == "cpu" else "naive"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but the triton package is not installed (pip install triton)")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for the CPU interpreter; got device {device}"
            )
    return backend
