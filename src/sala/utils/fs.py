"""One rule for every file and folder ``sala`` writes (issue 17): write into a temporary sibling, then rename it into
place; never delete a file ``sala`` did not write; refuse a non-empty output folder unless forced.

* :func:`atomic_file` / :func:`write_text` / :func:`write_json` / :func:`save_safetensors`: one file, via a hidden
  sibling ``.NAME.sala-tmp-PID-XXXX`` and ``os.replace`` (atomic on POSIX): a reader sees the old file or the new
  one, never half of one, and a killed run leaves the old file in place.
* :func:`atomic_dir`: a whole output folder. It is filled as a hidden sibling folder; a missing or empty ``out``
  is then replaced by one ``rename``. A non-empty ``out`` is refused unless ``force``; when forced, each new file
  replaces its namesake with ``os.replace`` only once every file is complete (data first, the JSON naming it
  last), and of the old files only those listed in the folder's manifest (:data:`MANIFEST`, the files ``sala``
  wrote there before) are removed. Report folders (``reuse_own``) may be rewritten without ``force`` when they
  hold nothing but sala's own files.

Temporary siblings left by a killed run are recognised by their marker and removed by the next run (only when
the process that made them is gone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

TMP_MARK = ".sala-tmp-"
MANIFEST = ".sala-files.json"
"""Inside every folder written by :func:`atomic_dir`: the relative paths of the files ``sala`` wrote there."""


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_tmp(path: Path) -> list[Path]:
    """Remove ``path``'s temporary siblings whose writer process is gone (a killed run); returns them."""
    removed = []
    prefix = f".{path.name}{TMP_MARK}"
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            logger.info("removed %s, left by a killed run", p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any, **kw: Any) -> Path:
    return write_text(path, json.dumps(payload, **{"indent": 2, **kw}) + "\n")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def record_written(folder: str | os.PathLike, *paths: str | os.PathLike) -> None:
    """Add ``paths`` (inside ``folder``) to the folder's manifest of files sala wrote, for folders filled file by
    file (reports) rather than through :func:`atomic_dir`."""
    folder = Path(folder)
    names = _read_manifest(folder) | {str(Path(p).resolve().relative_to(folder.resolve())) for p in paths}
    write_json(folder / MANIFEST, sorted(names), indent=1)


def check_out_dir(out: str | os.PathLike, force: bool, flag: str = "--force", reuse_own: bool = False,
                  own_names: tuple[str, ...] = ()) -> None:
    """Refuse a non-empty ``out`` unless ``force``: ``ValueError`` naming what is there and the fix. With
    ``reuse_own`` (report folders) a folder holding only files sala wrote there (its manifest, or ``own_names``:
    the report's fixed file names, for folders written before manifests existed) counts as empty: re-running a
    report rewrites it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; pass a folder path")
    if force or not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if reuse_own:
        own = {n.split("/", 1)[0] for n in _read_manifest(out)} | {MANIFEST, *own_names}
        entries = [e for e in entries if e not in own]
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"output folder {out} is not empty ({len(entries)} entries: {shown}); choose a new folder or "
                         f"pass {flag} to write into it (files sala did not write there are kept)")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _read_manifest(folder: Path) -> set[str]:
    try:
        names = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def _commit_order(name: str) -> tuple[int, str]:
    # data first, then the JSON that names it (config.json, the index, delta.json, reports): a reader that finds
    # the new metadata finds the new files it points to
    return (1 if name.endswith(".json") else 0, name)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, force: bool = False, flag: str = "--force",
               reuse_own: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder to fill; on success its content becomes ``out`` (see module
    docstring), on error it is removed and ``out`` is untouched. Refuses a non-empty ``out`` unless ``force``
    (see :func:`check_out_dir` for ``reuse_own``)."""
    out = Path(out)
    check_out_dir(out, force, flag, reuse_own)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    tmp = _tmp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _commit(tmp: Path, out: Path) -> None:
    new = [n for n in _files(tmp) if n != MANIFEST]
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        (tmp / MANIFEST).write_text(json.dumps(new, indent=1) + "\n")
        os.rename(tmp, out)  # one atomic step
        return
    old = _read_manifest(out)
    for name in sorted(new, key=_commit_order):
        dest = out / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            raise ValueError(f"cannot write {dest}: a folder of that name is in the way")
        os.replace(tmp / name, dest)
    for name in sorted(old - set(new)):  # sala's own files of the earlier run that this run did not rewrite
        stale = out / name
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    write_json(out / MANIFEST, new, indent=1)
    logger.info("replaced %d file(s) in %s (kept files sala did not write)", len(new), out)
