"""One generation at a time on the one model, behind a bounded queue.

The chat engine generates for one conversation (batch of one) with a KV cache of its own per call. The
server owns one model, so it runs one engine call at a time on a worker thread: caches never mix, the
memory in use is one model plus one KV cache whatever the load, and requests wait their turn in a queue
of at most `max_queue` (one more is refused at once, as 429). A job carries its own cancel flag and
deadline, checked between tokens: a client that disconnects, a stop string that matched, or a request
past its time limit stops its generation at the next token and frees the model for the next job.

Tokens travel to the waiting request through its asyncio queue (call_soon_threadsafe), as events:
("token", id), then ("end", reason) with reason "done" (the engine stopped: a stop token, max_tokens or
the context), "cancelled" or "timeout", or ("error", message).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from daychat.chat.engine import Engine


@dataclass
class Job:
    prompt: list[int]
    options: dict[str, Any]  # Engine.stream keyword arguments
    deadline: float  # time.monotonic() after which generation stops
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    produced: int = 0  # ids generated so far (read by /health and tests)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class QueueFull(Exception):
    pass


class Worker:
    """Runs jobs one after another on a daemon thread. `submit` raises QueueFull when `max_queue` jobs
    already wait (the running one not counted)."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: Job | None = None
        self.served = self.cancelled = self.timed_out = 0
        self._thread = threading.Thread(target=self._run, name="daychat-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull
            self.waiting += 1
        self._jobs.put(job)

    def close(self) -> None:
        """Stop the thread after the current job (the running job is cancelled)."""
        if self.running is not None:
            self.running.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        return {"busy": self.running is not None, "waiting": self.waiting, "max_queue": self.max_queue,
                "served": self.served, "cancelled": self.cancelled, "timed_out": self.timed_out}

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
            self.running = job
            try:
                job.send("end", self._generate(job))
            except Exception as e:  # a bug or an out-of-memory: the request gets a 500, the server goes on
                job.send("error", f"{type(e).__name__}: {e}")
            finally:
                self.running = None
                self.served += 1

    def _stopped(self, job: Job) -> str | None:
        """"cancelled" or "timeout" (counted) when the job must stop now, else None."""
        if job.cancel.is_set():
            self.cancelled += 1
            return "cancelled"
        if time.monotonic() > job.deadline:
            self.timed_out += 1
            return "timeout"
        return None

    def _generate(self, job: Job) -> str:
        if stopped := self._stopped(job):
            return stopped
        stream = self.engine.stream(job.prompt, **job.options)
        try:
            # The engine computes the next token when asked for it, so checking between tokens wastes no
            # forward pass on a reply nobody reads.
            for token in stream:
                job.produced += 1
                job.send("token", token)
                if stopped := self._stopped(job):
                    return stopped
        finally:
            stream.close()
        return "done"
