"""Progress bars that stay quiet when not attached to a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(it: Iterable[T], desc: str, total: int | None = None, disable: bool | None = None) -> Iterable[T]:
    """Wrap ``it`` in a tqdm bar; disabled automatically when stderr is not a TTY."""
    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(it, desc=desc, total=total, disable=disable, leave=False)
