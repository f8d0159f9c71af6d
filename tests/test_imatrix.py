"""Importance matrices (mistral_ref.imatrix): measured on calibration text (mistral.rs's
`calibration_file`), read from mistral.rs's .cimatrix and llama.cpp's GGUF imatrix files, recorded
from live requests (the Runner's online calibration), and the ISQ they weigh.

What each importance entry is gets checked against its definition computed here with NumPy (the
mean square of the first layer's normed inputs); the importance-weighted quantizer itself is
checked byte for byte against llama.cpp in tests/test_quantize.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter

import mistral_ref_kernels as kernels
from mistral_ref import CalibrationStatus, ChatCompletionRequest, Runner, Which
from mistral_ref.errors import InvalidRequestError, ModelSourceError, QuantizeError
from mistral_ref.imatrix import collect_importance, load_importance, save_cimatrix
from mistral_ref.model import Model
from test_checkpoint import DIMS, hf_weights, write_checkpoint

TEXT = "The quick brown fox jumps over the lazy dog. " * 30  # ~300 tokens: a few chunks of 128
REQUEST = ChatCompletionRequest([{"role": "user", "content": "Tell me a story"}], max_tokens=4)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return hf_weights(seed=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", weights)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(TEXT)
    return path


def test_importance_is_the_mean_square_of_each_input_column(checkpoint, weights):
    model = Model.from_checkpoint(checkpoint, activations="f32")
    tokens = list(range(100, 400))
    importance = collect_importance(model, tokens, bos_id=1, chunk=128, progress=False)
    # chunks of 128 tokens, each with BOS first: what layer 0's q, k and v saw is its normed embeddings
    seen = np.concatenate([[1] + tokens[i:i + 128] for i in range(0, len(tokens), 128)])
    x = weights["model.embed_tokens.weight"][seen].astype(np.float64)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + DIMS["rms_norm_eps"]) * weights["model.layers.0.input_layernorm.weight"]
    for name in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(importance[f"blk.0.{name}.weight"], (h * h).mean(0), rtol=1e-4)
    np.testing.assert_array_equal(importance["blk.1.ffn_gate.weight"], importance["blk.1.ffn_up.weight"])
    assert set(importance) == {f"blk.{i}.{t}.weight" for i in range(2) for t in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {"output.weight"}
    assert importance["blk.0.ffn_down.weight"].shape == (DIMS["intermediate_size"],)
    assert model.device.name == "cpu" and type(model.device).__name__ != "ImportanceRecorder"  # put back


def test_calibration_file_weighs_isq(checkpoint, calibration):
    runner = Runner(Which.Plain(str(checkpoint), calibration_file=str(calibration)), in_situ_quant="Q4K")
    plain = Runner(Which.Plain(str(checkpoint)), in_situ_quant="Q4K").model.file.tensors
    source = Model.from_checkpoint(checkpoint, activations="f32")
    tokenizer = runner.tokenizer
    importance = collect_importance(source, tokenizer.encode(TEXT), tokenizer.bos_id, progress=False)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"):
        t = runner.model.file.tensors[name]
        assert t.qtype == QType.Q4_K
        w = kernels.dequantize(source.file.tensors[name].data, source.file.tensors[name].qtype, t.shape)
        np.testing.assert_array_equal(t.data, kernels.quantize(w, QType.Q4_K, importance=importance[name]).reshape(-1))
        assert (t.data != plain[name].data).any()
    assert runner.send_chat_completion_request(REQUEST).usage.completion_tokens == 4


def test_imatrix_files_load_the_same_importance(tmp_path, checkpoint, calibration):
    source = Model.from_checkpoint(checkpoint, activations="f32")
    importance = collect_importance(source, list(range(3, 200)), bos_id=1, progress=False)
    save_cimatrix(tmp_path / "m.cimatrix", importance)
    loaded = load_importance(tmp_path / "m.cimatrix", source.config)
    assert loaded.keys() == importance.keys()
    for name in importance:
        np.testing.assert_array_equal(loaded[name], importance[name])
    # llama.cpp's GGUF imatrix: <name>.in_sum2 (sum of squares) and <name>.counts
    writer = GGUFWriter(str(tmp_path / "m.imatrix"), "imatrix")
    writer.add_string("general.type", "imatrix")
    for name, values in importance.items():
        writer.add_tensor(f"{name}.in_sum2", (values * np.float32(50)).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([50.0], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_gguf = load_importance(tmp_path / "m.imatrix", source.config)
    for name in importance:
        np.testing.assert_allclose(from_gguf[name], importance[name], rtol=1e-6)
    a = Runner(Which.Plain(str(checkpoint), imatrix=str(tmp_path / "m.cimatrix")), in_situ_quant="Q5K").model
    b = Model.from_checkpoint(checkpoint, isq="Q5K", importance=importance)
    for name, t in a.file.tensors.items():
        np.testing.assert_array_equal(t.data, b.file.tensors[name].data)


def test_online_calibration_requantizes_the_live_model(tmp_path, checkpoint):
    runner = Runner(Which.Plain(str(checkpoint)), in_situ_quant="Q4K", prefix_cache_n=4)
    before = {n: t.data.copy() for n, t in runner.model.file.tensors.items()}
    assert runner.calibration_status() == CalibrationStatus(False, 15, 0, 0, 0, 0)
    assert runner.begin_calibration().collecting
    for _ in range(2):
        runner.send_chat_completion_request(REQUEST)
    status = runner.calibration_status()
    assert status.layers == status.layers_tracking == 15 and 0 < status.min_rows <= status.max_rows
    recorded = runner._recorder.importance()
    assert runner.apply_calibration(save_cimatrix=str(tmp_path / "traffic.cimatrix")) == status
    assert not runner.calibration_status().collecting and not runner.prefix_cache.entries
    saved = load_importance(tmp_path / "traffic.cimatrix", runner.model.config)
    again = Model.from_checkpoint(checkpoint, isq="Q4K", importance=saved)
    for name, t in runner.model.file.tensors.items():
        np.testing.assert_array_equal(t.data, again.file.tensors[name].data)
    assert any((t.data != before[n]).any() for n, t in runner.model.file.tensors.items())
    assert set(saved) == set(recorded)
    assert runner.send_chat_completion_request(REQUEST).usage.completion_tokens == 4


def test_bad_calibration_use_is_a_clear_error(tmp_path, checkpoint, calibration):
    with pytest.raises(ModelSourceError, match="give in_situ_quant"):
        Runner(Which.Plain(str(checkpoint), calibration_file=str(calibration)))
    with pytest.raises(ModelSourceError, match="alternatives"):
        Runner(Which.Plain(str(checkpoint), calibration_file=str(calibration), imatrix=str(calibration)),
               in_situ_quant="Q4K")
    with pytest.raises(ModelSourceError, match="not a local file"):
        Runner(Which.Plain(str(checkpoint), calibration_file=str(tmp_path / "missing.txt")), in_situ_quant="Q4K")
    (tmp_path / "bad.cimatrix").write_bytes(b"\x05\x00")
    with pytest.raises(ModelSourceError, match="not a readable"):
        Runner(Which.Plain(str(checkpoint), imatrix=str(tmp_path / "bad.cimatrix")), in_situ_quant="Q4K")
    with pytest.raises(QuantizeError, match="blk.0.attn_q.weight: quantizing to Q6_K with an importance matrix"):
        Runner(Which.Plain(str(checkpoint), calibration_file=str(calibration)), in_situ_quant="Q6K")
    runner = Runner(Which.Plain(str(checkpoint)))
    with pytest.raises(InvalidRequestError, match="needs a model loaded with in_situ_quant"):
        runner.begin_calibration()
    runner = Runner(Which.Plain(str(checkpoint)), in_situ_quant="Q8_0")
    with pytest.raises(InvalidRequestError, match="no calibration is running"):
        runner.apply_calibration()
    runner.begin_calibration()
    with pytest.raises(InvalidRequestError, match="no request has run"):
        runner.apply_calibration()
    runner.send_chat_completion_request(REQUEST)
    with pytest.raises(ModelSourceError, match="expected a .cimatrix file"):
        runner.apply_calibration(save_cimatrix=str(tmp_path / "x.bin"))
