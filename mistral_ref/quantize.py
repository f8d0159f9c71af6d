"""Requantize a GGUF file to a llama.cpp file type (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_S,
Q4_K_M, Q5_K_M, Q6_K).

The same file `llama-quantize --allow-requantize IN OUT TYPE` writes without an importance matrix:
tensors in llama.cpp's order, each given the tensor type llama.cpp's rules pick (`tensor_types`,
after src/llama-quant.cpp), dequantized to float32 and requantized with kernels.quantize, whose
bytes equal llama.cpp's reference quantizers. A tensor whose type does not change is copied.
Metadata is copied with its value types; `general.file_type` and `general.quantization_version`
are set. The output streams tensor by tensor to a temporary file that is renamed at the end.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_VERSION
from tqdm import tqdm

import mistral_ref_kernels as kernels
from mistral_ref_kernels.formats import block_format
from mistral_ref.errors import QuantizeError
from mistral_ref.gguf import load_gguf

# file type -> (general.file_type value, the tensor type most tensors get)
FILE_TYPES: dict[str, tuple[LlamaFileType, QType]] = {
    "F32": (LlamaFileType.ALL_F32, QType.F32),
    "F16": (LlamaFileType.MOSTLY_F16, QType.F16),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, QType.Q4_0),
    "Q4_1": (LlamaFileType.MOSTLY_Q4_1, QType.Q4_1),
    "Q5_0": (LlamaFileType.MOSTLY_Q5_0, QType.Q5_0),
    "Q5_1": (LlamaFileType.MOSTLY_Q5_1, QType.Q5_1),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
    "Q4_K_S": (LlamaFileType.MOSTLY_Q4_K_S, QType.Q4_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, QType.Q4_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, QType.Q5_K),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, QType.Q6_K),
}

# a row length the chosen k-quant cannot tile falls back to a 32-weight format
FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0}

_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    """What the type rules look at: a tensor's name, NumPy shape and current type."""

    name: str
    shape: tuple[int, ...]
    qtype: QType


def llama_cpp_order(names: list[str]) -> list[str]:
    """llama.cpp's tensor order (its weight_name_comparer): tensors outside blocks first, then
    block by block in layer order; by name within each."""
    def key(name: str) -> tuple[int, str]:
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name)
    return sorted(names, key=key)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every
    third layer in between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def is_quantizable(t: TensorSpec) -> bool:
    """llama.cpp quantizes 2-D and larger weights, except norms and MoE gate inputs."""
    return (len(t.shape) >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name
            and "ffn_gate_inp.weight" not in t.name)


def tensor_types(tensors: list[TensorSpec], file_type: str, n_layers: int,
                 is_70b: bool = False) -> dict[str, QType]:
    """The tensor type of every tensor in a `file_type` file, by llama.cpp's rules.

    `n_layers` is the model's block count; `is_70b` marks a Llama-2-70B-shaped model (80 layers
    and grouped-query attention), whose attn_v llama.cpp bumps to Q5_K. Tensors that are not
    quantized keep their type. Raises QuantizeError when no type fits a tensor's rows.
    """
    if file_type not in FILE_TYPES:
        raise QuantizeError(f"unknown file type {file_type!r} (choose from {', '.join(FILE_TYPES)})")
    default = FILE_TYPES[file_type][1]
    by_name = {t.name: t for t in tensors}
    tied_embeddings = "output.weight" not in by_name
    n_attn_v = sum(_is_attn_v(name) for name in by_name)
    i_attn_v = i_ffn_down = 0
    types = {}
    for name in llama_cpp_order(list(by_name)):
        t = by_name[name]
        if not is_quantizable(t):
            types[name] = t.qtype
            continue
        n_cols = t.shape[-1]
        new = default
        if default in (QType.F32, QType.F16):  # llama.cpp applies its rules to quantized types only
            pass
        elif name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
            if n_cols % block_format(new).block_size:
                new = QType.Q8_0
            elif new != QType.Q8_0:
                new = QType.Q6_K
        elif name == "token_embd.weight":
            pass
        elif _is_attn_v(name):
            if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attn_v, n_attn_v):
                new = QType.Q6_K
            elif file_type == "Q4_K_S" and i_attn_v < 4:
                new = QType.Q5_K
            if is_70b and new in (QType.Q3_K, QType.Q4_K):
                new = QType.Q5_K
            i_attn_v += 1
        elif "ffn_down" in name:
            if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_ffn_down, n_layers):
                new = QType.Q6_K
            elif file_type == "Q4_K_S" and i_ffn_down < n_layers // 8:
                new = QType.Q5_K
            i_ffn_down += 1
        types[name] = _fit_rows(name, n_cols, new)
    return types


def _is_attn_v(name: str) -> bool:
    return any(s in name for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def _fit_rows(name: str, n_cols: int, qtype: QType) -> QType:
    """llama.cpp's fallback when blocks do not tile a row: k-quant -> 32-weight format -> F16."""
    if n_cols % block_format(qtype).block_size == 0:
        return qtype
    if qtype not in FALLBACK:
        raise QuantizeError(f"{name}: rows of {n_cols} weights do not fit {qtype.name} blocks "
                            f"of {block_format(qtype).block_size}")
    qtype = FALLBACK[qtype]
    return qtype if n_cols % block_format(qtype).block_size == 0 else QType.F16


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, file_type: str,
                  progress: bool = True) -> dict[str, QType]:
    """Write `dst`, the `file_type` requantization of GGUF file `src`; return the tensor types.

    Memory stays near one tensor in float32. `dst` appears only when complete (written to a
    temporary file beside it, then renamed); it may not be `src`.
    """
    src, dst = Path(src), Path(dst)
    if file_type not in FILE_TYPES:
        raise QuantizeError(f"unknown file type {file_type!r} (choose from {', '.join(FILE_TYPES)})")
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise QuantizeError(f"refusing to overwrite the input file {src}")
    model = load_gguf(src)
    config = model.config
    specs = [TensorSpec(t.name, t.shape, t.qtype) for t in model.tensors.values()]
    is_70b = config.n_layers == 80 and config.n_kv_heads != config.n_heads
    types = tensor_types(specs, file_type, config.n_layers, is_70b)
    order = llama_cpp_order(list(types))

    def requantized(name: str) -> np.ndarray:
        t = model.tensors[name]
        if types[name] == t.qtype:
            return t.data
        return kernels.quantize(kernels.dequantize(t.data, t.qtype, t.shape), types[name])

    reader = GGUFReader(src)
    write_gguf(dst, config.architecture,
               lambda writer: _copy_metadata(reader, writer, FILE_TYPES[file_type][0]),
               [(name, model.tensors[name].shape, types[name]) for name in order], requantized,
               progress, desc=f"quantize {file_type}")
    return types


def write_gguf(dst: Path, architecture: str, add_metadata: Callable[[GGUFWriter], None],
               tensors: list[tuple[str, tuple[int, ...], QType]],
               tensor_bytes: Callable[[str], np.ndarray], progress: bool, desc: str) -> None:
    """Stream a GGUF file to `dst`: metadata from `add_metadata(writer)`, then for each
    (name, NumPy shape, type) of `tensors` in order, the raw bytes `tensor_bytes(name)` returns,
    one tensor in memory at a time. Written to a temporary file beside `dst`, renamed when done."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        writer = GGUFWriter(tmp, architecture)
        add_metadata(writer)
        for name, shape, qtype in tensors:
            fmt = block_format(qtype)
            writer.add_tensor_info(name, (*shape[:-1], fmt.row_bytes(shape[-1])), np.dtype(np.uint8),
                                   fmt.nbytes(shape), raw_dtype=fmt.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(block_format(qtype).nbytes(shape) for _, shape, qtype in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc=desc) as bar:
            for name, shape, qtype in tensors:
                data = np.ascontiguousarray(tensor_bytes(name)).view(np.uint8).reshape(-1)
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
        writer.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, file_type: LlamaFileType) -> None:
    """Copy every key/value with its value type, in order, then (re)set the quantization version
    and the file type at the end, as llama.cpp's gguf_set_val_u32 does (remove, then append)."""
    updated = ("general.quantization_version", "general.file_type")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in updated:
            continue  # header fields; the key GGUFWriter writes first itself; keys set below
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        if field.name == "general.alignment":
            writer.data_alignment = int(field.contents())
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_file_type(int(file_type))
