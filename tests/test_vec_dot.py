"""llama.cpp numerics (8-bit activations, integer block dot products): the NumPy reference against
llama.cpp's own C functions and against float64 algebra, the Numba kernel against the reference."""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from hypothesis import given, settings
from hypothesis import strategies as st

import mistral_ref_kernels as kernels
from mistral_ref_kernels.cpu import vec_dot as cpu
from mistral_ref_kernels.cpu.lanes import AVX2
from mistral_ref_kernels.formats import FORMATS
from conftest import random_rows
from mistral_ref_kernels.reference import vec_dot as ref

TYPES = list(ref.VEC_DOT)


def activations(seed: int, n: int) -> np.ndarray:
    """Heavy-tailed x with an all-zero super-block, a spike, exact halves (rounding ties) and a
    negative extreme (Q8_K's scale takes the sign of the largest |x|)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.standard_normal(n) ** 2).astype(np.float32)
    x[:256] = 0
    x[300] = 7.5
    x[256:288] = np.arange(-16, 16, dtype=np.float32) * np.float32(0.5)
    x[n - 1] = -9.0
    return x


def dequantized_activations(y: np.ndarray) -> np.ndarray:
    """float64 x as the dot product sees it: d * q per block."""
    d = y["d"].astype(np.float64)
    return (d[:, None] * y["qs"].astype(np.float64)).ravel()


def rounding_bound(rows: np.ndarray, qtype: QType, y: np.ndarray) -> np.ndarray:
    """Bound on float32 rounding of a sum of products: a few ulps of sum(|w| * |x|), per row."""
    w = np.abs(kernels.dequantize(rows, qtype, (rows.shape[0], y["qs"].size), backend="reference"))
    return 4e-6 * (w.astype(np.float64) @ np.abs(dequantized_activations(y))) + 1e-30


# ------------------------------------------------------------------ reference vs llama.cpp (C)

def ggml_libraries():
    try:
        import llama_cpp
    except ImportError:
        return None
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base, cpu_lib = (glob.glob(os.path.join(libdir, f"lib{name}.so")) for name in ("ggml-base", "ggml-cpu"))
    if not base or not cpu_lib:
        return None
    base, cpu_lib = ctypes.CDLL(base[0]), ctypes.CDLL(cpu_lib[0])
    cpu_lib.ggml_cpu_init()
    return base, cpu_lib


def c_name(qtype: QType) -> str:
    return qtype.name.lower().replace("_k", "_K")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_equals_llama_cpp(qtype):
    """Activation blocks byte for byte equal to quantize_row_q8_*_ref; the dot products equal to
    ggml_vec_dot_*_generic within float rounding (the shipped binary fuses some of the C code's
    multiply-adds into FMAs, so it is not bit for bit the C source order)."""
    libs = ggml_libraries()
    if libs is None:
        pytest.skip("llama-cpp-python (libggml-base, libggml-cpu) is not installed")
    base, cpu_lib = libs
    n = 1024
    x = activations(1, n)
    y = ref.quantize_activations(x, qtype)
    c_blocks = np.zeros_like(y)
    vec_dot_type = ref.VEC_DOT_TYPE[qtype]
    getattr(base, f"quantize_row_{c_name(vec_dot_type)}_ref")(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(c_blocks.ctypes.data), ctypes.c_int64(n))
    if vec_dot_type == QType.Q8_K:  # C leaves bsums unwritten in all-zero blocks
        c_blocks["bsums"][c_blocks["d"] == 0] = 0
    assert c_blocks.tobytes() == y.tobytes()

    rows = random_rows(qtype, 9, n, seed=2)

    def c_vec_dot(name: str) -> np.ndarray:
        vec_dot, result = getattr(cpu_lib, name), ctypes.c_float()
        expected = np.empty(len(rows), np.float32)
        for r in range(len(rows)):
            row = np.ascontiguousarray(rows[r])
            vec_dot(ctypes.c_int(n), ctypes.byref(result), ctypes.c_size_t(0),
                    ctypes.c_void_p(row.ctypes.data), ctypes.c_size_t(0),
                    ctypes.c_void_p(y.ctypes.data), ctypes.c_size_t(0), ctypes.c_int(1))
            expected[r] = result.value
        return expected

    name = f"ggml_vec_dot_{c_name(qtype)}_{c_name(vec_dot_type)}"
    got, bound = ref.vec_dot(rows, qtype, y), rounding_bound(rows, qtype, y)
    generic, shipped = c_vec_dot(name + "_generic"), c_vec_dot(name)
    # The C source's order is the generic function's; but where it disagrees with the function
    # llama.cpp runs, that build's generic one is broken (Q5_0 in llama-cpp-python 0.3.36 built
    # with AVX-512, Sapphire Rapids: values off by hundreds), and the one it runs is the oracle.
    expected = generic if np.all(np.abs(generic - shipped) <= 4 * bound) else shipped
    assert np.all(np.abs(got - expected) <= bound)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_is_dequantized_w_times_round_tripped_x(qtype):
    """Independent of llama.cpp: integer block sums times scales are float64 W @ (x as 8 bits)."""
    n = 768
    rows = random_rows(qtype, 5, n, seed=3)
    x = activations(4, n)
    y = ref.quantize_activations(x, qtype)
    w = kernels.dequantize(rows, qtype, (5, n), backend="reference").astype(np.float64)
    exact = w @ dequantized_activations(y)
    if qtype in (QType.Q4_1, QType.Q5_1):
        # The min term uses s = fp16(d * sum(q)), not the exact d * sum(q): add that difference.
        m = rows.view(FORMATS[qtype].block)["m"].astype(np.float64)
        exact_s = y["d"].astype(np.float64) * y["qs"].sum(axis=1)
        exact += m @ (y["s"].astype(np.float64) - exact_s)
    got = ref.matvec_q8(rows, qtype, x)
    assert np.all(np.abs(got - exact) <= rounding_bound(rows, qtype, y))
    # and the 8-bit activations are within half a step of x, plus |q| <= 127 times the fp16
    # rounding of d (relative 2^-11) where d is stored as fp16
    step = np.repeat(y["d"].astype(np.float64), y["qs"].shape[1])
    slack = 0.5 + (127 * 2.0 ** -11 if y.dtype["d"] == np.float16 else 1e-6)
    assert np.all(np.abs(dequantized_activations(y) - x) <= slack * step + 1e-12)


# ------------------------------------------------------------------ Numba vs reference

@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n_columns", [1, 3])  # one column runs serially, more in parallel
def test_numba_activations_bit_identical(qtype, n_columns):
    x = np.stack([activations(5 + t, 1024) for t in range(n_columns)])
    x[0, :32] = 0  # an all-zero block (d = 0)
    x[0, 32:64] = np.r_[127, np.arange(31) - 14.5].astype(np.float32)  # d = 1: x.5 ties round away from 0
    x[0, 256 + 5], x[0, 256 + 100] = -50, 50  # a tie in magnitude: Q8_K's scale takes the first
    xq, xd, xs, xsum = cpu.quantize_activations(x, qtype in cpu.SUPER_BLOCK_TYPES)
    for t in range(n_columns):  # block-major: column t is [:, t]
        y = ref.quantize_activations(x[t], qtype)
        assert np.array_equal(xq[:, t], y["qs"])
        assert np.array_equal(xd[:, t].view(np.uint32), y["d"].astype(np.float32).view(np.uint32))
        if qtype == QType.Q4_K:
            assert np.array_equal(xsum[:, t], y["bsums"])
        else:  # Q8_0's block sums, for Q4_0 / Q5_0's offsets
            assert np.array_equal(xsum[:, t, 0], y["qs"].sum(axis=1))
        if qtype == QType.Q4_1:
            assert np.array_equal(xs[:, t].view(np.uint32), y["s"].astype(np.float32).view(np.uint32))


def test_q8_k_block_of_nan_quantizes_to_zero():
    """A Q8_K block with no largest magnitude (all NaN) is an all-zero block, d = 0, as llama.cpp's
    scan from 0 leaves it; the next block is quantized as usual."""
    x = activations(7, 512)[None].copy()
    x[0, :256] = np.nan
    xq, xd, _, xsum = cpu.quantize_activations(x, True)
    assert not xq[0].any() and xd[0, 0] == 0 and not xsum[0].any()
    assert np.array_equal(xq[1, 0], ref.quantize_activations(x[0, 256:], QType.Q4_K)["qs"][0])


def reference_columns(rows: np.ndarray, qtype: QType, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's x @ W.T for x (T, n), column by column, and each entry's rounding bound."""
    expected, bound = [], []
    for column in x:
        y = ref.quantize_activations(column, qtype)
        expected.append(ref.vec_dot(rows, qtype, y))
        bound.append(rounding_bound(rows, qtype, y))
    return np.stack(expected), np.stack(bound)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_columns", [1, 2, 7, 64, 300])
def test_numba_matmul_matches_reference(qtype, n_columns):
    """T columns against the reference, 37 rows (a ragged last row tile), heavy-tailed x."""
    n = 512
    rows = random_rows(qtype, 37, n, seed=n_columns)
    x = np.stack([activations(t, n) for t in range(n_columns)])
    got = cpu.matmul_q8(rows, qtype, x)
    expected, bound = reference_columns(rows, qtype, x)
    assert np.all(np.abs(got - expected) <= bound)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numba_matmul_columns_equal_decode(qtype):
    """Each column of a 300-column matmul (full tiles of COLUMN_TILE and a ragged tail) is bit
    for bit the one-column (decode) kernel's result for that column alone. 29 rows: a unit of
    16, a unit of 8 after it (on targets whose units are 16 rows) and 5 rows alone."""
    n = 512
    rows = random_rows(qtype, 29, n, seed=11)
    x = np.stack([activations(t, n) for t in range(300)])
    together = cpu.matmul_q8(rows, qtype, x)
    for t in range(300):
        alone = cpu.matmul_q8(rows, qtype, x[t:t + 1])[0]
        assert np.array_equal(together[t].view(np.uint32), alone.view(np.uint32)), t


@given(n_rows=st.integers(0, 3000), height=st.sampled_from([1, 4, 8]))
def test_decode_bands_cover_every_row_once(n_rows, height):
    """Decode's tiles in bands (rows r, r + spacing, ...): the tiles of a matrix take each of its
    whole tiles' rows exactly once, and the rows past them are the matrix's last ones."""
    covered = []
    for u in range(n_rows // height):
        r, spacing = cpu.band_tile(n_rows, u, height)
        covered += [r + i * spacing for i in range(height)]
    assert sorted(covered) == list(range(n_rows // height * height))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numba_decode_in_bands(qtype):
    """Decode of matrices of whole bands of tiles and a ragged rest, two in one call: each row as
    the reference computes it; and each column of a matmul of 2 and of BANDED_COLUMNS columns
    (TILE_ROWS-row tiles in bands of their own: 1100 rows hold one) bit for bit its decode."""
    n = 512
    matrices = tuple(random_rows(qtype, n_rows, n, seed=n_rows) for n_rows in (8 * cpu.BAND_SPACING + 29, 1100))
    x = np.stack([activations(t, n) for t in range(cpu.BANDED_COLUMNS)])
    assert 1100 >= cpu.TILE_ROWS * cpu.BAND_SPACING
    for rows in matrices:
        decoded = [cpu.matmul_q8(rows, qtype, x[t:t + 1])[0] for t in range(len(x))]
        for columns in (x[:2], x):
            together = cpu.matmul_q8(rows, qtype, columns)
            for t in range(len(columns)):
                assert np.array_equal(together[t].view(np.uint32), decoded[t].view(np.uint32)), t
    outs = tuple(np.full((1, m.shape[0]), np.nan, np.float32) for m in matrices)
    cpu.MATMUL_Q8[qtype](matrices, x[:1], outs)
    for rows, out in zip(matrices, outs):
        assert np.array_equal(out[0].view(np.uint32), cpu.matmul_q8(rows, qtype, x[:1])[0].view(np.uint32))
        expected, bound = reference_columns(rows, qtype, x[:1])
        assert np.all(np.abs(out - expected) <= bound)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_columns", [1, 3, 9])
def test_numba_matmul_fused_equals_each_alone(qtype, n_columns):
    """Several matrices sharing one input in one call (q, k, v; gate, up; four: a group of FUSED
    and a padded one): each output is bit for bit its matrix's call alone, with row counts that
    split tiles and row steps across matrices; and it computes the reference's values."""
    n = 512
    matrices = tuple(random_rows(qtype, n_rows, n, seed=n_rows) for n_rows in (5, 18, 33, 7))
    x = np.stack([activations(t, n) for t in range(n_columns)])
    outs = tuple(np.full((n_columns, m.shape[0]), np.nan, np.float32) for m in matrices)
    cpu.MATMUL_Q8[qtype](matrices, x, outs)
    for rows, out in zip(matrices, outs):
        assert np.array_equal(out.view(np.uint32), cpu.matmul_q8(rows, qtype, x).view(np.uint32))
        expected, bound = reference_columns(rows, qtype, x)
        assert np.all(np.abs(out - expected) <= bound)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmuls_pad_3_7_15_columns(qtype):
    """kernels.dispatch.Matmuls computes 3, 7 and 15 columns as 4, 8 and 16 (cpu.tile_columns,
    the last column repeated): each column it returns is bit for bit that column's decode, in
    outputs of the caller's shape; an F16 matrix sharing the input (no q8 kernel) is unpadded."""
    n = 512
    matrices = [(random_rows(qtype, n_rows, n, seed=n_rows), qtype) for n_rows in (29, 8)]
    f16 = (random_rows(QType.F16, 3, n), QType.F16)
    matmuls = kernels.dispatch.Matmuls([*matrices, f16], "cpu", "q8")
    x = np.stack([activations(t, n) for t in range(15)])
    decoded = [matmuls(x[t:t + 1]) for t in range(15)]
    for n_columns in (3, 7, 15):
        assert cpu.tile_columns(n_columns) == n_columns + 1
        *outs, f16_out = matmuls(x[:n_columns])
        for m, out in enumerate(outs):
            assert out.shape == (n_columns, matrices[m][0].shape[0]) and out.flags.c_contiguous
            for t in range(n_columns):
                assert np.array_equal(out[t].view(np.uint32), decoded[t][m][0].view(np.uint32)), (n_columns, t)
        f16_alone = kernels.dispatch.Matmuls([f16], "cpu", "q8")(x[:n_columns])[0]
        assert np.array_equal(f16_out.view(np.uint32), f16_alone.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(1, 40), n_super=st.integers(1, 3),
       n_columns=st.integers(1, 10))
def test_numba_matches_reference(qtype, seed, n_rows, n_super, n_columns):
    n = 256 * n_super
    rows = random_rows(qtype, n_rows, n, seed)
    rng = np.random.default_rng(seed)
    x = np.stack([activations(seed + t, n) if n > 300 else rng.standard_normal(n).astype(np.float32)
                  for t in range(n_columns)])
    expected, bound = reference_columns(rows, qtype, x)
    assert np.all(np.abs(cpu.matmul_q8(rows, qtype, x) - expected) <= bound)


def test_numba_integer_sums_exact():
    """With power-of-two scales every float operation is exact, so the kernel must equal the
    reference bit for bit: any error in an integer sum would show."""
    n = 512
    x = np.random.default_rng(6).integers(-127, 128, (3, n)).astype(np.float32)
    x[:, ::32] = 127  # every Q8_0 block: d = 1 exactly
    for qtype in (QType.Q4_0, QType.Q5_0, QType.Q8_0):
        rows = np.array(random_rows(qtype, 11, n, seed=7))
        blocks = rows.reshape(-1, FORMATS[qtype].type_size)
        blocks[:, 0:2] = np.array([0.25], np.float16).view(np.uint8)  # d
        rows.flags.writeable = False
        got = cpu.matmul_q8(rows, qtype, x)
        for t in range(3):
            assert np.array_equal(got[t], ref.matvec_q8(rows, qtype, x[t])), qtype.name


def test_q8_0_activation_blocks_are_gguf_pys():
    """The Q8_0 activation blocks of llama.cpp's numerics are the Q8_0 quantization gguf-py
    writes for the same floats: an independent check that runs without llama-cpp-python."""
    import gguf
    x = np.random.default_rng(5).standard_normal(32 * 40).astype(np.float32) * 3
    x[:32] = 0  # an all-zero block
    ours = ref.quantize_activations(x, QType.Q4_0).view(np.uint8).reshape(-1)
    theirs = gguf.quants.quantize(x.reshape(-1, 32), QType.Q8_0).reshape(-1)
    np.testing.assert_array_equal(ours, theirs)


def _compiled_lanes(n_bytes: int, values):
    """A compiled run(u, s, out): u and s's first n_bytes as byte vectors u_, s_, then each
    (at, vector) of values(builder, u_, s_) stored at byte `at` of out."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
    from mistral_ref_kernels.cpu import lanes

    @intrinsic
    def ops(typingctx, u, s, out):
        def codegen(context, builder, signature, args):
            u_, s_ = (lanes.bytes_at(context, builder, signature.args[i], args[i],
                                     ir.Constant(ir.IntType(64), 0), n_bytes) for i in range(2))
            target = lanes.byte_pointer(context, builder, signature.args[2], args[2])
            for at, value in values(builder, u_, s_):
                pointer = builder.bitcast(builder.gep(target, [ir.Constant(lanes.I32, at)]),
                                          value.type.as_pointer())
                builder.store(value, pointer, align=1)
            return context.get_dummy_value()
        return types.none(u, s, out), codegen

    @numba.njit
    def run(u, s, out):
        ops(u, s, out)
    return run


def _lane_ops(native: bool):
    """lanes.maddubs, madd, sign_of, dot_bytes and dot_words (AVX2 and VNNI instructions when
    `native` and the CPU has them, generic IR otherwise) on two 32-byte vectors, compiled."""
    from llvmlite import ir
    from mistral_ref_kernels.cpu import lanes

    def values(builder, u_, s_):
        pairs = lanes.maddubs(builder, u_, s_, native)
        steps = ir.Constant(ir.VectorType(lanes.I16, 16), list(range(-8, 8)))
        start = builder.bitcast(s_, ir.VectorType(lanes.I32, 8))  # any accumulator
        return [(0, pairs), (32, lanes.madd(builder, pairs, steps, native)), (64, lanes.sign_of(builder, s_, u_, native)),
                (96, lanes.dot_bytes(builder, start, u_, s_, native and lanes.VNNI)),
                (128, lanes.dot_words(builder, start, pairs, steps, native and lanes.VNNI))]
    return _compiled_lanes(32, values)


@pytest.mark.skipif(not AVX2, reason="the native path is x86 AVX2")
def test_generic_lanes_equal_avx2_instructions():
    """The generic IR that a CPU without AVX2 (or VNNI) compiles computes what vpmaddubsw /
    vpmaddwd / vpsignb (vpdpbusd / vpdpwssd) compute, over the operand ranges the kernels use (no
    int16 saturation)."""
    rng = np.random.default_rng(0)
    native, generic = _lane_ops(True), _lane_ops(False)
    for _ in range(200):
        u = rng.integers(0, 129, 32).astype(np.uint8)
        u[rng.random(32) < 0.2] = 0
        s = rng.integers(-128, 128, 32).astype(np.int8)
        outs = [np.zeros(160, np.uint8) for _ in range(2)]
        native(u, s, outs[0])
        generic(u, s, outs[1])
        np.testing.assert_array_equal(outs[0], outs[1])
    pairs = outs[0][:32].view(np.int16)  # and the last one against NumPy
    wide = u.astype(np.int32) * s.astype(np.int32)
    np.testing.assert_array_equal(pairs, wide[0::2] + wide[1::2])
    start = s.view(np.int32)
    np.testing.assert_array_equal(outs[0][96:128].view(np.int32), start + wide.reshape(8, 4).sum(axis=1))
    steps = np.arange(-8, 8, dtype=np.int32)
    np.testing.assert_array_equal(outs[0][128:].view(np.int32),
                                  start + (pairs.astype(np.int32) * steps).reshape(8, 2).sum(axis=1))


def test_vnni_on_16_lanes():
    """dot_bytes and dot_words on 16 int32 lanes (one 512-bit instruction with AVX-512 VNNI, else
    two 8-lane halves) compute the sums NumPy does, over the operand ranges the kernels use."""
    from llvmlite import ir
    from mistral_ref_kernels.cpu import lanes

    def values(builder, u_, s_):
        start, words = builder.bitcast(s_, ir.VectorType(lanes.I32, 16)), ir.VectorType(lanes.I16, 32)
        return [(0, lanes.dot_bytes(builder, start, u_, s_)),
                (64, lanes.dot_words(builder, start, builder.bitcast(u_, words), builder.bitcast(s_, words)))]
    run = _compiled_lanes(64, values)
    rng = np.random.default_rng(1)
    u = rng.integers(0, 129, 64).astype(np.uint8)  # no int16 pair saturates without VNNI
    s = rng.integers(-128, 128, 64).astype(np.int8)
    out = np.zeros(128, np.uint8)
    run(u, s, out)
    start = s.view(np.int32).astype(np.int64)
    np.testing.assert_array_equal(out[:64].view(np.int32),
                                  start + (u.astype(np.int64) * s).reshape(16, 4).sum(axis=1))
    word_sums = start + (u.view(np.int16).astype(np.int64) * s.view(np.int16)).reshape(16, 2).sum(axis=1)
    np.testing.assert_array_equal(out[64:].view(np.int32), word_sums.astype(np.int32))  # wraps as int32 does
