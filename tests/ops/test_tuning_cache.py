"""The persistent tuning cache: a pick is timed once, then read back by a new process (no timing, no compiling of
the other candidates); other device signatures, dropped candidates and unreadable files mean timing again; errors of
``skip`` leave a candidate out; ``SALA_TUNING_CACHE=0`` keeps picks in memory."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from sala.ops.common.tuning import TuningCache


@dataclass(frozen=True)
class Cfg:
    block: int
    warps: int


CANDIDATES = (Cfg(64, 4), Cfg(128, 8), Cfg(32, 2))
COST = {Cfg(64, 4): 2.0, Cfg(128, 8): 0.5, Cfg(32, 2): 1.0}


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SALA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SALA_TUNING_CACHE", raising=False)
    return tmp_path


class Timer:
    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cand):
        self.calls.append(cand)
        if cand in self.fail:
            raise MemoryError("too big for this GPU")
        return COST[cand]


def test_timed_once_then_read_back_by_a_new_process(cache_home):
    first, timer = TuningCache("k", lambda: "H200 | triton 3.6"), Timer()
    assert first.pick((8, 128, "torch.bfloat16"), CANDIDATES, timer) == Cfg(128, 8)
    assert timer.calls == list(CANDIDATES)
    assert first.pick((8, 128, "torch.bfloat16"), CANDIDATES, timer) == Cfg(128, 8) and len(timer.calls) == 3
    saved = json.loads((cache_home / "tuning" / "k.json").read_text())
    assert saved == {"H200 | triton 3.6": {"(8, 128, 'torch.bfloat16')": "Cfg(block=128, warps=8)"}}
    fresh, timer2 = TuningCache("k", lambda: "H200 | triton 3.6"), Timer()  # a restarted server
    assert fresh.pick((8, 128, "torch.bfloat16"), CANDIDATES, timer2) == Cfg(128, 8) and timer2.calls == []
    assert fresh.pick((16, 128, "torch.bfloat16"), CANDIDATES, timer2) == Cfg(128, 8) and len(timer2.calls) == 3


def test_other_signature_or_dropped_candidate_is_timed_again(cache_home):
    TuningCache("k", lambda: "H100 | triton 3.6").pick((1,), CANDIDATES, Timer())
    timer = Timer()
    assert TuningCache("k", lambda: "H200 | triton 3.6").pick((1,), CANDIDATES, timer) == Cfg(128, 8)
    assert len(timer.calls) == 3
    sections = json.loads((cache_home / "tuning" / "k.json").read_text())
    assert set(sections) == {"H100 | triton 3.6", "H200 | triton 3.6"}  # merged, the other GPU's picks kept
    timer = Timer()
    fewer = (Cfg(64, 4), Cfg(32, 2))  # the stored pick is no longer offered
    assert TuningCache("k", lambda: "H200 | triton 3.6").pick((1,), fewer, timer) == Cfg(32, 2) and len(timer.calls) == 2


def test_skipped_errors_unreadable_files_and_opt_out(cache_home, monkeypatch, caplog):
    timer = Timer(fail={Cfg(128, 8)})
    assert TuningCache("k", lambda: "s").pick((2,), CANDIDATES, timer, skip=(MemoryError,)) == Cfg(32, 2)
    with pytest.raises(MemoryError):  # an error outside skip is a bug: loud
        TuningCache("k2", lambda: "s").pick((2,), CANDIDATES, Timer(fail={Cfg(64, 4)}), skip=(ValueError,))
    with pytest.raises(RuntimeError, match="no candidate configuration ran"):
        TuningCache("k3", lambda: "s").pick((2,), CANDIDATES, Timer(fail=set(CANDIDATES)), skip=(MemoryError,))
    (cache_home / "tuning" / "k.json").write_text("{not json")
    timer = Timer()
    assert TuningCache("k", lambda: "s").pick((2,), CANDIDATES, timer) == Cfg(128, 8) and len(timer.calls) == 3
    assert "ignoring unreadable tuning cache" in caplog.text
    assert json.loads((cache_home / "tuning" / "k.json").read_text())["s"]["(2,)"] == "Cfg(block=128, warps=8)"
    monkeypatch.setenv("SALA_TUNING_CACHE", "0")
    TuningCache("off", lambda: "s").pick((3,), CANDIDATES, Timer())
    assert not (cache_home / "tuning" / "off.json").exists()
    monkeypatch.setenv("SALA_TUNING_CACHE", "yes")
    with pytest.raises(ValueError, match="SALA_TUNING_CACHE must be 0 or 1"):
        TuningCache("bad", lambda: "s").pick((3,), CANDIDATES, Timer())
