"""Resumable checkpoints with ``torch.distributed.checkpoint`` (DCP), written so that a kill never damages the last
good one.

Layout under ``<out>/checkpoints``::

    step-000120/         complete checkpoint: DCP shards of model + optimizer, rank-<r>.pt (data position, RNG),
                         meta.json (stage, step, tokens, fingerprints)
    step-000120.tmp/     a checkpoint being written (ignored and removed on resume)
    latest               name of the newest complete checkpoint, replaced atomically (rename)

Every rank writes into the ``.tmp`` folder; after a barrier rank 0 renames it and then points ``latest`` at it.
A crash before the rename leaves ``latest`` on the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

logger = logging.getLogger(__name__)

LATEST = "latest"


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another model or recipe than the run resuming from it."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict, rank_state: dict, keep: int) -> Path:
    """Write checkpoint ``root/name`` (all ranks call this); returns its final path."""
    rank = dist.get_rank()
    final, tmp = root / name, root / f"{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "has_optimizer": optimizer is not None,
                                                   "world_size": dist.get_world_size()}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint exists only once complete
        _atomic_write_text(root / LATEST, name + "\n")
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):  # left by a killed save; the one just written is already renamed
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Half-written ``.tmp`` folders are never returned."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise CheckpointMismatchError(f"{pointer} names {path.name}, which is missing or incomplete; "
                                      "remove the pointer to start over or restore the folder")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model (+ optimizer when both the checkpoint and the caller have one) and this rank's state."""
    meta = read_meta(path)
    if meta["world_size"] != dist.get_world_size():
        logger.warning("checkpoint %s was written by %d ranks, resuming with %d: the data order changes",
                       path, meta["world_size"], dist.get_world_size())
    if optimizer is not None and meta["has_optimizer"]:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
    rank_file = path / f"rank-{dist.get_rank()}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.exists() else {}
    return {"meta": meta, "rank": rank_state}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 state dict on CPU (rank 0 gets it; other ranks get an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
