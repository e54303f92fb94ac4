"""``sala chat``: slash commands stay in the REPL, and the demo starts without raising the model's RoPE limit
(issue 14 item 6)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

import sala.engine.chat as chat_mod
import sala.engine.commands as commands
from sala.engine.commands import ChatConfig, run_chat


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sent(monkeypatch):
    """The user messages of every history that reaches the model."""
    seen: list[list[str]] = []
    render = chat_mod.render_chat

    def spy(tokenizer, history, *a, **kw):
        seen.append([m["content"] for m in history if m["role"] == "user"])
        return render(tokenizer, history, *a, **kw)

    monkeypatch.setattr(chat_mod, "render_chat", spy)
    return seen


def chat(text: str, **kw) -> tuple[int, str]:
    err = io.StringIO()
    cfg = ChatConfig(demo=True, max_tokens=2, think="hide", **kw)
    code = run_chat(cfg, inp=io.StringIO(text), out=io.StringIO(), err=err)
    return code, err.getvalue()


def test_slash_commands_are_not_sent_to_the_model(sent):
    code, err = chat("/help\nHello\n/nonsense arg\n//etc is a path\n/reset\nAgain\n/quit\nnever read\n")
    assert code == 0
    assert sent == [["Hello"], ["Hello", "/etc is a path"], ["Again"]]
    assert "/reset" in err and "/exit" in err  # /help lists the commands
    assert "unknown command /nonsense" in err


def test_demo_chat_keeps_the_models_position_limit(monkeypatch, caplog):
    """The tiny demo model allows 4096 positions; chat's 8192 default was raised past it on every start."""
    loaded = []
    load = commands._load
    monkeypatch.setattr(commands, "_load", lambda *a, **kw: loaded.append(load(*a, **kw)) or loaded[-1])
    with caplog.at_level(logging.WARNING):
        code, _ = chat("Hi\n")
    assert code == 0
    assert loaded[0][0].config.max_position_embeddings == 4096
    assert not [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]
