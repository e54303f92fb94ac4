"""Issue 17 item 1: the default torch CPU thread count (torch's default, all cores, collapsed throughput 20x on a
shared 2-core machine)."""

from __future__ import annotations

import pytest
import torch

from sala.utils import env


@pytest.fixture()
def no_thread_env(monkeypatch):
    monkeypatch.delenv("SALA_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 1), (4, 3), (9, 8), (64, 8)])
def test_default_leaves_one_cpu_and_caps_at_8(no_thread_env, cpus, threads):
    no_thread_env.setattr(env, "usable_cpus", lambda: cpus)
    n, why = env.default_cpu_threads()
    assert n == threads and f"{cpus} usable CPUs" in why


def test_env_vars_win(no_thread_env):
    no_thread_env.setattr(env, "usable_cpus", lambda: 16)
    no_thread_env.setenv("OMP_NUM_THREADS", "3")
    assert env.default_cpu_threads() == (3, "OMP_NUM_THREADS=3")
    no_thread_env.setenv("SALA_NUM_THREADS", "5")
    assert env.default_cpu_threads() == (5, "SALA_NUM_THREADS=5")
    no_thread_env.setenv("SALA_NUM_THREADS", "-2")
    with pytest.raises(ValueError, match=r"SALA_NUM_THREADS must be a whole number >= 1, got '-2'"):
        env.default_cpu_threads()


def test_usable_cpus_is_positive_and_within_the_machine():
    import os

    assert 1 <= env.usable_cpus() <= (os.cpu_count() or 1)


def test_generate_sets_the_default(no_thread_env, capsys):
    """Before: ``sala generate`` without --threads left torch's default (every core) in place."""
    from sala import cli

    torch.set_num_threads(2)
    no_thread_env.setattr(env, "usable_cpus", lambda: 64)  # would be 8
    no_thread_env.setenv("SALA_NUM_THREADS", "1")
    assert cli.main(["generate", "--model", "tiny", "--device", "cpu", "--prompt", "hi", "--max-tokens", "2",
                     "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    no_thread_env.delenv("SALA_NUM_THREADS")
    no_thread_env.setattr(env, "usable_cpus", lambda: 4)
    assert cli.main(["generate", "--model", "tiny", "--device", "cpu", "--prompt", "hi", "--max-tokens", "2",
                     "--quiet"]) == 0
    assert torch.get_num_threads() == 3
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", "tiny", "--threads", "0", "--prompt", "hi"])
