"""How a training process leaves its process group: ranks meet before tearing down after a clean run (one that
destroyed its gloo group while a peer still wrote the export aborted in CI); after an error nothing waits on
peers that may never come."""

from __future__ import annotations

import pytest
import torch

from sala.train import parallel


class FakeDist:
    def __init__(self):
        self.calls: list[str] = []

    def is_initialized(self):
        return True

    def barrier(self):
        self.calls.append("barrier")

    def destroy_process_group(self):
        self.calls.append("destroy")


@pytest.mark.parametrize("world, ok, expected", [
    (2, True, ["barrier", "destroy"]),  # every rank arrives, then all tear down
    (1, True, ["destroy"]),
    (2, False, []),                     # a peer may be dead or stuck: no barrier, no collective teardown
    (1, False, ["destroy"]),
])
def test_shutdown_order(monkeypatch, world, ok, expected):
    fake = FakeDist()
    monkeypatch.setattr(parallel, "dist", fake)
    info = parallel.DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), owns_group=True)
    parallel.shutdown(info, ok=ok)
    assert fake.calls == expected


def test_shutdown_leaves_a_group_it_did_not_make(monkeypatch):
    fake = FakeDist()
    monkeypatch.setattr(parallel, "dist", fake)
    info = parallel.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), owns_group=False)
    parallel.shutdown(info)
    assert fake.calls == []
