"""Synthetic Mistral models: random weights in Mistral shapes, written as quantized GGUF files.

Architecture `llama` (as Mistral GGUFs are published), the real Mistral v1 SentencePiece
tokenizer (from the mistral-common wheel) as GGUF tokenizer metadata, the Mistral [INST] chat
template, and the tensor types llama.cpp's rules give the file type (mistral_ref.quantize).

Weights are random blocks written directly, never quantized from floats, so even the 7B preset
takes seconds plus disk time: every quant byte is random and each block's scale fields are set so
that the weights have standard deviation about 1/sqrt(row length) and mean about zero, which keeps
activations and logits of order one. Tensors stream to disk one at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_VERSION

import mistral_ref_kernels as kernels
from mistral_ref_kernels.formats import block_format
from mistral_ref.chat_template import MISTRAL_INSTRUCT_TEMPLATE
from mistral_ref.errors import QuantizeError
from mistral_ref.gguf import Config, expected_shapes
from mistral_ref.models import mistral_v1_tokenizer_path
from mistral_ref.quantize import FILE_TYPES, TensorSpec, llama_cpp_order, tensor_types, write_gguf
from mistral_ref.tokenizer import sentencepiece_gguf_metadata


@dataclass(frozen=True)
class Preset:
    """Model shape. head_dim = dim // n_heads."""

    dim: int
    n_layers: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    context_length: int
    sliding_window: int | None
    vocab_size: int = 32000
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


PRESETS: dict[str, Preset] = {
    # every dimension a multiple of 256, so every matrix really is a k-quant; a window of 16
    # tokens so short tests cross it
    "tiny": Preset(dim=256, n_layers=2, ffn_dim=512, n_heads=4, n_kv_heads=2, context_length=512,
                   sliding_window=16),
    "mistral-1b": Preset(dim=2048, n_layers=16, ffn_dim=7168, n_heads=16, n_kv_heads=8,
                         context_length=32768, sliding_window=4096),
    # Mistral-7B v0.1
    "mistral-7b": Preset(dim=4096, n_layers=32, ffn_dim=14336, n_heads=32, n_kv_heads=8,
                         context_length=32768, sliding_window=4096),
}

# mean quant level of the formats with an offset (w = d * q - m): the offset is set to cancel it
_MEAN_LEVEL = {QType.Q4_1: 7.5, QType.Q5_1: 15.5, QType.Q4_K: 7.5, QType.Q5_K: 15.5}


def tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """name -> NumPy shape of every tensor of a preset (the loader's own expected shapes)."""
    head_dim = p.dim // p.n_heads
    return expected_shapes(Config(
        "llama", p.n_layers, p.dim, p.n_heads, p.n_kv_heads, head_dim, p.ffn_dim, p.vocab_size,
        p.context_length, p.rope_theta, head_dim, p.norm_eps, p.sliding_window,
        tied_embeddings=False))


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: QType,
                  std: float) -> np.ndarray:
    """Raw bytes (uint8, flat) of a `qtype` tensor of `shape` with random quants, its weights of
    standard deviation about `std` and mean about 0. F32/F16 tensors are all ones (norms)."""
    fmt = block_format(qtype)
    if qtype in (QType.F32, QType.F16):
        return np.ones(shape, fmt.block["value"]).view(np.uint8).reshape(-1)
    raw = np.frombuffer(bytearray(rng.bytes(fmt.nbytes(shape))), dtype=np.uint8)
    blocks = raw.view(fmt.block)
    d = std / _unit_std(qtype) * rng.uniform(0.8, 1.2, len(blocks))
    _set_scales(blocks, qtype, d)
    return raw


def _set_scales(blocks: np.ndarray, qtype: QType, d: np.ndarray | float) -> None:
    blocks["d"] = d
    if "dmin" in blocks.dtype.names:
        blocks["dmin"] = np.asarray(d) * _MEAN_LEVEL[qtype]
    if "m" in blocks.dtype.names:
        blocks["m"] = -np.asarray(d) * _MEAN_LEVEL[qtype]


def _unit_std(qtype: QType) -> float:
    """Standard deviation of random blocks of `qtype` whose `d` is 1."""
    rng = np.random.default_rng(0)
    fmt = block_format(qtype)
    raw = np.frombuffer(bytearray(rng.bytes(256 * fmt.type_size)), dtype=np.uint8)
    _set_scales(raw.view(fmt.block), qtype, 1.0)
    return float(kernels.dequantize(raw, qtype, (256 * fmt.block_size,), backend="reference").std())


def synth_model(dst: str | os.PathLike, preset: str = "tiny", file_type: str = "Q4_K_M",
                sliding_window: int | None = None, seed: int = 0,
                progress: bool = True) -> dict[str, QType]:
    """Write a random-weight Mistral-shaped GGUF file; return its tensor types.

    preset: a key of PRESETS. file_type: a key of mistral_ref.quantize.FILE_TYPES.
    sliding_window: overrides the preset's (0 for none). seed: the same seed gives the same file.
    """
    if preset not in PRESETS:
        raise QuantizeError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if file_type not in FILE_TYPES:
        raise QuantizeError(f"unknown file type {file_type!r} (choose from {', '.join(FILE_TYPES)})")
    p = PRESETS[preset]
    window = p.sliding_window if sliding_window is None else (sliding_window or None)
    if window is not None and window < 0:
        raise QuantizeError(f"sliding window must be positive, got {window}")
    shapes = tensor_shapes(p)
    types = tensor_types([TensorSpec(n, s, QType.F32) for n, s in shapes.items()], file_type,
                         p.n_layers)
    order = llama_cpp_order(list(shapes))
    rng = np.random.default_rng(seed)

    def add_metadata(writer: GGUFWriter) -> None:
        writer.add_name(f"mistral-ref synthetic {preset}")
        _add_llama_hparams(writer, p, window)
        writer.add_file_type(int(FILE_TYPES[file_type][0]))
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for key, value in sentencepiece_gguf_metadata(mistral_v1_tokenizer_path(progress)).items():
            add_metadata_value(writer, key, value)
        writer.add_chat_template(MISTRAL_INSTRUCT_TEMPLATE)

    def tensor_bytes(name: str) -> np.ndarray:
        shape = shapes[name]
        return random_blocks(rng, shape, types[name], std=shape[-1] ** -0.5)

    write_gguf(Path(dst), "llama", add_metadata, [(n, shapes[n], types[n]) for n in order],
               tensor_bytes, progress, desc=f"synth {preset} {file_type}")
    return types


def _add_llama_hparams(writer: GGUFWriter, p: Preset, window: int | None) -> None:
    writer.add_context_length(p.context_length)
    writer.add_embedding_length(p.dim)
    writer.add_block_count(p.n_layers)
    writer.add_feed_forward_length(p.ffn_dim)
    writer.add_rope_dimension_count(p.dim // p.n_heads)
    writer.add_head_count(p.n_heads)
    writer.add_head_count_kv(p.n_kv_heads)
    writer.add_layer_norm_rms_eps(p.norm_eps)
    writer.add_rope_freq_base(p.rope_theta)
    writer.add_vocab_size(p.vocab_size)
    if window is not None:
        writer.add_sliding_window(window)


def add_metadata_value(writer: GGUFWriter, key: str, value) -> None:
    """Add a tokenizer metadata value with the GGUF type llama.cpp's converter gives it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, np.ndarray):
        sub_type = {np.dtype(np.float32): GGUFValueType.FLOAT32,
                    np.dtype(np.int32): GGUFValueType.INT32}[value.dtype]
        writer.add_key_value(key, value.tolist(), GGUFValueType.ARRAY, sub_type=sub_type)
    else:  # list of strings
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
