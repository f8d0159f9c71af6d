"""The transformer against a float64 reference forward, and its KV cache against full recompute."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mistral_ref import errors
from mistral_ref import model as model_module
from mistral_ref.model import Model, generate
from mistral_ref.synth import synth_model
from reference_model import reference_logits

WINDOW = 16  # the tiny preset's sliding window


@pytest.fixture(scope="module", params=[WINDOW, 0], ids=["window16", "no-window"])
def tiny(request, tmp_path_factory) -> Model:
    """A tiny random Mistral-shaped Q4_K_M model (every matrix Q4_K or Q6_K)."""
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    synth_model(path, "tiny", "Q4_K_M", sliding_window=request.param, seed=1, progress=False)
    return Model.from_gguf(path)


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 32000, n).tolist()


@pytest.mark.parametrize("n_tokens", [1, 10, 40])  # shorter and longer than the window
def test_logits_match_float64_reference(tiny, n_tokens):
    tokens = prompt(n_tokens)
    ours, want = tiny.logits(tokens), reference_logits(tiny.file, tokens)
    assert ours.shape == (n_tokens, tiny.config.vocab_size) and ours.dtype == np.float32
    assert np.abs(want).max() > 1  # logits of a sane scale, so the tolerance means something
    np.testing.assert_allclose(ours, want, atol=1e-3, rtol=0)


def test_window_changes_logits_only_past_the_window(tmp_path):
    """The same weights with and without a window: identical while the prompt fits the window,
    different once a query's view would reach further back."""
    windowed, full = tmp_path / "w.gguf", tmp_path / "f.gguf"
    synth_model(windowed, "tiny", "Q4_K_M", sliding_window=WINDOW, seed=2, progress=False)
    synth_model(full, "tiny", "Q4_K_M", sliding_window=0, seed=2, progress=False)
    tokens = prompt(WINDOW + 4)
    a, b = Model.from_gguf(windowed).logits(tokens), Model.from_gguf(full).logits(tokens)
    np.testing.assert_array_equal(a[:WINDOW], b[:WINDOW])  # position W-1 sees W keys: all of them
    assert np.abs(a[WINDOW:] - b[WINDOW:]).min(axis=1).max() > 0
    assert (np.abs(a[WINDOW:] - b[WINDOW:]).max(axis=1) > 1e-3).all()


def test_incremental_decode_equals_full_recompute(tiny):
    """Prefill 5 tokens, then one token at a time past the window (ring wraps twice)."""
    tokens = prompt(3 * WINDOW + 3)
    full = tiny.logits(tokens)
    cache = tiny.new_cache(len(tokens))
    steps = [tiny.forward(tokens[:5], cache)] + [tiny.forward([t], cache) for t in tokens[5:]]
    np.testing.assert_allclose(np.stack(steps), full[4:], atol=1e-4, rtol=0)
    if tiny.config.sliding_window:
        assert cache.k.shape[2] == WINDOW  # memory bounded by the window, not the sequence


def test_chunked_prefill_equals_one_chunk(tiny, monkeypatch):
    tokens = prompt(37)
    whole = tiny.logits(tokens)
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 7)  # chunks of 7 cross the window edge
    np.testing.assert_allclose(tiny.logits(tokens), whole, atol=1e-4, rtol=0)


def test_generate_is_greedy_with_the_cache(tiny):
    tokens = prompt(12)
    new = list(generate(tiny, tokens, 8))
    assert len(new) == 8
    # each new token is the argmax of a fresh full forward over everything before it
    full = tiny.logits(tokens + new[:-1])
    assert new == [int(i) for i in np.argmax(full[len(tokens) - 1:], axis=1)]
    stopped = list(generate(tiny, tokens, 8, stop_ids=[new[2]]))
    assert stopped == new[:new.index(new[2]) + 1]
    assert list(generate(tiny, tokens, 0)) == []


def test_bad_input(tiny):
    vocab, context = tiny.config.vocab_size, tiny.config.context_length
    with pytest.raises(errors.InputError, match="no tokens"):
        tiny.logits([])
    with pytest.raises(errors.InputError, match=f"token id {vocab} is outside the vocabulary"):
        tiny.logits([1, vocab])
    with pytest.raises(errors.InputError, match="token id -1"):
        tiny.logits([-1])
    with pytest.raises(errors.ContextLengthError, match=f"context of {context} tokens"):
        tiny.logits(prompt(context + 1))
    cache = tiny.new_cache(8)
    tiny.forward(prompt(6), cache)
    with pytest.raises(errors.ContextLengthError, match="6 cached \\+ 3 new tokens exceed"):
        tiny.forward(prompt(3), cache)
    with pytest.raises(errors.InputError, match="max_new_tokens"):
        list(generate(tiny, [1], -1))
    with pytest.raises(ValueError, match="device 'tpu'"):
        Model(tiny.file, device="tpu")


def test_default_model_matches_float64_reference(default_model):
    model = Model.from_gguf(default_model)
    tokens = [504, 3575, 282, 4649, 314, 7042, 30, 198, 198, 504]  # "The capital of France is Paris.\n\nThe"
    np.testing.assert_allclose(model.logits(tokens), reference_logits(model.file, tokens), atol=1e-3, rtol=0)


def test_default_model_peak_memory(default_model):
    """Peak RSS stays under file size + KV cache + 300 MB: weights are mapped, never copied."""
    code = f"""
import numpy as np
from mistral_ref.model import Model, generate
m = Model.from_gguf({str(default_model)!r})
list(generate(m, list(range(100, 164)), 16))
kv = 2 * m.config.n_layers * m.config.n_kv_heads * 80 * m.config.head_dim * 4
print(kv, int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kv_bytes, peak = map(int, out.stdout.split())
    budget = default_model.stat().st_size + kv_bytes + 300 * 2**20
    assert peak < budget, f"peak RSS {peak / 2**20:.0f} MB over budget {budget / 2**20:.0f} MB"
