"""Drive an :class:`~sala.engine.engine.Engine` from one background thread for asyncio callers.

Commands (add, abort) go through a thread-safe queue and are applied between engine steps; outputs come
back to each request's own ``asyncio.Queue`` via ``loop.call_soon_threadsafe``. While requests are running the
thread steps the engine continuously, so every active stream decodes in the same batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from typing import AsyncIterator

from sala.engine.engine import Engine
from sala.engine.types import EngineError, NonFiniteLogitsError, RequestError, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Thread-owned engine with ``async generate(...)`` streams; call :meth:`start` before use."""

    def __init__(self, engine: Engine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, callable] = {}
        self._thread = threading.Thread(target=self._loop, name="sala-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        """True while the engine thread is alive: from :meth:`start` until its loop has exited after
        :meth:`shutdown` (a thread cannot be started twice, so False after that does not mean startable)."""
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        return self.engine.stats()  # plain ints, read without locking

    # ---- engine thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # a failed step fails every request in flight (queued ones too), not only those
                # in that step's batch: the engine's state is unknown after it; the server keeps running
                logger.exception("engine step failed")
                self._fail_all(EngineError(f"engine step failed: {e}"))
        closing = EngineError("server is shutting down")
        self._fail_all(closing)
        while True:  # adds that arrived too late: their callers get the error instead of waiting forever
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add" and cmd[-1].set_running_or_notify_cancel():
                cmd[-1].set_exception(closing)

    def _fail_all(self, error: EngineError) -> None:
        # detach each sink before aborting: the abort's own final output must not reach the caller as a
        # normal finish, the caller gets the error instead
        for rid, sink in list(self._sinks.items()):
            del self._sinks[rid]
            self._safe_abort(rid)
            self._safe_call(sink, error)

    def _safe_abort(self, rid: str) -> RequestOutput | None:
        """engine.abort that never kills the engine thread (it may raise after a failed step)."""
        try:
            return self.engine.abort(rid)
        except Exception:
            logger.exception("aborting request %s failed", rid)
            return None

    @staticmethod
    def _safe_call(sink, item) -> None:
        try:
            sink(item)
        except Exception:  # e.g. the caller's event loop is closed: nobody is left to tell
            logger.exception("delivering to a request's stream failed")

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, prompt, params, rid, sink, fut = cmd
                if fut.cancelled():  # the caller went away before the request was added
                    continue
                try:
                    if self.engine.scheduler.num_waiting >= self.max_waiting:
                        raise RequestError(f"server busy: {self.max_waiting} requests already waiting", "server_busy")
                    if rid in self._sinks:  # checked here so a refused duplicate never replaces the live sink
                        raise RequestError(f"request id {rid!r} is already in use", "duplicate_request_id")
                    self.engine.add_request(prompt, params, rid, on_output=lambda out, r=rid: self._deliver(r, out))
                except Exception as e:
                    if fut.set_running_or_notify_cancel():
                        fut.set_exception(e)
                    continue
                self._sinks[rid] = sink
                if fut.set_running_or_notify_cancel():
                    fut.set_result(rid)
                else:  # cancelled while add_request ran
                    self._sinks.pop(rid, None)
                    self._safe_abort(rid)
            elif cmd[0] == "abort":
                _, rid, owner = cmd
                if owner is None:  # public abort: the stream gets the ABORT output and ends normally
                    out = self._safe_abort(rid)
                    self._sinks.pop(rid, None)
                elif self._sinks.get(rid) is owner:  # the stream's own caller left: nobody to tell
                    del self._sinks[rid]
                    out = self._safe_abort(rid)
                else:
                    continue  # that stream never started or already ended; the id may now be someone else's
                if out is not None:
                    logger.info("aborted request %s", rid)

    def _deliver(self, rid: str, item: RequestOutput | Exception) -> None:
        sink = self._sinks.get(rid)
        if sink is None:
            return
        if isinstance(item, Exception) or item.finished:
            del self._sinks[rid]
        if isinstance(item, RequestOutput) and item.error is not None:
            item = NonFiniteLogitsError(item.error)  # the stream raises it; the other requests go on
        self._safe_call(sink, item)

    # ---- asyncio side ------------------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early (client gone) aborts it and frees its slot.
        Raises :class:`RequestError` (before the first output) if the engine refuses the request."""
        if not self._thread.is_alive() or self._stop.is_set():
            raise EngineError("engine thread is not running")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = request_id or uuid.uuid4().hex
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def sink(item: RequestOutput | Exception) -> None:
            loop.call_soon_threadsafe(q.put_nowait, item)

        self._commands.put(("add", prompt, params, rid, sink, fut))
        self._wake.set()
        finished = False
        try:
            await asyncio.wrap_future(fut)  # cancelling this wait cancels fut, so the add is skipped or undone
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        except RequestError:
            finished = True  # refused: nothing to abort, and the id may belong to another live request
            raise
        finally:
            if not finished:
                self._commands.put(("abort", rid, sink))
                self._wake.set()

    def abort(self, request_id: str) -> None:
        """Abort a request by id, whoever is streaming it."""
        self._commands.put(("abort", request_id, None))
        self._wake.set()
