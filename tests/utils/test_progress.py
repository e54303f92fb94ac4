"""Progress without a terminal: a line every few seconds instead of silence (issue 14 item 6)."""

from __future__ import annotations

import io

import sala.utils.progress as prog
from sala.utils.progress import LineProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_prints_every_interval_and_a_closing_line():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(range(10), "aligning", interval=5.0, stream=out, clock=clock)
    for i in bar:
        clock.t += 2.0  # each step takes 2 s: a line after steps 3, 6, 9 (6 s, 12 s, 18 s)
        if i == 4:
            bar.set_postfix(mse="0.01")
    lines = out.getvalue().splitlines()
    assert lines[0] == "aligning: 3/10 (30%), 6 s, ~14 s left"
    assert lines[1].startswith("aligning: 6/10 (60%), 12 s") and lines[1].endswith("mse=0.01")
    assert lines[-1] == "aligning: done 10/10 (100%), 20 s, mse=0.01"
    assert len(lines) == 4


def test_short_loop_is_silent():
    out = io.StringIO()
    assert list(LineProgress(range(3), "x", interval=5.0, stream=out, clock=FakeClock())) == [0, 1, 2]
    assert out.getvalue() == ""


def test_progress_without_tty_writes_lines_to_stderr(monkeypatch, capsys):
    """The old helper returned a disabled tqdm bar here: a log saw nothing for minutes."""
    monkeypatch.setattr(prog, "LOG_INTERVAL_S", 0.0)
    assert list(progress(range(3), desc="probing")) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("probing: 1/3 (33%)")
    assert err[-1].startswith("probing: done 3/3 (100%)")


def test_progress_disabled_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(prog, "LOG_INTERVAL_S", 0.0)
    bar = progress(range(3), desc="probing", disable=True)
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(x=1)  # callers may set a postfix on any bar
    assert capsys.readouterr().err == ""


def test_prefill_progress_of_a_long_prompt_reaches_a_log(monkeypatch, capsys):
    """`sala generate` on a long prompt: the prefill bar was switched off without a TTY."""
    from sala.engine.commands import _PrefillBar

    monkeypatch.setattr(prog, "LOG_INTERVAL_S", 0.0)
    bar = _PrefillBar(chunk=4, quiet=False)
    for done in (4, 8, 12):
        bar("r", done, 12)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("prefill: 4/12 (33%)") and err[-1].startswith("prefill: done 12/12")
    quiet = _PrefillBar(chunk=4, quiet=True)
    quiet("r", 4, 12)
    assert capsys.readouterr().err == ""
