"""Hugging Face checkpoints (mistral_ref.checkpoint) and in-situ quantization (mistral_ref.isq).

The checkpoints here are written by the tests themselves, independently of the reader: a
safetensors writer of a few lines (and the `safetensors` package), HF's tensor names and layout,
and an F32 GGUF of the same weights written with gguf-py and llama.cpp's q/k row order (its
convert_hf_to_gguf.py `permute`, restated here). Loading either must give the same model; HF
transformers, when installed, must compute the same logits from the directory."""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter

import mistral_ref_kernels as kernels
from mistral_ref import (Architecture, ChatCompletionRequest, Runner, Which, load_checkpoint,
                         save_checkpoint)
from mistral_ref.errors import CheckpointError, ModelSourceError, QuantizeError
from mistral_ref.isq import isq_type, linear_weights, tensor_type
from mistral_ref.model import Model
from mistral_ref.models import mistral_v1_tokenizer_path
from mistral_ref.quantize import quantize_file
from mistral_ref.synth import add_metadata_value
from mistral_ref.tokenizer import Tokenizer, sentencepiece_gguf_metadata

DIMS = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512, vocab_size=32000, max_position_embeddings=512, rope_theta=10000.0,
            rms_norm_eps=1e-5, sliding_window=16)
TOKENS = [1, 851, 349, 264, 1369, 302, 272, 7768, 2556, 28723] * 4  # 40 tokens: past the window of 16


def hf_weights(c: dict = DIMS, seed: int = 0, qk_norm: bool = False) -> dict[str, np.ndarray]:
    """HF name -> float32 weights of a Mistral model with config `c` (random, deterministic);
    with `qk_norm`, Qwen3's per-head q_norm and k_norm too."""
    rng = np.random.default_rng(seed)
    dim, head_dim = c["hidden_size"], c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q, kv, ffn = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim, c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], dim), "model.norm.weight": (dim,),
              "lm_head.weight": (c["vocab_size"], dim)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                       p + "self_attn.q_proj.weight": (q, dim), p + "self_attn.k_proj.weight": (kv, dim),
                       p + "self_attn.v_proj.weight": (kv, dim), p + "self_attn.o_proj.weight": (dim, q),
                       p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim),
                       p + "mlp.down_proj.weight": (dim, ffn)})
        if qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
    out = {}
    for name, shape in shapes.items():
        out[name] = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                     else rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return out


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """The format as its documentation states it, written independently of mistral_ref's."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def as_stored(w: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    if dtype == "BF16":  # truncation: the float32 values of these bits are the model's weights
        return dtype, (w.view(np.uint32) >> 16).astype(np.uint16)
    return dtype, w.astype({"F32": np.float32, "F16": np.float16}[dtype])


def stored_values(w: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 weights a checkpoint of `dtype` holds."""
    _, raw = as_stored(w, dtype)
    return (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)


def write_checkpoint(path: Path, weights: dict[str, np.ndarray], dtype: str = "F32", n_shards: int = 1,
                     tokenizer: str = "model", config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32", **DIMS, **(config or {})}))
    names = list(weights)
    shards = [names[i::n_shards] for i in range(n_shards)]
    files = ["model.safetensors"] if n_shards == 1 else [f"model-{i:05d}.safetensors" for i in range(n_shards)]
    for file, shard in zip(files, shards):
        write_safetensors(path / file, {n: as_stored(weights[n], dtype) for n in shard})
    if n_shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: f for f, shard in zip(files, shards) for n in shard}}))
    spm = mistral_v1_tokenizer_path(progress=False)
    if tokenizer == "model":
        shutil.copy(spm, path / "tokenizer.model")
    else:
        (path / "tokenizer.json").write_text(Tokenizer.from_metadata(sentencepiece_gguf_metadata(spm)).to_json())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}))
    return path


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q_proj / k_proj rows for pairwise RoPE."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f32_gguf(path: Path, weights: dict[str, np.ndarray], dtype: str = "F32", arch: str = "llama",
                   c: dict = DIMS) -> Path:
    """The same model as llama.cpp's converter writes it (float32), with the tokenizer: q/k rows
    permuted for pairwise RoPE, except for qwen3 (its converter keeps HF's order)."""
    w = GGUFWriter(str(path), arch)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    if c.get("head_dim"):
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    if c.get("sliding_window"):
        w.add_sliding_window(c["sliding_window"])
    for key, value in sentencepiece_gguf_metadata(mistral_v1_tokenizer_path(progress=False)).items():
        add_metadata_value(w, key, value)
    w.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for name, array in weights.items():
        array = stored_values(array, dtype)
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            i, rest = stem.removeprefix("model.layers.").split(".", 1)
            if arch == "qwen3":
                pass
            elif rest == "self_attn.q_proj":
                array = llama_cpp_permute(array, c["num_attention_heads"])
            elif rest == "self_attn.k_proj":
                array = llama_cpp_permute(array, c["num_key_value_heads"])
            gguf_name = f"blk.{i}.{layer[rest]}.weight"
        else:
            gguf_name = f"{names[stem]}.weight"
        w.add_tensor(gguf_name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return hf_weights()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-mistral", weights)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, weights) -> Path:
    return write_f32_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", weights)


# -- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, n_shards, tokenizer", [("F32", 1, "model"), ("F16", 3, "json"),
                                                        ("BF16", 2, "model")])
def test_checkpoint_logits_equal_the_gguf_of_the_same_weights(tmp_path, weights, dtype, n_shards, tokenizer):
    hf = Model.from_checkpoint(write_checkpoint(tmp_path / "hf", weights, dtype, n_shards, tokenizer),
                               activations="f32")
    gguf = Model.from_gguf(write_f32_gguf(tmp_path / "f32.gguf", weights, dtype), activations="f32")
    assert hf.config.architecture == "mistral" and hf.config.norm_eps == pytest.approx(gguf.config.norm_eps)
    assert replace(hf.config, architecture="llama", norm_eps=gguf.config.norm_eps) == gguf.config
    assert {t.qtype for t in hf.file.tensors.values()} == {QType[dtype]}
    np.testing.assert_allclose(hf.logits(TOKENS), gguf.logits(TOKENS), rtol=0, atol=2e-5)


def test_weights_are_views_of_the_mapped_files_except_q_and_k(checkpoint):
    for name, t in load_checkpoint(checkpoint).tensors.items():
        mapped = getattr(t.data, "_mmap", None) is not None  # NumPy keeps the map on its views
        assert mapped != ("attn_q" in name or "attn_k" in name), name
        assert mapped == (str(getattr(t.data, "filename", "")) == str(checkpoint / "model.safetensors")), name


def test_safetensors_package_files_read_the_same(tmp_path, weights):
    safetensors = pytest.importorskip("safetensors.numpy")  # the format's own writer
    ours = write_checkpoint(tmp_path / "ours", weights, "F16")
    theirs = write_checkpoint(tmp_path / "theirs", weights, "F16")
    safetensors.save_file({n: w.astype(np.float16) for n, w in weights.items()},
                          str(theirs / "model.safetensors"), metadata={"format": "pt"})
    a, b = load_checkpoint(ours), load_checkpoint(theirs)
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name].data, b.tensors[name].data)


def test_transformers_computes_the_same_logits(checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                           attn_implementation="eager")
    with torch.no_grad():
        want = hf(torch.tensor([TOKENS])).logits[0].numpy()
    ours = Model.from_checkpoint(checkpoint, activations="f32").logits(TOKENS)
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4)


def test_tokenizer_and_chat_template_come_from_the_directory(checkpoint, tmp_path, weights):
    spm = Tokenizer.from_metadata(sentencepiece_gguf_metadata(mistral_v1_tokenizer_path(progress=False)))
    from_json = write_checkpoint(tmp_path / "json", weights, tokenizer="json")
    for path in (checkpoint, from_json):
        runner = Runner(Which.Plain(str(path), arch=Architecture.Mistral))
        text = "Hello world: naïve café, 1234 tokens!"
        assert runner.tokenize_text(text, True) == spm.encode(text, add_special_tokens=True)
        assert runner.tokenizer.bos_id == 1 and runner.tokenizer.eos_id == 2
        ids = runner.submit(ChatCompletionRequest([{"role": "user", "content": "hi"}], max_tokens=1)).job.prompt_ids
        assert ids == spm.encode("[INST] hi [/INST]", add_special_tokens=True)


def test_plain_runner_generates_what_the_gguf_runner_does(checkpoint, f32_gguf):
    request = dict(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12)
    plain = Runner(Which.Plain(str(checkpoint)))
    gguf = Runner(Which.GGUF(str(f32_gguf)))
    a = plain.send_chat_completion_request(ChatCompletionRequest(**request))
    b = gguf.send_chat_completion_request(ChatCompletionRequest(**request))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 12
    assert plain.list_models() == [str(checkpoint)] == [plain.get_default_model_id()]


def test_export_round_trip_keeps_logits_and_tokenizer(tmp_path, f32_gguf):
    out = save_checkpoint(f32_gguf, tmp_path / "exported", "F32", shard_bytes=8 << 20, progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    np.testing.assert_array_equal(Model.from_checkpoint(out, activations="f32").logits(TOKENS),
                                  Model.from_gguf(f32_gguf, activations="f32").logits(TOKENS))
    text = "Round trip: ünïcödé and spaces   here"
    assert (Runner(Which.Plain(str(out))).tokenize_text(text, True)
            == Runner(Which.GGUF(str(f32_gguf))).tokenize_text(text, True))


# -- bad checkpoints ----------------------------------------------------------------------------
def test_hub_ids_and_unsupported_architectures_are_clear_errors(checkpoint):
    with pytest.raises(ModelSourceError, match="never downloads"):
        Runner(Which.Plain("mistralai/Mistral-7B-Instruct-v0.1", arch=Architecture.Mistral))
    with pytest.raises(ModelSourceError, match=r"Gemma is not implemented.*Architecture.Mistral, Architecture.Llama, "
                                               r"Architecture.Qwen3, Architecture.SmolLm3"):
        Runner(Which.Plain(str(checkpoint), arch=Architecture.Gemma))
    with pytest.raises(ModelSourceError, match="multimodal"):
        Runner(Which.MultimodalPlain(model_id=str(checkpoint)))
    with pytest.raises(ModelSourceError, match="topology file 'topologies/isq.yml' does not exist"):
        Runner(Which.Plain(str(checkpoint), topology="topologies/isq.yml"))  # tests/test_topology.py


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").write_text('{"model_type": "qwen2"}'), "model_type 'qwen2' is not supported"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x05"), "too short"),
    (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "runs past"),
    (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{bad}"), "not JSON"),
    (lambda d: write_safetensors(d / "model.safetensors", {"lm_head.weight": ("F32", np.zeros(3, np.float32))}),
     "no tensor 'model.embed_tokens.weight'"),
    (lambda d: (d / "tokenizer.model").unlink(), "no tokenizer.json or tokenizer.model"),
])
def test_broken_checkpoints_name_the_problem(tmp_path, weights, damage, message):
    path = write_checkpoint(tmp_path / "broken", weights)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_tensor_dtype_shape_and_offsets_are_checked(tmp_path, weights):
    path = write_checkpoint(tmp_path / "bad", weights)
    stored = {n: as_stored(w, "F32") for n, w in weights.items()}
    write_safetensors(path / "model.safetensors", {**stored, "model.norm.weight": ("I8", np.zeros(256, np.int8))})
    with pytest.raises(CheckpointError, match="is I8"):
        load_checkpoint(path)
    write_safetensors(path / "model.safetensors", {**stored, "model.norm.weight": ("F32", np.zeros(7, np.float32))})
    with pytest.raises(CheckpointError, match=r"has shape \[7\]"):
        load_checkpoint(path)
    raw = bytearray((path / "model.safetensors").read_bytes())
    (path / "model.safetensors").write_bytes(bytes(raw[:-100]))
    with pytest.raises(CheckpointError, match="claims bytes"):
        load_checkpoint(path)


# -- in-situ quantization -----------------------------------------------------------------------
@pytest.mark.parametrize("isq, file_type", [("Q4K", "Q4_K_S"), ("8", "Q8_0")])
def test_isq_bytes_equal_mistral_ref_quantize(tmp_path, checkpoint, f32_gguf, isq, file_type):
    quantized = tmp_path / f"{file_type}.gguf"
    file_types = quantize_file(f32_gguf, quantized, file_type, progress=False)
    from mistral_ref.gguf import load_gguf
    written = load_gguf(quantized).tensors
    for model in (Model.from_checkpoint(checkpoint, isq=isq), Model.from_gguf(f32_gguf, isq=isq)):
        tensors = model.file.tensors
        compared = 0
        for name in linear_weights(model.config):
            assert tensors[name].qtype == isq_type(isq)
            if file_types[name] == tensors[name].qtype:
                np.testing.assert_array_equal(tensors[name].data, written[name].data.reshape(-1), err_msg=name)
                compared += 1
        assert compared >= 6 * DIMS["num_hidden_layers"]
        for name in ("token_embd.weight", "output_norm.weight"):
            assert tensors[name].qtype == QType.F32  # embeddings and norms keep their type


def test_isq_names_and_fallbacks_are_mistral_rs_s():
    assert [isq_type(n) for n in ("q4k", "Q4K", "3", "4", "5", "6", "8", "Q5_1", "Q3K")] == [
        QType.Q4_K, QType.Q4_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_0, QType.Q5_1, QType.Q3_K]
    # a row of 576 weights (SmolLM2's width) is no whole number of 256-weight super-blocks
    # (mistralrs-quant's get_fallback: Q3K -> Q4_0, Q4K -> Q4_1, Q5K -> Q5_0, Q6K -> Q5_1)
    assert [tensor_type(t, 576) for t in (QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_0)] == [
        QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0]
    with pytest.raises(QuantizeError, match="no kernels for it"):
        isq_type("HQQ4")
    with pytest.raises(QuantizeError, match="unknown"):
        isq_type("Q9")


def test_isq_of_an_f16_gguf_runs_and_matches_kernels_quantize(tmp_path, weights):
    f16 = write_f32_gguf(tmp_path / "f16-values.gguf", weights, "F16")
    runner = Runner(Which.GGUF(str(f16)), in_situ_quant="Q8_0")
    t = runner.model.file.tensors["blk.1.ffn_down.weight"]
    source = Model.from_gguf(f16).file.tensors["blk.1.ffn_down.weight"]
    want = kernels.quantize(kernels.dequantize(source.data, source.qtype, source.shape), QType.Q8_0)
    np.testing.assert_array_equal(t.data, want.reshape(-1))
    out = runner.send_chat_completion_request(ChatCompletionRequest([{"role": "user", "content": "hi"}], max_tokens=3))
    assert out.usage.completion_tokens == 3


def test_export_hf_cli(tmp_path, f32_gguf, capsys):
    from mistral_ref.cli import main
    assert main(["export-hf", str(tmp_path / "out"), "--model", str(f32_gguf), "--dtype", "BF16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    c = load_checkpoint(tmp_path / "out")
    assert c.tensors["blk.0.ffn_up.weight"].qtype == QType.BF16 and c.config.sliding_window == 16
