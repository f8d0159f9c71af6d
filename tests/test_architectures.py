"""The llama family's variations: Qwen3 (per-head q/k RMSNorm, q/k rows in HF's order in its GGUF
files) and SmolLM3 (every 4th layer without RoPE), from Hugging Face checkpoints and GGUF files.

The files are written by the tests (tests/test_checkpoint.py's writers: llama.cpp's converter's
layout, restated there), and the logits are checked against tests/reference_model.py (float64,
written from the architectures' definitions) and, when installed, HF transformers' Qwen3 and
SmolLM3 models."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mistral_ref import Architecture, ChatCompletionRequest, Runner, Which, save_checkpoint
from mistral_ref.errors import CheckpointError, ModelSourceError
from mistral_ref.gguf import load_gguf
from mistral_ref.isq import in_situ_quantize
from mistral_ref.model import Model
from reference_model import reference_logits
from test_checkpoint import DIMS, TOKENS, hf_weights, write_checkpoint, write_f32_gguf

# head_dim 48 with 4 heads of a 128-wide model: q is 192 wide, not the model's width (as in Qwen3)
QWEN3 = dict(DIMS, hidden_size=128, head_dim=48, sliding_window=None, use_sliding_window=False,
             model_type="qwen3", architectures=["Qwen3ForCausalLM"])
SMOLLM3 = dict(DIMS, num_hidden_layers=4, sliding_window=None, use_sliding_window=False,
               model_type="smollm3", architectures=["SmolLM3ForCausalLM"], pad_token_id=None, bos_token_id=1,
               eos_token_id=2)
ARCHS = {"qwen3": QWEN3, "smollm3": SMOLLM3}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def files(tmp_path_factory, arch) -> tuple[Path, Path]:
    """(HF checkpoint directory, F32 GGUF) of the same random weights."""
    c = ARCHS[arch]
    weights = hf_weights(c, seed=3, qk_norm=arch == "qwen3")
    root = tmp_path_factory.mktemp(arch)
    return (write_checkpoint(root / "hf", weights, config=c),
            write_f32_gguf(root / "f32.gguf", weights, arch=arch, c=c))


def test_configs_say_what_varies(files, arch):
    hf, gguf = Model.load(files[0]).config, Model.load(files[1]).config
    assert replace(hf, norm_eps=gguf.norm_eps) == gguf  # GGUF stores the epsilon as float32
    assert hf.architecture == arch and hf.sliding_window is None
    if arch == "qwen3":
        assert hf.qk_norm and hf.rope_halves and hf.head_dim == 48 and hf.no_rope_layers == ()
    else:
        assert not hf.qk_norm and not hf.rope_halves and hf.no_rope_layers == (3,)


@pytest.mark.parametrize("device", ["cpu", "reference"])
def test_gguf_logits_equal_the_float64_reference(files, device):
    ours = Model.from_gguf(files[1], device=device, activations="f32").logits(TOKENS)
    np.testing.assert_allclose(ours, reference_logits(load_gguf(files[1]), TOKENS), rtol=0, atol=1e-4)


def test_checkpoint_logits_equal_the_gguf_of_the_same_weights(files):
    np.testing.assert_allclose(Model.from_checkpoint(files[0], activations="f32").logits(TOKENS),
                               Model.from_gguf(files[1], activations="f32").logits(TOKENS), rtol=0, atol=2e-5)


def test_decode_steps_equal_the_prompt_pass(files):
    model = Model.from_gguf(files[1], activations="f32")
    cache = model.new_cache(len(TOKENS))
    model.forward(TOKENS[:30], cache)
    steps = [model.forward([t], cache) for t in TOKENS[30:]]
    np.testing.assert_allclose(steps, model.logits(TOKENS)[30:], rtol=0, atol=2e-5)


def test_q8_batched_logits_are_each_sequence_alone(files):
    model = Model(in_situ_quantize(load_gguf(files[1]), "Q8_0"), activations="q8")
    a, b = model.new_cache(64), model.new_cache(64)
    model.forward(TOKENS[:20], a)
    alone = model.forward([TOKENS[20]], a.fork())
    batched = model.forward_batch([([TOKENS[20]], a), (TOKENS[:7], b)])[0]
    np.testing.assert_array_equal(batched, alone)


def test_transformers_computes_the_same_logits(files, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(files[0], dtype=torch.float32,
                                                           attn_implementation="eager")
    assert type(hf).__name__ == ARCHS[arch]["architectures"][0]
    with torch.no_grad():
        want = hf(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(Model.from_checkpoint(files[0], activations="f32").logits(TOKENS), want,
                               rtol=0, atol=1e-4)


def test_export_round_trip(tmp_path, files, arch):
    out = save_checkpoint(files[1], tmp_path / "exported", "F32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    np.testing.assert_array_equal(Model.from_checkpoint(out, activations="f32").logits(TOKENS),
                                  Model.from_gguf(files[1], activations="f32").logits(TOKENS))


def test_plain_runner_with_the_architecture(files, arch):
    member = {"qwen3": Architecture.Qwen3, "smollm3": Architecture.SmolLm3}[arch]
    runner = Runner(Which.Plain(str(files[0]), arch=member))
    reply = runner.send_chat_completion_request(
        ChatCompletionRequest([{"role": "user", "content": "hi"}], max_tokens=5))
    assert reply.usage.completion_tokens == 5
    other = Architecture.Llama
    with pytest.raises(ModelSourceError, match=f"arch=Architecture.Llama, but .* is a '{arch}' model"):
        Runner(Which.Plain(str(files[0]), arch=other))


def test_a_llama_checkpoint_is_not_loaded_as_qwen3(tmp_path):
    path = write_checkpoint(tmp_path / "mistral", hf_weights())
    with pytest.raises(ModelSourceError, match="Architecture.Qwen3 loads 'qwen3'"):
        Runner(Which.Plain(str(path), arch=Architecture.Qwen3))


@pytest.mark.parametrize("config, message", [
    (dict(QWEN3, use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    (dict(SMOLLM3, no_rope_layers=[1, 1, 0]), "no_rope_layers must list 0 or 1 for each of the 4 layers"),
])
def test_unsupported_configs_are_clear_errors(tmp_path, config, message):
    path = write_checkpoint(tmp_path / "bad", hf_weights(config, qk_norm=config["model_type"] == "qwen3"),
                            config=config)
    with pytest.raises(CheckpointError, match=message):
        Model.from_checkpoint(path)


def test_a_qwen3_file_without_q_norm_names_the_tensor(tmp_path):
    weights = hf_weights(QWEN3, qk_norm=True)
    del weights["model.layers.1.self_attn.q_norm.weight"]
    with pytest.raises(Exception, match="blk.1.attn_q_norm.weight"):
        Model.from_gguf(write_f32_gguf(tmp_path / "q.gguf", weights, arch="qwen3", c=QWEN3))
