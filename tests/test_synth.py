"""`mistral-ref synth`: Mistral shapes, the real Mistral v1 tokenizer and chat template, every
matrix a real k-quant, sane random weights, deterministic by seed."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

import mistral_ref_kernels as kernels
from mistral_ref.chat_template import MISTRAL_INSTRUCT_TEMPLATE
from mistral_ref.cli import main
from mistral_ref.errors import QuantizeError
from mistral_ref.gguf import load_gguf
from mistral_ref.models import mistral_v1_tokenizer_path
from mistral_ref.synth import PRESETS, synth_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "tiny.gguf"
    synth_model(path, "tiny", "Q4_K_M", progress=False)
    return path


def test_tiny_config_and_types(tiny):
    f = load_gguf(tiny)
    c = f.config
    assert (c.architecture, c.dim, c.n_layers, c.ffn_dim, c.n_heads, c.n_kv_heads) == (
        "llama", 256, 2, 512, 4, 2)
    assert (c.vocab_size, c.rope_theta, c.sliding_window, c.tied_embeddings) == (32000, 10000.0, 16, False)
    assert c.norm_eps == pytest.approx(1e-5)
    assert f.metadata["general.file_type"] == 15
    matrices = {n: t.qtype for n, t in f.tensors.items() if len(t.shape) == 2}
    # Q4_K_M with 2 layers: use_more_bits holds for layer 1 only; output.weight is Q6_K
    assert {n for n, t in matrices.items() if t == QType.Q6_K} == {
        "output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    assert set(matrices.values()) == {QType.Q4_K, QType.Q6_K}
    assert all(t.qtype == QType.F32 for t in f.tensors.values() if len(t.shape) == 1)


def test_mistral_7b_shapes():
    p = PRESETS["mistral-7b"]
    assert (p.dim, p.n_layers, p.ffn_dim, p.n_heads, p.n_kv_heads, p.vocab_size, p.rope_theta,
            p.norm_eps) == (4096, 32, 14336, 32, 8, 32000, 10000.0, 1e-5)


def test_tokenizer_is_mistral_v1(tiny):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(mistral_v1_tokenizer_path(progress=False)))
    meta = load_gguf(tiny).metadata
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    np.testing.assert_array_equal(meta["tokenizer.ggml.scores"],
                                  [sp.get_score(i) for i in range(sp.get_piece_size())])
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (
        sp.bos_id(), sp.eos_id())
    assert meta["tokenizer.chat_template"] == MISTRAL_INSTRUCT_TEMPLATE


def test_weights_have_sane_scale(tiny):
    f = load_gguf(tiny)
    for name, t in f.tensors.items():
        w = kernels.dequantize(t.data, t.qtype, t.shape)
        assert np.isfinite(w).all()
        if len(t.shape) == 2:  # std ~ 1/sqrt(row length), mean ~ 0
            std = w.std() * np.sqrt(t.shape[-1])
            assert 0.8 < std < 1.25, name
            assert abs(w.mean()) < 0.05 * w.std(), name
        else:
            assert (w == 1).all()


def test_seed_and_window(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    synth_model(a, "tiny", "Q8_0", seed=1, progress=False)
    synth_model(b, "tiny", "Q8_0", seed=1, progress=False)
    synth_model(c, "tiny", "Q8_0", seed=2, sliding_window=0, progress=False)
    assert a.read_bytes() == b.read_bytes()
    fa, fc = load_gguf(a), load_gguf(c)
    assert not np.array_equal(fa.tensors["blk.0.attn_q.weight"].data, fc.tensors["blk.0.attn_q.weight"].data)
    assert fa.config.sliding_window == 16 and fc.config.sliding_window is None
    assert fa.tensors["output.weight"].qtype == QType.Q8_0
    assert fa.tensors["blk.0.ffn_up.weight"].qtype == QType.Q8_0


def test_bad_arguments(tmp_path):
    with pytest.raises(QuantizeError, match="preset"):
        synth_model(tmp_path / "x.gguf", "mistral-3b", progress=False)
    with pytest.raises(QuantizeError, match="file type"):
        synth_model(tmp_path / "x.gguf", "tiny", "Q2_K", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["synth", str(out), "--preset", "tiny", "--type", "Q4_K_M", "--sliding-window", "8",
                 "--seed", "3"]) == 0
    assert "Q6_K x3" in capsys.readouterr().out
    assert load_gguf(out).config.sliding_window == 8


@pytest.mark.oracle
def test_llama_cpp_runs_it(tiny):
    """llama.cpp loads the file and gives finite logits for a prompt longer than the window."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    tokens = llm.tokenize(b"[INST] The quick brown fox jumps over the lazy dog twice [/INST]")
    assert len(tokens) > 16
    llm.eval(tokens)
    logits = np.asarray(llm.scores[:len(tokens)])
    assert np.isfinite(logits).all() and logits.std() > 0.1
