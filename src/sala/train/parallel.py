"""Process group and FSDP2 for training (torchrun or one process; NCCL on GPUs, gloo on CPU).

Every run has a process group, one process included, so checkpoints (DCP) and metric reductions take one path.
Several ranks shard with FSDP2 ``fully_shard``: each decoder layer's mixer and MLP (the alignment stage calls mixers on
their own), then the root (embedding, final norm, lm_head, the layers' norms); the frozen teacher is sharded by
decoder layer. One rank trains the plain module under autocast (FSDP2 would only add copies and DTensor dispatch).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's group (``WORLD_SIZE`` set) or make a one-process group; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but torch sees no CUDA device")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if world == 1 and "MASTER_ADDR" not in os.environ:
            init = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend, init_method=init, rank=0, world_size=1,
                                    timeout=datetime.timedelta(minutes=30))
        else:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev, owns_group=owns)


def shutdown(info: DistInfo, *, ok: bool = True) -> None:
    """Leave the group this process made. After a clean run every rank first meets the others, so none tears its
    gloo/NCCL state down while a peer is still writing the export (a rank destroying early was seen to abort with
    'terminate called without an active exception' on a loaded 2-core CI machine). After an error the peers may
    never arrive: a multi-rank group is then left to process exit (as torchtitan does) rather than risk a hang."""
    if not (info.owns_group and dist.is_initialized()):
        return
    if ok:
        if info.world_size > 1:
            dist.barrier()
        dist.destroy_process_group()
    elif info.world_size == 1:
        dist.destroy_process_group()


def mixed_precision(dtype: torch.dtype, device: torch.device) -> MixedPrecisionPolicy:
    """bf16/fp16 parameters in compute on CUDA, fp32 gradient reduction; fp32 throughout on CPU."""
    compute = dtype if device.type == "cuda" else torch.float32
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def shard_student(wrapper: nn.Module, layers: nn.ModuleList, policy: MixedPrecisionPolicy) -> None:
    """FSDP2: one unit per mixer and per MLP, then the root ``wrapper`` (embedding, norms, lm_head)."""
    for layer in layers:
        fully_shard(layer.self_attn, mp_policy=policy)
        fully_shard(layer.mlp, mp_policy=policy)
    fully_shard(wrapper, mp_policy=policy)


def shard_teacher(teacher: nn.Module, policy: MixedPrecisionPolicy) -> None:
    """FSDP2 for the frozen teacher: one unit per decoder layer, then the root."""
    for layer in teacher.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(teacher, mp_policy=policy)


def all_reduce_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
