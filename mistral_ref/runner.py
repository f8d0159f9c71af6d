"""mistral.rs's Python API: `Runner(which=Which.MistralGGUF(...))` and its completion requests.

A request is checked and becomes a `Submission`: a scheduler Job and how its events become the
API's objects (chunks as they come, or one response at the end). The Runner's scheduler
(mistral_ref.scheduler) runs every started submission in each step, so the choices of one request
(n_choices, best_of), streams iterated side by side, and the server's concurrent requests all
share one forward pass per token.
"""
from __future__ import annotations

import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import Any

import numpy as np

from mistral_ref.api_types import (ChatCompletionChunkResponse, ChatCompletionRequest,
                                   ChatCompletionResponse, Choice, ChunkChoice, CompletionChoice,
                                   CompletionRequest, CompletionResponse, Delta, Logprobs,
                                   ResponseLogprob, ResponseMessage)
from mistral_ref.agentic import ToolCallback, ToolRounds, search_callback_tool
from mistral_ref.chat_template import apply_chat_template, load_chat_template, message_dicts
from mistral_ref.errors import InvalidRequestError, ModelSourceError
from mistral_ref.gguf import DEFAULT_LOAD
from mistral_ref.imatrix import CalibrationStatus, ImportanceRecorder, collect_importance, load_importance
from mistral_ref.imatrix import save_cimatrix as save_cimatrix_file
from mistral_ref.input_files import with_input_files
from mistral_ref.isq import in_situ_quantize, linear_weights
from mistral_ref.model import Model, load_model_file
from mistral_ref.prefix_cache import DEFAULT_ENTRIES, PrefixCache
from mistral_ref.sampler import DRY_SEQUENCE_BREAKERS, GrammarConstraint, SamplingParams, compile_grammar
from mistral_ref.scheduler import Event, Generation, Job, Scheduler, Timing
from mistral_ref.tokenizer import Tokenizer
from mistral_ref.tools import (SEARCH_TOOL, ToolSet, call_grammar, search_tool, check_tools, may_be_call, parse_tool_calls,
                               with_tools)
from mistral_ref.topology import load_topology
from mistral_ref.which import ModelDType, Which, resolve_which  # noqa: F401  (Which: mistralrs's import path)

SYSTEM_FINGERPRINT = "local"
TOKEN_SOURCE = re.compile(r"cache|none|(literal|env|path):.*", re.DOTALL)  # mistral.rs's forms


class PagedCacheType(Enum):
    """mistral.rs's PagedAttention KV cache type (Runner(pa_cache_type=...))."""

    Auto = 0
    F8E4M3 = 1


class Runner:
    """Loads a model and serves completion requests, as `mistralrs.Runner`.

    The positional order is mistralrs 0.9.5's; every argument has a meaning on this engine or is
    refused with an error naming it (docs/api.md has the table). In short:
    which: the model (mistral_ref.which.Which). max_seqs: sequences generating at once (more
    wait). prefix_cache_n: sequences whose KV caches the prefix cache keeps (0: off).
    token_source: checked, never used (nothing is downloaded). chat_template / jinja_explicit: a
    Jinja template or a file holding one (jinja_explicit wins). num_device_layers: "ORD:NUM" or
    "NUM" for device 0 only: the one device. in_situ_quant: an ISQ type (mistral_ref.isq), the
    default of a `Which(topology=...)` file's per-layer types (mistral_ref.topology).
    memory_goal, pa_*: PagedAttention settings, which mistral.rs uses only on CUDA and Metal:
    accepted on the cpu device, where they change nothing. seed: the seed of requests that give
    none (None: fresh entropy). enable_search + search_callback: a search tool answered by the
    callback; tool_callbacks: tool name -> callback(name, arguments) answered by the engine
    (mistral_ref.agentic). Refused: no_kv_cache=True, mtp_model, anymoe_config,
    paged_attn=True, F8E4M3 caches, enable_search without a search_callback, MCP, code execution
    and shell configs. Keyword-only extensions: device ("cpu", "cuda", "reference"),
    activations ("q8", the cpu default: llama.cpp's and mistral.rs's numerics; "f32": exact),
    load ("copy", the default, or "mmap"; GGUF files: mistral_ref.gguf.DEFAULT_LOAD).
    """

    def __init__(self, which: Any, max_seqs: int = 32, no_kv_cache: bool = False,
                 prefix_cache_n: int = DEFAULT_ENTRIES, token_source: str = "cache",
                 mtp_model: str | None = None, mtp_n_predict: int | None = None,
                 chat_template: str | None = None, jinja_explicit: str | None = None,
                 num_device_layers: list[str] | None = None, in_situ_quant: str | None = None,
                 anymoe_config: Any = None, memory_goal: str | float | None = None,
                 pa_blk_size: int | None = None, pa_cache_type: PagedCacheType | None = None,
                 no_paged_attn: bool = False, paged_attn: bool = False, seed: int | None = None,
                 enable_search: bool = False, search_embedding_model: str | None = None,
                 search_callback: Callable[[str], list[dict[str, str]]] | None = None,
                 tool_callbacks: Mapping[str, ToolCallback] | None = None,
                 mcp_client_config: Any = None, code_execution_config: Any = None,
                 shell_config: Any = None, *, pa_gpu_mem: int | None = None,
                 pa_gpu_mem_usage: float | None = None, pa_ctxt_len: int | None = None,
                 device: str = "cpu", activations: str | None = None, load: str = DEFAULT_LOAD):
        _check_options(dict(locals()))
        files = resolve_which(which)
        activations = activations or ("q8" if device == "cpu" else "f32")
        isq = in_situ_quant  # an ISQ name, or with a topology file a per-tensor choice of one
        if files.topology is not None:
            isq = load_topology(files.topology, device).isq_plan(in_situ_quant)
        importance = _importance(files, isq)
        if files.is_checkpoint:
            self.model = Model.from_checkpoint(files.path, device, activations, isq, importance)
        else:
            self.model = Model.from_gguf(files.path, device, activations, load, isq, importance)
        self._files, self._isq, self._recorder = files, isq, None  # for online calibration
        _check_dtype(getattr(which, "dtype", ModelDType.Auto), self.model)
        _check_device_layers(num_device_layers, device, self.model.config.n_layers)
        self.tokenizer = Tokenizer.of_model(self.model.file, files.tokenizer_json)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ModelSourceError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than "
                                   f"the model's {self.model.config.vocab_size}")
        self.chat_template = jinja_explicit or chat_template
        self.repeat_last_n = which.repeat_last_n
        self.model_id = files.model_id
        self.max_seqs = max_seqs
        self.tool_callbacks = dict(tool_callbacks or {})
        self.search_callback = search_callback if enable_search else None
        self._seeds = np.random.SeedSequence(seed)
        self.prefix_cache = PrefixCache(self.model, prefix_cache_n) if prefix_cache_n else None
        self.scheduler = Scheduler(self.model, self.tokenizer, self.prefix_cache, max_seqs=max_seqs)
        self._lock = threading.Lock()  # threads calling send_* share the scheduler: their steps batch

    # -- the documented API ---------------------------------------------------------------------
    def send_chat_completion_request(self, request: ChatCompletionRequest, model_id: str | None = None
                                     ) -> ChatCompletionResponse | Iterator[ChatCompletionChunkResponse]:
        """Generate a chat reply: a ChatCompletionResponse, or with `request.stream` an iterator of
        ChatCompletionChunkResponse (usage on the last chunk). Raises InvalidRequestError (a
        ValueError) naming the bad field before any compute. model_id: None, "default" or
        this Runner's model id (`list_models()`). Tool calls the Runner has callbacks for are
        answered by the engine (mistral_ref.agentic)."""
        self._check_model_id(model_id)
        if not isinstance(request, ChatCompletionRequest):
            raise InvalidRequestError("request", f"expected a ChatCompletionRequest, got {type(request).__name__}")
        request.__post_init__()
        callbacks, extra_tools = dict(self.tool_callbacks), []
        if request.web_search_options is not None:
            if self.search_callback is None:
                raise InvalidRequestError("web_search_options", "needs Runner(enable_search=True, "
                                                                "search_callback=...): mistral-ref does not search the web itself")
            callbacks[SEARCH_TOOL] = search_callback_tool(self.search_callback)
            extra_tools.append(search_tool(getattr(request.web_search_options, "search_description", None)))
        if not callbacks:
            return self._run(self.submit(request))
        rounds = ToolRounds(lambda r: self._run(self.submit(r)), callbacks, request, extra_tools)
        return rounds.chunks() if request.stream else rounds.response()

    def send_completion_request(self, request: CompletionRequest, model_id: str | None = None
                                ) -> CompletionResponse | Iterator[CompletionResponse]:
        """Complete a text prompt: a CompletionResponse; with `request.stream` (an extension) an
        iterator of CompletionResponse chunks. best_of > n_choices samples best_of sequences and
        returns the n_choices with the highest mean token logprob."""
        self._check_model_id(model_id)
        if not isinstance(request, CompletionRequest):
            raise InvalidRequestError("request", f"expected a CompletionRequest, got {type(request).__name__}")
        return self._run(self.submit(request))

    def list_models(self) -> list[str]:
        """The model ids this Runner serves: its one model's."""
        return [self.model_id]

    def get_default_model_id(self) -> str:
        return self.model_id

    def set_default_model_id(self, model_id: str) -> None:
        """Only this Runner's model can be the default (raises ValueError for another)."""
        self._check_model_id(model_id)

    def is_model_loaded(self, model_id: str) -> bool:
        return model_id == self.model_id

    def _check_model_id(self, model_id: str | None) -> None:
        if model_id not in (None, "default", self.model_id):
            raise InvalidRequestError("model_id", f"{model_id!r} is not loaded (this Runner serves "
                                                  f"{self.model_id!r})")

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

    # -- online calibration (mistral.rs's importance matrix from live requests) ----------------
    def begin_calibration(self, model_id: str | None = None) -> CalibrationStatus:
        """Start recording every matmul's input on the requests that run from now on: the
        importance matrix `apply_calibration` requantizes the in-situ quantized weights with."""
        self._check_model_id(model_id)
        if not self._isq:
            raise InvalidRequestError("begin_calibration", "needs a model loaded with in_situ_quant: "
                                                           "calibration requantizes the ISQ weights")
        with self._lock:
            if self._recorder is None:
                self._recorder = ImportanceRecorder(self.model)
                self.model.device = self._recorder
        return self.calibration_status()

    def calibration_status(self, model_id: str | None = None) -> CalibrationStatus:
        """What the calibration has recorded so far (collecting False before begin_calibration)."""
        self._check_model_id(model_id)
        if self._recorder is None:
            return CalibrationStatus(False, len(linear_weights(self.model.config)), 0, 0, 0, 0)
        return self._recorder.status()

    def apply_calibration(self, save_cimatrix: str | None = None, model_id: str | None = None) -> CalibrationStatus:
        """Requantize from the source weights with the importance recorded since
        begin_calibration and put them into the live model (running sequences go on with them;
        the prefix cache is emptied). save_cimatrix: a `.cimatrix` file to write it to. Returns the
        status before applying."""
        status = self.calibration_status(model_id)
        if self._recorder is None:
            raise InvalidRequestError("apply_calibration", "no calibration is running (call begin_calibration)")
        if status.min_rows == 0:
            raise InvalidRequestError("apply_calibration", "no request has run since begin_calibration")
        importance = self._recorder.importance()
        if save_cimatrix is not None:
            save_cimatrix_file(save_cimatrix, importance)
        model, device = self.model, self._recorder.device
        # requantized while requests go on; only the swap holds the lock
        requantized = Model(in_situ_quantize(load_model_file(self._files.path), self._isq, importance=importance),
                            device.name, model.activations)
        with self._lock:
            model.device, self._recorder = device, None
            model.take_weights(requantized)
            if self.prefix_cache is not None:
                self.prefix_cache.entries.clear()  # computed with the old weights
        return status

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

    def step(self, preempt: Callable[[], bool] | None = None) -> None:
        """One forward pass over every started submission (see mistral_ref.scheduler; preempt:
        Scheduler.step's)."""
        with self._lock:
            self.scheduler.step(preempt)

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
        thinking = {name: value for name in ("enable_thinking", "reasoning_effort")
                    if (value := getattr(request, name)) is not None}  # templates test `is defined`
        messages = (with_input_files(request.messages, request.input_files)  # mistral.rs's system message
                    if request.input_files else request.messages)
        prompt_ids = self._chat_prompt(messages, tools if calling else None, **thinking)
        job = self._job(request, prompt_ids, "messages", request.n_choices,
                        request.logprobs, request.top_logprobs or 0,
                        (call_grammar(tools), "json_schema") if calling and tools.forced else None)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                    model=request.model or self.model_id, system_fingerprint=SYSTEM_FINGERPRINT)
        timing = Timing(prompt_tokens=len(job.prompt_ids))
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
        timing = Timing(prompt_tokens=len(job.prompt_ids))
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
    def _chat_prompt(self, messages: list | str, tools: ToolSet | None = None,
                     **variables: Any) -> list[int]:
        """Prompt ids of a chat: messages through the chat template (which also sees the tools and
        `variables`, such as enable_thinking), or a str taken as an already templated prompt."""
        if isinstance(messages, str):  # an already templated prompt
            ids = self.tokenizer.encode(messages, add_special_tokens=False, parse_special=True)
            tok = self.tokenizer
            if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
                ids.insert(0, tok.bos_id)
            return ids
        dicts = message_dicts(messages)
        if tools is None and not any(m.get("tool_calls") or m["role"] == "tool" for m in dicts):
            return apply_chat_template(self.tokenizer, dicts, self.chat_template, **variables)
        source = load_chat_template(self.chat_template, self.tokenizer)
        return apply_chat_template(self.tokenizer, with_tools(dicts, tools, source), source,
                                   tools=tools.tools if tools else None, **variables)

    def _dry_breakers(self, breakers: list[str] | None) -> frozenset[int]:
        """Token ids of DRY sequence breakers (default mistral.rs's "\\n", ":", '"', "*"): the last
        token of "a" + breaker, as mistral.rs and koboldcpp take them."""
        texts = DRY_SEQUENCE_BREAKERS if breakers is None else breakers
        ids = (self.tokenizer.encode("a" + text, add_special_tokens=False) for text in texts)
        return frozenset(i[-1] for i in ids if i)

    def _job(self, request: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
             prompt_field: str, n_sequences: int, logprobs: bool, top_logprobs: int,
             grammar_of_tools: tuple[str, str] | None = None) -> Job:
        """Checks that need the model (vocabulary, context), then the job. Raises InvalidRequestError.
        grammar_of_tools: (grammar, type) constraining the output to a tool call (tool_choice)."""
        vocab, context = self.tokenizer.vocab_size, self.model.config.context_length
        if not prompt_ids:
            raise InvalidRequestError(prompt_field, "the prompt has no tokens")
        if request.truncate_sequence and len(prompt_ids) >= context:  # keep the end, as mistral.rs
            prompt_ids = prompt_ids[-(context - min(request.max_tokens or 1, context - 1)):]
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
            logprob=logprobs or n_sequences > request.n_choices,  # reported, or ranks best_of
            dry_multiplier=request.dry_multiplier,
            dry_base=1.75 if request.dry_base is None else request.dry_base,
            dry_allowed_length=2 if request.dry_allowed_length is None else request.dry_allowed_length,
            dry_breakers=self._dry_breakers(request.dry_sequence_breakers) if request.dry_multiplier else frozenset())
        grammar = None
        source = grammar_of_tools or (request.grammar, request.grammar_type)
        if source[0] is not None:  # compiled once; errors surface now, before any compute
            grammar = compile_grammar(*source)
            GrammarConstraint(self.tokenizer, grammar)
        return Job(prompt_ids, params, request.max_tokens, n_sequences,
                    (frozenset() if request.ignore_eos else self.tokenizer.stop_ids) | set(request.stop_token_ids or ()),
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


# -- Runner arguments ---------------------------------------------------------------------------
_REFUSED = {  # argument -> why this engine cannot honour it when set
    "mtp_model": "multi-token-prediction assistants are not implemented",
    "mtp_n_predict": "multi-token-prediction assistants are not implemented",
    "anymoe_config": "AnyMoE is not implemented",
    "mcp_client_config": "MCP clients are not implemented",
    "code_execution_config": "the code execution tool is not implemented",
    "shell_config": "the shell tool is not implemented",
    "search_embedding_model": "search results are not reranked (the search_callback's order is kept)",
}


def _check_options(options: dict[str, Any]) -> None:
    """Refuse Runner arguments this engine cannot honour, naming them (ValueError)."""
    for name, why in _REFUSED.items():
        if options[name] is not None:
            raise InvalidRequestError(name, why)
    max_seqs = options["max_seqs"]
    if not isinstance(max_seqs, int) or isinstance(max_seqs, bool) or max_seqs < 1:
        raise InvalidRequestError("max_seqs", f"must be an integer >= 1, got {max_seqs!r}")
    if options["no_kv_cache"]:
        raise InvalidRequestError("no_kv_cache", "this engine always keeps a KV cache (outputs are the same)")
    source = options["token_source"]
    if not isinstance(source, str) or not TOKEN_SOURCE.fullmatch(source.strip()):
        raise InvalidRequestError("token_source", f'must be "cache", "none", "literal:<token>", "env:<var>" '
                                                  f'or "path:<file>", got {source!r}')
    if options["paged_attn"] and options["no_paged_attn"]:
        raise InvalidRequestError("paged_attn", "paged_attn and no_paged_attn are mutually exclusive")
    if options["paged_attn"]:
        raise InvalidRequestError("paged_attn", "PagedAttention is not implemented (each sequence has a "
                                                "preallocated KV cache)")
    if options["pa_cache_type"] not in (None, PagedCacheType.Auto):
        raise InvalidRequestError("pa_cache_type", f"{options['pa_cache_type']} KV caches are not "
                                                   "implemented (float32 only)")
    if options["enable_search"] and options["search_callback"] is None:
        raise InvalidRequestError("enable_search", "needs a search_callback: mistral-ref does not search "
                                                   "the web itself")
    callbacks = options["tool_callbacks"]
    if callbacks is not None and not (isinstance(callbacks, Mapping)
                                      and all(isinstance(k, str) and callable(f) for k, f in callbacks.items())):
        raise InvalidRequestError("tool_callbacks", "must map tool names to callables(name, arguments) -> str")


def _check_device_layers(layers: list[str] | None, device: str, n_layers: int) -> None:
    """num_device_layers: ["NUM"] or ["ORD:NUM"] entries; the engine runs one device (ordinal 0).
    On the cpu device every layer is on the CPU, which is what any count amounts to without a
    GPU; on cuda every layer must be on it."""
    if layers is None:
        return
    on_device = 0
    for entry in layers if isinstance(layers, list) else [layers]:
        m = re.fullmatch(r"(?:(\d+):)?(\d+)", str(entry).strip())
        if not m:
            raise InvalidRequestError("num_device_layers", f'entries are "NUM" or "ORD:NUM", got {entry!r}')
        if int(m.group(1) or 0) != 0:
            raise InvalidRequestError("num_device_layers", f"{entry!r}: mistral-ref runs one device (ordinal 0)")
        on_device += int(m.group(2))
    if device == "cuda" and on_device < n_layers:
        raise InvalidRequestError("num_device_layers", f"{on_device} of {n_layers} layers on the GPU: "
                                                       "mistral-ref does not split a model between devices")


def _importance(files, isq) -> dict[str, np.ndarray] | None:
    """The importance matrix ISQ weighs errors by: read from `files.imatrix`, or measured on
    `files.calibration_file` with the unquantized model (mistral_ref.imatrix); None without one."""
    if files.imatrix is None and files.calibration_file is None:
        return None
    what = "imatrix" if files.imatrix is not None else "calibration_file"
    if not isq:
        raise ModelSourceError(f"{what}: an importance matrix weighs in-situ quantization; give in_situ_quant")
    source = load_model_file(files.path)
    if files.imatrix is not None:
        return load_importance(files.imatrix, source.config)
    tokenizer = Tokenizer.of_model(source, files.tokenizer_json)
    text = files.calibration_file.read_text(encoding="utf-8", errors="replace")
    return collect_importance(Model(source, "cpu", "f32"), tokenizer.encode(text), tokenizer.bos_id)


def _check_dtype(dtype: Any, model: Model) -> None:
    """ModelDType.Auto keeps the weights as stored; another dtype must be the stored one."""
    value = getattr(dtype, "value", dtype)
    if value in ("auto", None):
        return
    stored = {t.qtype.name.lower() for t in model.file.tensors.values() if t.qtype.name in ("F32", "F16", "BF16")}
    if stored - {value}:
        raise InvalidRequestError("dtype", f"the weights are {', '.join(sorted(stored))}; converting them to "
                                           f"{value} is not implemented (ModelDType.Auto keeps them; "
                                           "in_situ_quant quantizes them)")
