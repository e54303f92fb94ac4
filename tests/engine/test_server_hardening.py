"""Issue 17 items 2, 4, 5 and 8 over real HTTP: every failure is the OpenAI JSON error object (never a plain-text
500, never a reset keep-alive connection), bodies are bounded while read, text that cannot fit the context is
refused before tokenising, non-finite logits fail one request only, the docs pages need the key."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch

from .test_server import MODEL, _Server

POISON = 7  # token id with a NaN embedding row in the poisoned server's model


class _Tokenizer:
    """The demo tokenizer, recording every text it is asked to tokenise; ``boom`` raises (an unexpected bug)."""

    def __init__(self, inner) -> None:
        self.inner, self.texts = inner, []

    def __call__(self, text, *a, **kw):
        self.texts.append(text)
        if text == "boom":
            raise TypeError("boom: an error nobody handles")
        return self.inner(text, *a, **kw)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def hardened(demo_model):
    model, tok = demo_model
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        poisoned.model.embed_tokens.weight[POISON] = float("nan")
    s = _Server(poisoned, _Tokenizer(tok))
    s.tokenizer = s.engine.tokenizer
    yield s
    s.stop()


@pytest.fixture()
def client(hardened):
    with httpx.Client(base_url=hardened.url, timeout=60) as c:  # one keep-alive connection per test
        yield c


def _post_raw(client, body: bytes, path="/v1/completions"):
    return client.post(path, content=body, headers={"content-type": "application/json"})


def _error(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


def _still_serving(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text


def test_deeply_nested_json_is_a_400(client):
    """Before: RecursionError -> plain-text 500."""
    for body in (b"[" * 20_000 + b"]" * 20_000, b'{"model": "x", "prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"):
        err = _error(_post_raw(client, body), 400, "invalid_json")
        assert "nested" in err["message"] and "limit is 64" in err["message"]
    _still_serving(client)  # same connection


def test_brackets_inside_strings_do_not_count_as_nesting(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "[[[[" * 40, "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, body", [
    ("prompt", b'{"model": "sala-test", "prompt": "hi \\ud800 there", "max_tokens": 2}'),
    ("model", b'{"model": "sala\\ud800", "prompt": "hi", "max_tokens": 2}'),
    ("messages[0].content", b'{"model": "sala-test", "messages": [{"role": "user", "content": "\\udfff"}]}'),
])
def test_lone_surrogates_are_a_400_and_the_connection_lives(client, field, body):
    """Before: the tokenizer's TypeError (prompt) or a UnicodeEncodeError writing the 404 (model) -> plain-text
    500, and the next request on the same connection was reset."""
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    err = _error(_post_raw(client, body, path), 400, "invalid_text")
    assert err["param"] == field and "surrogate" in err["message"]
    _still_serving(client)


def test_unexpected_errors_are_a_json_500_and_the_connection_lives(client):
    err = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": "boom", "max_tokens": 2}), 500,
                 "internal_error")
    assert err["type"] == "server_error" and "TypeError" in err["message"]
    _still_serving(client)


def test_chunked_body_is_refused_once_past_the_limit(hardened):
    """Before: a chunked upload (no content-length) was read whole, then refused: the limit bounded nothing (a
    300 MB upload raised RSS by 500 MB). Here the client sends twice the limit and then stalls: the 413 must
    come without the end of the body."""
    import socket

    with socket.create_connection(("127.0.0.1", hardened.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 128 KiB; the limit is 64 KiB
            sock.sendall(b"4000\r\n" + b" " * 0x4000 + b"\r\n")
        reply = sock.recv(65536)  # a timeout here: the server is still waiting for the rest of the body
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request_too_large" in body and b"65536" in body


def test_text_too_long_for_the_context_is_refused_before_tokenising(client, hardened):
    """Before: the prompt was tokenised (14-22 s of CPU for 8 MB), then refused for its token count."""
    text = "abcdefgh " * 6000  # 54 KB under the 64 KiB body limit; the context is 256 tokens
    before = list(hardened.tokenizer.texts)
    err = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 2}), 400,
                 "context_length_exceeded")
    assert "always too long" in err["message"]
    err = _error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": text}]}),
                 400, "context_length_exceeded")
    assert err["param"] == "messages"
    assert hardened.tokenizer.texts[len(before):] == []  # neither was tokenised


def test_non_finite_logits_fail_that_request_only(client):
    """Before: NaN logits were sampled as an arbitrary token and returned with 200."""
    err = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": [11, 12, POISON], "max_tokens": 3}),
                 500, "non_finite_logits")
    assert "non-finite logits" in err["message"]
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": [POISON], "max_tokens": 3,
                                                         "stream": True}) as r:
        assert r.status_code == 500  # the first output is awaited before streaming: still a status to set
    _still_serving(client)
    assert client.get("/health").json()["running"] == 0


def test_docs_pages_need_the_key(demo_model, client):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 200  # no key: open, as before
    s = _Server(*demo_model, api_key="k")
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            for path in ("/docs", "/openapi.json", "/redoc"):
                _error(c.get(path), 404, "not_found")
                _error(c.get(path, headers={"authorization": "Bearer k"}), 404, "not_found")
    finally:
        s.stop()
