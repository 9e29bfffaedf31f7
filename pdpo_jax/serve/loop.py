"""The engine thread: one thread drives a `Scheduler`, the only one that touches it.

HTTP handlers run on an asyncio event loop; they hand `Job`s to the engine thread through a
thread-safe inbox (`submit`, `cancel`) and get each job's events back on their own loop
(`loop.call_soon_threadsafe`):

    ("tokens", ids, logprobs)   new tokens of the row as the engine makes them
    ("done", request)           the row ended; request.tokens / logprobs / finish_reason are set
    ("error", message, status)  the engine refused the request (400) or stopped (503)

While anything is queued or decoding the thread alternates between draining the inbox and one
`Scheduler.step`; when idle it waits on the inbox. `stop` lets it finish the jobs it has, then
ends it; a failure in a step ends it too, every open job getting an error.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from pdpo_jax.sampling.engine import Request, Scheduler

log = logging.getLogger(__name__)


class Job:
    """One engine request and where its events go: `sink(event)` runs on `loop`."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop,
                 sink: Callable[[tuple], None]):
        self.request, self.loop, self.sink = request, loop, sink
        request.on_tokens = self._on_tokens

    def post(self, *event) -> None:
        """Called in the engine thread; runs the sink on the handler's loop."""
        try:
            self.loop.call_soon_threadsafe(self.sink, event)
        except RuntimeError:  # the event loop closed: nobody is listening any more
            pass

    def _on_tokens(self, request: Request, tokens: list[int]) -> None:
        logprobs = request.logprobs[-len(tokens):] if request.logprobs else None
        self.post("tokens", list(tokens), logprobs)


class EngineLoop:
    """Runs `scheduler` in a daemon thread: `start`, `submit(job)`, `cancel(job)`, `stop`."""

    def __init__(self, scheduler: Scheduler, *, name: str = "engine"):
        self.scheduler = scheduler
        self.error: str | None = None  # why the thread ended early, if it did
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # id(request) -> job; the engine thread's own
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """Drops the job: no more events; its slot frees at the engine's next turn."""
        self._inbox.put(("cancel", job))

    def stop(self, timeout: float = 30.0) -> bool:
        """Finishes the jobs already submitted (at most `timeout` s, then drops them) and ends
        the thread. True when it ended."""
        if not self._thread.is_alive():
            return True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("engine: %d jobs still running after %.0f s; dropping them",
                        len(self._jobs), timeout)
            self._halt.set()
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        stopping = False
        try:
            while not self._halt.is_set():
                stopping |= self._take(block=not self.scheduler.busy and not stopping)
                if not self.scheduler.busy:
                    if stopping:
                        break
                    continue
                for request in self.scheduler.step():
                    self._jobs.pop(id(request)).post("done", request)
        except Exception as e:  # a bug or the device failing: every open job hears of it
            log.exception("engine: step failed; the engine thread ends")
            self.error = f"the engine failed: {type(e).__name__}: {e}"
        finally:
            self._close(self.error or "the server is shutting down")

    def _take(self, block: bool) -> bool:
        """Handles the inbox's commands (waiting up to 0.5 s for one when `block`); True when
        one of them asked to stop."""
        stop = False
        while True:
            try:
                kind, job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return stop
            block = False
            if kind == "stop":
                stop = True
            elif kind == "submit":
                self._admit(job)
            elif self._jobs.pop(id(job.request), None) is not None:  # cancel
                self.scheduler.cancel(job.request)

    def _admit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job.request)
        except ValueError as e:  # the handler checks first; this is the engine's last word
            job.post("error", str(e), 400)
            return
        self._jobs[id(job.request)] = job

    def _close(self, reason: str) -> None:
        """Every job still open, and every one still in the inbox, gets an error."""
        for job in self._jobs.values():
            job.post("error", reason, 503)
        self._jobs.clear()
        while True:
            try:
                kind, job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                job.post("error", reason, 503)
