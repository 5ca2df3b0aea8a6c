"""The FastAPI app: the web chat at /, the OpenAI-compatible API under /v1, /health.

    app = create_app(engine, model_id="daychat-sft")      # then run it with uvicorn

Routes:
    GET  /                      the web chat (chat.html: one page, no build step, nothing from a CDN)
    POST /v1/chat/completions   OpenAI chat completions, streamed as server-sent events with "stream": true
    GET  /v1/models             the one model served;  GET /v1/models/{id}
    GET  /health                {"status": "ok", model, context, busy, waiting, served, cancelled, timed_out}

A reply's text is what the chat CLI shows: a calculator exchange appears in it as
`[calculator: 12*7 = 84]`; in a stream each content delta also says which part it belongs to
(`"part": "text" | "tool_call" | "tool_output"`), which is how the web page shows tool calls apart.

Replies are generated one at a time (worker.py); a request waits in a queue of at most `max_queue`
(429 beyond), for at most `timeout_s` in all, queue wait included: a request whose generation has not
started by then gets a 503; one whose generation runs past it ends there, with finish_reason "length".
A client that disconnects stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from daychat.chat.display import Printer
from daychat.chat.engine import Engine
from daychat.serve.api import ApiError, ChatRequest, Limits, parse_request
from daychat.serve.worker import Job, QueueFull, Worker

PAGE = Path(__file__).with_name("chat.html")
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    model_id: str = "daychat"
    max_queue: int = 8  # requests waiting for the model (the one generating not counted)
    timeout_s: float = 300.0  # per request, queue wait included
    limits: Limits = Limits()


class _Pieces(Printer):
    """Printer that keeps (part, text) pieces instead of writing them."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, out=None)
        self.pieces: list[tuple[str, str]] = []

    def _write(self, text: str) -> None:
        if text:
            self.pieces.append((self.part, text))


class Reply:
    """Generated ids -> the reply as shown, delivered as (part, text) deltas, cut at the first stop string.
    Text that could be the start of a stop string is held back until the next tokens decide."""

    def __init__(self, tokenizer, stops: list[str]):
        self.printer = _Pieces(tokenizer)
        self.stops = stops
        self.text = ""
        self.bounds: list[tuple[int, str]] = []  # (offset where a part starts, part)
        self.sent = 0
        self.stopped = False  # a stop string matched

    def feed(self, token: int) -> list[tuple[str, str]]:
        self.printer.feed(token)
        return self._advance(final=False)

    def finish(self) -> list[tuple[str, str]]:
        self.printer.flush()
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[tuple[str, str]]:
        if self.stopped:  # ids the worker generated before it saw the cancel: not part of the reply
            self.printer.pieces.clear()
            return []
        for part, text in self.printer.pieces:
            if not self.bounds or self.bounds[-1][1] != part:
                self.bounds.append((len(self.text), part))
            self.text += text
        self.printer.pieces.clear()
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        deltas = []
        for i, (start, part) in enumerate(self.bounds):
            stop = self.bounds[i + 1][0] if i + 1 < len(self.bounds) else len(self.text)
            lo, hi = max(start, self.sent), min(stop, end)
            if lo < hi:
                deltas.append((part, self.text[lo:hi]))
        self.sent = max(self.sent, end)
        return deltas

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


def create_app(engine: Engine, config: ServerConfig = ServerConfig()) -> FastAPI:
    tokenizer, context = engine.tokenizer, engine.max_len
    state = {"worker": None}
    created = int(time.time())

    async def lifespan(app: FastAPI):
        state["worker"] = Worker(engine, config.max_queue)
        try:
            yield
        finally:
            state["worker"].close()

    app = FastAPI(title="daychat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_id, "context": context, **state["worker"].stats()}

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": created, "owned_by": "daychat",
                "context_length": context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_id:
            return error(ApiError(404, f"model {model_id!r} not found; this server serves {config.model_id!r}",
                                  "model", "model_not_found"))
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await read_json(request, config.limits.max_body_bytes)
            chat = parse_request(body, tokenizer=tokenizer, context=context, limits=config.limits)
        except ApiError as e:
            return error(e)
        job = Job(prompt=chat.prompt, loop=asyncio.get_running_loop(),
                  deadline=time.monotonic() + config.timeout_s,
                  options=dict(max_new_tokens=chat.max_tokens, temperature=chat.temperature, top_k=chat.top_k,
                               top_p=chat.top_p, seed=chat.seed if chat.seed is not None else uuid.uuid4().int % 2**63))
        try:
            state["worker"].submit(job)
        except QueueFull:
            return error(ApiError(429, f"the server is busy: {config.max_queue} requests are already waiting for "
                                       "the model; retry shortly", None, "queue_full"))
        # Wait for the first event (a token, or the end), watching the client: a request still in the queue
        # when its client leaves never reaches the model.
        first = await next_event(job, request)
        if first is None:
            return error(ApiError(499, "client disconnected"))
        if first == ("end", "timeout") and job.produced == 0:
            return error(ApiError(503, f"the model was busy for the whole request timeout ({config.timeout_s:g} s); "
                                       "retry later", None, "timeout"))
        if first[0] == "error":
            return error(ApiError(500, f"generation failed: {first[1]}"))
        completion = Completion(chat, job, tokenizer, config.model_id, context)
        if chat.stream:
            return StreamingResponse(completion.sse(first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await completion.whole(first, request)
        if result is None:
            return error(ApiError(499, "client disconnected"))
        return JSONResponse(result)

    return app


async def read_json(request: Request, max_bytes: int):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_bytes:
        raise ApiError(413, f"the request body is {int(size):,} bytes; at most {max_bytes:,} are accepted")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise ApiError(413, f"the request body is over {max_bytes:,} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None


async def next_event(job: Job, request: Request) -> tuple | None:
    """The job's next event, or None when the client went away (the job is then cancelled)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return None


class Completion:
    """One request's reply, as a whole JSON body or as server-sent events in OpenAI's chunk format."""

    def __init__(self, chat: ChatRequest, job: Job, tokenizer, model_id: str, context: int):
        self.chat, self.job, self.model_id, self.context = chat, job, model_id, context
        self.reply = Reply(tokenizer, chat.stop)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.finish_reason = "stop"

    async def events(self, first: tuple, request: Request | None) -> AsyncIterator[list[tuple[str, str]]]:
        """Deltas as they come, until the job ends. A matched stop string cancels the job (the worker stops
        at its next token). With `request`, the client is polled and a disconnect raises ConnectionError;
        however this generator is left early (a disconnect, the server's cancellation), the job is cancelled."""
        event, ended = first, False
        try:
            while True:
                kind, value = event
                if kind == "token":
                    deltas = self.reply.feed(value)
                    if self.reply.stopped:
                        self.job.cancel.set()
                    if deltas:
                        yield deltas
                else:  # "end", or "error" (the reply so far stands, marked as cut short)
                    ended = True
                    deltas = self.reply.finish()
                    self.finish_reason = self._finish_reason(value) if kind == "end" else "length"
                    yield deltas
                    return
                event = await next_event(self.job, request) if request is not None else await self.job.events.get()
                if event is None:
                    raise ConnectionError("client disconnected")
        finally:
            if not ended:
                self.job.cancel.set()

    def _finish_reason(self, end: str) -> str:
        """stop: a stop token or stop string; length: max_tokens, the context or the time limit."""
        if self.reply.stopped:
            return "stop"
        if end == "timeout" or self.job.produced >= self.chat.max_tokens \
                or len(self.chat.prompt) + self.job.produced >= self.context:
            return "length"
        return "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.chat.prompt), "completion_tokens": self.job.produced,
                "total_tokens": len(self.chat.prompt) + self.job.produced}

    async def whole(self, first: tuple, request: Request) -> dict | None:
        try:
            async for _ in self.events(first, request):
                pass
        except ConnectionError:
            return None
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply.text},
                             "logprobs": None, "finish_reason": self.finish_reason}],
                "usage": self.usage()}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def sse(self, first: tuple) -> AsyncIterator[str]:
        # When the client disconnects, Starlette cancels this generator at its next await, and events()
        # cancels the job on the way out.
        yield self._chunk({"role": "assistant", "content": ""})
        async for deltas in self.events(first, None):
            for part, text in deltas:
                yield self._chunk({"content": text, "part": part})
        yield self._chunk({}, self.finish_reason)
        if self.chat.include_usage:
            body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model_id, "choices": [], "usage": self.usage()}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
