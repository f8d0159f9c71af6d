"""mistral.rs's topology files (mistral_ref.topology): per-layer in-situ quantization types.

The semantics checked are mistral.rs's (mistralrs-core/src/topology/mod.rs and its unit tests;
mistralrs-quant's resolve_immediate_isq): START-END ranges are half-open, a later-ending range wins
an overlap (a later declaration when they end together), regexes beat ranges and the later regex
wins, uncovered linear weights get in_situ_quant (or keep their type without it). The bytes of a
weight quantized through a topology are compared with `mistral-ref quantize`'s and plain ISQ's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

import mistral_ref_kernels as kernels
from mistral_ref import ChatCompletionRequest, Runner, Which
from mistral_ref.errors import ModelSourceError
from mistral_ref.gguf import load_gguf
from mistral_ref.isq import linear_weights
from mistral_ref.model import Model
from mistral_ref.quantize import quantize_file
from mistral_ref.topology import load_topology
from test_checkpoint import DIMS, hf_weights, write_checkpoint, write_f32_gguf

C4 = dict(DIMS, num_hidden_layers=4)
PER_LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# layers 0-1 Q4K, layer 2 Q8_0, layer 3 uncovered; the output matrix by regex
TOPOLOGY = "0-2:\n  isq: Q4K\n2:\n  isq: q8_0\n  device: cpu\n'/lm_head\\..*/':\n  isq: Q5_0\n"


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return hf_weights(C4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-mistral-4", weights, config=C4)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, weights) -> Path:
    return write_f32_gguf(tmp_path_factory.mktemp("gguf") / "tiny-4-f32.gguf", weights, c=C4)


def write(tmp_path: Path, text: str, name: str = "topology.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def types_of(model: Model) -> dict[str, QType]:
    return {name: model.file.tensors[name].qtype for name in linear_weights(model.config)}


# -- the format ---------------------------------------------------------------------------------
def test_ranges_overlaps_single_layers_and_regexes_resolve_as_mistral_rs(tmp_path):
    # mistral.rs's unit tests highest_end_range_overrides_lower_end, later_range_with_same_end_wins
    t = load_topology(write(tmp_path, "0-4:\n  isq: Q4K\n2-6:\n  isq: Q6K\n"))
    assert [t.layers[i].isq for i in (0, 1, 2, 5)] == ["Q4K", "Q4K", "Q6K", "Q6K"]
    t = load_topology(write(tmp_path, "0-4:\n  isq: Q4K\n2-4:\n  isq: Q5K\n"))
    assert [t.layers[i].isq for i in range(4)] == ["Q4K", "Q4K", "Q5K", "Q5K"]
    # a later-ending range wins even when declared first
    t = load_topology(write(tmp_path, "2-6:\n  isq: Q6K\n0-4:\n  isq: Q4K\n"))
    assert [t.layers[i].isq for i in range(6)] == ["Q4K"] * 2 + ["Q6K"] * 4
    # regex_overrides_respect_declaration_order; a regex beats a range; END is exclusive
    t = load_topology(write(tmp_path, "0-2:\n  isq: Q4_0\n7:\n  isq: Q4_1\n'/mlp\\./':\n  isq: Q4K\n"
                                      "'/mlp\\.down_proj\\.weight$/':\n  isq: Q6K\n"))
    choose = t.isq_plan("Q8_0")
    assert choose("blk.1.attn_q.weight") == "Q4_0"
    assert choose("blk.2.attn_q.weight") == "Q8_0"  # not in 0-2: the default
    assert choose("blk.7.attn_v.weight") == "Q4_1"
    assert choose("blk.1.ffn_up.weight") == "Q4K"
    assert choose("blk.1.ffn_down.weight") == "Q6K"
    assert choose("output.weight") == "Q8_0"  # ranges address decoder layers only
    assert t.isq_plan(None)("blk.3.attn_q.weight") is None  # no in_situ_quant: keep the stored type
    # an entry without isq gives the default; nothing to quantize at all gives no plan
    assert load_topology(write(tmp_path, "0-2:\n  device: cpu\n")).isq_plan("Q4K")("blk.0.attn_q.weight") == "Q4K"
    assert load_topology(write(tmp_path, "0-2:\n  device: cpu\n")).isq_plan(None) is None


def test_a_relative_path_is_read_from_the_current_directory(tmp_path, monkeypatch, checkpoint):
    (tmp_path / "topologies").mkdir()
    write(tmp_path / "topologies", "0-8:\n  isq: Q8_0\n", "isq.yml")
    monkeypatch.chdir(tmp_path)
    runner = Runner(Which.Plain(str(checkpoint), topology="topologies/isq.yml"))
    types = types_of(runner.model)
    assert types.pop("output.weight") == QType.F32 and set(types.values()) == {QType.Q8_0}


# -- loading ------------------------------------------------------------------------------------
def test_each_layer_gets_the_type_its_range_names(tmp_path, checkpoint, f32_gguf):
    topology = write(tmp_path, TOPOLOGY)
    for which in (Which.Plain(str(checkpoint), topology=str(topology)),
                  Which.GGUF(str(f32_gguf), topology=str(topology))):
        for default, uncovered in (("Q6K", QType.Q6_K), (None, QType.F32)):
            model = Runner(which, in_situ_quant=default).model
            want = {f"blk.{i}.{t}.weight": [QType.Q4_K, QType.Q4_K, QType.Q8_0, uncovered][i]
                    for i in range(4) for t in PER_LAYER}
            assert types_of(model) == {**want, "output.weight": QType.Q5_0}
            for name in ("token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight"):
                assert model.file.tensors[name].qtype == QType.F32  # not linear weights: kept


def test_bytes_equal_mistral_ref_quantize_and_plain_isq(tmp_path, checkpoint, f32_gguf):
    runner = Runner(Which.Plain(str(checkpoint), topology=str(write(tmp_path, TOPOLOGY))), in_situ_quant="Q6K")
    tensors = runner.model.file.tensors
    plain = {q: Model.from_gguf(f32_gguf, isq=name).file.tensors
             for q, name in ((QType.Q4_K, "Q4K"), (QType.Q8_0, "8"), (QType.Q6_K, "Q6K"), (QType.Q5_0, "Q5_0"))}
    for name in linear_weights(runner.model.config):
        t = tensors[name]
        np.testing.assert_array_equal(t.data, plain[t.qtype][name].data, err_msg=name)
    # independently: the file `mistral-ref quantize` writes, where it chose the same type
    compared = set()
    for file_type in ("Q4_K_S", "Q8_0"):
        quantized = tmp_path / f"{file_type}.gguf"
        file_types = quantize_file(f32_gguf, quantized, file_type, progress=False)
        written = load_gguf(quantized).tensors
        for name in linear_weights(runner.model.config):
            if file_types[name] == tensors[name].qtype:
                np.testing.assert_array_equal(tensors[name].data, written[name].data.reshape(-1), err_msg=name)
                compared.add(name)
    # Q4_K_S keeps some attn_v / ffn_down at higher types (llama.cpp's rule): not those
    assert {f"blk.2.{t}.weight" for t in PER_LAYER} <= compared
    assert all(sum(f"blk.{i}.{t}.weight" in compared for t in PER_LAYER) >= 5 for i in (0, 1))
    source = Model.from_gguf(f32_gguf).file.tensors["blk.2.ffn_down.weight"]
    want = kernels.quantize(kernels.dequantize(source.data, source.qtype, source.shape), QType.Q8_0)
    np.testing.assert_array_equal(tensors["blk.2.ffn_down.weight"].data, want.reshape(-1))


def test_mistral_rs_example_topology_gives_q3_k(tmp_path, checkpoint, weights):
    # mistral.rs's topologies/isq.yml, verbatim (examples/python/topology.py)
    text = "0-8:\n  isq: Q3K\n8-16:\n  isq: Q4K\n16-24:\n  isq: Q6K\n# Skip 24-28\n28-32:\n  isq: Q8_0"
    runner = Runner(Which.Plain(str(checkpoint), topology=str(write(tmp_path, text))), in_situ_quant="Q4K")
    types = types_of(runner.model)
    assert types.pop("output.weight") == QType.Q4_K and set(types.values()) == {QType.Q3_K}
    # Q3_K's bytes are llama.cpp's (tests/test_quantize.py's fixture); here: they hold the weights
    t = runner.model.file.tensors["blk.1.ffn_up.weight"]
    w = weights["model.layers.1.mlp.up_proj.weight"]
    error = kernels.dequantize(t.data, t.qtype, t.shape) - w
    assert np.sqrt((error ** 2).mean() / (w ** 2).mean()) < 0.25  # 3.4 bits a weight
    out = runner.send_chat_completion_request(ChatCompletionRequest([{"role": "user", "content": "hi"}], max_tokens=3))
    assert out.usage.completion_tokens == 3


def test_a_gguf_runner_with_a_topology_generates(tmp_path, f32_gguf):
    runner = Runner(Which.GGUF(str(f32_gguf), topology=str(write(tmp_path, "0-4:\n  isq: Q8_0\n"))))
    out = runner.send_chat_completion_request(ChatCompletionRequest([{"role": "user", "content": "hi"}], max_tokens=3))
    assert out.usage.completion_tokens == 3


# -- bad files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("0-8:\n  isq: Q9\n", r"entry '0-8': isq 'Q9': unknown"),
    ("0-8:\n  isq: Q2K\n8-16:\n  isq: Q4K\n", r"entry '0-8': isq 'Q2K': mistral.rs has it, this engine has no kernels"),
    ("a-b:\n  isq: Q4K\n", r"entry 'a-b': a range must be START-END"),
    ("1-2-3:\n  isq: Q4K\n", r"entry '1-2-3': a range must be START-END"),
    ("-3:\n  isq: Q4K\n", r"entry '-3': a range must be START-END"),
    ("8-4:\n  isq: Q4K\n", r"entry '8-4': the range's end must be > its start"),
    ("0-99999999999:\n  isq: Q4K\n", r"entry '0-99999999999': layer 99999999998 is past any model's layers"),
    ("0-8:\n  isq: Q4K\n  device: cuda[0]\n", r"entry '0-8': device 'cuda\[0\]' cannot be honoured.*one device, here 'cpu'"),
    ("0-8:\n  isq: Q4K\n  device: gpu\n", r"entry '0-8': device 'gpu' must match"),
    ("0-8:\n  iqs: Q4K\n", r"entry '0-8': unknown key 'iqs'"),
    ("'/model\\.(/':\n  isq: Q4K\n", r"invalid topology regex"),
    ("0-8: Q4K\n", r"entry '0-8': expected a mapping"),
    ("", r"got an empty file"),
    ("0-8: [\n", r"not valid YAML"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, checkpoint, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ModelSourceError, match=message) as e:
        Runner(Which.Plain(str(checkpoint), topology=str(path)), in_situ_quant="Q4K")
    assert str(path) in str(e.value)


def test_a_missing_file_and_a_device_we_do_not_run_are_clear_errors(tmp_path, f32_gguf):
    with pytest.raises(ModelSourceError, match=r"topology file 'nowhere/isq.yml' does not exist.*current directory"):
        Runner(Which.GGUF(str(f32_gguf), topology="nowhere/isq.yml"))
    cuda = write(tmp_path, "0-2:\n  device: cuda[0]\n")
    with pytest.raises(ModelSourceError, match=r"device 'cuda\[0\]' cannot be honoured"):
        Runner(Which.GGUF(str(f32_gguf), topology=str(cuda)), device="reference")
    load_topology(cuda, "cuda")  # the one cuda device is accepted there
    for other in ("cpu", "cuda[1]", "metal[0]"):
        with pytest.raises(ModelSourceError, match="cannot be honoured"):
            load_topology(write(tmp_path, f"0-2:\n  device: {other}\n"), "cuda")
