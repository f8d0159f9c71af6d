"""mistral.rs's Python API: `Runner(which=Which.MistralGGUF(...))` and its completion requests.

A request becomes a `_Job`; `Runner._decode` prefills the prompt once, forks the KV cache for each
choice, and advances all unfinished sequences in lock step: sample a token for every sequence, then
run the model on every sequence's new token (`_forward_step`, the one place a batched forward will
go). Responses, streamed or not, are assembled from the per-token `_Event`s it yields.
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mistral_ref.api_types import (ChatCompletionChunkResponse, ChatCompletionRequest,
                                   ChatCompletionResponse, Choice, ChunkChoice, CompletionChoice,
                                   CompletionRequest, CompletionResponse, Delta, Logprobs,
                                   ResponseLogprob, ResponseMessage, TopLogprob, Usage)
from mistral_ref.chat_template import apply_chat_template
from mistral_ref.errors import InvalidRequestError, ModelSourceError
from mistral_ref.model import KVCache, Model
from mistral_ref.sampler import (GrammarConstraint, Sampler, SamplingParams, StopStrings,
                                 compile_grammar)
from mistral_ref.tokenizer import IncrementalDetokenizer, Tokenizer

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


@dataclass
class _Job:
    """What a request asks the engine to generate."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int | None
    n_sequences: int
    stop_ids: frozenset[int]
    stop_seqs: list[str]
    grammar: str | None  # compiled by sampler.compile_grammar
    seed: int | None
    logprobs: bool


@dataclass
class _Event:
    """One sampled token of one sequence: the text it made final, and how the sequence stands."""

    index: int
    text: str
    token_logprob: float | None  # None when no token was sampled (max_tokens=0)
    logprob: ResponseLogprob | None  # the reportable form, when logprobs were asked for
    finish_reason: str | None
    last: bool = False  # the job's final event: usage can be reported with it


@dataclass
class _Timing:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    prompt_done: float = 0.0
    end: float = 0.0

    def usage(self) -> Usage:
        total, prompt = self.end - self.start, self.prompt_done - self.start
        completion = self.end - self.prompt_done
        rate = lambda n, t: n / t if t > 0 else 0.0
        return Usage(completion_tokens=self.completion_tokens, prompt_tokens=self.prompt_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     avg_tok_per_sec=rate(self.prompt_tokens + self.completion_tokens, total),
                     avg_prompt_tok_per_sec=rate(self.prompt_tokens, prompt),
                     avg_compl_tok_per_sec=rate(self.completion_tokens, completion),
                     total_time_sec=total, total_prompt_time_sec=prompt,
                     total_completion_time_sec=completion)


class _Sequence:
    """One choice being generated: its KV cache, sampler, grammar, detokenizer and stop strings."""

    def __init__(self, index: int, job: _Job, cache: KVCache, rng: np.random.Generator,
                 tokenizer: Tokenizer, grammar: GrammarConstraint | None):
        self.index, self.job, self.cache, self.tokenizer = index, job, cache, tokenizer
        self.sampler = Sampler(job.params, rng)
        self.grammar = grammar
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopStrings(job.stop_seqs)
        self.context = list(job.prompt_ids)  # prompt + generated ids
        self.finish_reason: str | None = None

    def advance(self, logits: np.ndarray) -> _Event:
        """Sample the next token from `logits` (float32 (model vocab,)) and see whether it ends
        the sequence."""
        tok = self.tokenizer
        allowed = self.grammar.allowed() if self.grammar is not None else None
        sample = self.sampler.sample(logits[:tok.vocab_size], self.context, len(self.job.prompt_ids), allowed)
        token = sample.token
        self.context.append(token)
        if token in self.job.stop_ids:  # a stop token's own text is not part of the output
            text, self.finish_reason = "", "stop"
        else:
            text = self.stops.add(self.detokenizer.add(token))
            if self.grammar is not None:
                self.grammar.consume(token)
            if self.stops.stopped or (self.grammar is not None and self.grammar.finished):
                self.finish_reason = "stop"
            elif len(self.context) >= self.cache.max_tokens:  # max_tokens, or the model's context
                self.finish_reason = "length"
        if self.finish_reason is not None and not self.stops.stopped:
            text += self.stops.add(self.detokenizer.flush())
            text += self.stops.flush()
        logprob = None
        if self.job.logprobs:
            piece = lambda i: tok.token_bytes(i).decode("utf-8", errors="replace")
            logprob = ResponseLogprob(token=piece(token), logprob=sample.logprob,
                                      bytes=list(tok.token_bytes(token)),
                                      top_logprobs=[TopLogprob(i, lp, piece(i)) for i, lp in sample.top_logprobs])
        return _Event(self.index, text, sample.logprob, logprob, self.finish_reason)


class Runner:
    """Loads a model and serves completion requests, as `mistralrs.Runner`.

    which: the model (see `Which`). chat_template: a Jinja template or a file holding one,
    overriding the GGUF's. seed: default random seed of requests that give none (None: fresh
    entropy). device: "cpu", "cuda" or "reference" (kernels.device). activations: "q8" (default on the CPU: activations
    quantized to 8 bits before each quantized matmul, llama.cpp's and mistral.rs's numerics, and
    twice the decode speed) or "f32" (exact float32 arithmetic; the cuda device's only mode).
    token_source: accepted for mistral.rs compatibility; nothing is fetched, so it is not used.
    """

    def __init__(self, which: Which.GGUF | Which.MistralGGUF, chat_template: str | None = None,
                 seed: int | None = None, device: str = "cpu", activations: str | None = None,
                 token_source: str = "cache"):
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

    # -- the documented API ---------------------------------------------------------------------
    def send_chat_completion_request(self, request: ChatCompletionRequest, model_id: str | None = None
                                     ) -> ChatCompletionResponse | Iterator[ChatCompletionChunkResponse]:
        """Generate a chat reply: a ChatCompletionResponse, or with `request.stream` an iterator of
        ChatCompletionChunkResponse (usage on the last chunk). Raises InvalidRequestError (a
        ValueError) naming the bad field before any compute. model_id: accepted for mistralrs
        compatibility; a Runner holds one model."""
        if not isinstance(request, ChatCompletionRequest):
            raise InvalidRequestError("request", f"expected a ChatCompletionRequest, got {type(request).__name__}")
        request.__post_init__()  # fields may have been changed since construction
        prompt_ids = self._chat_prompt(request.messages)
        job = self._job(request, prompt_ids, "messages", request.n_choices,
                        request.logprobs, request.top_logprobs or 0)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                    model=request.model or self.model_id, system_fingerprint=SYSTEM_FINGERPRINT)
        timing = _Timing(prompt_tokens=len(prompt_ids))
        events = self._decode(job, timing)
        if request.stream:
            return (ChatCompletionChunkResponse(
                        **head, object="chat.completion.chunk",
                        choices=[ChunkChoice(e.finish_reason, e.index, Delta(e.text), _logprobs(e, job))],
                        usage=timing.usage() if e.last else None)
                    for e in events)
        texts, logprobs, finish, _ = _collect(events, job.n_sequences)
        choices = [Choice(finish[i], i, ResponseMessage(texts[i]),
                          Logprobs(logprobs[i]) if job.logprobs else None) for i in range(job.n_sequences)]
        return ChatCompletionResponse(**head, object="chat.completion", choices=choices, usage=timing.usage())

    def send_completion_request(self, request: CompletionRequest, model_id: str | None = None
                                ) -> CompletionResponse | Iterator[CompletionResponse]:
        """Complete a text prompt: a CompletionResponse; with `request.stream` (an extension) an
        iterator of CompletionResponse chunks. best_of > n_choices samples best_of sequences and
        returns the n_choices with the highest mean token logprob."""
        if not isinstance(request, CompletionRequest):
            raise InvalidRequestError("request", f"expected a CompletionRequest, got {type(request).__name__}")
        request.__post_init__()
        prompt_ids = self.tokenizer.encode(request.prompt, add_special_tokens=True)
        job = self._job(request, prompt_ids, "prompt", request.best_of,
                        request.logprobs is not None, request.logprobs or 0)
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                    model=request.model or self.model_id, system_fingerprint=SYSTEM_FINGERPRINT,
                    object="text_completion")
        prefix = request.prompt if request.echo_prompt else ""
        suffix = request.suffix or ""
        timing = _Timing(prompt_tokens=len(prompt_ids))
        events = self._decode(job, timing)
        if request.stream:
            return self._stream_completion(events, job, head, timing, prefix, suffix)
        texts, logprobs, finish, mean_logprobs = _collect(events, job.n_sequences)
        ranked = sorted(range(job.n_sequences), key=lambda i: -mean_logprobs[i])
        choices = [CompletionChoice(finish[i], rank, prefix + texts[i] + suffix,
                                    Logprobs(logprobs[i]) if job.logprobs else None)
                   for rank, i in enumerate(ranked[:request.n_choices])]
        return CompletionResponse(**head, choices=choices, usage=timing.usage())

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

    # -- engine ---------------------------------------------------------------------------------
    def _chat_prompt(self, messages: list | str) -> list[int]:
        if isinstance(messages, str):  # an already templated prompt
            ids = self.tokenizer.encode(messages, add_special_tokens=False, parse_special=True)
            tok = self.tokenizer
            if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
                ids.insert(0, tok.bos_id)
            return ids
        return apply_chat_template(self.tokenizer, messages, self.chat_template)

    def _job(self, request: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
             prompt_field: str, n_sequences: int, logprobs: bool, top_logprobs: int) -> _Job:
        """Checks that need the model (vocabulary, context), then the job. Raises InvalidRequestError."""
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
            logit_bias=dict(request.logit_bias or {}), top_logprobs=top_logprobs if logprobs else 0)
        grammar = None
        if request.grammar is not None:  # compiled once; errors surface now, before any compute
            grammar = compile_grammar(request.grammar, request.grammar_type)
            GrammarConstraint(self.tokenizer, grammar)
        return _Job(prompt_ids, params, request.max_tokens, n_sequences,
                    self.tokenizer.stop_ids | set(request.stop_token_ids or ()),
                    list(request.stop_seqs or ()), grammar, request.seed, logprobs)

    def _decode(self, job: _Job, timing: _Timing) -> Iterator[_Event]:
        """Generate all sequences of `job`, yielding one event per sampled token."""
        context = self.model.config.context_length
        budget = context if job.max_tokens is None else min(context, len(job.prompt_ids) + job.max_tokens)
        cache = self.model.new_cache(budget)
        timing.start = time.perf_counter()
        logits = self.model.forward(job.prompt_ids, cache)
        timing.prompt_done = time.perf_counter()
        seeds = np.random.SeedSequence(job.seed) if job.seed is not None else self._seeds.spawn(1)[0]
        rngs = [np.random.default_rng(s) for s in seeds.spawn(job.n_sequences)]
        sequences = [_Sequence(i, job, cache if i == 0 else cache.fork(), rngs[i], self.tokenizer,
                               GrammarConstraint(self.tokenizer, job.grammar) if job.grammar else None)
                     for i in range(job.n_sequences)]
        if job.max_tokens == 0:
            timing.end = time.perf_counter()
            for seq in sequences:
                yield _Event(seq.index, "", None, None, "length", last=seq is sequences[-1])
            return
        active, all_logits = sequences, [logits] * len(sequences)
        while active:
            for seq, seq_logits in zip(active, all_logits):
                event = seq.advance(seq_logits)
                event.last = all(s.finish_reason is not None for s in sequences)
                timing.completion_tokens += 1
                timing.end = time.perf_counter()
                yield event
            active = [s for s in active if s.finish_reason is None]
            all_logits = self._forward_step(active)

    def _forward_step(self, sequences: Sequence[_Sequence]) -> list[np.ndarray]:
        """Logits after each sequence's newest token, each against its own cache. This is where a
        batched forward over all sequences will go."""
        return [self.model.forward(seq.context[-1:], seq.cache) for seq in sequences]

    def _stream_completion(self, events: Iterator[_Event], job: _Job, head: dict, timing: _Timing,
                           prefix: str, suffix: str) -> Iterator[CompletionResponse]:
        started = set()
        for event in events:
            text = event.text
            if event.index not in started:
                started.add(event.index)
                text = prefix + text
            if event.finish_reason is not None:
                text += suffix
            yield CompletionResponse(**head, choices=[CompletionChoice(event.finish_reason, event.index, text,
                                                                       _logprobs(event, job))],
                                     usage=timing.usage() if event.last else None)


def _logprobs(event: _Event, job: _Job) -> Logprobs | None:
    return Logprobs([event.logprob]) if job.logprobs and event.logprob is not None else None


def _collect(events: Iterator[_Event], n: int
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
