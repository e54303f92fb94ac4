"""Progress for long loops: a tqdm bar on a terminal, a plain line every few seconds in a log.

Without a TTY tqdm bars were switched off, so ``sala select-layers`` wrote nothing for minutes into a log
(issue 14 item 6). :func:`progress` now prints ``desc: 12/200 (6%), 41 s, ~10 min left, mse=0.013`` to stderr at
most every ``interval`` seconds there instead, and a closing line once it has printed any.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

LOG_INTERVAL_S = 5.0
"""Seconds between two progress lines when stderr is not a terminal."""


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """Iterate ``it``, writing one progress line to ``stream`` at most every ``interval`` seconds.

    Quiet for loops shorter than ``interval``. ``set_postfix(**values)`` adds ``key=value`` to the next lines (as
    tqdm's); ``update(n)`` advances by hand when used as a counter (``for`` is not needed).
    """

    def __init__(self, it: Iterable[T] | None, desc: str, total: int | None = None, *, interval: float = LOG_INTERVAL_S,
                 stream: TextIO | None = None, clock=time.monotonic) -> None:
        self.it, self.desc, self.interval, self.clock = it, desc, interval, clock
        self.stream = stream if stream is not None else sys.stderr
        if total is None and it is not None and hasattr(it, "__len__"):
            total = len(it)  # type: ignore[arg-type]
        self.total, self.n, self.postfix = total, 0, ""
        self.start = self.last = clock()
        self.printed = 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, done: bool = False) -> str:
        elapsed = self.clock() - self.start
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"]
        parts.append(_duration(elapsed))
        if not done and self.total and 0 < self.n < self.total:
            parts.append(f"~{_duration(elapsed / self.n * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: {'done ' if done else ''}{', '.join(parts)}"

    def _emit(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.printed += 1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(self.line())

    def close(self) -> None:
        if self.printed:  # a short loop stays silent; a long one says when it ended
            self._emit(self.line(done=True))
            self.printed = 0

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.it:  # type: ignore[union-attr]
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(LineProgress):
    def _emit(self, text: str) -> None:
        pass


def progress(it: Iterable[T], desc: str, total: int | None = None, disable: bool | None = None,
             interval: float | None = None) -> Iterable[T]:
    """Iterate ``it`` with progress on stderr: a tqdm bar on a terminal, else a line every ``interval`` seconds
    (default :data:`LOG_INTERVAL_S`).

    ``disable=True`` is silent; ``None`` (default) picks by ``sys.stderr.isatty()``.
    """
    if disable:
        return _Silent(it, desc, total)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, total=total, leave=False)
    return LineProgress(it, desc, total, interval=LOG_INTERVAL_S if interval is None else interval)


def counter(desc: str, total: int | None, disable: bool | None = None, unit: str = "it"):
    """A progress counter advanced by hand (``update(n)``, ``close()``, ``n``): a tqdm bar on a terminal, else
    :class:`LineProgress` lines every :data:`LOG_INTERVAL_S` seconds; silent with ``disable=True``."""
    if disable:
        return _Silent(None, desc, total)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False)
    return LineProgress(None, desc, total, interval=LOG_INTERVAL_S)
