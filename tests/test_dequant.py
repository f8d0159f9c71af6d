"""Dequantization: bit-exact against gguf-py (llama.cpp's arithmetic) for every format and backend."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from hypothesis import given, settings
from hypothesis import strategies as st

import mistral_ref_kernels as kernels
from mistral_ref_kernels.formats import FORMATS
from mistral_ref import load_gguf

BACKENDS = ["reference", "cpu"]
FP16 = np.dtype("<f2")
# fp16 bit patterns that matter: zeros, the smallest and largest subnormals, the smallest normal,
# one, the extremes of the finite range; and then any finite value.
SPECIAL_FP16 = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF]
finite_fp16 = st.one_of(st.sampled_from(SPECIAL_FP16),
                        st.integers(0, 0xFFFF).filter(lambda b: (b >> 10) & 0x1F != 0x1F))


@st.composite
def random_tensor(draw, qtype: QType):
    """Raw bytes (n_rows, row_bytes) of random blocks with valid fp16 fields, and the logical shape."""
    fmt = FORMATS[qtype]
    n_rows, blocks_per_row = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if fmt.block_size == 1:
        blocks_per_row *= 32
    n = n_rows * blocks_per_row
    raw = np.frombuffer(draw(st.binary(min_size=n * fmt.type_size, max_size=n * fmt.type_size)),
                        np.uint8).copy()
    blocks = raw.view(fmt.block)
    for name in fmt.block.names:
        if fmt.block[name] == FP16:
            bits = draw(st.lists(finite_fp16, min_size=n, max_size=n))
            blocks[name] = np.array(bits, np.uint16).view(FP16)
    return raw.reshape(n_rows, -1), (n_rows, blocks_per_row * fmt.block_size)


def assert_bit_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    mismatch = got.view(np.uint32) != want.astype(np.float32).view(np.uint32)
    assert not mismatch.any(), f"{mismatch.sum()} weights differ, first at {np.argwhere(mismatch)[0]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda q: q.name)
def test_random_blocks_match_gguf_py(qtype, backend):
    @settings(max_examples=40, deadline=None)
    @given(random_tensor(qtype))
    def check(tensor):
        raw, shape = tensor
        assert_bit_identical(kernels.dequantize(raw, qtype, shape, backend=backend),
                             gguf.quants.dequantize(raw, qtype))
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_f16_every_bit_pattern(backend):
    """All 65536 halves convert as NumPy converts them, infinities and NaN payloads included,
    except that signalling NaNs come back quiet (the CPU's vcvtph2ps does that, and so does
    llama.cpp's F16C conversion; NumPy converts bit by bit)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    signalling = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0) & ((bits & 0x200) == 0)
    want.view(np.uint32)[signalling] |= 0x00400000  # the quiet bit
    assert_bit_identical(kernels.dequantize(bits.view(np.uint8), QType.F16, (1 << 16,),
                                            backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_tensor_of_default_model(default_model, backend):
    f = load_gguf(default_model)
    assert {t.qtype for t in f.tensors.values()} == {QType.F32, QType.Q4_1, QType.Q8_0}
    for t in f.tensors.values():
        assert_bit_identical(kernels.dequantize(t.data, t.qtype, t.shape, backend=backend),
                             gguf.quants.dequantize(t.rows, t.qtype).reshape(t.shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", [QType.F32, QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
def test_out_is_written_in_place(qtype, backend):
    @settings(max_examples=5, deadline=None)
    @given(random_tensor(qtype))
    def check(tensor):
        raw, shape = tensor
        out = np.full(shape, np.nan, np.float32)
        got = kernels.dequantize(raw, qtype, shape, backend=backend, out=out)
        assert np.shares_memory(got, out) and got.shape == shape
        assert_bit_identical(out, gguf.quants.dequantize(raw, qtype))
    check()


@pytest.mark.parametrize("out", [np.zeros(255, np.float32), np.zeros(256, np.float64),
                                 np.zeros((256, 2), np.float32)[:, 0]])
def test_bad_out_is_refused(out):
    raw = np.zeros(144, np.uint8)
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of 256"):
        kernels.dequantize(raw, QType.Q4_K, (256,), out=out)


def test_qtype_by_name_and_number():
    raw = np.zeros(18, np.uint8)
    for qtype in ("Q4_0", "q4_0", 2, QType.Q4_0):
        assert kernels.dequantize(raw, qtype, (32,)).shape == (32,)


@pytest.mark.parametrize("args, match", [
    ((np.zeros(18, np.uint8), "IQ2_XXS", (32,)), "IQ2_XXS is not supported"),
    ((np.zeros(18, np.uint8), "Q9_9", (32,)), "Q9_9 is not supported"),
    ((np.zeros(17, np.uint8), "Q4_0", (32,)), "needs 18 bytes, got 17"),
    ((np.zeros(18, np.uint8), "Q4_0", (16,)), "not a whole number of Q4_0 blocks"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.dequantize(*args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        kernels.dequantize(np.zeros(18, np.uint8), "Q4_0", (32,), backend="gpu")


def test_layouts_match_gguf_py():
    for qtype, fmt in FORMATS.items():
        assert gguf.GGML_QUANT_SIZES[qtype] == (fmt.block_size, fmt.type_size), qtype.name
