"""Launch configurations picked by timing, remembered across processes.

A kernel with several candidate configurations times them once per shape class on the GPU and keeps the fastest.
In memory only, every new process (a restarted server) paid that again on its first request: compiling every
candidate and timing each. :class:`TuningCache` also writes the picks to ``<SALA_CACHE_DIR>/tuning/<name>.json``,
one section per device signature (GPU name, Triton and torch versions: a pick made under another one is not reused),
so a later process compiles and runs only the chosen configuration. Candidates are stored by ``repr`` and matched
against the current candidate list: a pick no longer offered is timed again. ``SALA_TUNING_CACHE=0`` turns the file
off.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sala.utils.env import cache_dir, tuning_cache
from sala.utils.fs import write_json

logger = logging.getLogger(__name__)


def device_signature(device: torch.device) -> str:
    """What a timing depends on besides the shape: the GPU model and the compiler stack."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} | triton {triton.__version__} | torch {torch.__version__}"


class TuningCache:
    """``pick(key, candidates, time_one)``: the remembered fastest candidate for ``key`` (a tuple of the shape class),
    else each candidate timed by ``time_one(candidate) -> ms`` (one raising an error of ``skip`` is left out) and
    the fastest kept."""

    def __init__(self, name: str, signature: Callable[[], str]) -> None:
        self.name = name
        self._signature = signature
        self._memory: dict[str, Any] = {}
        self._disk: dict[str, str] | None = None  # this signature's section of the file, read once
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return cache_dir() / "tuning" / f"{self.name}.json"

    def _read_file(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable tuning cache %s (%s); configurations are timed again", self.path, e)
            return {}
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            logger.warning("ignoring tuning cache %s: not a JSON object of sections", self.path)
            return {}
        return data

    def _section(self) -> dict[str, str]:
        if self._disk is None:
            self._disk = dict(self._read_file().get(self._signature(), {})) if tuning_cache() else {}
        return self._disk

    def _remember(self, skey: str, choice: Any) -> None:
        self._memory[skey] = choice
        if not tuning_cache():
            return
        self._section()[skey] = repr(choice)
        data = self._read_file()  # merge: another process may have added picks since this one read the file
        data.setdefault(self._signature(), {})[skey] = repr(choice)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, data, indent=1, sort_keys=True)
        except OSError as e:  # a read-only cache folder costs the next process a re-timing, nothing else
            logger.warning("could not write the tuning cache %s: %s", self.path, e)

    def pick(self, key: tuple, candidates: Sequence[Any], time_one: Callable[[Any], float],
             skip: tuple[type[BaseException], ...] = (Exception,)) -> Any:
        skey = repr(key)
        with self._lock:
            if skey in self._memory:
                return self._memory[skey]
            stored = self._section().get(skey)
            by_repr = {repr(c): c for c in candidates}
            if stored in by_repr:
                self._memory[skey] = by_repr[stored]
                logger.info("%s: %s for %s from the tuning cache", self.name, stored, key)
                return by_repr[stored]
            timings: dict[Any, float] = {}
            for cand in candidates:
                try:
                    timings[cand] = time_one(cand)
                except skip as err:  # e.g. out of shared memory on this GPU: not a candidate here
                    logger.debug("%s: %s skipped: %s", self.name, cand, err)
            if not timings:
                raise RuntimeError(f"{self.name}: no candidate configuration ran for {key}")
            best = min(timings, key=timings.get)
            logger.info("%s picks %s for %s: fastest of %d (%.3f ms)", self.name, best, key, len(timings), timings[best])
            self._remember(skey, best)
            return best

    def clear_memory(self) -> None:
        """Forget the in-memory picks (the file stays): as a new process would start."""
        with self._lock:
            self._memory.clear()
            self._disk = None
