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


def _switch(name: str) -> bool:
    """An on/off variable: unset or ``1`` is on, ``0`` is off, anything else a ValueError naming it."""
    value = os.environ.get(name, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def flash_varlen() -> bool:
    """Packed training documents attend in one flash ``varlen_attn`` launch on CUDA; ``SALA_FLASH_VARLEN=0`` attends
    document by document with SDPA instead (for a torch whose ``varlen_attn`` fails)."""
    return _switch("SALA_FLASH_VARLEN")


def cudnn_split() -> bool:
    """Chunked dense prefill on CUDA attends through two cuDNN calls merged by log-sum-exp instead of one
    FlashAttention-2 call with a lower-right causal bias (:mod:`sala.ops.infllm_v2.dense`); ``SALA_CUDNN_SPLIT=0``
    keeps flash."""
    return _switch("SALA_CUDNN_SPLIT")


def fp8_cublas_blockwise() -> bool:
    """Prefill-sized FP8 linears with groups of 128 go through cuBLAS block scaling (``torch._scaled_mm`` with
    1 x 128 scales on both operands) where this torch and cuBLAS take it; ``SALA_FP8_CUBLAS=0`` keeps the Triton
    group GEMM."""
    return _switch("SALA_FP8_CUBLAS")


def fp8_decode_plan() -> tuple[int, int, int, int, int] | None:
    """``SALA_FP8_DECODE_PLAN=BM,BN,warps,stages,swap``: the decode-sized fp8 group GEMM's launch plan on a GPU
    instead of the built-in one (for benchmarks comparing plans end to end; the interpreter keeps its small tiles);
    unset: None."""
    value = os.environ.get("SALA_FP8_DECODE_PLAN", "").strip()
    if not value:
        return None
    try:
        plan = tuple(int(v) for v in value.split(","))
    except ValueError:
        plan = ()
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in plan[:3])
    if len(plan) != 5 or not pow2 or plan[3] < 1 or plan[0] < 16 or plan[1] < 16 or plan[4] not in (0, 1):
        raise ValueError(f"SALA_FP8_DECODE_PLAN must be BM,BN,warps,stages,swap (BM, BN >= 16 and warps powers of "
                         f"two, stages >= 1, swap 0 or 1); got {value!r}")
    return plan


def triton_interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cache_dir() -> Path:
    """Root of sala's caches (dequantised GGUF sources, the demo's conversions): ``SALA_CACHE_DIR``, default
    ``~/.cache/sala``."""
    base = os.environ.get("SALA_CACHE_DIR", "").strip()
    return Path(base).expanduser() if base else Path.home() / ".cache" / "sala"


def tuning_cache() -> bool:
    """Kernel launch configurations picked by timing on a GPU persist under :func:`cache_dir` ``/tuning`` so a new
    process does not time them again (a server's first request pays no tuning); ``SALA_TUNING_CACHE=0`` keeps them in
    memory only."""
    return _switch("SALA_TUNING_CACHE")


def corpus_dir() -> Path | None:
    """The text corpus folder forced by ``SALA_CORPUS_DIR`` (None: the default location)."""
    value = os.environ.get("SALA_CORPUS_DIR", "").strip()
    return Path(value).expanduser() if value else None


MAX_DEFAULT_THREADS = 8


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_cpu_threads() -> tuple[int, str]:
    """Torch CPU threads when no ``--threads`` is given, with the reason (logged by the caller).

    Rule (issue 17 item 1): ``SALA_NUM_THREADS`` if set, else ``OMP_NUM_THREADS`` if set (torch already honours
    it); else the usable CPUs minus one, between 1 and 8. The one left over serves the HTTP loop, the tokenizer
    and whatever else runs on the machine: OpenMP threads spin at their barriers, so one more thread than there
    are free cores turns each matmul into a wait for the preempted thread. Measured with
    ``benchmarks/serve_load.py`` on 2 cores beside one CPU hog: torch's default (2 threads) gave 26 tok/s and a
    p99 of 13.9 s; 1 thread 549 tok/s and 0.44 s. Past 8 threads decode (memory-bound, small matmuls) stops
    gaining and the barriers cost more. Whether the machine is shared cannot be told reliably at start-up, so the
    rule assumes it may be; pass ``--threads N`` (or set ``SALA_NUM_THREADS``) on a dedicated machine.
    """
    for var in ("SALA_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{var} must be a whole number >= 1, got {value!r}")
            return int(value), f"{var}={value}"
    cpus = usable_cpus()
    n = max(1, min(cpus - 1, MAX_DEFAULT_THREADS))
    return n, f"{cpus} usable CPUs: one left for the server/tokenizer threads and other jobs, at most {MAX_DEFAULT_THREADS}"


def set_cpu_threads(requested: int | None = None) -> int:
    """Set torch's CPU thread count: ``requested`` (``--threads``) or :func:`default_cpu_threads`; returns it."""
    import logging

    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        n, why = requested, "--threads"
    else:
        n, why = default_cpu_threads()
    torch.set_num_threads(n)
    logging.getLogger(__name__).info("torch CPU threads: %d (%s)", n, why)
    return n


def api_key() -> str | None:
    """The server's API key from ``SALA_API_KEY`` (None when unset or blank); unlike ``--api-key`` it does not show
    in ``/proc/PID/cmdline``."""
    value = os.environ.get("SALA_API_KEY", "").strip()
    return value or None
