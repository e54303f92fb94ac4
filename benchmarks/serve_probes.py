"""Single probes of ``sala serve`` behind issue 17 items 2, 4 and 7; never collected by pytest.

Starts ``sala serve --model tiny --device cpu`` and reports: the server's RSS around a 300 MiB chunked upload
(refused with 413 once past the body limit) and around an ~8 MB prompt under the limit (refused for the context
before tokenising), the answer to 100,000 nested brackets, then the time from SIGTERM to exit and the exit status
with three 4,000-token streams queued on one slot.

    python benchmarks/serve_probes.py                          # with this checkout's sala
    python benchmarks/serve_probes.py --serve-args "--shutdown-timeout 1"
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import threading
import time

import httpx

from serve_load import _free_port, rss_mib


def start(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sala.cli", "serve", "--model", "tiny", "--device", "cpu", "--threads",
                             "1", "--port", str(port), "--served-model-name", "m", "--log-level", "warning", *extra],
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def memory_probes(extra: list[str]) -> None:
    proc, url = start(["--context", "4096", *extra])
    try:
        httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=60)
        r0 = rss_mib(proc.pid)

        def body():
            for _ in range(300):
                yield b" " * 2**20

        t = time.time()
        try:
            status = httpx.post(url + "/v1/completions", content=body(), headers={"content-type": "application/json"},
                                timeout=120).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        r1 = rss_mib(proc.pid)
        print(f"300 MiB chunked upload: {status} after {time.time() - t:.2f} s; RSS {r0:.0f} -> {r1:.0f} MiB")
        text = "hello world " * 690_000
        t = time.time()
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": text, "max_tokens": 2}, timeout=300)
        r2 = rss_mib(proc.pid)
        print(f"{len(text) / 1e6:.1f} MB prompt: {r.status_code} {r.json()['error']['code']} after "
              f"{time.time() - t:.2f} s; RSS {r1:.0f} -> {r2:.0f} MiB")
        r = httpx.post(url + "/v1/completions", content=b"[" * 100_000 + b"]" * 100_000,
                       headers={"content-type": "application/json"})
        print(f"100,000 nested brackets: {r.status_code} {r.headers.get('content-type')} {r.text[:80]}")
    finally:
        proc.terminate()
        proc.wait(60)


def sigterm_probe(extra: list[str]) -> None:
    proc, url = start(["--batch", "1", *extra])
    first = threading.Event()

    def stream():
        body = {"model": "m", "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
                for _ in r.iter_lines():
                    first.set()
        except httpx.HTTPError:
            pass

    for _ in range(3):
        threading.Thread(target=stream, daemon=True).start()
    first.wait(60)
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(600)
    print(f"SIGTERM with three 4,000-token streams queued: exit status {rc} after {time.time() - t0:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-args", default="", help="extra flags for sala serve")
    args = p.parse_args()
    extra = shlex.split(args.serve_args)
    memory_probes(extra)
    sigterm_probe(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
