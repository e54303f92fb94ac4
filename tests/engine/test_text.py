"""Incremental detokenization, stop strings, <think> filtering and chat rendering with the bundled tokenizer."""

from __future__ import annotations

import pytest

from sala.engine.chat import ThinkFilter, render_chat
from sala.engine.demo import DEMO_VOCAB_SIZE, demo_tokenizer_dir
from sala.engine.detok import TextStream
from sala.engine.loader import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(demo_tokenizer_dir())


def test_bundled_tokenizer(tok):
    assert len(tok) == DEMO_VOCAB_SIZE
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    ids = tok("héllo wörld 日本")["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "héllo wörld 日本"
    assert sum(p.stat().st_size for p in demo_tokenizer_dir().iterdir()) < 1 << 20


@pytest.mark.parametrize("text", ["Hello world, the capital of France is Paris.", "multi-byte: é 日本語 🙂 done", "a\nb\n\nc"])
def test_stream_concatenates_to_decode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = TextStream(tok, context=[1])
    deltas = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cut_and_never_leaked(tok):
    text = "The capital of France is Paris. Then more."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = TextStream(tok, stop=["Paris", "zzz"])
    out = ""
    for i in ids:
        out += s.push(i)
        assert "Par" not in out  # the held-back tail never shows a stop-string prefix
        if s.stopped:
            break
    out += s.flush()
    assert s.stopped and out == "The capital of France is "


def test_earliest_stop_string_wins(tok):
    ids = tok("alpha beta gamma", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, stop=["gamma", "beta"])
    out = "".join(s.push(i) for i in ids) + s.flush()
    assert out == "alpha "


def test_think_filter_split_tags():
    f = ThinkFilter()
    pieces = ["<th", "ink>let me ", "think</thi", "nk>\n\nThe answer", " is 4.<", "/think"]
    got = [f.feed(p) for p in pieces] + [f.flush()]
    assert "".join(r for r, _ in got) == "let me think"
    assert "".join(a for _, a in got) == "\n\nThe answer is 4.</think"
    assert f.answer == "\n\nThe answer is 4.</think"


def test_chat_render_single_bos(tok):
    ids = render_chat(tok, [{"role": "user", "content": "Hi"}])
    assert ids.count(1) == 1 and ids[0] == 1
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
