"""OpenAI-compatible HTTP server (mistral.rs's `mistralrs-server`): FastAPI in front of one Runner.

Threads: uvicorn's event loop parses requests and writes responses; one engine thread owns the
Runner and does all model work, so /health and bad requests are answered while a generation runs.
Requests reach the engine through a bounded queue (503 when it is full). Each round of the engine
is one batched forward pass over every running request's sequences (continuous batching, see
mistral_ref.scheduler), prompts read in chunks between decode tokens.

Request validation and the response JSON are the Runner's (`ChatCompletionRequest.from_openai`,
`response.to_dict()`); this module adds routing, authentication, Server-Sent Events and OpenAI's
error shape. No traceback reaches a client: unexpected exceptions are logged and answered with a
bare 500.

The routes, exception handlers and checks are module-level functions; what the routes share (the
Runner, the engine, the served model's name, the API key) is one `ServerState` per app, kept on
`app.state.server`. `create_app` only builds that state and wires the app together.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path  # Swagger UI 5's files (swagger-ui-bundle-v2 on PyPI)

from mistral_ref.api_types import (ChatCompletionChunkResponse, ChatCompletionRequest,
                                   ChatCompletionResponse, CompletionRequest, CompletionResponse, Usage,
                                   completion_requests, sum_usage)
from mistral_ref.errors import InvalidRequestError, MistralRefError
from mistral_ref.prefix_cache import DEFAULT_ENTRIES
from mistral_ref.runner import Runner, Submission

log = logging.getLogger("mistral_ref.server")

DEFAULT_KEEP_ALIVE_MS = 10_000  # mistral.rs's default; KEEP_ALIVE_INTERVAL overrides it
MAX_BODY_BYTES = 4 << 20
ENGINE_SWITCH_INTERVAL_S = 0.0005  # see serve()
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


# -- errors in OpenAI's shape ---------------------------------------------------------------------
class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(e: BaseException) -> APIError:
    """The APIError a client sees for an exception raised while serving it."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, MistralRefError) and isinstance(e, ValueError):  # bad input found by the model side
        return APIError(400, str(e))
    return APIError(500, "internal server error", type="server_error")


def _log_unexpected(e: BaseException) -> None:
    if api_error(e).status == 500:
        log.error("internal error while generating", exc_info=e)


# -- the engine -----------------------------------------------------------------------------------
_DONE = object()  # end of a job's events


class Job:
    """One request on its way through the engine, and the events the engine sends back for it.

    submit: checks the request and returns the Runner's Submission (raises on a bad request).
    Events, posted by the engine and read on the event loop with `get()`: ("accepted", None) once
    a stream's request has been checked, ("chunk", dict) per streamed chunk, ("result", dict),
    ("error", exception), and _DONE last.
    """

    def __init__(self, submit: Callable[[], Submission], stream: bool, loop: asyncio.AbstractEventLoop,
                 to_json: Callable[[Any], dict] = lambda response: response.to_dict()):
        self.submit, self.stream, self.loop, self.to_json = submit, stream, loop, to_json
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()  # set by the client side: stop generating for it
        self.submission: Submission | None = None

    async def get(self, timeout: float | None = None) -> tuple[Any, Any] | None:
        """The next event; None once `timeout` s have passed without one."""
        if timeout is None or not self.events.empty():
            return await self.events.get()
        try:
            async with asyncio.timeout(timeout):  # a timer, where wait_for made a task per event
                return await self.events.get()
        except TimeoutError:
            return None


def _receive(events: list[tuple[Job, Any, Any]]) -> None:
    """On the event loop: a round's events into their jobs' queues."""
    for job, kind, value in events:
        job.events.put_nowait((kind, value))


class QueueFullError(APIError):
    def __init__(self, capacity: int):
        super().__init__(503, f"the server is busy ({capacity} requests queued or running); retry later",
                         type="server_error", code="queue_full")


class Engine:
    """The one thread that runs the Runner: continuous batching over HTTP requests.

    Up to `max_running` requests, streamed or not, generate at once; each round is one
    `Runner.step()` (one forward pass over all their sequences, prompts read in chunks between
    decode tokens), after which every request's new chunks go out. At most `max_queue` more
    requests wait, checked, for a running slot. A request whose client hangs up is cancelled at
    the next round; one that fails ends alone.
    """

    def __init__(self, runner: Runner, max_queue: int = 32, max_running: int = 8):
        if max_queue < 0 or max_running < 1:
            raise ValueError(f"need max_queue >= 0 and max_running >= 1, got {max_queue}, {max_running}")
        self.runner, self.max_queue, self.max_running = runner, max_queue, max_running
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()  # checked and waiting for a running slot
        self.running: list[Job] = []
        self.n_jobs = 0  # submitted and not finished: bounded by max_queue + max_running
        self.n_chunks = 0  # chunks streamed since start (lets a test see that a cancel stopped work)
        self.n_cancelled = 0  # requests ended because their client went away
        self.prefix_cache_stats: dict[str, int] = {}  # a snapshot, for /health on the event loop
        self.outbox: list[tuple[Job, Any, Any]] = []  # events not yet posted to the event loop
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mistral-ref-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left and end the thread; waits up to `timeout` s for a forward to end."""
        self.stopping.set()
        self.inbox.put(None)
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFullError (503) when the engine has no room."""
        capacity = self.max_queue + self.max_running
        with self.lock:
            if self.stopping.is_set():
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if self.n_jobs >= capacity:
                raise QueueFullError(capacity)
            self.n_jobs += 1
        self.inbox.put(job)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            n_jobs = self.n_jobs
        running = len(self.running)
        return {"running": running, "queued": max(0, n_jobs - running), "streamed_chunks": self.n_chunks,
                "cancelled": self.n_cancelled, "steps": self.runner.scheduler.n_steps,
                "preempted_steps": self.runner.scheduler.n_preempted,
                "prefix_cache": self.prefix_cache_stats}

    # everything below runs on the engine thread
    def _loop(self) -> None:
        while not self.stopping.is_set():
            self._take_inbox(block=not self.running and not self.waiting)
            while self.waiting and len(self.running) < self.max_running:
                self._admit(self.waiting.popleft())
            for job in [j for j in self.running if j.cancelled.is_set()]:
                self.n_cancelled += 1
                self._finish(job)
            self._post()
            if self.running:
                try:
                    self.runner.step(preempt=self._request_waiting)
                except Exception as e:  # a bug: every running request gets its 500, the server lives on
                    for job in list(self.running):
                        self._finish(job, e)
                for job in list(self.running):
                    self._deliver(job)
                if self.runner.prefix_cache is not None:
                    self.prefix_cache_stats = self.runner.prefix_cache.stats()
                self._post()
        shutting_down = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        for job in self.running + list(self.waiting):
            self._finish(job, shutting_down)
        while (job := self._inbox_get(block=False)) is not None:
            self._finish(job, shutting_down)
        self._post()

    def _send(self, job: Job, kind: Any, value: Any = None) -> None:
        self.outbox.append((job, kind, value))

    def _post(self) -> None:
        """Hand the events of a round to the event loop at once: one wake-up of the loop, and one
        hand-over of the GIL, for all the round's chunks instead of one per chunk."""
        if not self.outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for event in self.outbox:
            by_loop.setdefault(event[0].loop, []).append(event)
        self.outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_receive, events)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                for job, _, _ in events:
                    job.cancelled.set()

    def _request_waiting(self) -> bool:
        """Whether a request has arrived that could start running now (asked during a step)."""
        return not self.inbox.empty() and len(self.running) + len(self.waiting) < self.max_running

    def _inbox_get(self, block: bool) -> Job | None:
        try:
            return self.inbox.get(block=block, timeout=1.0 if block else None)
        except queue.Empty:
            return None

    def _take_inbox(self, block: bool) -> None:
        """Move new jobs to `waiting`, checked now: a bad request gets its 400, and a stream its
        response headers, without waiting for a running slot."""
        job = self._inbox_get(block)
        while job is not None:
            if job.cancelled.is_set():
                self._finish(job)
            else:
                try:
                    job.submission = job.submit()
                except Exception as e:
                    self._finish(job, e)
                else:
                    if job.stream:
                        self._send(job, "accepted")
                    self.waiting.append(job)
            job = self._inbox_get(block=False)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            return self._finish(job)
        job.submission.start()
        self.running.append(job)

    def _deliver(self, job: Job) -> None:
        """What the last step made for `job`: its chunks, or its response once done."""
        submission = job.submission
        try:
            if submission.stream:
                for chunk in submission.chunks():
                    self.n_chunks += 1
                    self._send(job, "chunk", job.to_json(chunk))
            elif submission.done:
                self._send(job, "result", job.to_json(submission.response()))
        except Exception as e:
            return self._finish(job, e)
        if submission.done:
            self._finish(job)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        if error is not None:
            _log_unexpected(error)
        if job.submission is not None:
            job.submission.cancel()  # a no-op when it finished
        if error is not None:
            self._send(job, "error", error)
        self._send(job, _DONE)
        if job in self.running:
            self.running.remove(job)
        with self.lock:
            self.n_jobs -= 1


# -- HTTP -----------------------------------------------------------------------------------------
def _keep_alive_seconds() -> float:
    raw = os.environ.get("KEEP_ALIVE_INTERVAL", "")
    try:
        ms = int(raw) if raw else DEFAULT_KEEP_ALIVE_MS
    except ValueError:
        raise ValueError(f"KEEP_ALIVE_INTERVAL must be milliseconds (an integer), got {raw!r}") from None
    if ms <= 0:
        raise ValueError(f"KEEP_ALIVE_INTERVAL must be > 0 ms, got {ms}")
    return ms / 1000


async def _read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON: 413 past `max_bytes`, 422 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {max_bytes} bytes",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise APIError(413, f"request body is over the limit of {max_bytes} bytes",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(422, f"request body is not valid JSON: {e}", code="invalid_json") from None


def _sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


@dataclass(frozen=True)
class ServerState:
    """What the routes share: one per app, built by `create_app` and kept on `app.state.server`, so
    the routes can be plain module-level functions."""

    runner: Runner
    engine: Engine
    served_id: str  # the model's name in /v1/models and in requests
    api_key: str | None  # None: no authentication
    keep_alive: float  # seconds between `: keep-alive` comments of a stream with nothing new
    created: int  # the model card's `created`: when the app was built
    max_body_bytes: int


async def _server_state(request: Request) -> ServerState:
    """The app's ServerState, for the routes (as StateDep); async, so FastAPI calls it on the event
    loop rather than in a worker thread."""
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(_server_state)]


# exception handlers: whatever goes wrong, the client gets OpenAI's error shape
async def _on_api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response()


async def _on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors: mainly an unknown route (404) or a known one with the wrong method (405)."""
    message = (f"no route {request.method} {request.url.path}" if e.status_code in (404, 405)
               else str(e.detail))
    return APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()


async def _on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return APIError(422, f"invalid request: {e.errors()}").response()


async def _on_error(request: Request, e: Exception) -> JSONResponse:
    return api_error(e).response()


_EXCEPTION_HANDLERS: dict[Any, Callable[..., Any]] = {
    APIError: _on_api_error,
    StarletteHTTPException: _on_http_error,
    RequestValidationError: _on_validation_error,
    MistralRefError: _on_error,  # mostly bad input found by the Runner (400): not logged as a crash
    Exception: _on_error,  # a bug: Starlette logs the traceback; the client gets a bare 500
}


def _check_api_key(state: StateDep, request: Request) -> None:
    """The /v1 router's dependency: with an API key set, 401 unless the request bears it."""
    if state.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
        raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


def _check_model(body: Any) -> None:
    """One model is served, whatever name a request gives it ("", "default", "mistral", the
    served id: mistral.rs's examples use all of these); the response names the served id."""
    model = body.get("model", "") if isinstance(body, dict) else ""
    if not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {model!r}", param="model")


def _include_usage(body: Any) -> bool:
    """Whether the client asked for OpenAI's separate usage chunk (`stream_options`)."""
    options = body.get("stream_options") if isinstance(body, dict) else None
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, f"stream_options must be {{\"include_usage\": true|false}}, got {options!r}",
                       param="stream_options")
    return options.get("include_usage", False)


async def _handle(request: Request, state: ServerState, body: Any, build: Callable[[dict], Any]) -> Response:
    """Run a generation request on the engine: its JSON once done, or its SSE once the engine has
    checked it (so a bad value is still a 400, not an error event)."""
    _check_model(body)
    include_usage = _include_usage(body)
    if isinstance(body, dict):
        body = {**body, "model": state.served_id}
    reqs = build(body)  # raises InvalidRequestError: 400
    req = reqs[0]
    completions = isinstance(req, CompletionRequest)
    shape = _OpenAILogprobs(state.runner.tokenizer, completions, len(req.prompt) if completions
                            and isinstance(req.prompt, str) else 0)

    def submit() -> Any:
        parts = [state.runner.submit(r, strict_context=True) for r in reqs]
        return parts[0] if len(parts) == 1 else _Prompts(parts, req.n_choices)
    job = Job(submit, req.stream, asyncio.get_running_loop(), lambda response: shape(response.to_dict()))
    state.engine.submit(job)
    if not req.stream:
        return await _wait_result(request, job)
    kind, value = await job.get()
    if kind != "accepted":
        raise api_error(value) if kind == "error" else APIError(
            503, "the server is shutting down", type="server_error", code="shutting_down")
    return StreamingResponse(_stream(job, include_usage, state.keep_alive), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Prompts:
    """The submissions of one completions request's prompts (OpenAI's `prompt` list) as one:
    prompt i's choices get indexes i * n .. i * n + n - 1, and the usage, summed over the
    prompts, comes with the last chunk or the response."""

    def __init__(self, parts: list[Submission], n: int):
        self.parts, self.n, self.stream = parts, n, parts[0].stream
        self.usages: list[Usage | None] = [None] * len(parts)

    @property
    def done(self) -> bool:
        return all(part.done for part in self.parts)

    def start(self) -> None:
        for part in self.parts:
            part.start()

    def cancel(self) -> None:
        for part in self.parts:
            part.cancel()

    def chunks(self) -> Iterator[CompletionResponse]:
        ready = []
        for i, part in enumerate(self.parts):
            for chunk in part.chunks():
                self._renumber(i, chunk)
                self.usages[i], chunk.usage = chunk.usage or self.usages[i], None
                ready.append(chunk)
        if ready and self.done:
            ready[-1].usage = sum_usage(self.usages)
        yield from ready

    def response(self) -> CompletionResponse:
        responses = [part.response() for part in self.parts]
        for i, response in enumerate(responses):
            self._renumber(i, response)
        return dataclasses.replace(responses[0], choices=[c for r in responses for c in r.choices],
                                   usage=sum_usage([r.usage for r in responses]))

    def _renumber(self, i: int, response: CompletionResponse) -> None:
        for choice in response.choices:
            choice.index += i * self.n


class _OpenAILogprobs:
    """Logprobs in OpenAI's HTTP types (the Python API keeps the seed's): a chat alternative's
    `token` is its text and `bytes` its UTF-8 bytes, with the token id kept as `id`; completions
    get the legacy object {tokens, token_logprobs, top_logprobs (text -> logprob), text_offset},
    offsets counted in characters from the start of the prompt, across a stream's chunks."""

    def __init__(self, tokenizer: Any, completions: bool, prompt_chars: int):
        self.tokenizer, self.completions, self.prompt_chars = tokenizer, completions, prompt_chars
        self.next_offset: dict[int, int] = {}  # choice index -> its next token's text_offset

    def __call__(self, data: dict) -> dict:
        for choice in data.get("choices", []):
            if choice.get("logprobs") is None:
                continue
            content = choice["logprobs"]["content"] or []
            if self.completions:
                choice["logprobs"] = self._legacy(choice["index"], content)
                continue
            for entry in content:
                entry["top_logprobs"] = [
                    {"token": top["bytes"], "logprob": top["logprob"],
                     "bytes": list(self.tokenizer.token_bytes(top["token"])), "id": top["token"]}
                    for top in entry["top_logprobs"]]
        return data

    def _legacy(self, index: int, content: list[dict]) -> dict:
        offsets, at = [], self.next_offset.get(index, self.prompt_chars)
        for entry in content:
            offsets.append(at)
            at += len(entry["token"])
        self.next_offset[index] = at
        return {"tokens": [entry["token"] for entry in content],
                "token_logprobs": [entry["logprob"] for entry in content],
                "top_logprobs": [{top["bytes"]: top["logprob"] for top in entry["top_logprobs"]}
                                 for entry in content],
                "text_offset": offsets}


# /docs: request bodies field by field (the seed's ChatCompletionRequest, spelled as OpenAI's
# JSON, with the seed's comments as descriptions) and by example; responses by the schema
# pydantic derives from the response dataclasses.
_SCHEMAS: dict[str, Any] = {}  # the response schemas' shared definitions, for `_openapi`
_NULLABLE_NUMBER, _NULLABLE_INT = {"type": ["number", "null"]}, {"type": ["integer", "null"]}
_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "integer"},
                   {"type": "array", "items": {"type": "integer"}}, {"type": "null"}]}
_SAMPLING_FIELDS: dict[str, tuple[dict, Any, str]] = {  # name: (schema, default, description)
    "model": ({"type": "string"}, "", "Any name: the one loaded model is served."),
    "max_tokens": ({**_NULLABLE_INT, "minimum": 0}, None,
                   "Most tokens to generate (None: up to the context); prompt + max_tokens must fit "
                   "the context. Also `max_completion_tokens`."),
    "n": ({"type": "integer", "minimum": 1}, 1, "Default 1. Choices to generate."),
    "temperature": ({**_NULLABLE_NUMBER, "minimum": 0}, 1, "Default 1. 0: greedy."),
    "top_p": ({**_NULLABLE_NUMBER, "exclusiveMinimum": 0, "maximum": 1}, 1, "Default 1."),
    "top_k": ({**_NULLABLE_INT, "minimum": -1}, -1, "Default -1 to consider all."),
    "min_p": ({**_NULLABLE_NUMBER, "minimum": 0, "exclusiveMaximum": 1}, None, "Minimum probability "
              "relative to the most likely token."),
    "presence_penalty": ({**_NULLABLE_NUMBER, "minimum": -2, "maximum": 2}, None, "OpenAI's."),
    "frequency_penalty": ({**_NULLABLE_NUMBER, "minimum": -2, "maximum": 2}, None, "OpenAI's."),
    "repetition_penalty": ({**_NULLABLE_NUMBER, "exclusiveMinimum": 0}, None, "llama.cpp's, over "
                           "the last 64 tokens."),
    "logit_bias": ({"type": ["object", "null"], "additionalProperties": {"type": "number"}}, None,
                   "Token id (as a string) -> bias added to its logit."),
    "stop": (_STOP, None, "Strings, or token ids, that end the output."),
    "seed": ({**_NULLABLE_INT, "minimum": 0}, None, "Makes sampling reproducible."),
    "stream": ({"type": "boolean"}, False, "Server-Sent Events, ending with `data: [DONE]`."),
    "stream_options": ({"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
                       None, "`include_usage`: the usage in a last chunk of its own."),
    "grammar": ({"anyOf": [{"type": "string"}, {"type": "object", "properties": {
        "type": {"enum": ["regex", "json_schema", "lark", "llguidance"]}, "value": {}}}, {"type": "null"}]},
        None, "A grammar the output must match: a string with `grammar_type`, or mistral.rs's "
              "{type, value}."),
    "grammar_type": ({"enum": ["regex", "json_schema", "lark", "llguidance", None]}, None,
                     "The string grammar's type."),
    "response_format": ({"type": ["object", "null"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]}, "json_schema": {"type": "object"}}},
        None, "OpenAI's: text, json_object (any JSON object), json_schema (its `schema`)."),
    "dry_multiplier": ({**_NULLABLE_NUMBER, "minimum": 0}, None, "DRY repetition penalty (mistral.rs's); "
                       "off when null or 0."),
    "dry_base": ({**_NULLABLE_NUMBER, "minimum": 1}, None, "DRY base, default 1.75."),
    "dry_allowed_length": ({**_NULLABLE_INT, "minimum": 0}, None, "Repeats DRY lets pass, default 2."),
    "dry_sequence_breakers": ({"type": ["array", "null"], "items": {"type": "string"}}, None,
                              "Strings that end a DRY repeat (default newline, colon, quote, star)."),
    "ignore_eos": ({"type": "boolean"}, False, "Do not stop at the model's end-of-generation tokens."),
    "truncate_sequence": ({"type": "boolean"}, False, "Cut a prompt that does not fit the context "
                          "from its start instead of refusing it."),
}
_CHAT_FIELDS = {
    "messages": ({"anyOf": [{"type": "array", "items": {"type": "object", "required": ["role", "content"],
                                                       "properties": {"role": {"type": "string"}, "content": {}}}},
                            {"type": "string"}]}, None,
                 "The conversation ({role, content}; content a string, or text parts and, in user "
                 "messages, `file` parts {filename, file_data}: input files), or an "
                 "already templated prompt."),
    **_SAMPLING_FIELDS,
    "logprobs": ({"type": "boolean"}, False, "Default false."),
    "top_logprobs": ({**_NULLABLE_INT, "minimum": 0, "maximum": 20}, None, "Alternatives per token."),
    "enable_thinking": ({"type": ["boolean", "null"]}, None, "Passed to the chat template."),
    "reasoning_effort": ({"enum": ["off", "none", "low", "medium", "high", "xhigh", None]}, None,
                         "Passed to the chat template."),
}
_COMPLETION_FIELDS = {
    "prompt": ({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}},
                          {"type": "array", "items": {"anyOf": [{"type": "string"},
                                                                {"type": "array", "items": {"type": "integer"}}]}}]},
               None, "Text or token ids, or a list of them (one set of choices each)."),
    **_SAMPLING_FIELDS,
    "best_of": ({"type": "integer", "minimum": 1}, 1, "Candidates generated; the n best are returned."),
    "echo": ({"type": "boolean"}, False, "Prefix the prompt to the text."),
    "suffix": ({"type": ["string", "null"]}, None, "Appended to the text."),
    "logprobs": ({**_NULLABLE_INT, "minimum": 0, "maximum": 20}, None, "Alternatives per token."),
}


def _request_body(fields: dict[str, tuple[dict, Any, str]], required: str,
                  example: dict[str, Any]) -> dict[str, Any]:
    """An operation's JSON body for /docs: every field's schema, default and description, and an
    example. The routes parse the body themselves (`from_openai`): this only documents it."""
    properties = {name: {**schema, "default": default, "description": text}
                  for name, (schema, default, text) in fields.items()}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "required": [required], "properties": properties},
        "example": example}}}}


def _responses(*classes: type) -> dict[int, Any]:
    """The 200 response: JSON of the first class, SSE chunks of the second. Their `$defs` go to
    _SCHEMAS, since FastAPI does not know of schemas it did not derive itself."""
    content = {}
    for cls, media in zip(classes, ("application/json", "text/event-stream")):
        schema = TypeAdapter(cls).json_schema(mode="serialization",
                                              ref_template="#/components/schemas/{model}")
        _SCHEMAS.update(schema.pop("$defs", {}))
        content[media] = {"schema": schema}
    return {200: {"description": "OpenAI-compatible response (a stream: one chunk per `data:` line)",
                  "content": content}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document (built once) with _SCHEMAS added to its components."""
    if app.openapi_schema is None:
        FastAPI.openapi(app)
        app.openapi_schema.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
    return app.openapi_schema


# routes: the OpenAI API under /v1, behind the API key when one is set; /health and /docs never are
_v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])
_root = APIRouter()


@_v1.post("/chat/completions", openapi_extra=_request_body(_CHAT_FIELDS, "messages",
    {"model": "", "messages": [{"role": "system", "content": "You are Mistral.rs, an AI assistant."},
                               {"role": "user", "content": "Write a story about Rust error handling."}],
     "max_tokens": 32}), responses=_responses(ChatCompletionResponse, ChatCompletionChunkResponse))
async def chat_completions(request: Request, state: StateDep) -> Response:
    """Process an OpenAI compatible chat request; with `"stream": true`, Server-Sent Events
    of chat.completion.chunk objects ending with `data: [DONE]`."""
    body = await _read_json(request, state.max_body_bytes)
    return await _handle(request, state, body, lambda b: [ChatCompletionRequest.from_openai(b)])


@_v1.post("/completions", openapi_extra=_request_body(_COMPLETION_FIELDS, "prompt",
    {"model": "", "prompt": "What is Rust?", "max_tokens": 32, "temperature": 0}),
    responses=_responses(CompletionResponse, CompletionResponse))
async def completions(request: Request, state: StateDep) -> Response:
    """Process an OpenAI compatible text completion request (streaming supported)."""
    body = await _read_json(request, state.max_body_bytes)
    return await _handle(request, state, body, completion_requests)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.served_id, "object": "model", "created": state.created, "owned_by": "local"}


@_v1.get("/models")
async def models(state: StateDep) -> dict[str, Any]:
    """Returns the running models."""
    return {"object": "list", "data": [_model_card(state)]}


@_v1.get("/models/{model}")
async def model(model: str, state: StateDep) -> dict[str, Any]:
    """Returns one running model (the list's one entry: requests may name it anything, but a
    lookup by id finds only its id)."""
    if model not in ("", "default", state.served_id):
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.served_id!r}",
                       param="model", code="model_not_found")
    return _model_card(state)


@_root.get("/health")
async def health(state: StateDep) -> dict[str, Any]:
    """Returns the server health; answers while a generation runs."""
    return {"status": "ok", "model": state.served_id, **state.engine.stats()}


@_root.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    """Returns OpenAPI API docs (Swagger UI, served from this server)."""
    return get_swagger_ui_html(openapi_url=request.app.openapi_url, title="mistral-ref API",
                               swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
                               swagger_css_url="/static/swagger-ui/swagger-ui.css",
                               swagger_favicon_url="/static/swagger-ui/favicon-32x32.png")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine thread runs while the app is served (uvicorn enters and leaves this)."""
    engine = app.state.server.engine
    engine.start()
    yield
    engine.stop()


def create_app(runner: Runner, model_id: str | None = None, api_key: str | None = None,
               max_queue: int = 32, max_running: int = 8, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `runner` under the name `model_id` (default: the GGUF file's name).

    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`. The engine thread starts and
    stops with the app's lifespan (uvicorn runs it).
    """
    state = ServerState(runner=runner, served_id=model_id or runner.model_id, api_key=api_key,
                        keep_alive=_keep_alive_seconds(),
                        engine=Engine(runner, max_queue=max_queue, max_running=max_running),
                        created=int(time.time()), max_body_bytes=max_body_bytes)
    app = FastAPI(title="mistral-ref", version="0.1.0", lifespan=_lifespan, docs_url=None,
                  redoc_url=None, description=__doc__.split("\n\n")[0],
                  exception_handlers=_EXCEPTION_HANDLERS)
    app.state.server = state
    app.openapi = partial(_openapi, app)
    # The Swagger UI page loads its script and style from here, not from a CDN: /docs works offline.
    app.mount("/static/swagger-ui", StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")
    app.include_router(_v1)
    app.include_router(_root)
    return app


async def _wait_result(request: Request, job: Job) -> Response:
    """A non-streamed job's JSON; a client that hangs up before its turn is dropped from the queue."""
    try:
        while True:
            event = await job.get(DISCONNECT_POLL_S)
            if event is None:
                if await request.is_disconnected():
                    job.cancelled.set()
                continue
            kind, value = event
            if kind == "result":
                return JSONResponse(value)
            if kind == "error":
                raise api_error(value)
            if kind is _DONE:  # cancelled
                return APIError(499, "client closed the request", code="cancelled").response()
    finally:
        job.cancelled.set()


async def _stream(job: Job, include_usage: bool, keep_alive: float) -> AsyncIterator[bytes]:
    """SSE of a stream's chunks. The client hanging up ends this generator (Starlette cancels it or
    closes it), and the `finally` cancels the job so the engine stops generating for it."""
    try:
        while True:
            event = await job.get(keep_alive)
            if event is None:
                yield b": keep-alive\n\n"
                continue
            kind, value = event
            if kind == "chunk":
                if include_usage and value.get("usage") is not None:
                    # OpenAI's shape: the usage in a last chunk of its own, with no choices
                    yield _sse({**value, "usage": None})
                    yield _sse({**value, "choices": [], "usage": value["usage"]})
                else:
                    yield _sse(value)
            elif kind == "error":
                yield _sse(api_error(value).body())
            elif kind is _DONE:
                yield _sse("[DONE]")
                return
    finally:
        job.cancelled.set()


T = TypeVar("T")


def in_passing_thread(load: Callable[[], T]) -> T:
    """load() run on a thread of its own that then ends; its result, or its exception raised here.

    The engine thread must be the only thread that starts the kernels' parallel regions: GNU
    OpenMP keeps a pool of workers for every thread that started one, and once it manages more
    threads than there are CPUs its idle workers sleep after 100 spins instead of 300,000, so
    every region wakes them from sleep. Loading with in-situ quantization runs parallel
    quantizers; on the main thread (which lives on) that left a decode step 2.7x slower on the
    engine thread (SmolLM2, 2 cores: 72 -> 27 tok/s). A thread's pool ends with the thread."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, load()))
        except BaseException as e:  # noqa: BLE001 (re-raised on the calling thread)
            outcome.append((False, e))
    thread = threading.Thread(target=run, name="mistral-ref-load")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def serve(model_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, model_id: str | None = None, max_queue: int = 32,
          max_running: int = 8, chat_template: str | None = None, seed: int | None = None,
          shutdown_timeout: float = 10.0, log_level: str = "info",
          prefix_cache_n: int = DEFAULT_ENTRIES, in_situ_quant: str | None = None) -> None:
    """Load the model (a GGUF file or a checkpoint directory) and serve it until SIGINT/SIGTERM.
    In-flight requests then get up to `shutdown_timeout` s to finish; what is left is cancelled.
    prefix_cache_n: sequences the prefix cache keeps (0: off); in_situ_quant: an ISQ type."""
    import uvicorn

    from mistral_ref.which import which_of_path

    runner = in_passing_thread(lambda: Runner(which=which_of_path(model_path), chat_template=chat_template,
                                              seed=seed, prefix_cache_n=prefix_cache_n,
                                              in_situ_quant=in_situ_quant))
    app = create_app(runner, model_id=model_id, api_key=api_key, max_queue=max_queue,
                     max_running=max_running)
    engine = app.state.server.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn stops accepting and waits for open responses; past the timeout the engine
            # ends what still runs with a 503 error event, so a stream closes properly.
            if not self.should_exit:
                timer = threading.Timer(shutdown_timeout, engine.stop)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    # uvicorn's own cancel is only the backstop for a forward pass that outlasts the engine's stop.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 10)
    # The engine thread drops the GIL in every kernel (~300 a step) and must take it back from the
    # event loop each time: with CPython's default 5 ms switch interval a busy loop held it that
    # long (one stream over HTTP: 119 -> 143 tok/s at 0.5 ms; docs/server.md).
    sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)
    Server(config).run()


__all__ = ["APIError", "Engine", "Job", "create_app", "in_passing_thread", "serve"]
