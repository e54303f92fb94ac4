"""Progress of long evals: a tqdm bar with ETA on a terminal, a plain line every few seconds otherwise (logs,
CI, ``nohup``), nothing with ``quiet``."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``with Progress(total, "ppl", unit="tok") as p: p.update(n)``."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", quiet: bool = False, interval: float = 5.0,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream or sys.stderr
        self.n, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.bar = None
        self.plain = not quiet and not self.stream.isatty()
        if not quiet and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta_s = _hms(eta) if eta == eta else "?"
        speed = f"{rate:,.1f} {self.unit}/s" if rate >= 0.1 or rate == 0 else f"{1 / rate:,.1f} s/{self.unit}"
        return f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({pct:.0f}%) elapsed {_hms(elapsed)} ETA {eta_s} ({speed})"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain:
            now = time.perf_counter()
            if now - self.last >= self.interval or self.n >= self.total:
                self.last = now
                print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
