"""Quantizers: bytes equal to gguf-py and to llama.cpp's own C quantizers, NumPy and Numba
bit-identical, round-trip error within each format's bound, and the fp16 encoder."""
from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mistral_ref_kernels as kernels
from mistral_ref_kernels.cpu import vec_dot as cpu_vec_dot
from mistral_ref_kernels.reference import vec_dot as reference_vec_dot
from mistral_ref_kernels.cpu.fp16 import f32_to_fp16_bits
from mistral_ref_kernels.formats import block_format

ALL = list(kernels.QUANTIZABLE)
LEGACY = [t for t in ALL if block_format(t).block_size == kernels.QK]
K_QUANTS = [t for t in ALL if block_format(t).block_size == kernels.QK_K]


def weights(seed: int, rows: int = 8, cols: int = 1024) -> np.ndarray:
    """Gaussian weights with a heavy-tailed row, outliers and the blocks quantizers special-case:
    all zero, all -0.0, constant, integers, one spike."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[1] *= rng.standard_normal(cols).astype(np.float32) ** 3
    x[2, :256] = 0.0
    x[2, 256:512] = -0.0
    x[3, :256] = 0.75
    x[3, 256:512] = -0.75
    x[4, :256] = rng.integers(-4, 4, 256)
    x[5, :256] = 0.0
    x[5, 7] = 3.0
    x[6] += 0.1  # all-positive blocks: the k-quant min is clamped to 0
    return x


def ggml_quantize():
    """llama.cpp's ggml_quantize_chunk from the libggml-base that llama-cpp-python ships, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.*"))
    if not libs:
        return None
    fn = ctypes.CDLL(libs[0]).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def quantize(x: np.ndarray, qtype: QType) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(block_format(qtype).nbytes(x.shape), np.uint8)
        assert fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None) == out.nbytes
        return out.reshape(x.shape[0], -1)
    return quantize


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bytes_equal_gguf_py(qtype, backend):
    x = weights(0)
    x[2, 256:512] = 0.0  # gguf-py takes the all-zero block's -0.0 as its max; see below
    np.testing.assert_array_equal(kernels.quantize(x, qtype, backend), gguf_quants.quantize(x, qtype))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q5_0], ids=lambda q: q.name)
def test_all_negative_zero_block_follows_c(qtype):
    """In llama.cpp `max` starts at +0.0 and a zero never replaces it, so d = +0.0 / -8 = -0.0
    (fp16 bits 0x8000) whatever the zeros' signs; gguf-py picks -0.0 as max and writes +0.0."""
    x = np.full((1, 32), -0.0, np.float32)
    for backend in ("reference", "cpu"):
        d = kernels.quantize(x, qtype, backend)[0, :2].view("<u2")[0]
        assert d == 0x8000


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_bytes_equal_llama_cpp(qtype):
    oracle = ggml_quantize()
    if oracle is None:
        pytest.skip("llama-cpp-python (libggml-base) is not installed")
    for seed in range(2):
        x = weights(seed)
        expected = oracle(x, qtype)
        np.testing.assert_array_equal(kernels.quantize(x, qtype, "reference"), expected)
        np.testing.assert_array_equal(kernels.quantize(x, qtype, "cpu"), expected)


# llama.cpp's own output, committed (tests/fixtures/make_llama_cpp_fixtures.py made it with
# llama-cpp-python's libggml-base): the checks above that need llama-cpp-python skip without it,
# these always run. Inputs: 24 seeded super-blocks, hard cases first (zeros, -0.0, constants,
# outliers, all-negative, tiny, mixed group scales, rounding ties, tied +-peaks).
FIXTURE = Path(__file__).parent / "fixtures" / "llama_cpp_quants.npz"
Q8_K_BLOCK = reference_vec_dot.Q8_K_BLOCK
DEQUANTIZED_TYPES = [t for t in kernels.FORMATS if block_format(t).block_size > 1]  # quantized ones
BACKENDS = ["reference", "cpu"]


@pytest.fixture(scope="module")
def llama_cpp():
    with np.load(FIXTURE) as f:
        return {name: f[name] for name in f.files}


def first_bad_blocks(got: np.ndarray, expected: np.ndarray, block_bytes: int) -> str:
    got, expected = got.reshape(-1, block_bytes), expected.reshape(-1, block_bytes)
    bad = np.flatnonzero((got != expected).any(axis=1))
    return (f"{len(bad)} of {len(got)} blocks differ; first, block {bad[0]}:\n"
            f"  ours      {got[bad[0]].tobytes().hex()}\n  llama.cpp {expected[bad[0]].tobytes().hex()}"
            if len(bad) else "")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", kernels.QUANTIZABLE, ids=lambda q: q.name)
def test_bytes_equal_llama_cpp_fixture(llama_cpp, qtype, backend):
    got = kernels.quantize(llama_cpp["x"], qtype, backend=backend)
    expected = llama_cpp[f"{qtype.name}_bytes"]
    assert got.shape == expected.shape
    bad = first_bad_blocks(got, expected, block_format(qtype).type_size)
    assert not bad, bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", kernels.IMPORTANCE_WEIGHTED, ids=lambda q: q.name)
def test_importance_weighted_bytes_equal_llama_cpp_fixture(llama_cpp, qtype, backend):
    """llama.cpp's quantize_row_q4_K_impl / q5_K_impl with an importance matrix (one group of 32
    columns all zero), what llama-quantize --imatrix writes."""
    got = kernels.quantize(llama_cpp["x"], qtype, backend=backend, importance=llama_cpp["importance"])
    bad = first_bad_blocks(got, llama_cpp[f"{qtype.name}_imatrix_bytes"], block_format(qtype).type_size)
    assert not bad, bad
    assert (got != llama_cpp[f"{qtype.name}_bytes"]).any()  # the importance changed the choice


def test_importance_is_checked():
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match="Q6_K with an importance matrix is not supported"):
        kernels.quantize(x, QType.Q6_K, importance=np.ones(256, np.float32))
    with pytest.raises(ValueError, match=r"importance must be float32 of shape \(256,\)"):
        kernels.quantize(x, QType.Q4_K, importance=np.ones(128, np.float32))
    with pytest.raises(ValueError, match="finite and >= 0"):
        kernels.quantize(x, QType.Q4_K, importance=np.full(256, -1, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", DEQUANTIZED_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_llama_cpp_fixture(llama_cpp, qtype, backend):
    """Bit for bit (compared as uint32, so -0.0 and +0.0 differ) on llama.cpp's bytes."""
    x = llama_cpp["x"]
    got = kernels.dequantize(llama_cpp[f"{qtype.name}_bytes"], qtype, x.shape, backend=backend)
    np.testing.assert_array_equal(got.view(np.uint32), llama_cpp[f"{qtype.name}_dequant"].view(np.uint32))


def test_fixture_has_the_hard_cases(llama_cpp):
    """The fixture's inputs still hold what it is for: zero and -0.0 blocks, ties on .5 with
    Q8_0's d = 1, tiny and huge magnitudes, and blocks Q4_K's scale search refits."""
    x = llama_cpp["x"].reshape(-1, 256)
    assert (x[0].view(np.uint32) == 0).all() and (x[1].view(np.uint32) == 0x80000000).all()
    assert (np.abs(x) < 1e-29).all(axis=1).any() and np.abs(x).max() >= 1e4
    ties = x.reshape(-1, 32)
    assert ((np.abs(ties).max(axis=1) == 127) & (ties % 1 == 0.5).sum(axis=1).astype(bool)).any()


def q8_k_blocks(x: np.ndarray, backend: str) -> np.ndarray:
    """x (float32 (n,)) as the Q8_K activation blocks the q8 matmul feeds k-quant dot products.
    No public function returns them: these are the kernels' internal ones (move with them)."""
    if backend == "reference":
        return reference_vec_dot.quantize_activations(x, QType.Q4_K).view(np.uint8)
    qs, d, _, sums = (a[:, 0] for a in cpu_vec_dot.quantize_activations(x[None], True))
    y = np.zeros(len(d), Q8_K_BLOCK)
    y["d"], y["qs"], y["bsums"] = d, qs, sums
    return y.view(np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q8_k_activation_blocks_equal_llama_cpp_fixture(llama_cpp, backend):
    """quantize_row_q8_K_ref's bytes (its all-zero blocks' bsums, which C leaves unwritten, read 0)."""
    x = llama_cpp["x"]
    expected = llama_cpp["Q8_K_bytes"].reshape(-1)
    got = np.concatenate([q8_k_blocks(row, backend).reshape(-1) for row in x])
    assert got.shape == expected.shape
    bad = first_bad_blocks(got, expected, Q8_K_BLOCK.itemsize)
    assert not bad, bad


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_numba_bit_identical_to_numpy(qtype):
    for seed in range(2):
        x = weights(seed, rows=7)
        np.testing.assert_array_equal(kernels.quantize(x, qtype, "cpu"),
                                      kernels.quantize(x, qtype, "reference"))


# Worst-case |error| per block as a fraction of the block's largest |weight|, derived from each
# format: half a quantization step (offset formats: of the block's range, at most 2 amax), plus a
# full step where the clamp at the top level bites (Q4_0/Q5_0 map +amax to level 2^b), plus fp16
# rounding of the scales. K-quants refit scales, so theirs is the 6-bit scale grid's: a group
# whose scale rounds to zero keeps only its min. Scales below fp16's normal range lose relative
# precision, hence the small absolute term.
ROUND_TRIP_BOUND = {
    QType.Q8_0: (32, 0.5 / 127 + 2 ** -10),
    QType.Q4_0: (32, 1 / 8 + 2 ** -9),
    QType.Q5_0: (32, 1 / 16 + 2 ** -9),
    QType.Q4_1: (32, 1 / 15 + 2 ** -9),
    QType.Q5_1: (32, 1 / 31 + 2 ** -9),
    QType.Q3_K: (256, 0.5),
    QType.Q4_K: (256, 0.5),
    QType.Q5_K: (256, 0.3),
    QType.Q6_K: (256, 0.1),
}
FP16_FLOOR = 2.0 ** -13


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_round_trip_error_bound(qtype, data):
    fmt = block_format(qtype)
    n_blocks = data.draw(st.integers(1, 4))
    scale = data.draw(st.sampled_from([1e-3, 1.0, 100.0]))
    x = data.draw(hnp.arrays(np.float32, (n_blocks * fmt.block_size,),
                             elements=st.floats(-1, 1, width=32, allow_subnormal=False)))
    x = (x * np.float32(scale)).reshape(1, -1)
    back = kernels.dequantize(kernels.quantize(x, qtype), qtype, x.shape)
    size, fraction = ROUND_TRIP_BOUND[qtype]
    amax = np.abs(x.reshape(-1, size)).max(axis=1)
    err = np.abs((back - x).reshape(-1, size)).max(axis=1)
    assert (err <= fraction * amax + FP16_FLOOR).all()


@pytest.mark.parametrize("qtype, max_rel_rmse", [
    (QType.Q8_0, 0.008), (QType.Q6_K, 0.02), (QType.Q5_K, 0.04), (QType.Q5_1, 0.05),
    (QType.Q5_0, 0.05), (QType.Q4_K, 0.08), (QType.Q4_1, 0.10), (QType.Q4_0, 0.12)],
    ids=lambda v: getattr(v, "name", str(v)))
def test_gaussian_rmse(qtype, max_rel_rmse):
    """On Gaussian weights each format's error sits at its bits' level."""
    x = np.random.default_rng(1).standard_normal((16, 1024)).astype(np.float32)
    back = kernels.dequantize(kernels.quantize(x, qtype), qtype, x.shape)
    assert np.sqrt(np.mean((back - x) ** 2)) / x.std() < max_rel_rmse


def test_quantize_rejects_bad_input():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(TypeError):
        kernels.quantize(x.astype(np.float64), QType.Q4_K)
    with pytest.raises(ValueError, match="multiple of 256"):
        kernels.quantize(np.zeros((2, 96), np.float32), QType.Q4_K)
    with pytest.raises(ValueError, match="non-finite"):
        kernels.quantize(np.full((1, 32), np.nan, np.float32), QType.Q8_0)
    with pytest.raises(ValueError, match="quantizing to Q2_K is not supported"):
        kernels.quantize(x, QType.Q2_K)
    with pytest.raises(ValueError, match="backend"):
        kernels.quantize(x, QType.Q4_K, backend="tpu")


@numba.njit(cache=True)
def _encode_all(x, out):
    for i in range(x.size):
        out[i] = f32_to_fp16_bits(x[i])


def test_f32_to_fp16_bits_matches_numpy():
    """Every fp16 value, the float32 midpoints between neighbours (ties to even) and one float32
    ulp either side of them, subnormals, overflow and signed zero."""
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    extra = np.array([65504, 65519.996, 65520, 1e6, 2 ** -25, 2 ** -26, 1e-10, -0.0], np.float32)
    x = np.concatenate([halves, mids, np.nextafter(mids, np.float32(0)),
                        np.nextafter(mids, np.float32(np.inf)), extra])
    x = np.concatenate([x, -x])
    out = np.empty(x.size, np.uint16)
    _encode_all(x, out)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, expected)
