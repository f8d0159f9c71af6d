"""Sampler properties (hypothesis) against plain-Python references of each rule."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_ref.sampler import (DRAW_BLOCK, Sampler, SamplingParams, StopStrings, apply_penalties, draw,
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


@settings(deadline=None)
@given(st.integers(1, 3 * DRAW_BLOCK + 5), st.floats(0, 0.5), st.integers(0, 2**32 - 1))
def test_draw_is_the_first_running_sum_past_the_target(n, zero_share, seed):
    """Against the plain inverse CDF: the first index whose running sum exceeds u * total; whole
    blocks and scattered weights of zero, and u up to the largest below 1, never pick a zero."""
    rng = np.random.default_rng(seed)
    weights = rng.exponential(size=n) * (rng.random(n) >= zero_share)
    weights[rng.integers(0, n):][:DRAW_BLOCK] = 0
    weights[rng.integers(0, n)] = 0.5  # some weight is left
    for u in [*rng.random(20), 0.0, np.nextafter(1.0, 0.0)]:
        picked = draw(weights, u)
        assert weights[picked] > 0
        cdf = np.cumsum(weights)
        plain = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)
        if abs(cdf[plain] - u * cdf[-1]) > 1e-9 * cdf[-1] and abs(cdf[plain - 1] - u * cdf[-1]) > 1e-9 * cdf[-1]:
            assert picked == plain  # (the same but where the two sums round differently at an edge)


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


# Fixed top_k / top_p / min_p cases whose kept sets are derived by hand. The probabilities are
# binary fractions, so every mass and cutoff below is exact in float64 and the boundaries are
# decided by the rule, not by rounding. The rule (mistral.rs's `filter_top_kp_min_p`, llama.cpp's
# top_k -> top_p -> min_p chain): sort descending, ties by lower id; keep the first top_k;
# cutoff = top_p * (mass of those k), i.e. top_p of the top-k distribution renormalized; keep a
# token while the mass before it is < cutoff; then keep the probs > min_p * (largest prob).
# Each case notes the kept set of the near-misses it rules out.
TRUNCATION_CASES = [
    # sorted: id1 .25, id2 .125, id3 .125, id5 .125, id6 .125, id7 .125, id0 .0625, id4 .0625
    # top-3 = 1, 2, 3, mass .5; cutoff .75 * .5 = .375; mass before: 0, .25, .375 -> [1, 2].
    # top_p on the unrenormalized mass (cutoff .75): [1, 2, 3]; top_p before top_k (full-vocab
    # mass before 0, .25, .375, .5, .625 < .75 keeps 1, 2, 3, 5, 6; top-3 of those): [1, 2, 3];
    # `<=` (.375 <= .375): [1, 2, 3]; cumulative including itself < cutoff (.25, .375): [1].
    pytest.param([.0625, .25, .125, .125, .0625, .125, .125, .125], 3, .75, None, [1, 2],
                 id="top_k-then-renormalized-top_p-boundary"),
    # sorted: id2 .5, id4 .25, id1 .125, id0 .0625, id3 .0625
    # top-2 mass .75; cutoff .625 * .75 = .46875; id4's mass before .5 >= .46875 -> [2].
    # unrenormalized (cutoff .625) or top_p first (.5 < .625, then top-2): [2, 4].
    pytest.param([.0625, .125, .5, .0625, .25], 2, .625, None, [2],
                 id="top_k-then-renormalized-top_p-margin"),
    # sorted: id1 .5, id3 .25, id0 .125, id2 .125; no top_k, cutoff .75 * 1;
    # mass before 0, .5, .75 -> [1, 3]. `<=`: [1, 3, 0]; cumulative including itself (.5, .75): [1].
    pytest.param([.125, .5, .125, .25], None, .75, None, [1, 3], id="top_p-exact-boundary"),
    # sorted: id0 .5, id1 .25, id2 .125, id3 .0625, id4 .0625; top_p .5625, min_p .2.
    # top_p (mass 1): mass before 0, .5, .75 vs .5625 -> [0, 1]; min_p: .2 * .5 = .1 < .25 -> [0, 1].
    # min_p first (keeps .5, .25, .125, mass .875) then top_p: cutoff .5625 * .875 = .4921875,
    # id1's mass before .5 >= it -> [0].
    pytest.param([.5, .25, .125, .0625, .0625], None, .5625, .2, [0, 1], id="min_p-after-top_p"),
    # sorted: id9 .25, id2 .125, id5 .125, then eight .0625. top-3 = 9, 2, 5 (mass .5);
    # min_p .25 * max .25 = .0625 < .125 -> [9, 2, 5]. The max renormalized over the top-k
    # (.25 / .5 = .5) against unrenormalized probs: .25 * .5 = .125, .125 > .125 fails -> [9].
    pytest.param([.0625, .0625, .125, .0625, .0625, .125, .0625, .0625, .0625, .25, .0625], 3, None, .25,
                 [9, 2, 5], id="min_p-relative-to-max-after-top_k"),
    # same probs, top-3, min_p .5: .5 * .25 = .125, and .125 > .125 fails -> [9].
    # `>=`: [9, 2, 5]; renormalized probs (.5, .25, .25) against the unrenormalized max's .125:
    # [9, 2, 5].
    pytest.param([.0625, .0625, .125, .0625, .0625, .125, .0625, .0625, .0625, .25, .0625], 3, None, .5,
                 [9], id="min_p-strict-boundary"),
    # sorted: id0 .25, id3 .25 (ties by lower id), then id1, id2, id4, id5 at .125 -> top-3 [0, 3, 1];
    # breaking ties by higher id would give [3, 0, 5].
    pytest.param([.25, .125, .125, .25, .125, .125], 3, None, None, [0, 3, 1], id="top_k-ties-by-lower-id"),
]


@pytest.mark.parametrize("probs, top_k, top_p, min_p, expected", TRUNCATION_CASES)
def test_truncation_fixed_cases(probs, top_k, top_p, min_p, expected):
    probs = np.array(probs, np.float64)
    assert probs.sum() == 1.0
    assert truncated_support(probs, top_k, top_p, min_p).tolist() == expected
    assert reference_support(probs, top_k, top_p, min_p) == expected


def test_sampler_renormalizes_top_p_over_the_top_k():
    """Through Sampler: of top-2 {2: .5, 4: .25} top_p .625 keeps only id 2 (.625 * .75 =
    .46875 <= .5, the mass before id 4). Applying top_p to the whole distribution (cutoff .625)
    would keep id 4 as well and draw it a third of the time."""
    logits = np.log(np.array([.0625, .125, .5, .0625, .25], np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=.625), np.random.default_rng(0))
    assert {sampler.sample(logits, [0], 1).token for _ in range(200)} == {2}


def test_greedy_skips_the_logprob_nobody_reads():
    logits = np.array([0.1, 2.0, -1.0, 2.0], np.float32)
    quiet = Sampler(SamplingParams(logprob=False)).sample(logits, [], 0)
    assert quiet.token == 1 and math.isnan(quiet.logprob) and quiet.top_logprobs == []
    full = Sampler(SamplingParams()).sample(logits, [], 0)
    assert full.token == 1 and math.isclose(full.logprob, math.log(reference_probs(logits.tolist())[1]),
                                            rel_tol=1e-9)
