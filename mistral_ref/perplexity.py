"""Perplexity and KL divergence by llama.cpp's method (tools/perplexity/perplexity.cpp).

The text is tokenized once (with BOS when the model adds one) and cut into chunks of `ctx` tokens.
Each chunk runs from a fresh cache, its first token replaced by BOS when the model adds one, and
the logits at positions ctx/2 .. ctx-2 are scored against the next token: the second half of each
chunk is predicted with at least ctx/2 tokens of context. PPL = exp(mean NLL), its standard error
PPL * sqrt(var(NLL) / (n - 1)), as llama-perplexity prints them.

KL divergence compares a model against a base model's log-probabilities on the same tokens. The
base's are saved (`save_logits`) in llama.cpp's file format, so llama-perplexity's
--kl-divergence-base files work both ways: "_logits_", int32 n_ctx, n_vocab, n_chunk, the int32
tokens, then per chunk and scored position the log-probabilities quantized to uint16 (two float32
fields, scale and min log-prob, then one uint16 per token, padded to an even count); log-probs
more than 16 below the maximum read as the minimum. The statistics are llama.cpp's: mean KLD and
its error, percentiles of KLD and of Δp (the change in the correct token's probability), RMS Δp,
and how often both models put the same token on top.

Chunks are independent, so they can be scored anywhere: `ChunkScorer` scores one; the driver runs
them in this process or on Ray actors (mistral_ref.distributed) and adds the results up in chunk
order, so both give the same numbers.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mistral_ref.errors import InputError
from mistral_ref.model import Model
from mistral_ref.tokenizer import Tokenizer

MAGIC = b"_logits_"
LOG_PROB_RANGE = 16.0  # llama.cpp keeps log-probs down to this far below the maximum
PERCENTILES = (("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9),
               ("Median", 0.5), ("10.0%", 0.1), ("5.0%", 0.05), ("1.0%", 0.01), ("0.1%", 0.001),
               ("Minimum", 0.0))
P_DIFF_PERCENTILES = PERCENTILES[:5] + (("75.0%", 0.75), ("Median", 0.5), ("25.0%", 0.25)) + PERCENTILES[6:]


def first_scored(ctx: int) -> int:
    """The first position of a chunk whose prediction is scored."""
    return ctx // 2


def text_chunks(tokenizer: Tokenizer, text: str, ctx: int, n_chunks: int | None = None) -> np.ndarray:
    """The text's tokens (BOS first when the model adds one) as int32 (n_chunks, ctx) chunks: all
    whole chunks, or the first `n_chunks`. Raises InputError when there are fewer than 2 * ctx
    tokens (llama.cpp's minimum)."""
    if ctx < 4 or ctx % 2:
        raise InputError(f"ctx must be an even number >= 4, got {ctx}")
    tokens = np.asarray(tokenizer.encode(text, add_special_tokens=True), dtype=np.int32)
    if len(tokens) < 2 * ctx:
        raise InputError(f"the text has {len(tokens)} tokens; a context of {ctx} needs at least {2 * ctx}")
    n = len(tokens) // ctx if n_chunks is None or n_chunks <= 0 else min(n_chunks, len(tokens) // ctx)
    return tokens[:n * ctx].reshape(n, ctx)


# -- one chunk ----------------------------------------------------------------------------------
def log_prob_row_count(n_vocab: int) -> int:
    """uint16 values per scored position in a log-prob file: 4 (two float32) + n_vocab, even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """llama.cpp's compact log-probabilities of float32 (n, vocab) logits: uint16 (n, row count)."""
    logits = np.asarray(logits, np.float32)
    n, vocab = logits.shape
    top = logits.max(axis=1)
    low = np.maximum(logits.min(axis=1), top - np.float32(LOG_PROB_RANGE))
    log_sum = np.log(np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    out = np.zeros((n, log_prob_row_count(vocab)), np.uint16)
    out[:, :4] = np.stack([scale, low - top - log_sum], axis=1).astype(np.float32).view(np.uint16)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    levels = np.rint((logits - low[:, None]) * inv[:, None])  # rint: ties to even, as nearest_int
    out[:, 4:4 + vocab] = np.where(logits > low[:, None], levels, 0).astype(np.uint16)
    return out


def dequantize_log_probs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """float32 (n, vocab) log-probabilities of `quantize_log_probs` rows."""
    d = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    return (d[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + d[:, 1:2]).astype(np.float32)


@dataclass
class ChunkScore:
    """Sums over one chunk's scored positions (float64), and with a base model the per-position
    KLD and Δp values; `log_probs`: the chunk's quantized log-probs when saving."""

    count: int
    nll: float
    nll2: float
    nll_base: float = 0.0
    nll_base2: float = 0.0
    nll_nll_base: float = 0.0
    kld: np.ndarray = field(default_factory=lambda: np.empty(0))
    p_diff: np.ndarray = field(default_factory=lambda: np.empty(0))
    same_top: int = 0
    log_probs: np.ndarray | None = None


def score_logits(logits: np.ndarray, targets: np.ndarray, base_rows: np.ndarray | None = None,
                 save: bool = False) -> ChunkScore:
    """Score float32 (n, vocab) logits against int (n,) next tokens; with `base_rows` (the base
    model's quantized log-probs for the same positions) also KLD and Δp, as llama.cpp does."""
    logits = np.asarray(logits, np.float32)
    rows = np.arange(len(targets))
    top = logits.max(axis=1)
    sum_exp = np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)
    nll = top + np.log(sum_exp) - logits[rows, targets]  # float64
    score = ChunkScore(len(targets), float(nll.sum()), float((nll * nll).sum()),
                       log_probs=quantize_log_probs(logits) if save else None)
    if base_rows is None:
        return score
    vocab = logits.shape[1]
    log_sum = np.log(sum_exp).astype(np.float32)
    nll32 = (top + log_sum - logits[rows, targets]).astype(np.float32)
    base = dequantize_log_probs(base_rows, vocab)
    nll_base = -base[rows, targets]
    shifted = (top + log_sum)[:, None]  # log p = logit - shifted
    kept = base > np.float32(-LOG_PROB_RANGE)
    terms = np.where(kept, np.exp(base) * (base - logits + shifted), np.float32(0))
    score.kld = terms.sum(axis=1, dtype=np.float64)
    score.p_diff = (np.exp(-nll32) - np.exp(-nll_base)).astype(np.float64)
    score.same_top = int(np.sum(logits.argmax(axis=1) == base.argmax(axis=1)))
    n64, b64 = nll32.astype(np.float64), nll_base.astype(np.float64)
    score.nll, score.nll2 = float(n64.sum()), float((n64 * n64).sum())
    score.nll_base, score.nll_base2, score.nll_nll_base = float(b64.sum()), float((b64 * b64).sum()), float((n64 * b64).sum())
    return score


class ChunkScorer:
    """Scores chunks with one loaded model: what a process, or each Ray actor, holds."""

    def __init__(self, model_path: str | os.PathLike, activations: str = "f32", threads: int | None = None):
        if threads:
            import numba
            numba.set_num_threads(threads)
        self.model = Model.load(model_path, activations=activations)
        tokenizer = Tokenizer.of_model(self.model.file)
        self.bos = tokenizer.bos_id if tokenizer.add_bos else None
        self.n_vocab = self.model.config.vocab_size

    def score(self, chunk: np.ndarray, base_rows: np.ndarray | None = None, save: bool = False) -> ChunkScore:
        """One chunk (int (ctx,) tokens) from a fresh cache, BOS first when the model adds one."""
        ctx, first = len(chunk), first_scored(len(chunk))
        ids = np.array(chunk, dtype=np.int64)
        if self.bos is not None:
            ids[0] = self.bos
        logits = self.model.logits(ids)[first:ctx - 1]
        return score_logits(logits, np.asarray(chunk[first + 1:], np.int64), base_rows, save)


# -- the whole text -----------------------------------------------------------------------------
@dataclass
class Perplexity:
    ppl: float
    ppl_stderr: float
    n_scored: int
    n_chunks: int
    ctx: int
    chunk_ppl: list[float]  # the running estimate after each chunk


def mean_and_stderr(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and sqrt(var / (count - 1)) (0 for <= 10 values)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


def perplexity_of(scores: Iterable[ChunkScore], ctx: int) -> Perplexity:
    nll = nll2 = 0.0
    count, running = 0, []
    for s in scores:
        nll, nll2, count = nll + s.nll, nll2 + s.nll2, count + s.count
        running.append(math.exp(nll / count))
    mean = nll / count
    var = nll2 / count - mean * mean
    stderr = math.sqrt(var / (count - 1)) if var > 0 else 0.0
    return Perplexity(math.exp(mean), math.exp(mean) * stderr, count, len(running), ctx, running)


@dataclass
class KLDivergence:
    ppl: float
    ppl_stderr: float
    ppl_base: float
    ppl_base_stderr: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    kld: float
    kld_stderr: float
    kld_percentiles: dict[str, float]
    p_diff: float
    p_diff_stderr: float
    p_diff_percentiles: dict[str, float]
    rms_p_diff: float
    rms_p_diff_stderr: float
    same_top: float
    same_top_stderr: float
    n_scored: int
    n_chunks: int


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear interpolation between sorted values."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = fraction * (len(values) - 1)
    i = int(p)
    return float((1 - (p - i)) * values[i] + (p - i) * values[min(i + 1, len(values) - 1)])


def _median(values: np.ndarray) -> float:
    n = len(values)
    return float(values[n // 2] if n % 2 else 0.5 * (values[n // 2] + values[n // 2 - 1]))


def kl_divergence_of(scores: Sequence[ChunkScore]) -> KLDivergence:
    """llama.cpp's KL-divergence statistics over chunk scores made with base rows."""
    n = sum(s.count for s in scores)
    tot = lambda name: sum(getattr(s, name) for s in scores)  # noqa: E731
    log_ppl = mean_and_stderr(tot("nll"), tot("nll2"), n)
    log_base = mean_and_stderr(tot("nll_base"), tot("nll_base2"), n)
    cov = 0.0 if n < 10 else (tot("nll_nll_base") / n - (tot("nll") / n) * (tot("nll_base") / n)) / (n - 1)
    kld = np.concatenate([s.kld for s in scores])
    p_diff = np.concatenate([s.p_diff for s in scores])
    kld_mean = mean_and_stderr(float(kld.sum()), float((kld * kld).sum()), n)
    p_mean = mean_and_stderr(float(p_diff.sum()), float((p_diff * p_diff).sum()), n)
    p2 = p_diff * p_diff
    mse = mean_and_stderr(float(p2.sum()), float((p2 * p2).sum()), n)
    rms = math.sqrt(mse[0])
    same = tot("same_top") / n
    kld_sorted, p_sorted = np.sort(kld), np.sort(p_diff)
    pct = lambda values, table: {name: (_median(values) if name == "Median" else percentile(values, f))  # noqa: E731
                                 for name, f in table}
    return KLDivergence(
        ppl=math.exp(log_ppl[0]), ppl_stderr=math.exp(log_ppl[0]) * log_ppl[1],
        ppl_base=math.exp(log_base[0]), ppl_base_stderr=math.exp(log_base[0]) * log_base[1],
        ln_ppl_ratio=log_ppl[0] - log_base[0],
        ln_ppl_ratio_stderr=math.sqrt(max(0.0, log_ppl[1] ** 2 + log_base[1] ** 2 - 2 * cov)),
        kld=kld_mean[0], kld_stderr=kld_mean[1], kld_percentiles=pct(kld_sorted, PERCENTILES),
        p_diff=p_mean[0], p_diff_stderr=p_mean[1], p_diff_percentiles=pct(p_sorted, P_DIFF_PERCENTILES),
        rms_p_diff=rms, rms_p_diff_stderr=0.5 / rms * mse[1] if rms else 0.0,
        same_top=same, same_top_stderr=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        n_scored=n, n_chunks=len(scores))


# -- log-prob files -----------------------------------------------------------------------------
def write_log_prob_header(out: BinaryIO, chunks: np.ndarray, n_vocab: int) -> None:
    n_chunk, ctx = chunks.shape
    out.write(MAGIC + np.array([ctx, n_vocab, n_chunk], "<i4").tobytes())
    out.write(np.ascontiguousarray(chunks, "<i4").tobytes())


@dataclass
class LogProbFile:
    """A base model's log-prob file: the chunks it scored, and each chunk's quantized rows."""

    path: Path
    chunks: np.ndarray  # int32 (n_chunk, ctx)
    n_vocab: int
    data: np.ndarray  # uint16 map of the rows, (n_chunk, ctx - 1 - ctx // 2, row count)

    @classmethod
    def open(cls, path: str | os.PathLike) -> LogProbFile:
        path = Path(path)
        raw = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        if raw[:8].tobytes() != MAGIC or len(raw) < 20:
            raise InputError(f"{path} is not a log-probability file (no {MAGIC!r} header)")
        ctx, n_vocab, n_chunk = (int(v) for v in raw[8:20].view("<i4"))
        rows, width = ctx - 1 - first_scored(ctx), log_prob_row_count(n_vocab)
        start = 20 + 4 * ctx * n_chunk
        if min(ctx, n_vocab, n_chunk) < 1 or len(raw) != start + 2 * n_chunk * rows * width:
            raise InputError(f"{path}: {len(raw)} bytes do not hold {n_chunk} chunks of {ctx} tokens "
                             f"over {n_vocab} tokens of vocabulary")
        chunks = raw[20:start].view("<i4").reshape(n_chunk, ctx)
        return cls(path, chunks, n_vocab, raw[start:].view("<u2").reshape(n_chunk, rows, width))


# -- driver -------------------------------------------------------------------------------------
def evaluate(scores: Iterable[ChunkScore], chunks: np.ndarray, n_vocab: int, kl_divergence: bool = False,
             save_logits: str | os.PathLike | None = None,
             on_chunk: Callable[[Perplexity], None] | None = None) -> Perplexity | KLDivergence:
    """Add up the chunks' scores (in chunk order), writing the log-prob file when asked: the
    perplexity, or with base rows in the scores the KL-divergence statistics. `on_chunk` sees
    the running perplexity after each chunk."""
    out = open(save_logits, "wb") if save_logits else None
    try:
        if out:
            write_log_prob_header(out, chunks, n_vocab)
        done: list[ChunkScore] = []
        for score in scores:
            done.append(score)
            if out:
                out.write(np.ascontiguousarray(score.log_probs).tobytes())
            if on_chunk:
                on_chunk(perplexity_of(done, chunks.shape[1]))
    finally:
        if out:
            out.close()
    return kl_divergence_of(done) if kl_divergence else perplexity_of(done, chunks.shape[1])


def as_dict(result: Any) -> dict[str, Any]:
    """A result as JSON-ready values."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(result).items()}
