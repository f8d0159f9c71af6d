"""Sampler properties (hypothesis) against plain-Python references of each rule."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_ref.sampler import (Sampler, SamplingParams, StopStrings, apply_penalties,
                                 log_softmax, top_sorted, truncated_support)

finite = st.floats(-30, 30, allow_nan=False, width=32)
logit_vectors = st.lists(finite, min_size=2, max_size=60).map(lambda v: np.array(v, np.float32))
# few distinct values, so ties are common
tied_vectors = st.lists(st.sampled_from([-2.0, 0.0, 0.5, 1.0, 3.0]), min_size=2, max_size=40).map(
    lambda v: np.array(v, np.float32))


def reference_probs(logits, temperature=1.0):
    m = max(logits)
    e = [math.exp((x - m) / temperature) for x in logits]
    return [x / sum(e) for x in e]


@given(st.one_of(logit_vectors, tied_vectors), st.floats(0.05, 5))
def test_probabilities_sum_to_one_and_match_softmax(logits, temperature):
    logp = log_softmax(logits.astype(np.float64) / temperature)
    assert math.isclose(np.exp(logp).sum(), 1.0, rel_tol=1e-9)
    np.testing.assert_allclose(np.exp(logp), reference_probs(logits.tolist(), temperature), rtol=1e-9, atol=1e-300)


@given(st.one_of(logit_vectors, tied_vectors), st.data())
def test_greedy_is_argmax_after_bias(logits, data):
    n = len(logits)
    bias = data.draw(st.dictionaries(st.integers(0, n - 1), st.floats(-50, 50), max_size=4))
    sample = Sampler(SamplingParams(logit_bias=bias)).sample(logits, [0], 1)
    biased = [float(x) + bias.get(i, 0.0) for i, x in enumerate(logits)]
    assert sample.token == biased.index(max(biased))  # first index on ties
    assert math.isclose(sample.logprob, math.log(reference_probs(biased)[sample.token]), abs_tol=1e-9)


@given(st.one_of(logit_vectors, tied_vectors), st.integers(1, 70))
def test_top_sorted_is_a_stable_descending_sort(values, m):
    values = values.astype(np.float64)
    expected = sorted(range(len(values)), key=lambda i: (-values[i], i))[:m]
    assert top_sorted(values, m).tolist() == expected


def reference_support(probs, top_k, top_p, min_p):
    """The kept ids, written as the rules read: sort, take k, walk the nucleus, apply min-p."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    k = len(order) if top_k is None or top_k <= 0 else top_k
    order = order[:k]
    if top_p is not None and 0 < top_p < 1:
        total = float(np.sum(probs)) if k >= len(probs) else float(np.cumsum(probs[order])[-1])
        kept, before = [], 0.0
        for i in order:
            if before < top_p * total:
                kept.append(i)
            before += probs[i]
        order = kept
    if min_p is not None and 0 < min_p < 1:
        order = [i for i in order if probs[i] > min_p * probs[order[0]]]
    return [i for i in order if probs[i] > 0]


@given(st.one_of(logit_vectors, tied_vectors), st.one_of(st.none(), st.integers(-1, 70)),
       st.one_of(st.none(), st.floats(0.01, 1.0)), st.one_of(st.none(), st.floats(0.0, 0.99)))
def test_truncation_keeps_exactly_the_right_support(logits, top_k, top_p, min_p):
    probs = np.exp(log_softmax(logits.astype(np.float64)))
    kept = truncated_support(probs, top_k, top_p, min_p).tolist()
    assert kept == reference_support(probs, top_k, top_p, min_p)
    assert kept  # something is always left to sample


def test_top_p_head_search_on_a_large_vocabulary():
    # a flat tail makes the nucleus far longer than the first sorted head of 64 tokens
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(49152) * 0.5
    probs = np.exp(log_softmax(logits))
    for top_p in (0.05, 0.5, 0.9, 0.999):
        assert truncated_support(probs, None, top_p, None).tolist() == reference_support(probs, None, top_p, None)


@given(logit_vectors, st.integers(1, 5), st.floats(0.1, 1.0), st.floats(0.0, 0.5), st.integers(0, 2**32 - 1))
@settings(max_examples=50)
def test_samples_stay_inside_the_support(logits, top_k, top_p, min_p, seed):
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = np.exp(log_softmax(logits.astype(np.float64)))
    support = set(reference_support(probs, top_k, top_p, min_p))
    sampler = Sampler(params, np.random.default_rng(seed))
    assert all(sampler.sample(logits, [0], 1).token in support for _ in range(20))


def test_sampling_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2, 1e-12], np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0), np.random.default_rng(0))
    counts = np.bincount([sampler.sample(logits, [0], 1).token for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.5, 0.3, 0.2, 0.0], atol=0.015)


@given(logit_vectors, st.data())
def test_penalties_move_logits_the_right_way(logits, data):
    n = len(logits)
    prompt = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=10))
    generated = data.draw(st.lists(st.integers(0, n - 1), max_size=10))
    presence, frequency = data.draw(st.floats(-2, 2)), data.draw(st.floats(-2, 2))
    r, last_n = data.draw(st.floats(0.5, 2.0)), data.draw(st.integers(0, 25))
    context = prompt + generated
    out = apply_penalties(logits, context, len(prompt),
                          SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                                         repetition_penalty=r, repeat_last_n=last_n))
    recent = set(context[-last_n:]) if last_n else set()
    for t in range(n):
        x = float(logits[t])
        count = generated.count(t)
        x -= count * frequency + (count > 0) * presence
        if t in recent:
            x = x / r if x > 0 else x * r
        assert math.isclose(out[t], x, rel_tol=1e-12, abs_tol=1e-12)
    # with positive penalties nothing seen gains, and nothing unseen changes
    pos = apply_penalties(logits, context, len(prompt), SamplingParams(
        presence_penalty=abs(presence), frequency_penalty=abs(frequency),
        repetition_penalty=max(r, 1 / r), repeat_last_n=last_n))
    for t in range(n):
        if t in generated or t in recent:
            assert pos[t] <= logits[t]
        else:
            assert pos[t] == logits[t]


@given(logit_vectors, st.integers(0, 2**32 - 1), st.floats(0.2, 2.0))
@settings(max_examples=30)
def test_same_seed_same_tokens(logits, seed, temperature):
    params = SamplingParams(temperature=temperature, top_p=0.95)
    a = Sampler(params, np.random.default_rng(seed))
    b = Sampler(params, np.random.default_rng(seed))
    assert [a.sample(logits, [0], 1).token for _ in range(10)] == [b.sample(logits, [0], 1).token for _ in range(10)]


def test_different_seeds_give_different_tokens():
    logits = np.zeros(1000, np.float32)
    draw = lambda seed: [Sampler(SamplingParams(temperature=1.0), np.random.default_rng(seed)).sample(logits, [0], 1).token
                         for _ in range(3)]
    assert draw(1) != draw(2)


def test_logprobs_come_before_truncation_and_after_temperature():
    logits = np.array([0.0, math.log(2.0), math.log(3.0), -1.0], np.float32)
    params = SamplingParams(temperature=0.5, top_k=1, top_logprobs=3, presence_penalty=0.2)
    sample = Sampler(params, np.random.default_rng(0)).sample(logits, [3, 2], 1)
    penalized = [float(x) for x in logits]
    penalized[2] -= 0.2  # generated once (the context after the 1-token prompt)
    expected = [math.log(p) for p in reference_probs(penalized, 0.5)]
    assert sample.token == 2  # top_k=1 keeps only the best token
    assert math.isclose(sample.logprob, expected[2], rel_tol=1e-9)
    assert [t for t, _ in sample.top_logprobs] == [2, 1, 0]
    np.testing.assert_allclose([lp for _, lp in sample.top_logprobs], [expected[2], expected[1], expected[0]], rtol=1e-9)


def test_greedy_reports_logprobs_without_temperature():
    logits = np.array([1.0, 2.0, 0.5], np.float32)
    sample = Sampler(SamplingParams(temperature=0.0, top_logprobs=2)).sample(logits, [0], 1)
    expected = [math.log(p) for p in reference_probs([1.0, 2.0, 0.5])]
    assert sample.token == 1 and math.isclose(sample.logprob, expected[1], rel_tol=1e-9)


def test_mask_forbids_tokens():
    logits = np.array([5.0, 1.0, 0.0], np.float32)
    allowed = np.array([False, True, True])
    assert Sampler(SamplingParams()).sample(logits, [0], 1, allowed).token == 1
    sampler = Sampler(SamplingParams(temperature=2.0), np.random.default_rng(0))
    assert all(sampler.sample(logits, [0], 1, allowed).token != 0 for _ in range(200))


stop_texts = st.text(alphabet="ab c\n", max_size=30)


@given(st.lists(stop_texts, max_size=12), st.lists(st.text(alphabet="ab c\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_string_never_appears_in_the_output(pieces, stops):
    matcher = StopStrings(stops)
    out = ""
    for piece in pieces:
        out += matcher.add(piece)
        assert not any(s in out for s in stops)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    full = "".join(pieces)
    hits = [full.find(s) for s in stops if s in full]
    assert out == (full[:min(hits)] if hits else full)
    assert matcher.stopped == bool(hits)


def test_stop_string_spanning_pieces_is_held_back_then_cut():
    matcher = StopStrings(["</end>"])
    assert matcher.add("hello </") == "hello "
    assert matcher.add("en") == ""
    assert matcher.add("d> more") == "" and matcher.stopped


def test_held_back_text_is_released_when_it_cannot_be_a_stop():
    matcher = StopStrings(["</end>"])
    assert matcher.add("a </e") == "a "
    assert matcher.add("x") == "</ex"
    assert matcher.flush() == ""


def test_sampler_handles_a_full_vocabulary_with_everything_on():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(49152) * 3).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=1.0,
                            frequency_penalty=0.5, repetition_penalty=1.1, logit_bias={5: 1.0}, top_logprobs=5)
    sampler = Sampler(params, np.random.default_rng(0))
    probs = np.exp(log_softmax(apply_penalties(logits, list(range(100)), 50, params) / 0.7))
    support = reference_support(probs, 50, 0.9, 0.05)
    assert all(sampler.sample(logits, list(range(100)), 50).token in support for _ in range(50))
