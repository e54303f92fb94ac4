"""Backend choice for ops: ``naive`` (the pure-PyTorch reference, any device), ``cpu`` (plain PyTorch shaped for
CPUs: batched chunks, SDPA, gathered sparse blocks; any device) or ``triton`` (CUDA, or the CPU interpreter).

``auto`` picks Triton for CUDA tensors when Triton imports, ``cpu`` for CPU tensors, else the reference. An op
without a ``cpu`` implementation runs its reference under ``cpu``. ``SALA_BACKEND`` overrides ``auto`` globally;
an explicit ``backend=`` argument overrides both.

Each op family registers its implementations here, one per backend name (:func:`register`), and its public entry
runs the one :func:`call` picks, so adding a backend means registering functions, not editing branches:

* every op registers a ``naive`` implementation (the reference, the oracle the others are tested against);
* an implementation may come with ``accepts(*args)``: inputs it declines (a dtype, a layout, autograd) run the
  op's ``naive`` implementation instead, as does a backend the op has no implementation for;
* all implementations of an op take the arguments its public entry passes to :func:`call`; one registered with
  ``takes_backend=True`` also gets ``backend=`` the resolved name (composites that call other entries with it).

A name registered for any op becomes a valid ``backend=`` argument; ``auto`` still picks only the built-in three.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sala.utils.env import BACKENDS, op_backend, triton_interpret

logger = logging.getLogger(__name__)

REFERENCE = "naive"
"""The backend every op implements: the fallback for inputs or backends without an implementation of their own."""


@dataclass(frozen=True)
class Impl:
    """One op's implementation for one backend."""

    fn: Callable[..., Any]
    accepts: Callable[..., bool] | None = None
    """Predicate over the op's arguments; False: these inputs run the reference instead. None: takes everything."""
    takes_backend: bool = False
    """Call ``fn`` with ``backend=`` the resolved backend name as well."""


_IMPLS: dict[str, dict[str, Impl]] = {}
"""op name -> backend name -> implementation."""


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def backend_names() -> tuple[str, ...]:
    """Every name ``backend=`` accepts: ``auto``, the built-in backends, then any other name registered for an op."""
    extra = sorted({b for impls in _IMPLS.values() for b in impls} - set(BACKENDS))
    return BACKENDS + tuple(extra)


def register(op: str, backend: str, fn: Callable[..., Any] | None = None, *,
             accepts: Callable[..., bool] | None = None, takes_backend: bool = False, replace: bool = False):
    """Register ``fn`` as ``op``'s implementation for ``backend``; without ``fn``, a decorator that does so.

    ``accepts`` and ``takes_backend``: see :class:`Impl`. A second registration for the same (op, backend) is an
    error unless ``replace=True``. Returns ``fn`` (so the decorator leaves the function as it was)."""
    if not backend or backend == "auto":
        raise ValueError(f"cannot register an implementation of {op!r} under backend {backend!r}: 'auto' is a "
                         "choice between backends, not one; give a backend name such as 'naive', 'cpu' or 'triton'")

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        impls = _IMPLS.setdefault(op, {})
        if backend in impls and not replace:
            raise ValueError(f"op {op!r} already has a {backend!r} implementation ({impls[backend].fn.__qualname__}); "
                             "unregister it first or pass replace=True")
        impls[backend] = Impl(f, accepts, takes_backend)
        return f

    return add if fn is None else add(fn)


def unregister(op: str, backend: str) -> Impl:
    """Remove and return ``op``'s implementation for ``backend`` (KeyError if there is none)."""
    impls = _IMPLS.get(op, {})
    if backend not in impls:
        raise KeyError(f"op {op!r} has no {backend!r} implementation; it has {sorted(impls)}")
    if backend == REFERENCE:
        raise ValueError(f"the {REFERENCE!r} implementation of {op!r} is every backend's fallback and cannot be removed")
    return impls.pop(backend)


def implementations(op: str) -> dict[str, Impl]:
    """A copy of ``op``'s registered implementations by backend name."""
    return dict(_impls(op))


def _impls(op: str) -> dict[str, Impl]:
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no op named {op!r} is registered; known ops: {sorted(_IMPLS)}")
    return impls


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if triton_available() else REFERENCE
    return "cpu" if device.type == "cpu" else REFERENCE


def _check_triton(device: torch.device) -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' requested but the triton package is not installed (pip install triton)")
    if device.type != "cuda" and not triton_interpret():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for the CPU interpreter; got device {device}"
        )


_DEVICE_CHECKS: dict[str, Callable[[torch.device], None]] = {"triton": _check_triton}
"""Backend name -> check that raises when the backend cannot run for tensors on that device."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``auto`` or a backend name into the backend that will run for tensors on ``device``."""
    names = backend_names()
    if backend not in names:
        raise ValueError(f"backend must be one of {', '.join(map(repr, names))}; got {backend!r}")
    if backend == "auto":
        backend = op_backend()  # SALA_BACKEND (validated there)
    if backend == "auto":
        return _auto(device)
    check = _DEVICE_CHECKS.get(backend)
    if check is not None:
        check(device)
    return backend


def _pick(op: str, backend: str, device: torch.device, args: tuple, kwargs: dict) -> tuple[Impl, str]:
    chosen = resolve_backend(backend, device)
    impls = _impls(op)
    impl = impls.get(chosen)
    if impl is None or (impl.accepts is not None and not impl.accepts(*args, **kwargs)):
        impl = impls.get(REFERENCE)
        if impl is None:
            raise KeyError(f"op {op!r} has no {REFERENCE!r} implementation to fall back on")
    return impl, chosen


def resolve(op: str, backend: str, device: torch.device, /, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """The function :func:`call` would run for ``op`` with these arguments (for inspection and tests)."""
    return _pick(op, backend, device, args, kwargs)[0].fn


def call(op: str, backend: str, device: torch.device, /, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on ``backend`` (``auto`` or a name) for tensors on ``device``: the backend's implementation when it
    has one that accepts these arguments, else the reference."""
    impl, chosen = _pick(op, backend, device, args, kwargs)
    if impl.takes_backend:
        return impl.fn(*args, backend=chosen, **kwargs)
    return impl.fn(*args, **kwargs)
