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


def _read_response(sock) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 response with a content-length, read whole: head and body may arrive in
    separate segments (CI once saw a 413 head alone in the first recv)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response head ended: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(body)} of {length} body bytes"
        body += chunk
    return head, body


def test_chunked_body_is_refused_once_past_the_limit(hardened):
    """Before: a chunked upload (no content-length) was read whole, then refused: the limit bounded nothing (a
    300 MB upload raised RSS by 500 MB). Here the client sends twice the limit and then stalls: the 413 must
    come without the end of the body."""
    import socket

    with socket.create_connection(("127.0.0.1", hardened.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(8):  # 128 KiB; the limit is 64 KiB
                sock.sendall(b"4000\r\n" + b" " * 0x4000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before the client has sent everything
        head, body = _read_response(sock)  # a timeout here: the server is still waiting for the rest of the body
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
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


# ---- API key sources (item 8) -------------------------------------------------------------------------------------
def _serve_cfg(**kw):
    from sala.engine.commands import ServeConfig

    return ServeConfig(model="tiny", **kw)


def test_api_key_from_file_or_env_not_only_the_command_line(tmp_path, monkeypatch, caplog):
    """Before: only --api-key, which every local user reads in /proc/PID/cmdline."""
    from sala.engine.commands import resolve_api_key

    monkeypatch.delenv("SALA_API_KEY", raising=False)
    assert resolve_api_key(_serve_cfg()) is None
    f = tmp_path / "key"
    f.write_text("s3cret\nignored\n")
    assert resolve_api_key(_serve_cfg(api_key_file=str(f))) == "s3cret"
    monkeypatch.setenv("SALA_API_KEY", " from-env ")
    assert resolve_api_key(_serve_cfg()) == "from-env"
    with pytest.raises(ValueError, match="give the API key one way, got --api-key-file and SALA_API_KEY"):
        resolve_api_key(_serve_cfg(api_key_file=str(f)))
    monkeypatch.delenv("SALA_API_KEY")
    with caplog.at_level("WARNING"):
        assert resolve_api_key(_serve_cfg(api_key="k")) == "k"
    assert "visible to every local user" in caplog.text
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty; put the key on its first line"):
        resolve_api_key(_serve_cfg(api_key_file=str(tmp_path / "empty")))
    with pytest.raises(OSError):
        resolve_api_key(_serve_cfg(api_key_file=str(tmp_path / "missing")))


def test_serve_uses_the_env_key(monkeypatch):
    import sala.engine.server as server_pkg
    from sala.engine.commands import run_serve

    seen = {}

    def fake_serve(engine, tokenizer, config, **kw):
        seen.update(key=config.api_key, **kw)

    monkeypatch.setattr(server_pkg, "serve", fake_serve)
    monkeypatch.setenv("SALA_API_KEY", "env-key")
    assert run_serve(_serve_cfg(device="cpu", threads=1, shutdown_timeout=3.0)) == 0
    assert seen["key"] == "env-key" and seen["shutdown_timeout"] == 3.0


# ---- graceful shutdown (item 7) -----------------------------------------------------------------------------------
def test_sigterm_stops_within_the_deadline_and_exits_0():
    """Before: SIGTERM waited for every in-flight stream without a deadline (12 s to 90+ s), then the process died
    of the signal (status 143)."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from .test_server import _free_port

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sala.cli", "serve", "--model", "tiny", "--device", "cpu", "--threads",
                             "1", "--batch", "1", "--port", str(port), "--served-model-name", MODEL, "--log-level",
                             "warning", "--shutdown-timeout", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        first = threading.Event()

        def stream():  # three 4,000-token streams on one slot: ~12,000 tokens of work queued
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                    for _ in r.iter_lines():
                        first.set()
            except httpx.HTTPError:
                pass  # cut at the deadline

        threads = [threading.Thread(target=stream, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        assert first.wait(30)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, proc.stderr.read().decode()[-2000:]
    assert took < 6, f"exit took {took:.1f} s with a 1 s deadline"


def test_engine_error_mid_stream_ends_with_an_error_event():
    """Once streaming began there is no status left to set: the stream ends with an ``error`` event, then [DONE]."""
    import asyncio
    import json

    from sala.engine.server.app import _sse_guard
    from sala.engine.types import NonFiniteLogitsError

    async def events():
        yield "data: {}\n\n"
        raise NonFiniteLogitsError("the model produced non-finite logits (NaN/inf) for request r at output token 3")

    async def collect():
        return [e async for e in _sse_guard(events())]

    first, err, done = asyncio.run(collect())
    assert first == "data: {}\n\n" and done == "data: [DONE]\n\n"
    assert json.loads(err.removeprefix("data: "))["error"] == {
        "message": "the model produced non-finite logits (NaN/inf) for request r at output token 3",
        "type": "server_error", "param": None, "code": "non_finite_logits"}


def test_one_socket_survives_a_bad_request(hardened):
    """Item 2 on one raw keep-alive socket (an HTTP client would silently reconnect): a lone surrogate, then an
    unhandled error, then a good request, all answered on the same connection."""
    import socket

    def request(sock, body: bytes) -> bytes:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head, body = _read_response(sock)
        return head.split(b"\r\n")[0] + b" " + body

    with socket.create_connection(("127.0.0.1", hardened.port), timeout=30) as sock:
        assert request(sock, b'{"model": "sala-test", "prompt": "\\ud800", "max_tokens": 2}').startswith(b"HTTP/1.1 400")
        assert request(sock, b'{"model": "sala-test", "prompt": "boom", "max_tokens": 2}').startswith(b"HTTP/1.1 500")
        reply = request(sock, b'{"model": "sala-test", "prompt": "Hello", "max_tokens": 2}')
        assert reply.startswith(b"HTTP/1.1 200") and b'"choices"' in reply
