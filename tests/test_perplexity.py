"""Perplexity, KL divergence and cross-engine comparison (mistral_ref.perplexity, .compare,
.distributed), checked against the definitions recomputed here from the model's logits, against
llama.cpp's method run on llama-cpp-python's logits, and Ray runs against local ones."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mistral_ref.cli import main
from mistral_ref.compare import Positions, log_softmax, position_metrics
from mistral_ref.distributed import ordered_results
from mistral_ref.errors import InputError
from mistral_ref.model import Model
from mistral_ref.perplexity import (ChunkScorer, LogProbFile, dequantize_log_probs, evaluate,
                                    quantize_log_probs, score_logits, text_chunks)
from mistral_ref.quantize import quantize_file
from mistral_ref.synth import synth_model
from mistral_ref.tokenizer import Tokenizer

WORDS = ("the river ran quietly past the old mill where children played and the miller counted his "
         "sacks of grain before the winter came down from the hills with snow and long nights").split()
CTX = 64


def generated_text(n_words: int = 700, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppl") / "tiny.gguf"
    synth_model(path, "tiny", "Q8_0", seed=1, progress=False)
    return path


@pytest.fixture(scope="module")
def tiny_q4(tiny) -> Path:
    out = tiny.with_name("tiny-q4_0.gguf")
    quantize_file(tiny, out, "Q4_0", progress=False)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(generated_text())
    return path


def reference_perplexity(model: Model, chunks: np.ndarray, bos: int | None) -> float:
    """llama.cpp's perplexity loop, restated: BOS as each chunk's first token, positions
    ctx/2 .. ctx-2 scored against the next token, PPL = exp(mean NLL)."""
    nll, count = 0.0, 0
    for chunk in chunks:
        ids = chunk.astype(np.int64).copy()
        if bos is not None:
            ids[0] = bos
        logp = log_softmax(model.logits(ids))
        for j in range(len(chunk) // 2, len(chunk) - 1):
            nll -= logp[j, chunk[j + 1]]
            count += 1
    return math.exp(nll / count)


def test_perplexity_is_llama_cpp_s_definition(tiny, text_file):
    scorer = ChunkScorer(tiny)
    tokenizer = Tokenizer.of_model(scorer.model.file)
    chunks = text_chunks(tokenizer, text_file.read_text(), CTX)
    assert chunks.shape[1] == CTX and len(chunks) >= 3 and chunks[0, 0] == tokenizer.bos_id
    result = evaluate((scorer.score(c) for c in chunks), chunks, scorer.n_vocab)
    # float32 exponentials (llama.cpp's) against float64 here: ~1e-9 apart
    assert result.ppl == pytest.approx(reference_perplexity(scorer.model, chunks, tokenizer.bos_id), rel=1e-7)
    assert result.n_scored == len(chunks) * (CTX - 1 - CTX // 2) and result.ppl_stderr > 0
    assert result.chunk_ppl[-1] == result.ppl
    with pytest.raises(InputError, match="needs at least"):
        text_chunks(tokenizer, "too short", CTX)


def test_log_prob_quantization_keeps_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 1001)) * 4).astype(np.float32)
    rows = quantize_log_probs(logits)
    assert rows.shape == (7, 2 * 501 + 4) and rows.dtype == np.uint16
    want, got = log_softmax(logits), dequantize_log_probs(rows, 1001)
    scale = np.ascontiguousarray(rows[:, :2]).view(np.float32)[:, 0]
    near = want > want.max(axis=1, keepdims=True) - 16
    assert np.all(np.abs(got - want)[near] <= (scale[:, None] * 0.5 + 1e-5).repeat(1001, 1)[near])
    score = score_logits(logits, np.arange(7))
    # llama.cpp exponentiates in float32 and sums in float64: float64 throughout agrees to ~1e-9
    assert score.nll == pytest.approx(-sum(want[i, i] for i in range(7)), rel=1e-7)


def test_kl_divergence_against_the_definition(tiny, tiny_q4, text_file, tmp_path):
    base, other = ChunkScorer(tiny), ChunkScorer(tiny_q4)
    chunks = text_chunks(Tokenizer.of_model(base.model.file), text_file.read_text(), CTX, 3)
    saved = tmp_path / "base.logits"
    base_ppl = evaluate((base.score(c, save=True) for c in chunks), chunks, base.n_vocab, save_logits=saved)
    f = LogProbFile.open(saved)
    np.testing.assert_array_equal(f.chunks, chunks)
    result = evaluate((other.score(c, f.data[i]) for i, c in enumerate(f.chunks)), f.chunks, f.n_vocab,
                      kl_divergence=True)
    # recomputed from both models' full float64 distributions
    klds, same = [], []
    for chunk in chunks:
        ids = chunk.astype(np.int64).copy()
        ids[0] = 1
        p, q = (log_softmax(m.model.logits(ids))[CTX // 2:CTX - 1] for m in (base, other))
        klds += list((np.exp(p) * (p - q)).sum(axis=1))
        same += list(p.argmax(1) == q.argmax(1))
    assert result.kld == pytest.approx(np.mean(klds), rel=2e-2, abs=1e-4)
    assert result.same_top == pytest.approx(np.mean(same), abs=0.02)
    assert result.ppl_base == pytest.approx(base_ppl.ppl, rel=1e-3)
    assert result.kld_percentiles["Maximum"] >= result.kld_percentiles["Median"] >= result.kld_percentiles["Minimum"]
    itself = evaluate((base.score(c, f.data[i]) for i, c in enumerate(chunks)), chunks, f.n_vocab, kl_divergence=True)
    assert itself.kld < 1e-4 and itself.same_top == 1.0
    (tmp_path / "bad.logits").write_bytes(saved.read_bytes()[:-10])
    with pytest.raises(InputError, match="do not hold"):
        LogProbFile.open(tmp_path / "bad.logits")


def test_cli_json_and_kl_divergence(tiny, tiny_q4, text_file, tmp_path, capsys):
    base = tmp_path / "base.logits"
    assert main(["perplexity", str(tiny), "--text", str(text_file), "--ctx", str(CTX), "--chunks", "2",
                 "--json", "--save-logits", str(base)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_scored"] == 2 * (CTX - 1 - CTX // 2) and out["ppl"] > 1 and out["ppl_stderr"] > 0
    assert main(["perplexity", str(tiny_q4), "--kl-divergence", str(base)]) == 0
    report = capsys.readouterr().out
    assert "Mean    KLD:" in report and "Same top p:" in report and "99.9%   KLD:" in report


def test_ray_runs_equal_local_runs(tiny, tiny_q4, text_file, tmp_path):
    pytest.importorskip("ray")
    chunks = text_chunks(Tokenizer.of_model(Model.from_gguf(tiny).file), text_file.read_text(), CTX, 4)
    calls = [(c, None, True) for c in chunks]
    local = list(ordered_results(ChunkScorer, (str(tiny),), "score", calls))
    remote = list(ordered_results(ChunkScorer, (str(tiny),), "score", calls, ray_address="", n_workers=2))
    a, b = evaluate(iter(local), chunks, 32000), evaluate(iter(remote), chunks, 32000)
    assert b.ppl == pytest.approx(a.ppl, rel=1e-6) and b.ppl_stderr == pytest.approx(a.ppl_stderr, rel=1e-6)
    rows = np.stack([s.log_probs for s in local])
    kl_calls = [(c, rows[i], False) for i, c in enumerate(chunks)]
    kl_local = evaluate(ordered_results(ChunkScorer, (str(tiny_q4),), "score", kl_calls), chunks, 32000, True)
    kl_ray = evaluate(ordered_results(ChunkScorer, (str(tiny_q4),), "score", kl_calls, "", 2), chunks, 32000, True)
    assert kl_ray.kld == pytest.approx(kl_local.kld, rel=1e-6)
    assert kl_ray.same_top == kl_local.same_top


# -- llama.cpp's numbers ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.oracle
def test_default_model_f32_perplexity_equals_llama_cpp_s(default_model, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = tmp_path / "smollm2-f32.gguf"
    quantize_file(default_model, f32, "F32", progress=False)
    ctx = 256
    scorer = ChunkScorer(f32)
    tokenizer = Tokenizer.of_model(scorer.model.file)
    chunks = text_chunks(tokenizer, generated_text(900, seed=3), ctx, 3)
    ours = evaluate((scorer.score(c) for c in chunks), chunks, scorer.n_vocab)
    llm = llama_cpp.Llama(model_path=str(f32), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for chunk in chunks:  # llama-perplexity's loop on llama.cpp's own logits
        ids = [int(t) for t in chunk]
        if tokenizer.add_bos:
            ids[0] = tokenizer.bos_id
        llm.reset()
        llm.eval(ids)
        logp = log_softmax(np.array(llm.scores[:ctx]))
        for j in range(ctx // 2, ctx - 1):
            nll -= logp[j, chunk[j + 1]]
            count += 1
    assert ours.ppl == pytest.approx(math.exp(nll / count), rel=1e-3)


# -- compare ------------------------------------------------------------------------------------
def test_position_metrics_full_and_top_k():
    rng = np.random.default_rng(1)
    ours = rng.standard_normal((5, 50)).astype(np.float32)
    theirs = ours + rng.standard_normal((5, 50)).astype(np.float32) * 0.01
    m = position_metrics(ours, Positions(logits=theirs))
    assert m["max_abs_logit_diff"] == pytest.approx(list(np.abs(ours - theirs).max(1)), rel=1e-6)
    p, q = log_softmax(ours), log_softmax(theirs)
    assert m["kld"] == pytest.approx(list((np.exp(p) * (p - q)).sum(1)), rel=1e-9)
    assert m["top1_agree"] == list(ours.argmax(1) == theirs.argmax(1))
    top = np.argsort(-q, axis=1)[:, :20]
    valid = np.array([True, True, False, True, True])
    k = position_metrics(ours, Positions(ids=top, logprobs=np.take_along_axis(q, top, 1), valid=valid))
    assert k["kld"][2] is None and k["top1_agree"][0] == (ours[0].argmax() == top[0, 0])
    assert max(x for x in k["max_abs_logit_diff"] if x is not None) < 0.05


@pytest.mark.oracle
def test_compare_cli_against_llama_cpp(tiny, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the river ran past the mill\nsnow came down from the hills\n")
    report = tmp_path / "report.json"
    assert main(["compare", str(tiny), "--engine", "llama_cpp", "--prompts", str(prompts),
                 "--json", str(report), "--activations", "q8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["positions"] > 10 and summary["top1_agreement"] >= 0.9 and summary["mean_kld"] < 1e-2
    assert report.with_suffix(".png").stat().st_size > 1000
    assert len(json.loads(report.read_text())["prompts"]) == 2


@pytest.mark.oracle
def test_compare_against_transformers_on_a_checkpoint(tiny, tmp_path):
    pytest.importorskip("transformers")
    from mistral_ref.checkpoint import save_checkpoint
    from mistral_ref.compare import Comparer
    checkpoint = save_checkpoint(tiny, tmp_path / "hf", "F32", progress=False)
    result = Comparer(checkpoint, "transformers").compare("the miller counted his sacks of grain")
    assert len(result["kld"]) == len(result["token_ids"]) > 5
    assert max(result["max_abs_logit_diff"]) < 1e-3 and all(result["top1_agree"])


@pytest.mark.oracle
def test_compare_against_mistralrs(default_model):
    pytest.importorskip("mistralrs")
    from mistral_ref.compare import Comparer
    result = Comparer(default_model, "mistralrs", activations="q8").compare("The quick brown fox jumps")
    scored = [v for v in result["kld"] if v is not None]
    assert len(scored) >= len(result["token_ids"]) - 1 and max(scored) < 0.1
    assert np.mean([a for a in result["top1_agree"] if a is not None]) >= 0.8


@pytest.mark.oracle
def test_compare_on_ray_equals_local(tiny):
    pytest.importorskip("ray")
    pytest.importorskip("llama_cpp")
    from mistral_ref.compare import Comparer
    calls = [("the river ran past the mill",), ("snow came down from the hills",)]
    local = list(ordered_results(Comparer, (str(tiny), "llama_cpp", "q8"), "compare", calls))
    remote = list(ordered_results(Comparer, (str(tiny), "llama_cpp", "q8"), "compare", calls, "", 2))
    for a, b in zip(local, remote):
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["kld"], b["kld"], rtol=1e-6, atol=1e-9)
        assert a["top1_agree"] == b["top1_agree"]
