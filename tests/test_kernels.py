"""Transformer kernels (CPU) against the NumPy references of kernels.reference.ops."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from hypothesis import given, settings
from hypothesis import strategies as st

import mistral_ref_kernels as kernels
from mistral_ref_kernels.cpu.matvec import MATVEC
from mistral_ref_kernels.cpu.ops import SERIAL_ELEMENTS
from mistral_ref_kernels.formats import FORMATS
from mistral_ref_kernels.reference import ops as ref
from conftest import random_rows

rng = np.random.default_rng(0)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda q: q.name)
@pytest.mark.parametrize("n_tokens, pool", [(1, False), (3, False), (3, True)])
def test_matmul_matches_float64(qtype, n_tokens, pool, monkeypatch):
    """pool: prefill on the thread pool that big matrices use (the threshold lowered to 0)."""
    if pool:
        monkeypatch.setattr(kernels.dispatch, "PREFILL_POOL_MIN_WEIGHTS", 0)
    n_rows, n = 37, 512
    rows = random_rows(qtype, n_rows, n)
    x = rng.standard_normal((n_tokens, n)).astype(np.float32)
    want = np.stack([ref.matvec(rows, qtype, x[t]) for t in range(n_tokens)])
    got = kernels.matmul(rows, qtype, x)
    assert got.shape == (n_tokens, n_rows) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("activations", ["f32", "q8"])
@pytest.mark.parametrize("n_tokens", [1, 4])
def test_matmuls_of_mixed_formats_equal_matmul_each(activations, n_tokens):
    """matmuls over matrices of several formats (Q4_K_M's q, k in Q4_K and v in Q6_K; an F16
    one with no q8 kernel) groups them by format into fused calls: every output, in order, is
    bit for bit that matrix's matmul alone."""
    n = 512
    weights = [(random_rows(QType.Q4_K, 40, n), QType.Q4_K), (random_rows(QType.Q6_K, 12, n), QType.Q6_K),
               (random_rows(QType.Q4_K, 12, n), QType.Q4_K), (random_rows(QType.F16, 7, n), QType.F16)]
    x = rng.standard_normal((n_tokens, n)).astype(np.float32)
    together = kernels.dispatch.matmuls(weights, x, activations=activations)
    assert [out.shape for out in together] == [(n_tokens, rows.shape[0]) for rows, _ in weights]
    for (rows, qtype), out in zip(weights, together):
        assert np.array_equal(out, kernels.matmul(rows, qtype, x, activations=activations))


def test_matvec_covers_decode_types():
    assert set(MATVEC) >= {QType.Q4_K, QType.Q6_K, QType.Q5_K, QType.Q5_0, QType.Q5_1,
                                 QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.F16, QType.BF16, QType.F32}


@pytest.mark.parametrize("pool", [False, True])
def test_matmul_tiles_with_small_scratch(pool, monkeypatch):
    if pool:
        monkeypatch.setattr(kernels.dispatch, "PREFILL_POOL_MIN_WEIGHTS", 0)
    rows, x = random_rows(QType.Q4_K, 50, 256), rng.standard_normal((4, 256)).astype(np.float32)
    whole = kernels.matmul(rows, QType.Q4_K, x)
    tiled = kernels.matmul(rows, QType.Q4_K, x, scratch=np.empty(256 * 7, np.float32))
    # BLAS sums in another order for a one-row tile (a matrix-vector product): float32 rounding
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_matmul_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not hold rows of 96 weights"):
        kernels.matmul(random_rows(QType.Q8_0, 2, 64), QType.Q8_0, np.zeros((1, 96), np.float32))
    with pytest.raises(ValueError, match="not a whole number of Q8_0 blocks"):
        kernels.matmul(random_rows(QType.Q8_0, 2, 64), QType.Q8_0, np.zeros((1, 100), np.float32))
    with pytest.raises(ValueError, match="float32"):
        kernels.matmul(random_rows(QType.Q8_0, 2, 64), QType.Q8_0, np.zeros((1, 64)))
    with pytest.raises(ValueError, match=r"rows of \[64, 96\] weights"):  # can share no input
        kernels.dispatch.Matmuls([(random_rows(QType.Q8_0, 2, 64), QType.Q8_0),
                                  (random_rows(QType.Q8_0, 2, 96), QType.Q8_0)])


def test_rmsnorm():
    """Enough tokens for the parallel path (cpu.ops.SERIAL_ELEMENTS); a few of them alone take the
    serial one, with the same bits."""
    x = rng.standard_normal((SERIAL_ELEMENTS // 96 + 5, 96)).astype(np.float32) * 3
    w = rng.standard_normal(96).astype(np.float32)
    got = kernels.rmsnorm(x, w, 1e-5)
    np.testing.assert_allclose(got, ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    assert np.array_equal(kernels.rmsnorm(x[3:4], w, 1e-5), got[3:4])
    assert np.array_equal(kernels.rmsnorm(x[3:7], w, 1e-5), got[3:7])


def test_rope_rotates_pairs_and_keeps_the_rest():
    n_tokens = SERIAL_ELEMENTS // 48 + 6  # the parallel path; token 3 alone the serial one
    x = rng.standard_normal((n_tokens, 3, 16)).astype(np.float32)
    positions = np.concatenate([[0, 1, 2, 500, 8191, 32767], rng.integers(0, 32768, n_tokens - 6)]).astype(np.int64)
    inv_freq = 10000.0 ** (-np.arange(0, 12, 2) / 12)  # rope_dim 12 < head_dim 16
    want = ref.rope(x, positions, inv_freq)
    rotations = kernels.rope_rotations(positions, inv_freq)
    angles = positions[:, None] * inv_freq  # float64, rounded once to float32
    assert np.array_equal(rotations, np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32))
    got = kernels.rope(x.copy(), rotations)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[..., 12:], x[..., 12:])
    assert np.array_equal(got[0], x[0])  # position 0: no rotation
    assert np.array_equal(kernels.rope(x[3:4], rotations[3:4]), got[3:4])  # one token


def test_swiglu():
    gate, up = rng.standard_normal((2, SERIAL_ELEMENTS // 8 // 64 + 2, 64)).astype(np.float32) * 4
    gate[0, :8] = [0.0, -0.0, 30.0, -30.0, 100.0, -100.0, 1e-30, -1e-30]  # both signs' branches, both tails
    got = kernels.swiglu(gate, up)  # the parallel path; one token alone the serial one
    np.testing.assert_allclose(got, ref.swiglu(gate, up), rtol=1e-5, atol=1e-6)
    assert np.array_equal(kernels.swiglu(gate[1:2], up[1:2]), got[1:2])
    special = np.array([[np.inf, -np.inf, np.nan, -88.0, 88.0]], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_allclose(kernels.swiglu(special, np.ones_like(special)), ref.swiglu(special, np.ones_like(special)),
                                   rtol=1e-6, atol=1e-30)  # NaN where the reference has (-inf * 0); silu(-88) ~ -5e-37


@settings(max_examples=60, deadline=None)
@given(n_past=st.integers(0, 100), n_new=st.integers(1, 12), window=st.sampled_from([0, 1, 4, 9, 70]),
       heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]), data=st.data())
def test_attention_chunk_against_band_mask(n_past, n_new, window, heads, data):
    """A chunk at positions n_past.. attends to its own keys and to the ring cache's earlier ones,
    exactly as full attention with the band mask over the whole sequence."""
    n_heads, n_kv = heads
    head_dim = 8
    total = n_past + n_new
    slots = window if window else total
    seed = data.draw(st.integers(0, 2**32 - 1))
    g = np.random.default_rng(seed)
    q = g.standard_normal((n_new, n_heads, head_dim)).astype(np.float32)
    k = g.standard_normal((total, n_kv, head_dim)).astype(np.float32)
    v = g.standard_normal((total, n_kv, head_dim)).astype(np.float32)
    k_cache = np.full((n_kv, slots, head_dim), np.nan, np.float32)  # unwritten slots must not be read
    v_cache = k_cache.copy()
    for p in range(max(0, n_past - slots), n_past):
        k_cache[:, p % slots], v_cache[:, p % slots] = k[p], v[p]
    got = kernels.attention(q, k[n_past:], v[n_past:], k_cache, v_cache, n_past, window)
    want = ref.attention(q, k, v, np.arange(n_past, total), np.arange(total), window)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_format_registries_agree_and_refuse_unknown_formats():
    """The q8 decode kernels cover exactly the formats with a q8 reference; a per-format kernel
    built for a format its registry lacks fails at compile time, naming what it has."""
    from numba.core.errors import TypingError

    from mistral_ref_kernels.cpu import matvec, vec_dot
    from mistral_ref_kernels.reference import vec_dot as reference_vec_dot

    assert set(vec_dot.MATMUL_Q8) == set(reference_vec_dot.VEC_DOT)
    assert set(matvec.MATVEC) == set(matvec.ROW_DOT)
    unknown = matvec._matvec_kernel(int(QType.Q2_K))
    with pytest.raises(TypingError, match="no float32 matvec kernel for Q2_K.*Q4_K"):
        unknown(random_rows(QType.Q2_K, 2, 256), np.zeros(256, np.float32), np.empty(2, np.float32))


def test_the_kernels_load_under_one_name():
    """kernels/ installs as mistral_ref_kernels; nothing may import it as `kernels` (from the
    repository root that name would load a second copy of every module)."""
    code = ("import sys, mistral_ref.runner, mistral_ref.server, mistral_ref.cli, mistral_ref.synth\n"
            "import mistral_ref_kernels.cuda, mistral_ref_kernels.reference.quant\n"
            "print(sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})
    assert out.stdout.strip() == "[]"
