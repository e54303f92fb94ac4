"""Load and soak test of ``sala serve`` over 127.0.0.1 (issue 17); never collected by pytest.

Starts ``sala serve`` itself (or targets ``--url``), then runs ``--concurrency`` clients for ``--requests`` requests
or ``--duration`` seconds, whichever ends first: a mix of streaming and non-streaming completions, clients that
disconnect mid-request (``--disconnect``) and streams cancelled after a few events (``--cancel``). Optionally starts
``--hogs`` CPU-burning processes beside it, the "shared machine" of issue 17 item 1. Prints latency p50/p90/p99
(whole request) and TTFT of the streams, output tokens/s, errors by kind, the server's RSS before and after, and
``/health`` at the end (nothing may be left running or waiting).

    python benchmarks/serve_load.py                                   # tiny random model, CPU, 8 clients, 300 requests
    python benchmarks/serve_load.py --hogs 1 --duration 120           # soak beside one CPU hog
    python benchmarks/serve_load.py --serve-args "--threads 1"        # compare a thread count
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a server you started
    python benchmarks/serve_load.py --device cuda --preset minicpm-sala-9b --batch 64 --context 64K \
        --concurrency 64 --prompt-words 340 21500 --max-tokens 256 --start-timeout 300  # GPU: released shape, 1K-63K tokens

Writes one JSON line per run to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "sala.cli", "serve", "--model", args.preset, "--device", args.device, "--port", str(port),
           "--batch", str(args.batch), "--context", str(args.context), "--served-model-name", args.model,
           "--log-level", "warning", *shlex.split(args.serve_args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start within {args.start_timeout:.0f} s")


WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches in "
         "the old town square near the river").split()


def prompt(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


class Stats:
    def __init__(self) -> None:
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.tokens = 0
        self.done = 0
        self.errors: dict[str, int] = {}
        self.disconnects = 0
        self.cancels = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one(client: httpx.AsyncClient, args, rng: random.Random, st: Stats) -> None:
    body = {"model": args.model, "prompt": prompt(rng, args.prompt_words[0], args.prompt_words[1]),
            "max_tokens": rng.randint(max(1, args.max_tokens // 2), args.max_tokens), "temperature": 0.8,
            "seed": rng.randrange(2**31), "ignore_eos": True}
    roll = rng.random()
    t0 = time.perf_counter()
    try:
        if roll < args.disconnect:  # a client that gives up mid-request: the server must free its slot
            try:
                await client.post("/v1/completions", json=body, timeout=rng.uniform(0.01, 0.2))
            except httpx.TimeoutException:
                pass
            st.disconnects += 1
            return
        if roll < args.disconnect + args.cancel or roll < args.disconnect + args.cancel + args.stream:
            cancel_after = rng.randint(1, 3) if roll < args.disconnect + args.cancel else None
            stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=stream_body) as r:
                if r.status_code != 200:
                    st.error(f"http_{r.status_code}")
                    return
                events, used = 0, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        st.error(ev["error"].get("code", "stream_error"))
                        return
                    if ev.get("usage"):  # the last chunk: exact token count
                        used = ev["usage"]["completion_tokens"]
                        continue
                    if events == 0:  # the server sends a prompt's first token at once, text or not
                        st.ttft.append(time.perf_counter() - t0)
                    events += 1
                    if cancel_after is not None and events >= cancel_after:
                        st.cancels += 1
                        return  # leaving the block closes the stream: the server aborts the request
            st.tokens += used if used is not None else events
        else:
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                st.error(f"http_{r.status_code}")
                return
            st.tokens += r.json()["usage"]["completion_tokens"]
        st.latency.append(time.perf_counter() - t0)
        st.done += 1
    except httpx.HTTPError as e:
        st.error(type(e).__name__)


async def run_load(url: str, args) -> tuple[Stats, float]:
    st = Stats()
    rng = random.Random(args.seed)
    issued = 0
    t_end = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        async def worker(i: int) -> None:
            nonlocal issued
            wrng = random.Random(rng.randrange(2**31) + i)
            while issued < args.requests and time.perf_counter() < t_end:
                issued += 1
                await one(client, args, wrng, st)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        return st, time.perf_counter() - t0


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    h = {}
    while time.time() < deadline:
        h = httpx.get(url + "/health", timeout=5).json()
        if h.get("running") == 0 and h.get("waiting") == 0:
            return h
        time.sleep(0.2)
    return h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="target this server instead of starting one (RSS then needs --pid)")
    p.add_argument("--pid", type=int, help="the server's process id, for RSS, with --url")
    p.add_argument("--model", default="sala-load", help="served model name (default sala-load)")
    p.add_argument("--preset", default="tiny", help="model of the started server (preset or directory; default tiny)")
    p.add_argument("--device", default="cpu", help="device of the started server (default cpu)")
    p.add_argument("--batch", type=int, default=8, help="engine slots of the started server (default 8)")
    p.add_argument("--context", default="2048", help="context of the started server (default 2048)")
    p.add_argument("--serve-args", default="", help="extra flags for sala serve, e.g. '--threads 1'")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=300, help="stop after this many requests (default 300)")
    p.add_argument("--duration", type=float, default=120.0, help="or after this many seconds (default 120)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, nargs=2, default=(8, 200), metavar=("MIN", "MAX"))
    p.add_argument("--stream", type=float, default=0.5, help="fraction of streaming requests (default 0.5)")
    p.add_argument("--disconnect", type=float, default=0.05, help="fraction that disconnect mid-request")
    p.add_argument("--cancel", type=float, default=0.05, help="fraction of streams cancelled after 1-3 events")
    p.add_argument("--hogs", type=int, default=0, help="CPU-burning processes to run beside the server")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request in seconds")
    p.add_argument("--start-timeout", type=float, default=120.0,
                   help="seconds to wait for the started server's /health (default 120; a 9B model on a GPU needs more)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="name of this run in the printout / JSON")
    p.add_argument("--out", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)

    proc, url, pid = None, args.url, args.pid
    hogs: list[subprocess.Popen] = []
    try:
        if url is None:
            proc, url = start_server(args)
            pid = proc.pid
        for _ in range(3):  # warm-up: first requests pay one-time costs
            httpx.post(url + "/v1/completions", json={"model": args.model, "prompt": "warm up", "max_tokens": 4},
                       timeout=60)
        rss_before = rss_mib(pid)
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
        st, wall = asyncio.run(run_load(url, args))
        health = wait_idle(url)
        rss_after = rss_mib(pid)
    finally:
        for h in hogs:
            h.kill()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    res = {
        "label": args.label, "serve_args": args.serve_args, "hogs": args.hogs, "cpus": os.cpu_count(),
        "concurrency": args.concurrency, "requests_done": st.done, "disconnects": st.disconnects, "cancels": st.cancels,
        "errors": st.errors, "wall_s": round(wall, 2), "tokens_per_s": round(st.tokens / wall, 1),
        "latency_s": {q: round(pct(st.latency, q), 3) for q in (50, 90, 99)},
        "ttft_s": {q: round(pct(st.ttft, q), 3) for q in (50, 90, 99)},
        "rss_mib_before": rss_before, "rss_mib_after": rss_after,
        "health_after": {k: health.get(k) for k in ("running", "waiting", "free_slots")},
    }
    lat, ttft = res["latency_s"], res["ttft_s"]
    print(f"[{args.label or 'run'}] {st.done} requests ok + {st.disconnects} disconnects + {st.cancels} cancels in "
          f"{wall:.1f} s, {res['tokens_per_s']:,.0f} tok/s; errors {st.errors or 0}")
    print(f"  latency p50 {lat[50]:.3f} s  p90 {lat[90]:.3f} s  p99 {lat[99]:.3f} s | TTFT p50 {ttft[50]:.3f} s  "
          f"p90 {ttft[90]:.3f} s  p99 {ttft[99]:.3f} s")
    if rss_before is not None:
        print(f"  server RSS {rss_before:.0f} MiB before -> {rss_after:.0f} MiB after; /health after: "
              f"{res['health_after']}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    leaked = res["health_after"]["running"] or res["health_after"]["waiting"]
    return 1 if leaked or st.errors else 0


if __name__ == "__main__":
    sys.exit(main())
