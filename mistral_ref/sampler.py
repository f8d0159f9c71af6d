"""Choosing the next token from logits, with mistral.rs's semantics:

  0. DRY ("don't repeat yourself", mistral.rs's and koboldcpp's): a token that would extend a
     repeat of the context's ending by n >= allowed_length tokens loses
     multiplier * base^(n - allowed_length) (`dry_penalties`).
  1. frequency and presence penalties over the generated tokens (OpenAI):
       logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty
     repetition penalty (CTRL/HF) over the last `repeat_last_n` tokens of prompt + output:
       logit[t] = logit[t] / r if logit[t] > 0 else logit[t] * r
  2. logit bias added; tokens a grammar forbids set to -inf.
  3. greedy (temperature None or 0): argmax, first index on ties. Otherwise
     probs = softmax(logits / temperature), then truncation over probs sorted descending (ties:
     lower id first): keep the first top_k; keep a token while the mass before it is < top_p * (mass
     of the kept top_k); drop tokens with prob <= min_p * (largest prob). Sample from what is left.
  4. reported logprobs come from the distribution of step 3 before truncation (softmax(logits) when
     greedy), as mistral.rs reports them.

Also here: `StopStrings`, which finds stop strings in streamed text, and `GrammarConstraint`, the
llguidance token mask. Vectorised NumPy over the vocabulary, in float64 so that truncation
boundaries do not depend on float32 rounding.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from mistral_ref.errors import GrammarError, InputError
from mistral_ref.tokenizer import TOKEN_CONTROL, Tokenizer

GRAMMAR_TYPES = ("regex", "json_schema", "lark", "llguidance")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. None turns a knob off (mistral.rs's convention)."""

    temperature: float | None = None  # None or 0: greedy
    top_k: int | None = None  # None or <= 0: all tokens
    top_p: float | None = None  # in (0, 1]; None or 1: no nucleus truncation
    min_p: float | None = None  # in [0, 1); None or 0: off
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # > 0; None or 1: off
    repeat_last_n: int = 64  # how far back the repetition penalty looks
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    top_logprobs: int = 0  # alternatives to report for each token
    dry_multiplier: float | None = None  # None or 0: DRY off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_breakers: frozenset[int] = frozenset()  # token ids no repeat extends across
    logprob: bool = True  # compute the chosen token's logprob (greedy: a pass of exp over the vocabulary)

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def penalizes(self) -> bool:
        """Whether any of steps 0 to 2 (DRY, presence / frequency / repetition penalties, logit
        bias) changes the logits."""
        return bool(self.dry_multiplier or self.presence_penalty or self.frequency_penalty
                    or (self.repetition_penalty is not None and self.repetition_penalty != 1.0)
                    or self.logit_bias)

    @property
    def truncates(self) -> bool:
        return bool((self.top_k is not None and self.top_k > 0)
                    or (self.top_p is not None and 0.0 < self.top_p < 1.0)
                    or (self.min_p is not None and 0.0 < self.min_p < 1.0))


@dataclass(frozen=True)
class Sample:
    """One chosen token and what may be reported about it."""

    token: int
    logprob: float  # log-probability of `token` in the reported distribution (step 4); NaN when
    #                 greedy and not asked for (SamplingParams.logprob)
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), most likely first


DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")  # mistral.rs's default
DRY_MAX_MATCH = 50  # mistral.rs's bound on a repeat's length: the cost stays linear in the context


def dry_penalties(context: Sequence[int], params: SamplingParams) -> dict[int, float]:
    """Step 0: token id -> DRY penalty. Each earlier occurrence at i of the context's last token
    proposes its successor context[i + 1] (unless that is a breaker), with the length of the match
    between the tokens ending at i and the context's ending: compared backwards from i and the last
    token, stopping at a difference, a breaker in the ending (the last token itself is not
    checked), the start, or DRY_MAX_MATCH. A token's match is its longest proposal."""
    ids = np.asarray(context, dtype=np.int64)
    n = len(ids)
    if not params.dry_multiplier or n < 2:
        return {}
    breakers = params.dry_breakers
    longest: dict[int, int] = {}
    for i in np.flatnonzero(ids[:-1] == ids[-1]):
        successor = int(ids[i + 1])
        if successor in breakers:
            continue
        length = 1
        while length < DRY_MAX_MATCH and length <= i:
            ending = int(ids[n - 1 - length])
            if ids[i - length] != ending or ending in breakers:
                break
            length += 1
        longest[successor] = max(length, longest.get(successor, 0))
    allowed = params.dry_allowed_length
    return {token: params.dry_multiplier * params.dry_base ** (length - allowed)
            for token, length in longest.items() if length >= allowed}


def apply_penalties(logits: np.ndarray, context: Sequence[int], prompt_len: int,
                    params: SamplingParams) -> np.ndarray:
    """Steps 0 to 2 without the grammar: float (vocab,) logits -> a new float64 (vocab,) array.

    context: prompt + generated ids, the first `prompt_len` of them the prompt.
    """
    out = np.array(logits, dtype=np.float64)
    vocab = len(out)
    for token, penalty in dry_penalties(context, params).items():
        if token < vocab:
            out[token] -= penalty
    generated = np.asarray(context[prompt_len:], dtype=np.int64)
    if (params.frequency_penalty or params.presence_penalty) and generated.size:
        counts = np.bincount(generated, minlength=vocab)[:vocab]
        out -= counts * (params.frequency_penalty or 0.0) + (counts > 0) * (params.presence_penalty or 0.0)
    r = params.repetition_penalty
    if r is not None and r != 1.0 and params.repeat_last_n > 0 and len(context):
        seen = np.unique(np.asarray(context[-params.repeat_last_n:], dtype=np.int64))
        seen = seen[seen < vocab]
        out[seen] = np.where(out[seen] > 0, out[seen] / r, out[seen] * r)
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias.keys(), np.int64, len(params.logit_bias))
        out[ids] += np.fromiter(params.logit_bias.values(), np.float64, len(ids))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 (vocab,) log-probabilities of float (vocab,) logits; -inf stays -inf."""
    shifted = logits - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def top_sorted(probs: np.ndarray, m: int) -> np.ndarray:
    """Indices of the `m` largest values, descending, ties by lower id: the same as
    `np.argsort(-probs, kind="stable")[:m]` in O(vocab + m log m). int64 (min(m, vocab),)."""
    n = len(probs)
    if m >= n:
        return np.argsort(-probs, kind="stable")
    kth = np.partition(probs, n - m)[n - m]  # the m-th largest value
    above = np.flatnonzero(probs > kth)
    ties = np.flatnonzero(probs == kth)[:m - len(above)]
    idx = np.concatenate([above, ties])
    return idx[np.lexsort((idx, -probs[idx]))]


def truncated_support(probs: np.ndarray, top_k: int | None, top_p: float | None,
                      min_p: float | None) -> np.ndarray:
    """The ids sampling may pick after top-k, top-p and min-p, most likely first (step 3).

    probs: float64 (vocab,) probabilities. Returns int64 (n_kept,); never empty while some prob > 0.
    """
    n = len(probs)
    k = n if top_k is None or top_k <= 0 else min(top_k, n)
    if top_p is not None and 0.0 < top_p < 1.0:
        if k < n:
            order = top_sorted(probs, k)
            mass = np.cumsum(probs[order])
            cutoff = top_p * mass[-1]
        else:
            # The nucleus is a prefix of the sorted order: sort a growing head until its mass
            # reaches the cutoff rather than sorting the whole vocabulary. A cumsum over a longer
            # head starts with the same values, so the prefix found is the full sort's prefix.
            cutoff, m = top_p * float(np.sum(probs)), 64
            while True:
                order = top_sorted(probs, m)
                mass = np.cumsum(probs[order])
                if mass[-1] >= cutoff or m >= n:
                    break
                m *= 8
        mass_before = np.concatenate([[0.0], mass[:-1]])
        order = order[mass_before < cutoff]
    else:
        order = top_sorted(probs, k)
    if min_p is not None and 0.0 < min_p < 1.0:
        order = order[probs[order] > min_p * probs[order[0]]]
    return order[probs[order] > 0]


DRAW_BLOCK = 1024  # weights a block in `draw`


def draw(weights: np.ndarray, u: float) -> int:
    """The index u (uniform in [0, 1)) picks from unnormalised weights (float64 (n,), >= 0, some
    > 0): the first whose running sum exceeds u times their total; never one of weight 0. The
    blocks' sums first, then the running sum inside one block of DRAW_BLOCK (a cumsum over
    SmolLM2's 49152 weights was half of a temperature sample's 250 us)."""
    whole = len(weights) // DRAW_BLOCK * DRAW_BLOCK
    block_sums = weights[:whole].reshape(-1, DRAW_BLOCK).sum(axis=1)
    if whole < len(weights):
        block_sums = np.append(block_sums, weights[whole:].sum())
    cdf = np.cumsum(block_sums)
    target = u * cdf[-1]
    b = min(int(np.searchsorted(cdf, target, side="right")), len(cdf) - 1)
    while block_sums[b] <= 0:  # rounding put the target at the very end: the last block with weight
        b -= 1
    block = weights[b * DRAW_BLOCK:(b + 1) * DRAW_BLOCK]
    j = int(np.searchsorted(np.cumsum(block), target - (cdf[b - 1] if b else 0.0), side="right"))
    if j == len(block):  # rounding again: the block's last token with weight
        j = int(np.flatnonzero(block)[-1])
    return b * DRAW_BLOCK + j


class Sampler:
    """Picks tokens for one sequence with `params`, drawing from its own random generator."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator | None = None):
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng()

    def sample(self, logits: np.ndarray, context: Sequence[int], prompt_len: int,
               allowed: np.ndarray | None = None) -> Sample:
        """Choose the next token. logits: float (vocab,) from the model; context: prompt +
        generated ids; allowed: optional bool (vocab,) grammar mask."""
        p = self.params
        # Greedy with nothing to change the logits and no logprob to report: the argmax of the
        # model's own logits is all (no float64 copy, no penalty pass).
        plain = p.greedy and not (p.logprob or p.top_logprobs or p.penalizes) and allowed is None
        x = logits if plain else apply_penalties(logits, context, prompt_len, p)
        if allowed is not None:
            x[~allowed] = -np.inf
        largest = np.max(x)
        if not np.isfinite(largest):
            if allowed is not None and not allowed.any():
                raise GrammarError("no token is allowed at this point (the grammar cannot continue)")
            raise InputError("no token can be sampled: the logits are NaN, +inf or all -inf")
        if p.greedy:
            token = int(np.argmax(x))
            if not (p.logprob or p.top_logprobs):  # nobody reads it: skip the exp over the vocabulary
                return Sample(token, math.nan, [])
            logp = log_softmax(x)
            top = top_sorted(logp, p.top_logprobs) if p.top_logprobs > 0 else np.empty(0, np.int64)
            return Sample(token, float(logp[token]), [(int(i), float(logp[i])) for i in top])
        # x is apply_penalties' own float64 copy: scaled and shifted in place (the max of x / t is
        # max(x) / t, the same float), a vocabulary pass fewer each (n choices sample n times a step)
        shifted = np.divide(x, p.temperature, out=x)
        shifted -= largest / p.temperature
        weights = np.exp(shifted)  # unnormalised probs: sampling does not need the division
        total = np.sum(weights)
        if p.truncates:
            support = truncated_support(weights / total, p.top_k, p.top_p, p.min_p)
            token = int(support[draw(weights[support], self.rng.random())])
        else:
            token = draw(weights, self.rng.random())
        log_total = np.log(total)
        top = top_sorted(shifted - log_total, p.top_logprobs) if p.top_logprobs > 0 else np.empty(0, np.int64)
        return Sample(token, float(shifted[token] - log_total), [(int(i), float(shifted[i] - log_total)) for i in top])


class StopStrings:
    """Cuts streamed text at the first stop string, which may span token boundaries.

    `add(delta)` returns text that is final: it holds back a tail that could still become the start
    of a stop string, so a stop string never reaches the caller, even in pieces.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything added so far
        self.emitted = 0  # length of the prefix of `text` already returned
        self.stopped = False

    def add(self, delta: str) -> str:
        """Feed new text; returns the newly final part. Sets `stopped` when a stop string is seen."""
        self.text += delta
        # An occurrence cannot start before `emitted`: that text was returned only once no stop
        # string could begin there.
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) - self._held_back()
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out

    def flush(self) -> str:
        """End of generation without a stop string: the held-back tail is final."""
        out, self.emitted = ("" if self.stopped else self.text[self.emitted:]), len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        tail = self.text[self.emitted:]
        for n in range(min(len(tail), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stops):
                return n
        return 0


# -- grammars (llguidance) ------------------------------------------------------------------------
class _LLGuidanceVocab:
    """Our tokenizer as llguidance's TokenizerWrapper protocol: bytes per id (control tokens
    marked with a leading 0xFF, llguidance's convention), EOS, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size)
                                  if tokenizer.token_types[i] == TOKEN_CONTROL]
        special = set(self.special_token_ids)
        self.tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]

    def __call__(self, text: str) -> list[int]:
        """Ids of `text` as a continuation (llguidance tokenizes forced text with this)."""
        if isinstance(text, bytes):  # llguidance probes whether bytes are accepted: they are not
            raise TypeError("text must be str")
        tok = self._tokenizer
        if not tok.add_space_prefix:
            return tok.encode(text)
        # SentencePiece puts a space before the start of a text; a continuation has none. Encode
        # after a newline (which never merges with what follows) and drop the newline's ids.
        head = tok.encode("\n")
        ids = tok.encode("\n" + text)
        return ids[len(head):] if ids[:len(head)] == head else tok.encode(text)


@lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer: Tokenizer):
    # Building the token trie takes ~0.1-1 s for a large vocabulary: once per tokenizer.
    import llguidance
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_LLGuidanceVocab(tokenizer)),
                                  eos_token=sorted(tokenizer.stop_ids) or None)


def compile_grammar(grammar: str, grammar_type: str) -> str:
    """llguidance's grammar text for `grammar` of `grammar_type` ("regex", "json_schema", "lark",
    or "llguidance": llguidance's own grammar, JSON or Lark, passed through as mistral.rs does).
    Raises GrammarError for an unknown type or a JSON schema that is not JSON, ImportError
    naming the `grammar` extra when llguidance is not installed."""
    if grammar_type not in GRAMMAR_TYPES:
        raise GrammarError(f"unknown grammar_type {grammar_type!r} (known: {', '.join(GRAMMAR_TYPES)})")
    try:
        import llguidance
    except ImportError:
        raise ImportError("grammar-constrained decoding needs llguidance: "
                          "pip install 'mistral-ref[grammar]'") from None
    if grammar_type == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar)
    if grammar_type == "lark":
        return llguidance.LLMatcher.grammar_from_lark(grammar)
    if grammar_type == "llguidance":
        return grammar
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.loads(grammar))
    except ValueError as e:
        raise GrammarError(f"json_schema is not a JSON object: {e}") from None


class GrammarConstraint:
    """The set of tokens that keep the output inside a grammar, step by step (llguidance)."""

    def __init__(self, tokenizer: Tokenizer, compiled_grammar: str):
        """compiled_grammar: what `compile_grammar` returns (compile once, match per sequence)."""
        import llguidance
        self.vocab_size = tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), compiled_grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def allowed(self) -> np.ndarray:
        """bool (vocab,): which tokens may come next."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(words, bitorder="little")[:self.vocab_size].astype(bool)

    def consume(self, token: int) -> None:
        """Advance past a sampled token (one `allowed()` permitted)."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} violates the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """True once the grammar admits no further token (the output is complete)."""
        return self.matcher.is_stopped()
