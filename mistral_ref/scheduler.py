"""Continuous batching: every running sequence advances in one forward pass per step.

A request becomes a `Job`; `Scheduler.submit` turns it into a `Generation` and returns it. Each
`Scheduler.step()` is one `Model.forward_batch` over one new token of every decoding sequence and,
in the token budget left (`step_tokens`), chunks of the prompts still being read (chunked
prefill), so running streams keep flowing while a long prompt is read; a step that reads the end
of a prompt leaves the decode tokens to the next step, so the new request's first token waits for
its prompt alone; and a step of decode tokens alone gives way to a request that arrives during its
first half (`step(preempt)`): abandoned there, it runs again after the new prompt. A prompt,
once read, is
forked into the job's sequences (n_choices, best_of); each samples from its own logits, which do
not depend on what else is in the batch (Model.forward_batch), so a request generates what it
would alone. A sequence that fails (a grammar error, say) ends its generation only.

With a `PrefixCache`, a prompt starting with tokens whose keys and values are cached (the next
turn of a chat, a shared system prompt) restores them instead of recomputing them, and every
sequence's cache is offered to it when the sequence ends.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mistral_ref.api_types import ResponseLogprob, TopLogprob, Usage
from mistral_ref.model import PREFILL_CHUNK, KVCache, Model
from mistral_ref.prefix_cache import PrefixCache
from mistral_ref.sampler import GrammarConstraint, Sampler, SamplingParams, StopStrings
from mistral_ref.tokenizer import IncrementalDetokenizer, Tokenizer


_Work = tuple[list[int], KVCache, Callable[[np.ndarray], None]]  # tokens, their cache, what gets the logits


@dataclass
class Job:
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
class Event:
    """One sampled token of one sequence: the text it made final, and how the sequence stands."""

    index: int
    text: str
    token_logprob: float | None  # None when no token was sampled (max_tokens=0)
    logprob: ResponseLogprob | None  # the reportable form, when logprobs were asked for
    finish_reason: str | None
    last: bool = False  # the job's final event: usage can be reported with it


@dataclass
class Timing:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
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

    def __init__(self, index: int, job: Job, cache: KVCache, rng: np.random.Generator,
                 tokenizer: Tokenizer):
        self.index, self.job, self.cache, self.tokenizer = index, job, cache, tokenizer
        self.sampler = Sampler(job.params, rng)
        self.grammar = GrammarConstraint(tokenizer, job.grammar) if job.grammar else None
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopStrings(job.stop_seqs)
        self.context = list(job.prompt_ids)  # prompt + generated ids
        self.finish_reason: str | None = None

    def advance(self, logits: np.ndarray) -> Event:
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
            text += self.stops.add(self.detokenizer.flush(drop_unfinished=True))
            text += self.stops.flush()
        logprob = None
        if self.job.logprobs:
            piece = lambda i: tok.token_bytes(i).decode("utf-8", errors="replace")
            logprob = ResponseLogprob(token=piece(token), logprob=sample.logprob,
                                      bytes=list(tok.token_bytes(token)),
                                      top_logprobs=[TopLogprob(i, lp, piece(i)) for i, lp in sample.top_logprobs])
        return Event(self.index, text, sample.logprob, logprob, self.finish_reason)


class Generation:
    """A submitted job: its prompt being read, then its sequences, and the events they produced
    that nobody has taken yet (`events`). `done` once every sequence has finished, the job has
    failed (`error`) or been cancelled."""

    def __init__(self, job: Job, timing: Timing, cache: KVCache, rngs: list[np.random.Generator]):
        self.job, self.timing, self.cache, self.rngs = job, timing, cache, rngs
        self.events: deque[Event] = deque()
        self.sequences: list[_Sequence] = []  # empty while the prompt is being read
        self.error: BaseException | None = None
        self.done = False

    @property
    def prefilling(self) -> bool:
        return not self.sequences and not self.done

    def decoding(self) -> list[_Sequence]:
        return [] if self.done else [s for s in self.sequences if s.finish_reason is None]


class Scheduler:
    """Runs the generations submitted to it, all of them in each step.

    step_tokens: the most tokens one step runs (decode tokens first, prompt chunks in the rest);
    a long prompt is read over several steps. prefix_cache: None to recompute every prompt.
    max_seqs: the most sequences (choices) a step runs: generations are admitted in submission
    order while they fit (the first always runs), the rest wait.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, prefix_cache: PrefixCache | None = None,
                 step_tokens: int = PREFILL_CHUNK, max_seqs: int | None = None):
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        self.model, self.tokenizer, self.prefix_cache = model, tokenizer, prefix_cache
        self.step_tokens, self.max_seqs = step_tokens, max_seqs
        self.generations: list[Generation] = []  # submitted and not done
        self.n_steps = 0
        self.n_preempted = 0  # decode steps abandoned for a request that arrived during them
        self._decodes_held = False  # the last step ran prompts without the decode tokens
        # The caches of an abandoned step: written at positions their next step writes again,
        # so not offered to the prefix cache before it has (a ring's oldest slot is overwritten).
        self._torn: dict[int, KVCache] = {}

    def submit(self, job: Job, timing: Timing, seeds: np.random.SeedSequence) -> Generation:
        """Start `job` (its prompt is read by the next steps); seeds: its sequences' randomness."""
        context = self.model.config.context_length
        budget = context if job.max_tokens is None else min(context, len(job.prompt_ids) + job.max_tokens)
        cache = self.model.new_cache(budget)
        timing.start = time.perf_counter()
        if self.prefix_cache is not None:
            timing.cached_tokens = self.prefix_cache.restore(job.prompt_ids, cache)
        gen = Generation(job, timing, cache, [np.random.default_rng(s) for s in seeds.spawn(job.n_sequences)])
        self.generations.append(gen)
        return gen

    def cancel(self, gen: Generation) -> None:
        """Stop generating for `gen` (its client went away); a no-op once it is done."""
        if not gen.done:
            self._end(gen)

    def step(self, preempt: Callable[[], bool] | None = None) -> None:
        """One forward pass over every running sequence and the next prompt chunks; the events it
        produces are appended to their generations.

        preempt: asked between the layers of the first half of a step of decode tokens only; True
        abandons the step (a new request is waiting) and the next step runs the same tokens
        again: a new request waits at most half a step for its prompt to start, where it had
        waited out whole steps, and the running streams lose at most half a step to it."""
        decodes: list[_Work] = []
        prompts: list[_Work] = []
        running = self._admitted()
        for gen in running:
            for seq in gen.decoding():
                decodes.append((seq.context[-1:], seq.cache, lambda logits, g=gen, s=seq: self._advance(g, [s], logits)))
        budget, ends_a_prompt = max(1, self.step_tokens - len(decodes)), False
        for gen in running:
            if gen.prefilling and budget > 0:
                start = gen.cache.length
                chunk = gen.job.prompt_ids[start:start + budget]
                budget -= len(chunk)
                ends_a_prompt |= start + len(chunk) == len(gen.job.prompt_ids)
                prompts.append((chunk, gen.cache, lambda logits, g=gen: self._prompt_read(g, logits)))
        # A step that reads the end of a prompt leaves the decode tokens to the next step (never
        # two steps in a row), so that request's first token costs its prompt alone, not also
        # the running streams' step (SmolLM2: a 42-token prompt 23 ms alone, 29 with 7 decodes).
        self._decodes_held = bool(ends_a_prompt and decodes and not self._decodes_held)
        work = prompts if self._decodes_held else decodes + prompts
        if not work:
            return
        self.n_steps += 1
        interrupt = None
        if preempt is not None and not prompts:
            half = len(self.model.layers) // 2
            interrupt = lambda layer: layer < half and preempt()  # noqa: E731
        try:
            all_logits = self.model.forward_batch([(tokens, cache) for tokens, cache, _ in work], interrupt)
        except Exception as e:  # not a request's fault (they were checked): all of them fail
            for gen in list(self.generations):
                self._end(gen, e)
            return
        if all_logits is None:
            self.n_preempted += 1
            self._torn.update((id(cache), cache) for _, cache, _ in work)
            return
        for _, cache, _ in work:
            self._torn.pop(id(cache), None)
        for (_, _, then), logits in zip(work, all_logits):
            then(logits)

    def _admitted(self) -> list[Generation]:
        running, n_seqs = [], 0
        for gen in self.generations:
            if running and self.max_seqs is not None and n_seqs + gen.job.n_sequences > self.max_seqs:
                break
            running.append(gen)
            n_seqs += gen.job.n_sequences
        return running

    # -- after the forward pass ---------------------------------------------------------------
    def _prompt_read(self, gen: Generation, logits: np.ndarray) -> None:
        """A prompt chunk ran; once the whole prompt has, fork its cache into the job's sequences,
        each sampling its first token from the prompt's last logits."""
        if gen.done or gen.cache.length < len(gen.job.prompt_ids):
            return
        job, timing = gen.job, gen.timing
        timing.prompt_done = time.perf_counter()
        self._offer(job.prompt_ids, gen.cache)  # the same prompt again restores all but its last token
        gen.sequences = [_Sequence(i, job, gen.cache if i == 0 else gen.cache.fork(), gen.rngs[i],
                                   self.tokenizer) for i in range(job.n_sequences)]
        if job.max_tokens == 0:
            timing.end = time.perf_counter()
            for seq in gen.sequences:
                seq.finish_reason = "length"
                gen.events.append(Event(seq.index, "", None, None, "length", last=seq is gen.sequences[-1]))
            self._end(gen)
            return
        self._advance(gen, gen.sequences, logits)

    def _advance(self, gen: Generation, sequences: Sequence[_Sequence], logits: np.ndarray) -> None:
        if gen.done:
            return
        for seq in sequences:
            try:
                event = seq.advance(logits)
            except Exception as e:  # this request's failure (a grammar error, say): it alone ends
                self._end(gen, e)
                return
            gen.timing.completion_tokens += 1
            gen.timing.end = time.perf_counter()
            event.last = all(s.finish_reason is not None for s in gen.sequences)
            gen.events.append(event)
            if seq.finish_reason is not None:
                self._offer(seq.context[:seq.cache.length], seq.cache)
        if all(s.finish_reason is not None for s in gen.sequences):
            self._end(gen)

    def _offer(self, token_ids: list[int], cache: KVCache) -> None:
        if self.prefix_cache is not None and id(cache) not in self._torn:
            self.prefix_cache.store(token_ids, cache)

    def _end(self, gen: Generation, error: BaseException | None = None) -> None:
        """gen is over: finished, failed or cancelled. What its unfinished sequences had computed
        is offered to the prefix cache."""
        if gen.done:
            return
        gen.done, gen.error = True, error
        self.generations.remove(gen)
        if error is None:
            for seq in gen.sequences:
                if seq.finish_reason is None:
                    self._offer(seq.context[:seq.cache.length], seq.cache)
            if not gen.sequences and gen.cache.length:  # cancelled while its prompt was read
                self._offer(gen.job.prompt_ids[:gen.cache.length], gen.cache)
        for seq in gen.sequences:
            self._torn.pop(id(seq.cache), None)
