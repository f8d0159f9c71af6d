"""Continuous batching (mistral_ref.scheduler) and the prefix cache, through the Runner: whatever a
request is batched with and whatever it restores from the prefix cache, it generates exactly what
it generates alone, with the q8 activations of the default Runner (each matmul column is computed
alone, so its logits are the same bits).

The reference for every request is the same request on a second Runner with the prefix cache
off, run by itself."""
from __future__ import annotations

import numpy as np
import pytest

from mistral_ref import ChatCompletionRequest, CompletionRequest, Message, Role, Runner, Which
from mistral_ref.model import Model, generate
from mistral_ref.prefix_cache import PrefixCache, common_prefix
from mistral_ref.sampler import Sampler, SamplingParams
from mistral_ref.scheduler import Job, Scheduler, Timing
from mistral_ref.synth import synth_model

WINDOW = 16
SYSTEM = Message(Role.System, "You are a careful assistant who answers every question about "
                              "lighthouses, ships and the sea in one short sentence.")


def model_file(tmp_path_factory, window: int):
    path = tmp_path_factory.mktemp("batching") / f"tiny-w{window}.gguf"
    synth_model(path, "tiny", "Q4_K_M", sliding_window=window, seed=0, progress=False)
    return path


@pytest.fixture(scope="module", params=[WINDOW, 0], ids=["window16", "no-window"])
def runners(request, tmp_path_factory) -> tuple[Runner, Runner]:
    """(batching with a prefix cache, alone without one) on the same tiny random Mistral."""
    path = model_file(tmp_path_factory, request.param)
    return Runner(Which.GGUF(str(path))), Runner(Which.GGUF(str(path)), prefix_cache_n=0)


def requests(eos: int) -> list:
    """Requests that differ in every way: prompt, length, sampling, seed, stops, grammar, n."""
    user = lambda text: [Message(Role.User, text)]
    return [
        ChatCompletionRequest(user("Name a colour."), "m", max_tokens=9),
        ChatCompletionRequest(user("Tell me about the sea, and the ships upon it, at length."), "m",
                              max_tokens=14, temperature=0.8, top_p=0.9, seed=3, n_choices=2),
        ChatCompletionRequest([SYSTEM, *user("Why?")], "m", max_tokens=5, temperature=1.2, top_k=20,
                              seed=11, logprobs=True, top_logprobs=2, presence_penalty=0.5),
        ChatCompletionRequest(user("Count."), "m", max_tokens=12, grammar=r"[0-9]{1,6}",
                              grammar_type="regex", temperature=1.0, seed=5),
        ChatCompletionRequest(user("Go on"), "m", max_tokens=20, temperature=1.0, seed=8,
                              stop_seqs=["a"], logit_bias={eos: -100.0}),
        CompletionRequest("Once upon a time", "m", max_tokens=7, best_of=2, n_choices=2, temperature=0.9,
                          seed=4),
        ChatCompletionRequest(user("Nothing"), "m", max_tokens=0),
    ]


def as_json(response) -> dict:
    body = response.to_dict()
    for key in ("id", "created", "usage"):
        body.pop(key)
    return body


def stream_texts(chunks) -> dict:
    texts = {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + piece
    return texts


def test_interleaved_streams_equal_each_alone(runners):
    """Seven different requests iterated side by side share one forward pass per step, and each
    streams what it generates alone."""
    runner, alone = runners
    eos = runner.tokenizer.eos_id
    expected = [stream_texts(alone.send_chat_completion_request(r) if isinstance(r, ChatCompletionRequest)
                             else alone.send_completion_request(r))
                for r in (_streamed(r) for r in requests(eos))]
    send = lambda r: (runner.send_chat_completion_request(r) if isinstance(r, ChatCompletionRequest)
                      else runner.send_completion_request(r))
    streams = [send(_streamed(r)) for r in requests(eos)]
    chunks = [[] for _ in streams]
    steps = runner.scheduler.n_steps
    live = set(range(len(streams)))
    while live:
        for i in sorted(live):
            try:
                chunks[i].append(next(streams[i]))
            except StopIteration:
                live.remove(i)
    assert [stream_texts(c) for c in chunks] == expected
    longest = max(r.max_tokens for r in requests(eos))
    assert runner.scheduler.n_steps - steps <= longest + 2  # batched, not one request after another


def _streamed(request):
    request.stream = True
    return request


def test_non_streamed_requests_batched_equal_alone(runners):
    """The server's way: submit, start, step until done; responses equal the lone ones (best_of
    too: the best are ranked from the same candidates)."""
    runner, alone = runners
    eos = runner.tokenizer.eos_id
    all_requests = [*requests(eos), CompletionRequest("Once upon a time", "m", max_tokens=7, best_of=3,
                                                      n_choices=2, temperature=0.9, seed=4)]
    submissions = [runner.submit(r) for r in all_requests]
    for s in submissions:
        s.start()
    while not all(s.done for s in submissions):
        runner.step()
    for submission, request in zip(submissions, all_requests):
        send = (alone.send_chat_completion_request if isinstance(request, ChatCompletionRequest)
                else alone.send_completion_request)
        assert as_json(submission.response()) == as_json(send(request))


def test_a_failing_request_ends_alone(runners, monkeypatch):
    runner, alone = runners
    eos = runner.tokenizer.eos_id
    doomed, kept = (runner.submit(r) for r in requests(eos)[:2])
    doomed.start()
    kept.start()
    runner.step()  # both prompts read, first tokens sampled

    def boom(*args, **kwargs):
        raise RuntimeError("sampler failure")
    monkeypatch.setattr(doomed.generation.sequences[0].sampler, "sample", boom)
    while not kept.done:
        runner.step()
    assert doomed.done
    with pytest.raises(RuntimeError, match="sampler failure"):
        doomed.response()
    assert as_json(kept.response()) == as_json(alone.send_chat_completion_request(requests(eos)[1]))


def test_a_prompt_ends_in_a_step_of_its_own(runners, monkeypatch):
    """Chunked prefill: a long prompt's chunks share steps with the running decode tokens; the
    step that reads a prompt's last chunk leaves them out (its first token waits for no one
    else's), and the next step has them, whatever new prompt ends then. Each sequence generates
    what greedy decoding alone gives."""
    runner, _ = runners
    model = runner.model
    scheduler = Scheduler(model, runner.tokenizer, step_tokens=8)
    steps, forward_batch = [], model.forward_batch

    def recorded(batch, interrupt=None):
        steps.append([len(tokens) for tokens, _ in batch])
        return forward_batch(batch, interrupt)
    monkeypatch.setattr(model, "forward_batch", recorded)
    prompts = [[1, 2, 3], list(range(5, 25)), [30, 31, 32, 33]]
    lengths = [12, 3, 3]
    submit = lambda i: scheduler.submit(Job(prompts[i], SamplingParams(), lengths[i], 1, frozenset(), [], None,
                                            None, False), Timing(), np.random.SeedSequence(i))
    gens = [submit(0)]
    scheduler.step()
    scheduler.step()
    gens.append(submit(1))  # 20 tokens: chunks of 7 beside the decode token, then the last 6
    for _ in range(3):
        scheduler.step()
    gens.append(submit(2))  # ends in the step right after one that held the decode tokens
    while not all(g.done for g in gens):
        scheduler.step()
    assert steps[:7] == [[3], [1], [1, 7], [1, 7], [6], [1, 1, 4], [1, 1, 1]]
    for prompt, n, gen in zip(prompts, lengths, gens):
        assert gen.sequences[0].context == prompt + list(generate(model, prompt, n))


def test_a_decode_step_gives_way_to_a_new_request(runners, monkeypatch):
    """A step of decode tokens alone asks `preempt` before each layer of its first half (a step
    with a prompt chunk never does); True abandons it: no event, no cache advanced, and a
    sequence cancelled before the step runs again is not offered to the prefix cache (its cache
    was written at the step's positions). The new prompt runs next, alone, then the same decode
    tokens: every sequence generates what greedy decoding alone gives."""
    runner, _ = runners
    model = runner.model
    prefix_cache = PrefixCache(model)
    scheduler = Scheduler(model, runner.tokenizer, prefix_cache=prefix_cache)
    steps, forward_batch, asked, arrived = [], model.forward_batch, [], [False]

    def recorded(batch, interrupt=None):
        logits = forward_batch(batch, interrupt)
        steps.append(([len(tokens) for tokens, _ in batch], logits is None))
        return logits

    def preempt() -> bool:
        asked.append(len(steps))
        return arrived[0]
    monkeypatch.setattr(model, "forward_batch", recorded)
    prompts, lengths = [[1, 2, 3], [7, 8, 9, 10, 11], [20, 21]], [6, 8, 4]
    submit = lambda i: scheduler.submit(Job(prompts[i], SamplingParams(), lengths[i], 1, frozenset(), [], None,
                                            None, False), Timing(), np.random.SeedSequence(i))
    kept, cancelled = submit(0), submit(1)
    scheduler.step(preempt)  # both prompts: never asked
    scheduler.step(preempt)  # decode tokens, nothing waiting
    assert asked == [1] * (len(model.layers) // 2)
    arrived[0] = True
    lengths_before, events_before = [g.sequences[0].cache.length for g in (kept, cancelled)], len(kept.events)
    scheduler.step(preempt)
    assert steps[-1] == ([1, 1], True) and scheduler.n_preempted == 1 and asked[-1] == 2
    assert [g.sequences[0].cache.length for g in (kept, cancelled)] == lengths_before
    assert len(kept.events) == events_before
    stored, store = [], prefix_cache.store
    monkeypatch.setattr(prefix_cache, "store", lambda ids, cache: (stored.append(list(ids)), store(ids, cache)))
    scheduler.cancel(cancelled)
    assert stored == []
    arrived[0] = False
    new = submit(2)
    while not (kept.done and new.done):
        scheduler.step(preempt)
    assert [s for s, _ in steps[3:5]] == [[2], [1, 1]]  # the new prompt alone, then the same token again
    for gen, i in ((kept, 0), (new, 2)):
        assert gen.sequences[0].context == prompts[i] + list(generate(model, prompts[i], lengths[i]))


def test_n_choices_decode_as_one_batch(runners):
    """n_choices=4 takes one step per token for all four (the prompt read once), and each choice
    is what decoding it alone with Model.forward and its own random stream gives."""
    runner, _ = runners
    eos, n, max_tokens, seed = runner.tokenizer.eos_id, 4, 6, 21
    request = CompletionRequest("The lighthouse", "m", max_tokens=max_tokens, best_of=n, n_choices=n,
                                temperature=1.0, seed=seed, logit_bias={eos: -100.0})
    steps = runner.scheduler.n_steps
    response = runner.send_completion_request(request)
    assert runner.scheduler.n_steps - steps == max_tokens

    model: Model = runner.model
    prompt = runner.tokenizer.encode("The lighthouse", add_special_tokens=True)
    params = SamplingParams(temperature=1.0, logit_bias={eos: -100.0}, repeat_last_n=runner.repeat_last_n)
    prompt_cache = model.new_cache(len(prompt) + max_tokens)
    prompt_logits = model.forward(prompt, prompt_cache)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]
    texts = []
    for rng in rngs:
        cache, logits, context = prompt_cache.fork(), prompt_logits, list(prompt)
        sampler = Sampler(params, rng)
        for _ in range(max_tokens):
            context.append(sampler.sample(logits[:runner.tokenizer.vocab_size], context, len(prompt)).token)
            logits = model.forward(context[-1:], cache)
        texts.append(runner.tokenizer.decode(context[len(prompt):]))
    assert sorted(c.text for c in response.choices) == sorted(texts)


def test_a_continuation_restores_the_whole_sequence(runners):
    """A prompt continuing a finished sequence token for token (what the next turn of a chat is
    when the template reproduces the reply's tokens) restores all of it, past the window's wrap
    too: the entry keeps the last 16 positions, all that a query at its end sees."""
    runner, alone = runners
    greedy = lambda ids, n: Job(ids, SamplingParams(), n, 1, frozenset(), [], None, None, False)
    prompt = runner._chat_prompt([SYSTEM, Message(Role.User, "Where is the nearest lighthouse?")])

    def run(r: Runner, job: Job) -> list[int]:
        gen = r.scheduler.submit(job, Timing(), np.random.SeedSequence(0))
        while not gen.done:
            r.step()
        return gen.sequences[0].context[len(job.prompt_ids):]
    first = run(runner, greedy(prompt, 8))
    assert len(prompt) + 7 > WINDOW
    turn2 = prompt + first + runner.tokenizer.encode(" And after that?", add_special_tokens=False)
    reused = runner.prefix_cache.reused_tokens
    assert run(runner, greedy(turn2, 6)) == run(alone, greedy(turn2, 6))
    assert runner.prefix_cache.reused_tokens - reused == len(prompt) + 7


def test_the_next_turn_of_a_chat(runners):
    """Turn 2 through the chat template. This random model's replies do not survive
    re-tokenization, so turn 2 shares turn 1's prompt only: restored without a window; with one,
    turn 1's ring has moved past it and nothing is restored. Either way the answer is the lone one."""
    runner, alone = runners
    turn1 = [SYSTEM, Message(Role.User, "Where is the nearest lighthouse?")]
    request = lambda messages: ChatCompletionRequest(messages, "m", max_tokens=8)
    reply = runner.send_chat_completion_request(request(turn1)).choices[0].message.content
    turn2 = [*turn1, Message(Role.Assistant, reply), Message(Role.User, "And the one after that?")]
    reused = runner.prefix_cache.reused_tokens
    response = runner.send_chat_completion_request(request(turn2))
    assert as_json(response) == as_json(alone.send_chat_completion_request(request(turn2)))
    if not runner.model.config.sliding_window:
        assert runner.prefix_cache.reused_tokens - reused >= len(runner._chat_prompt(turn1))


def test_a_shared_system_prompt(runners):
    """Two users behind one system prompt: without a window the second restores every position
    the two prompts share; with a window of 16 the first's entry no longer holds them (its ring
    moved on), so less is restored (at most a short unwrapped entry's). Both answers are the lone
    ones."""
    runner, alone = runners
    messages = lambda text: [SYSTEM, Message(Role.User, text)]
    ask = lambda text: ChatCompletionRequest(messages(text), "m", max_tokens=4)
    runner.send_chat_completion_request(ask("First question about ships?"))
    reused = runner.prefix_cache.reused_tokens
    response = runner.send_chat_completion_request(ask("Second question, on tides."))
    assert as_json(response) == as_json(alone.send_chat_completion_request(ask("Second question, on tides.")))
    shared = common_prefix(np.array(runner._chat_prompt(messages("First question about ships?"))),
                           np.array(runner._chat_prompt(messages("Second question, on tides."))))
    if runner.model.config.sliding_window:
        assert runner.prefix_cache.reused_tokens - reused < shared
    else:
        assert runner.prefix_cache.reused_tokens - reused == shared


def test_prefix_cache_bounds_and_lru(tmp_path_factory):
    model = Model.from_gguf(model_file(tmp_path_factory, 0), activations="q8")
    cache = PrefixCache(model, max_entries=2)

    def stored(tokens):
        kv = model.new_cache(32)
        model.forward(tokens, kv)
        cache.store(tokens, kv)
        return kv
    stored([1, 2, 3])
    stored([1, 2, 3, 4, 5])  # supersedes [1, 2, 3]
    assert cache.stats()["entries"] == 1
    stored([1, 2, 3])  # already served by [1, 2, 3, 4, 5]
    assert cache.stats()["entries"] == 1
    stored([7, 8])
    target = model.new_cache(32)
    assert cache.restore([1, 2, 3, 4, 9], target) == 4  # [1..5] is now the most recent
    stored([10, 11])
    assert [list(t) for t, _ in cache.entries.values()] == [[1, 2, 3, 4, 5], [10, 11]]
    assert cache.restore([1, 2], model.new_cache(8)) == 1  # the last token always runs
    assert cache.restore([5, 6], model.new_cache(8)) == 0
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 1
    small = PrefixCache(model, max_bytes=1000)
    kv = model.new_cache(32)
    model.forward([1, 2, 3], kv)
    small.store([1, 2, 3], kv)
    assert small.stats()["entries"] == 0  # over the byte budget: not kept


def test_threads_sharing_a_runner_batch_together(runners):
    """Requests sent from several threads (as users of mistralrs try) share the Runner's steps
    and each gets what it gets alone."""
    import threading

    runner, alone = runners
    eos = runner.tokenizer.eos_id
    chosen = [r for r in requests(eos) if isinstance(r, ChatCompletionRequest)][:4]
    results = [None] * len(chosen)

    def one(i: int) -> None:
        results[i] = as_json(runner.send_chat_completion_request(chosen[i]))
    steps = runner.scheduler.n_steps
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(chosen))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [as_json(alone.send_chat_completion_request(r)) for r in chosen]
    assert runner.scheduler.n_steps - steps < sum(r.max_tokens for r in chosen)
