"""`mistral-ref quantize`: llama.cpp's tensor-type rules, metadata kept, atomic streaming writer,
and (with llama-cpp-python installed) whole files byte-identical to llama_model_quantize's."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

import mistral_ref_kernels as kernels
from mistral_ref import quantize as q
from mistral_ref.cli import main
from mistral_ref.errors import QuantizeError
from mistral_ref.gguf import load_gguf
from mistral_ref.synth import synth_model


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    """A tiny Mistral-shaped model (rows of 256 and 512) stored as Q8_0, to requantize."""
    path = tmp_path_factory.mktemp("quantize") / "tiny-q8_0.gguf"
    synth_model(path, "tiny", "Q8_0", progress=False)
    return path


def test_use_more_bits_layers():
    # llama.cpp: first eighth, last eighth, and every third layer from n/8 + 2 on
    assert [i for i in range(32) if q.use_more_bits(i, 32)] == [
        0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_llama_cpp_order_is_by_layer_number():
    names = ["blk.10.attn_q.weight", "token_embd.weight", "blk.2.ffn_up.weight",
             "blk.2.attn_k.weight", "output.weight"]
    assert q.llama_cpp_order(names) == ["output.weight", "token_embd.weight", "blk.2.attn_k.weight",
                                        "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


def test_smollm2_q4_k_m_types(default_model):
    """SmolLM2's width 576 is no multiple of 256: the k-quants fall back to 32-weight formats
    except in ffn_down (rows of 1536); its tied token_embd follows output.weight's rule."""
    f = load_gguf(default_model)
    specs = [q.TensorSpec(t.name, t.shape, t.qtype) for t in f.tensors.values()]
    types = q.tensor_types(specs, "Q4_K_M", f.config.n_layers)
    assert types["token_embd.weight"] == QType.Q8_0  # Q6_K wanted, 576 % 256 -> Q8_0
    assert types["blk.0.attn_q.weight"] == QType.Q5_0  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == QType.Q8_0  # use_more_bits: Q6_K -> Q8_0
    assert types["blk.4.attn_v.weight"] == QType.Q5_0
    assert types["blk.0.ffn_down.weight"] == QType.Q6_K
    assert types["blk.4.ffn_down.weight"] == QType.Q4_K
    assert types["blk.5.ffn_down.weight"] == QType.Q6_K  # (5 - 30/8) % 3 == 2
    assert types["blk.0.attn_norm.weight"] == QType.F32
    assert sum(t == QType.Q6_K for t in types.values()) == 14  # 3 + 4 at the ends + 7 between


def test_tensor_types_untied_and_other_file_types(tiny_q8):
    f = load_gguf(tiny_q8)
    specs = [q.TensorSpec(t.name, t.shape, t.qtype) for t in f.tensors.values()]
    m = q.tensor_types(specs, "Q4_K_M", 2)
    assert m["output.weight"] == QType.Q6_K and m["token_embd.weight"] == QType.Q4_K
    assert (m["blk.0.attn_v.weight"], m["blk.1.attn_v.weight"]) == (QType.Q4_K, QType.Q6_K)
    s = q.tensor_types(specs, "Q4_K_S", 2)
    assert s["blk.0.attn_v.weight"] == QType.Q5_K and s["blk.1.ffn_down.weight"] == QType.Q4_K
    assert q.tensor_types(specs, "Q8_0", 2)["output.weight"] == QType.Q8_0
    assert q.tensor_types(specs, "Q4_0", 2)["output.weight"] == QType.Q6_K
    with pytest.raises(QuantizeError, match="unknown file type"):
        q.tensor_types(specs, "Q3_K_M", 2)


def test_fallback_to_f16_and_error():
    assert q.tensor_types([q.TensorSpec("blk.0.ffn_up.weight", (8, 48), QType.F32)], "Q4_K_M", 1) == {
        "blk.0.ffn_up.weight": QType.F16}
    with pytest.raises(QuantizeError, match="do not fit Q8_0"):
        q.tensor_types([q.TensorSpec("blk.0.ffn_up.weight", (8, 48), QType.F32)], "Q8_0", 1)


def test_quantize_file_round_trip(tiny_q8, tmp_path):
    out = tmp_path / "tiny-q4_k_m.gguf"
    types = q.quantize_file(tiny_q8, out, "Q4_K_M", progress=False)
    src, dst = load_gguf(tiny_q8), load_gguf(out)
    assert list(dst.tensors) == q.llama_cpp_order(list(src.tensors))
    assert {n: t.qtype for n, t in dst.tensors.items()} == types
    assert dst.metadata["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    for key, value in src.metadata.items():
        if key != "general.file_type":
            assert np.array_equal(dst.metadata[key], value) if isinstance(value, np.ndarray) \
                else dst.metadata[key] == value, key
    for name, t in dst.tensors.items():
        s = src.tensors[name]
        x = kernels.dequantize(s.data, s.qtype, s.shape)
        if t.qtype == s.qtype:
            assert np.array_equal(t.data, s.data)  # copied as is
        else:  # requantized from the dequantized source
            assert np.array_equal(t.data.reshape(-1), kernels.quantize(x, t.qtype).reshape(-1))
    assert not list(tmp_path.glob(".*.tmp"))


def test_refuses_to_overwrite_input(tiny_q8):
    before = tiny_q8.read_bytes()
    with pytest.raises(QuantizeError, match="overwrite the input"):
        q.quantize_file(tiny_q8, tiny_q8, "Q4_K_M", progress=False)
    assert tiny_q8.read_bytes() == before


def test_failure_leaves_no_partial_output(tiny_q8, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")

    def broken(x, qtype, backend="cpu"):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(kernels, "quantize", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        q.quantize_file(tiny_q8, out, "Q4_K_M", progress=False)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_cli_quantize(tiny_q8, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["quantize", str(tiny_q8), str(out), "--type", "Q6_K"]) == 0
    assert "Q6_K" in capsys.readouterr().out
    assert {t.qtype for t in load_gguf(out).tensors.values()} == {QType.Q6_K, QType.F32}
    assert main(["quantize", str(out), str(out), "--type", "Q8_0"]) == 1
    assert "overwrite" in capsys.readouterr().err


LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.allow_requantize, params.nthread = int(sys.argv[3]), True, 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("source", ["smollm2", "tiny"])
def test_file_bytes_equal_llama_cpp(source, default_model, tiny_q8, tmp_path):
    """Whole output files, header, metadata and tensors, equal llama.cpp's Q4_K_M."""
    pytest.importorskip("llama_cpp")
    src = default_model if source == "smollm2" else tiny_q8
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    q.quantize_file(src, ours, "Q4_K_M", progress=False)
    # in a child process: llama.cpp logs to stderr and exits on a fatal error
    subprocess.run([sys.executable, "-c", LLAMA_QUANTIZE, str(src), str(theirs), "15"],
                   check=True, capture_output=True)
    a, b = load_gguf(ours), load_gguf(theirs)
    assert {n: t.qtype for n, t in a.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}
    for name in b.tensors:
        assert np.array_equal(a.tensors[name].data, b.tensors[name].data), name
    assert ours.read_bytes() == theirs.read_bytes()


def test_float_and_legacy_file_types_follow_llama_cpp(tmp_path, tiny_q8):
    """llama.cpp applies its per-tensor rules only to quantized file types: F32 and F16 files are
    all F32 / F16; the legacy types keep their type except the output matrix (Q6_K, or Q8_0 when
    its rows are no whole number of super-blocks)."""
    TensorSpec, tensor_types = q.TensorSpec, q.tensor_types
    f = load_gguf(tiny_q8)
    specs = [TensorSpec(t.name, t.shape, t.qtype) for t in f.tensors.values()]
    for file_type, qtype in (("F32", QType.F32), ("F16", QType.F16)):
        types = tensor_types(specs, file_type, f.config.n_layers)
        assert {types[s.name] for s in specs if len(s.shape) == 2} == {qtype}
    types = tensor_types(specs, "Q5_1", f.config.n_layers)
    assert types["blk.0.attn_v.weight"] == types["blk.1.ffn_down.weight"] == QType.Q5_1
    assert types.get("output.weight", types["token_embd.weight"]) in (QType.Q6_K, QType.Q8_0)
    out = tmp_path / "f32.gguf"
    q.quantize_file(tiny_q8, out, "F32", progress=False)
    g = load_gguf(out)
    assert g.metadata["general.file_type"] == 0
    t = f.tensors["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(
        g.tensors["blk.0.attn_q.weight"].data.view(np.float32),
        kernels.dequantize(t.data, t.qtype, t.shape).reshape(-1))
