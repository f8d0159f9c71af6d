"""mistral.rs's Python API: `Runner(which=Which.MistralGGUF(...))` and its completion requests.

A request is checked and becomes a `Submission`: a scheduler Job and how its events become the
API's objects (chunks as they come, or one response at the end). The Runner's scheduler
(mistral_ref.scheduler) runs every started submission in each step, so the choices of one request
(n_choices, best_of), streams iterated side by side, and the server's concurrent requests all
share one forward pass per token.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistral_ref.api_types import (ChatCompletionChunkResponse, ChatCompletionRequest,
                                   ChatCompletionResponse, Choice, ChunkChoice, CompletionChoice,
                                   CompletionRequest, CompletionResponse, Delta, Logprobs,
                                   ResponseLogprob, ResponseMessage)
from mistral_ref.chat_template import apply_chat_template, load_chat_template, message_dicts
from mistral_ref.errors import InvalidRequestError, ModelSourceError
from mistral_ref.model import Model
from mistral_ref.prefix_cache import DEFAULT_ENTRIES, PrefixCache
from mistral_ref.sampler import GrammarConstraint, SamplingParams, compile_grammar
from mistral_ref.scheduler import Event, Generation, Job, Scheduler, Timing
from mistral_ref.tokenizer import Tokenizer
from mistral_ref.tools import (ToolSet, call_grammar, check_tools, may_be_call, parse_tool_calls,
                               with_tools)

SYSTEM_FINGERPRINT = "local"


class Which:
    """Which model to load. Every variant names local files: a directory (`quantized_model_id`)
    holding `quantized_filename`, or the GGUF file itself; `tok_model_id` None (the GGUF's own
    tokenizer) or a local directory with a tokenizer.json; `tokenizer_json` a tokenizer.json file
    overriding the GGUF's vocabulary. A hub model id fails with ModelSourceError."""

    @dataclass(frozen=True)
    class GGUF:
        quantized_model_id: str
        quantized_filename: str | None = None
        tok_model_id: str | None = None
        tokenizer_json: str | None = None
        repeat_last_n: int = 64

    @dataclass(frozen=True)
    class MistralGGUF:
        tok_model_id: str | None
        quantized_model_id: str
        quantized_filename: str | None = None
        tokenizer_json: str | None = None
        repeat_last_n: int = 64

    class LlamaGGUF(MistralGGUF):
        """Same fields as MistralGGUF: both architectures load through one code path."""


def _local(what: str, value: str | os.PathLike) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"{what} {str(value)!r} is not a local file or directory; mistral-ref loads local "
            "files only and never downloads from a model hub (see `mistral-ref fetch` for the "
            "default model)")
    return path


def resolve_which(which: Which.GGUF | Which.MistralGGUF) -> tuple[Path, Path | None]:
    """The GGUF file and the optional tokenizer.json a `Which` names. Raises ModelSourceError."""
    if not isinstance(which, (Which.GGUF, Which.MistralGGUF)):
        raise ModelSourceError(f"unsupported model selection {which!r} (supported: Which.GGUF, "
                               "Which.MistralGGUF, Which.LlamaGGUF)")
    gguf = _local("quantized_model_id", which.quantized_model_id)
    if gguf.is_dir():
        if not which.quantized_filename:
            raise ModelSourceError(f"quantized_filename is needed: {gguf} is a directory")
        gguf = _local("quantized_filename", gguf / which.quantized_filename)
    elif which.quantized_filename and Path(which.quantized_filename).name != gguf.name:
        raise ModelSourceError(f"quantized_model_id is the file {gguf}, but quantized_filename "
                               f"names {which.quantized_filename!r}")
    tokenizer_json = None
    if which.tokenizer_json is not None:
        tokenizer_json = _local("tokenizer_json", which.tokenizer_json)
    elif which.tok_model_id is not None:
        tok_dir = _local("tok_model_id", which.tok_model_id)
        tokenizer_json = _local("tok_model_id's tokenizer.json", tok_dir / "tokenizer.json")
    return gguf, tokenizer_json


class Runner:
    """Loads a model and serves completion requests, as `mistralrs.Runner`.

    which: the model (see `Which`). chat_template: a Jinja template or a file holding one,
    overriding the GGUF's. seed: default random seed of requests that give none (None: fresh
    entropy). device: "cpu", "cuda" or "reference" (kernels.device). activations: "q8" (default on the CPU: activations
    quantized to 8 bits before each quantized matmul, llama.cpp's and mistral.rs's numerics, and
    twice the decode speed) or "f32" (exact float32 arithmetic; the cuda device's only mode).
    token_source: accepted for mistral.rs compatibility; nothing is fetched, so it is not used.
    prefix_cache_n: how many sequences' KV caches the prefix cache keeps (mistral.rs's name and
    default; 0 turns it off): a prompt starting with a cached sequence reuses its keys and values.
    """

    def __init__(self, which: Which.GGUF | Which.MistralGGUF, chat_template: str | None = None,
                 seed: int | None = None, device: str = "cpu", activations: str | None = None,
                 token_source: str = "cache", prefix_cache_n: int = DEFAULT_ENTRIES):
        gguf, tokenizer_json = resolve_which(which)
        activations = activations or ("q8" if device == "cpu" else "f32")
        self.model = Model.from_gguf(gguf, device=device, activations=activations)
        metadata = self.model.file.metadata
        self.tokenizer = (Tokenizer.from_tokenizer_json(tokenizer_json, metadata) if tokenizer_json
                          else Tokenizer.from_metadata(metadata))
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ModelSourceError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than "
                                   f"the model's {self.model.config.vocab_size}")
        self.chat_template = chat_template
        self.repeat_last_n = which.repeat_last_n
        self.model_id = gguf.name
        self._seeds = np.random.SeedSequence(seed)
        self.prefix_cache = PrefixCache(self.model, prefix_cache_n) if prefix_cache_n else None
        self.scheduler = Scheduler(self.model, self.tokenizer, self.prefix_cache)
        self._lock = threading.Lock()  # threads calling send_* share the scheduler: their steps batch

    # -- the documented API ---------------------------------------------------------------------
    def send_chat_completion_request(self, request: ChatCompletionRequest, model_id: str | None = None
                                     ) -> ChatCompletionResponse | Iterator[ChatCompletionChunkResponse]:
        """Generate a chat reply: a ChatCompletionResponse, or with `request.stream` an iterator of
        ChatCompletionChunkResponse (usage on the last chunk). Raises InvalidRequestError (a
        ValueError) naming the bad field before any compute. model_id: accepted for mistralrs
        compatibility; a Runner holds one model."""
        if not isinstance(request, ChatCompletionRequest):
            raise InvalidRequestError("request", f"expected a ChatCompletionRequest, got {type(request).__name__}")
        return self._run(self.submit(request))

    def send_completion_request(self, request: CompletionRequest, model_id: str | None = None
                                ) -> CompletionResponse | Iterator[CompletionResponse]:
        """Complete a text prompt: a CompletionResponse; with `request.stream` (an extension) an
        iterator of CompletionResponse chunks. best_of > n_choices samples best_of sequences and
        returns the n_choices with the highest mean token logprob."""
        if not isinstance(request, CompletionRequest):
            raise InvalidRequestError("request", f"expected a CompletionRequest, got {type(request).__name__}")
        return self._run(self.submit(request))

    def tokenize_text(self, text: str, add_special_tokens: bool, enable_thinking: bool | None = None,
                      model_id: str | None = None) -> list[int]:
        """Token ids of `text` (enable_thinking: accepted for compatibility; no template is applied)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool, model_id: str | None = None) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def max_sequence_length(self, model_id: str | None = None) -> int:
        """The model's context length in tokens."""
        return self.model.config.context_length

    # -- the engine: what a server drives -------------------------------------------------------
    def submit(self, request: ChatCompletionRequest | CompletionRequest,
               strict_context: bool = False) -> Submission:
        """Check `request` (raises InvalidRequestError naming the field) and make it a Submission,
        which `start()` puts in the scheduler; `step()` then advances every started one.

        A max_tokens that does not fit the context after the prompt ends generation at the
        context ("length"); with `strict_context` (the HTTP server: OpenAI's behaviour) it is an
        error instead."""
        request.__post_init__()  # fields may have been changed since construction
        if isinstance(request, ChatCompletionRequest):
            submission = self._chat_submission(request)
        elif isinstance(request, CompletionRequest):
            submission = self._completion_submission(request)
        else:
            raise InvalidRequestError("request", f"expected a ChatCompletionRequest or CompletionRequest, "
                                                 f"got {type(request).__name__}")
        n_prompt, context = len(submission.job.prompt_ids), self.model.config.context_length
        if strict_context and request.max_tokens is not None and n_prompt + request.max_tokens > context:
            raise InvalidRequestError("max_tokens", (
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{n_prompt + request.max_tokens} tokens ({n_prompt} in the prompt, {request.max_tokens} "
                f"in the completion). Please reduce the length of the prompt or completion."))
        return submission

    def step(self) -> None:
        """One forward pass over every started submission (see mistral_ref.scheduler)."""
        with self._lock:
            self.scheduler.step()

    def _run(self, submission: Submission):
        return self._stream(submission) if submission.stream else self._complete(submission)

    def _stream(self, submission: Submission) -> Iterator:
        submission.start()  # on the first next(): an iterator nobody reads costs nothing
        try:
            while True:
                done = submission.done  # seen before draining: every event up to it goes out
                yield from submission.chunks()
                if done:
                    return
                self.step()
        finally:
            submission.cancel()

    def _complete(self, submission: Submission):
        submission.start()
        try:
            while not submission.done:
                self.step()
            return submission.response()
        finally:
            submission.cancel()

    def _chat_submission(self, request: ChatCompletionRequest) -> Submission:
        tools = check_tools(request.tool_schemas, request.tool_choice)
        calling = tools is not None and tools.choice != "none"  # the output may be tool calls
        prompt_ids = self._chat_prompt(request.messages, tools if calling else None)
        job = self._job(request, prompt_ids, "messages", request.n_choices,
                        request.logprobs, request.top_logprobs or 0,
                        (call_grammar(tools), "json_schema") if calling and tools.forced else None)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                    model=request.model or self.model_id, system_fingerprint=SYSTEM_FINGERPRINT)
        timing = Timing(prompt_tokens=len(prompt_ids))
        held: list[str | None] = [""] * job.n_sequences  # with tools: text held back; None once streaming

        def message(text: str, finish_reason: str) -> tuple[str | None, list | None, str]:
            content, calls = parse_tool_calls(text, tools) if calling else (text, [])
            return (content, calls, "tool_calls") if calls else (text, None, finish_reason)

        def chunk(e: Event) -> ChatCompletionChunkResponse | None:
            delta, finish_reason = Delta(e.text), e.finish_reason
            if calling and held[e.index] is not None:
                text = held[e.index] + e.text
                if not may_be_call(text):  # an ordinary reply: out with it, and stream the rest
                    delta, held[e.index] = Delta(text), None
                elif e.finish_reason is None:
                    held[e.index] = text
                    return None
                else:
                    content, calls, finish_reason = message(text, e.finish_reason)
                    delta = Delta(content, tool_calls=calls and [{"index": k, **c} for k, c in enumerate(calls)])
            return ChatCompletionChunkResponse(
                **head, object="chat.completion.chunk",
                choices=[ChunkChoice(finish_reason, e.index, delta, _logprobs(e, job))],
                usage=timing.usage() if e.last else None)

        def response(events: list[Event]) -> ChatCompletionResponse:
            texts, logprobs, finish, _ = _collect(events, job.n_sequences)
            replies = [message(texts[i], finish[i]) for i in range(job.n_sequences)]
            choices = [Choice(finish_reason, i, ResponseMessage(content, tool_calls=calls),
                              Logprobs(logprobs[i]) if job.logprobs else None)
                       for i, (content, calls, finish_reason) in enumerate(replies)]
            return ChatCompletionResponse(**head, object="chat.completion", choices=choices, usage=timing.usage())
        return Submission(self, job, timing, request.stream, chunk, response)

    def _completion_submission(self, request: CompletionRequest) -> Submission:
        text = request.prompt if isinstance(request.prompt, str) else None
        prompt_ids = (self.tokenizer.encode(text, add_special_tokens=True) if text is not None
                      else list(request.prompt))
        bad = [i for i in prompt_ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError("prompt", f"token id {bad[0]} is outside the vocabulary "
                                                f"(0..{self.tokenizer.vocab_size - 1})")
        if text is None:
            text = self.tokenizer.decode(prompt_ids)
        job = self._job(request, prompt_ids, "prompt", request.best_of,
                        request.logprobs is not None, request.logprobs or 0)
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                    model=request.model or self.model_id, system_fingerprint=SYSTEM_FINGERPRINT,
                    object="text_completion")
        prefix = text if request.echo_prompt else ""
        suffix = request.suffix or ""
        timing = Timing(prompt_tokens=len(prompt_ids))
        started = set()

        def chunk(e: Event) -> CompletionResponse:
            text = e.text
            if e.index not in started:
                started.add(e.index)
                text = prefix + text
            if e.finish_reason is not None:
                text += suffix
            return CompletionResponse(**head, choices=[CompletionChoice(e.finish_reason, e.index, text,
                                                                        _logprobs(e, job))],
                                      usage=timing.usage() if e.last else None)

        def response(events: list[Event]) -> CompletionResponse:
            texts, logprobs, finish, mean_logprobs = _collect(events, job.n_sequences)
            ranked = sorted(range(job.n_sequences), key=lambda i: -mean_logprobs[i])
            choices = [CompletionChoice(finish[i], rank, prefix + texts[i] + suffix,
                                        Logprobs(logprobs[i]) if job.logprobs else None)
                       for rank, i in enumerate(ranked[:request.n_choices])]
            return CompletionResponse(**head, choices=choices, usage=timing.usage())
        return Submission(self, job, timing, request.stream, chunk, response)

    # -- checks --------------------------------------------------------------------------------
    def _chat_prompt(self, messages: list | str, tools: ToolSet | None = None) -> list[int]:
        if isinstance(messages, str):  # an already templated prompt
            ids = self.tokenizer.encode(messages, add_special_tokens=False, parse_special=True)
            tok = self.tokenizer
            if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
                ids.insert(0, tok.bos_id)
            return ids
        dicts = message_dicts(messages)
        if tools is None and not any(m.get("tool_calls") or m["role"] == "tool" for m in dicts):
            return apply_chat_template(self.tokenizer, dicts, self.chat_template)
        source = load_chat_template(self.chat_template, self.tokenizer)
        return apply_chat_template(self.tokenizer, with_tools(dicts, tools, source), source,
                                   tools=tools.tools if tools else None)

    def _job(self, request: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
             prompt_field: str, n_sequences: int, logprobs: bool, top_logprobs: int,
             grammar_of_tools: tuple[str, str] | None = None) -> Job:
        """Checks that need the model (vocabulary, context), then the job. Raises InvalidRequestError.
        grammar_of_tools: (grammar, type) constraining the output to a tool call (tool_choice)."""
        vocab, context = self.tokenizer.vocab_size, self.model.config.context_length
        if not prompt_ids:
            raise InvalidRequestError(prompt_field, "the prompt has no tokens")
        if len(prompt_ids) >= context:
            raise InvalidRequestError(prompt_field, f"the prompt has {len(prompt_ids)} tokens; the "
                                                    f"model's context is {context} tokens")
        for name, ids in (("logit_bias", list(request.logit_bias or {})),
                          ("stop_token_ids", request.stop_token_ids or [])):
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidRequestError(name, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        params = SamplingParams(
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
            min_p=request.min_p, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty, repeat_last_n=self.repeat_last_n,
            logit_bias=dict(request.logit_bias or {}), top_logprobs=top_logprobs if logprobs else 0,
            logprob=logprobs or n_sequences > request.n_choices)  # reported, or ranks best_of
        grammar = None
        source = grammar_of_tools or (request.grammar, request.grammar_type)
        if source[0] is not None:  # compiled once; errors surface now, before any compute
            grammar = compile_grammar(*source)
            GrammarConstraint(self.tokenizer, grammar)
        return Job(prompt_ids, params, request.max_tokens, n_sequences,
                    self.tokenizer.stop_ids | set(request.stop_token_ids or ()),
                    list(request.stop_seqs or ()), grammar, request.seed, logprobs)


class Submission:
    """A checked request (`Runner.submit`) and its output as the API's objects. `start()` puts it in
    the Runner's scheduler; then, after each `Runner.step()`, `chunks()` gives a streamed request's
    new chunks, and `response()` a non-streamed one's response once `done`. Both raise the
    request's error if it failed while generating."""

    def __init__(self, runner: Runner, job: Job, timing: Timing, stream: bool,
                 chunk: Callable[[Event], Any], response: Callable[[list[Event]], Any]):
        self.runner, self.job, self.timing, self.stream = runner, job, timing, stream
        self._chunk, self._response = chunk, response
        self.generation: Generation | None = None
        self._events: list[Event] = []  # a non-streamed request's, until its response

    def start(self) -> None:
        with self.runner._lock:
            if self.generation is None:
                seeds = (np.random.SeedSequence(self.job.seed) if self.job.seed is not None
                         else self.runner._seeds.spawn(1)[0])
                self.generation = self.runner.scheduler.submit(self.job, self.timing, seeds)

    @property
    def done(self) -> bool:
        return self.generation is not None and self.generation.done

    def chunks(self) -> Iterator:
        """The chunks of the events not yet taken (streamed requests), to the last one made,
        even while this iterator was paused (the caller checks `done` before, not after)."""
        events = self.generation.events if self.generation is not None else deque()
        while events:
            chunk = self._chunk(events.popleft())
            if chunk is not None:  # None: held back (a reply that may be a tool call)
                yield chunk
        self._raise_error()

    def response(self):
        """The whole response (non-streamed requests, once done)."""
        self._events += self._take()
        self._raise_error()
        return self._response(self._events)

    def cancel(self) -> None:
        """Stop generating (the client went away); a no-op once done."""
        if self.generation is not None:
            with self.runner._lock:
                self.runner.scheduler.cancel(self.generation)

    def _take(self) -> list[Event]:
        if self.generation is None:
            return []
        events = list(self.generation.events)
        self.generation.events.clear()
        return events

    def _raise_error(self) -> None:
        if self.generation is not None and self.generation.error is not None:
            raise self.generation.error


def _logprobs(event: Event, job: Job) -> Logprobs | None:
    return Logprobs([event.logprob]) if job.logprobs and event.logprob is not None else None


def _collect(events: Iterator[Event], n: int
             ) -> tuple[list[str], list[list[ResponseLogprob]], list[str], list[float]]:
    """Per sequence: its text, logprob entries, finish reason and mean token logprob."""
    texts, logprobs, finish = [""] * n, [[] for _ in range(n)], [""] * n
    sums, counts = [0.0] * n, [0] * n
    for e in events:
        texts[e.index] += e.text
        if e.logprob is not None:
            logprobs[e.index].append(e.logprob)
        if e.token_logprob is not None:
            sums[e.index] += e.token_logprob
            counts[e.index] += 1
        if e.finish_reason is not None:
            finish[e.index] = e.finish_reason
    return texts, logprobs, finish, [s / max(1, c) for s, c in zip(sums, counts)]
