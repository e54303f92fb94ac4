"""What the Triton ops' launch plans read about the device, in one place: the SM count, shared memory per block,
TMA support, and whether kernels take their GPU launch configurations or the CPU interpreter's small ones.

Compiled kernels on a GPU always take the GPU configurations. The interpreter (``TRITON_INTERPRET=1``) takes
small tiles by default, for speed; inside ``gpu_launch_configs()`` it takes the GPU ones instead: the same tile
sizes, keys per step, split counts (from the emulated GPU's SM count) and so the same multi-block paths and masks
a GPU executes, so that CPU tests vouch for the code that ships. num_warps / num_stages mean nothing to the
interpreter, and it still computes 16-bit dots in fp32 (its bf16 ``tl.dot`` is wrong), so it does not reproduce
the rounding of dot operands, nor races (it runs programs one after another, threads in lockstep).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sala.utils.env import triton_interpret

_CPU_SMS = 4  # interpreter default: small grids, few programs


@dataclass(frozen=True)
class EmulatedGPU:
    """The device facts launch plans read, for the interpreter to plan as on that GPU."""

    name: str
    sms: int
    smem_per_block: int  # bytes a block may opt into
    tma: bool  # tensor-memory-accelerator descriptors (compute capability >= 9)


H200 = EmulatedGPU("H200", sms=132, smem_per_block=232448, tma=True)
RTX_4090 = EmulatedGPU("RTX 4090", sms=128, smem_per_block=101376, tma=False)  # 99 KB per block: small-smem configs

_emulated: EmulatedGPU | None = None


@contextlib.contextmanager
def gpu_launch_configs(gpu: EmulatedGPU = H200) -> Iterator[EmulatedGPU]:
    """Within the block, interpreted kernels launch with the configurations compiled kernels use on ``gpu``
    (no effect on compiled kernels, which always do). For tests; not thread-local."""
    global _emulated
    prev, _emulated = _emulated, gpu
    try:
        yield gpu
    finally:
        _emulated = prev


def interpreter_configs() -> bool:
    """True when kernels take their small interpreter launch configurations: the interpreter runs and no
    ``gpu_launch_configs()`` block asked for the GPU ones."""
    return _emulated is None and triton_interpret()


def gpu_plan(device: torch.device) -> bool:
    """Whether launch plans for tensors on ``device`` follow a GPU's: compiled kernels on CUDA, or the
    interpreter inside ``gpu_launch_configs()``."""
    if triton_interpret():
        return _emulated is not None
    return device.type == "cuda"


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _cuda_smem_per_block(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024)


@functools.cache
def _cuda_has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: the CUDA count, the emulated GPU's inside
    ``gpu_launch_configs()``, else a small constant (the interpreter's grids)."""
    if device.type == "cuda":
        return _cuda_sms(_index(device))
    return _emulated.sms if _emulated is not None else _CPU_SMS


def smem_per_block(device: torch.device | None) -> int | None:
    """Shared memory a block may opt into on ``device`` (bytes); the emulated GPU's off CUDA inside
    ``gpu_launch_configs()``; None when unknown (no device, or CPU without emulation)."""
    if device is not None and device.type == "cuda":
        return _cuda_smem_per_block(_index(device))
    return _emulated.smem_per_block if _emulated is not None else None


def has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` may load through TMA descriptors: Hopper and newer on CUDA; the emulated GPU's
    answer inside ``gpu_launch_configs()``; else True (the interpreter emulates descriptors)."""
    if device.type == "cuda":
        return _cuda_has_tma(_index(device))
    return _emulated.tma if _emulated is not None else True
