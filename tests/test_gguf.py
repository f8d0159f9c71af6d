"""GGUF loader: values against gguf-py's independent reader, and a typed error for every bad file."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, tiny_tensors, write_tiny_gguf
from mistral_ref import errors, load_gguf


def test_default_model_matches_gguf_py(default_model):
    ours, theirs = load_gguf(default_model), gguf.GGUFReader(default_model)
    assert ours.version == 3
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type
        assert mine.shape == tuple(int(n) for n in reversed(t.shape))
        assert not mine.data.flags.writeable
        assert np.array_equal(mine.data, t.data.reshape(-1).view(np.uint8))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        mine = ours.metadata[key]
        if isinstance(mine, np.ndarray):
            assert mine.tolist() == value, key
        elif isinstance(mine, float):
            assert mine == pytest.approx(value, rel=1e-7), key
        else:
            assert mine == value, key


def test_copy_load_matches_gguf_py_on_huge_pages(default_model):
    """load="copy": every tensor's bytes equal gguf-py's, read-only, in one 2 MB-aligned
    anonymous block (not the file's map); the model's logits are those of the mmap load."""
    from mistral_ref.memory import HUGE_PAGE
    from mistral_ref.model import Model
    ours, theirs = load_gguf(default_model, load="copy"), gguf.GGUFReader(default_model)
    starts = []
    for t in theirs.tensors:
        mine = ours.tensors[t.name].data
        assert not mine.flags.writeable and mine.base is not None
        assert np.array_equal(mine, t.data.reshape(-1).view(np.uint8))
        starts.append(mine.ctypes.data)
    first = ours.tensors[theirs.tensors[0].name].data.ctypes.data
    assert (first - (int(theirs.tensors[0].data_offset) - theirs.data_offset)) % HUGE_PAGE == 0
    assert not any(ours._map.ctypes.data <= a < ours._map.ctypes.data + ours._map.size for a in starts)
    tokens = [1, 22, 333, 4444]
    assert np.array_equal(Model.from_gguf(default_model, load="copy").logits(tokens),
                          Model.from_gguf(default_model, load="mmap").logits(tokens))


def test_mmap_load_is_views_of_the_file_map(default_model):
    """load="mmap": every tensor is a read-only view inside the file's map, its bytes gguf-py's."""
    ours, theirs = load_gguf(default_model, load="mmap"), gguf.GGUFReader(default_model)
    start, size = ours._map.ctypes.data, ours._map.size
    for t in theirs.tensors:
        mine = ours.tensors[t.name].data
        assert not mine.flags.writeable and start <= mine.ctypes.data < start + size
        assert np.array_equal(mine, t.data.reshape(-1).view(np.uint8))


def test_unknown_load_is_refused(default_model):
    with pytest.raises(ValueError, match="unknown load 'ram'"):
        load_gguf(default_model, load="ram")


def test_default_model_config(default_model):
    c = load_gguf(default_model).config
    # SmolLM2-135M: published hyper-parameters (HF config.json of SmolLM2-135M-Instruct).
    assert (c.architecture, c.n_layers, c.dim, c.n_heads, c.n_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (c.head_dim, c.ffn_dim, c.vocab_size, c.context_length) == (64, 1536, 49152, 8192)
    assert (c.rope_theta, c.rope_dim, c.sliding_window, c.tied_embeddings) == (1e5, 64, None, True)
    assert c.norm_eps == pytest.approx(1e-5)


def test_tiny_file_config_and_data(tmp_path):
    tensors = tiny_tensors()
    f = load_gguf(write_tiny_gguf(tmp_path / "t.gguf", arch="mistral", tensors=tensors,
                                  metadata={"mistral.attention.sliding_window": 16}))
    c = f.config
    assert (c.architecture, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == ("mistral", 64, 4, 2, 16)
    assert (c.sliding_window, c.tied_embeddings, c.vocab_size) == (16, False, TINY["vocab"])
    for name, array in tensors.items():
        t = f.tensors[name]
        assert t.qtype == QType.F32 and t.shape == array.shape
        assert np.array_equal(t.data.view(np.float32).reshape(t.shape), array)


def test_tied_embeddings_without_output(tmp_path):
    tensors = tiny_tensors()
    del tensors["output.weight"]
    assert load_gguf(write_tiny_gguf(tmp_path / "t.gguf", tensors=tensors)).config.tied_embeddings


def test_quantized_tensor_rows(tmp_path):
    tensors = tiny_tensors()
    rows = np.zeros((TINY["ffn_dim"], TINY["dim"] // 32 * 18), np.uint8)  # Q4_0 bytes of ffn_up
    tensors["blk.0.ffn_up.weight"] = rows
    f = load_gguf(write_tiny_gguf(tmp_path / "t.gguf", tensors=tensors,
                                  raw_types={"blk.0.ffn_up.weight": QType.Q4_0}))
    t = f.tensors["blk.0.ffn_up.weight"]
    assert t.qtype == QType.Q4_0 and t.shape == (TINY["ffn_dim"], TINY["dim"])
    assert t.rows.shape == rows.shape


# --- bad files: each gets its own typed error, naming the problem --------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GG", b"\x00" * 64, b"GGML" + b"\x00" * 60])
def test_not_gguf(tmp_path, content):
    (tmp_path / "x.gguf").write_bytes(content)
    with pytest.raises(errors.NotGGUFError, match="not a GGUF file"):
        load_gguf(tmp_path / "x.gguf")


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("g") / "t.gguf").read_bytes()


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path, good_bytes, version):
    (tmp_path / "x.gguf").write_bytes(good_bytes[:4] + struct.pack("<I", version) + good_bytes[8:])
    with pytest.raises(errors.UnsupportedVersionError, match=f"version {version}"):
        load_gguf(tmp_path / "x.gguf")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.9999))
def test_truncated(tmp_path, good_bytes, cut):
    n = max(4, int(len(good_bytes) * cut))
    (tmp_path / "x.gguf").write_bytes(good_bytes[:n])
    with pytest.raises(errors.TruncatedGGUFError, match="truncated|ends at"):
        load_gguf(tmp_path / "x.gguf")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_header_never_crashes(tmp_path, good_bytes, data):
    """Random bytes overwritten anywhere in the header: a GGUFError or a consistent load."""
    header_end = good_bytes.index(b"output.weight") + 64
    buf = bytearray(good_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, header_end))] = data.draw(st.integers(0, 255))
    (tmp_path / "x.gguf").write_bytes(bytes(buf))
    try:
        f = load_gguf(tmp_path / "x.gguf")
    except errors.GGUFError:
        return
    for t in f.tensors.values():
        assert t.data.nbytes == t.format.nbytes(t.shape)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(errors.UnsupportedArchitectureError, match="'gpt2'"):
        load_gguf(write_tiny_gguf(tmp_path / "x.gguf", arch="gpt2"))


def test_mixture_of_experts_rejected(tmp_path):
    with pytest.raises(errors.UnsupportedArchitectureError, match="mixture-of-experts"):
        load_gguf(write_tiny_gguf(tmp_path / "x.gguf", metadata={"llama.expert_count": 8}))


def test_unsupported_tensor_type(tmp_path):
    tensors = tiny_tensors()
    tensors["blk.1.ffn_up.weight"] = np.zeros((TINY["ffn_dim"], 2 * 66), np.uint8)  # IQ2_XXS bytes
    path = write_tiny_gguf(tmp_path / "x.gguf", tensors=tensors,
                           raw_types={"blk.1.ffn_up.weight": QType.IQ2_XXS})
    with pytest.raises(errors.UnsupportedTensorTypeError, match="blk.1.ffn_up.weight.*IQ2_XXS"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    tensors = tiny_tensors()
    del tensors["blk.1.attn_v.weight"]
    with pytest.raises(errors.MissingTensorError, match="blk.1.attn_v.weight"):
        load_gguf(write_tiny_gguf(tmp_path / "x.gguf", tensors=tensors))


def test_wrong_tensor_shape(tmp_path):
    tensors = tiny_tensors()
    tensors["blk.0.ffn_down.weight"] = tensors["blk.0.ffn_down.weight"].T.copy()
    with pytest.raises(errors.TensorShapeError, match="blk.0.ffn_down.weight"):
        load_gguf(write_tiny_gguf(tmp_path / "x.gguf", tensors=tensors))


def test_row_not_whole_blocks(tmp_path):
    tensors = tiny_tensors()
    tensors["blk.0.ffn_up.weight"] = np.zeros((TINY["ffn_dim"], TINY["dim"] // 32 * 18), np.uint8)
    raw = write_tiny_gguf(tmp_path / "t.gguf", tensors=tensors,
                          raw_types={"blk.0.ffn_up.weight": QType.Q4_0}).read_bytes()
    # Tensor info: name, u32 n_dims, u64 dims innermost first; make the row 48 weights long.
    dims_at = raw.index(b"blk.0.ffn_up.weight") + len("blk.0.ffn_up.weight") + 4
    assert struct.unpack_from("<Q", raw, dims_at)[0] == TINY["dim"]
    (tmp_path / "x.gguf").write_bytes(raw[:dims_at] + struct.pack("<Q", 48) + raw[dims_at + 8:])
    with pytest.raises(errors.TensorShapeError, match="blk.0.ffn_up.weight.*not a whole number of Q4_0"):
        load_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("key, value, match", [
    ("{arch}.attention.head_count", 5, "not a multiple of head_count"),
    ("{arch}.attention.head_count_kv", 3, "not a multiple of head_count_kv"),
    ("{arch}.embedding_length", "wide", "not a valid int"),
    ("{arch}.block_count", None, "'llama.block_count' is missing"),
    ("{arch}.attention.layer_norm_rms_epsilon", None, "layer_norm_rms_epsilon' is missing"),
    ("general.alignment", 24, "not a power of two"),
    ("{arch}.rope.dimension_count", 18, "must be even and in 1..head_dim"),
    ("{arch}.rope.dimension_count", 7, "must be even"),
    ("{arch}.rope.freq_base", 0.0, "must be positive"),
])
def test_bad_metadata(tmp_path, key, value, match):
    with pytest.raises(errors.MetadataError, match=match):
        load_gguf(write_tiny_gguf(tmp_path / "x.gguf", metadata={key: value}))


def test_errors_are_value_errors():
    assert issubclass(errors.TruncatedGGUFError, errors.GGUFError)
    assert issubclass(errors.GGUFError, ValueError)
    assert issubclass(errors.GGUFError, errors.MistralRefError)


def test_a_huge_block_count_is_a_missing_tensor_not_a_memory_blowup(tmp_path):
    """Found by test_corrupt_header_never_crashes: a corrupt block_count near 2^32 made the shape
    check build names for every layer until the machine ran out of memory (24 GB)."""
    path = write_tiny_gguf(tmp_path / "x.gguf", metadata={"llama.block_count": (1 << 32) - 1})
    with pytest.raises(errors.MissingTensorError, match="missing tensor 'blk.2"):
        load_gguf(path)
