"""GGUF loading: metadata, a model Config, and tensors as read-only views into one block of memory.

File layout (GGUF v2/v3, little-endian): magic b"GGUF", u32 version, u64 tensor count, u64
key/value count; the key/value pairs; one info record per tensor (name, dims innermost first,
type, offset); padding to `general.alignment`; then the tensor data. Nothing is dequantized here:
every tensor is a uint8 view of one block of memory, its byte range checked against the file.
That block is the tensor data read into anonymous memory on huge pages (load="copy", the
default; mistral_ref.memory; llama.cpp's --no-mmap), or the file's memory map (load="mmap").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QType

from mistral_ref_kernels.formats import BlockFormat, block_format
from mistral_ref.memory import read_into_huge_pages
from mistral_ref.errors import (GGUFError, MetadataError, MissingTensorError, NotGGUFError,
                                TensorShapeError, TruncatedGGUFError,
                                UnsupportedArchitectureError, UnsupportedTensorTypeError,
                                UnsupportedVersionError)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen3", "smollm3")
# Architectures whose q/k rows stay in Hugging Face's order in a GGUF file (llama.cpp's NEOX RoPE,
# rotating dimension i with i + D/2); llama's converter reorders them for adjacent pairs.
ROPE_HALVES = ("qwen3",)
QK_NORM = ("qwen3",)  # an RMSNorm over each head's q and k before RoPE
# SmolLM3 leaves RoPE out of every 4th layer (llama.cpp's n_no_rope_layer_step; HF's
# no_rope_layer_interval): layer i rotates when (i + 1) % 4 != 0.
NO_ROPE_INTERVAL = {"smollm3": 4}
LOADS = ("mmap", "copy")
# Decode streams every weight once a token and, reading in bands (kernels.cpu.vec_dot), reads
# them faster from huge pages: the 7B-shaped Q4_K_M decoded at 5.98 tok/s copied against 5.85
# mapped (bench/generate.py), and in-process its step took 152-163 ms copied against 171-207
# mapped (the page cache's 4 KB pages, wherever they lie). The copy costs 2-3 s of loading for its 4.37 GB (up to 10 s when the kernel first
# compacts memory for 2 MB pages) and the same resident size. See docs/kernels.md.
DEFAULT_LOAD = "copy"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: type id -> NumPy scalar dtype; 7 is bool, 8 string, 9 array.
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                  7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of a llama-family model (llama, mistral, qwen3, smollm3), read from GGUF
    metadata. The last three fields are the family's variations: `qk_norm` (Qwen3), q/k rows in
    `rope_halves` order (Qwen3's GGUF files), `no_rope_layers` (SmolLM3)."""

    architecture: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_dim: int
    norm_eps: float
    sliding_window: int | None
    tied_embeddings: bool
    qk_norm: bool = False
    rope_halves: bool = False
    no_rope_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as stored: `data` is its raw bytes (uint8, a read-only view of the file's map or
    of its copy).

    `shape` is the logical NumPy shape, outermost first (GGUF lists dims innermost first); rows run
    along the last axis, each `format.row_bytes(shape[-1])` bytes of consecutive blocks.
    """

    name: str
    qtype: QType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def format(self) -> BlockFormat:
        return block_format(self.qtype)

    @property
    def rows(self) -> np.ndarray:
        """The raw bytes as a (n_rows, row_bytes) uint8 view."""
        return self.data.reshape(-1, self.format.row_bytes(self.shape[-1]))


class _Cursor:
    """Reads little-endian values from the mapped header, raising on any read past the end."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.buf):
            raise TruncatedGGUFError(
                f"{self.path}: truncated while reading {what} at byte {self.pos} "
                f"(needs {n} bytes, file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, dtype: str, what: str) -> Any:
        dt = np.dtype(dtype)
        return self.take(dt.itemsize, what).view(dt)[0].item()

    def string(self, what: str) -> str:
        n = self.scalar("<u8", f"{what} length")
        raw = self.take(n, what).tobytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            elem_type = self.scalar("<u4", f"{what} element type")
            count = self.scalar("<u8", f"{what} count")
            if elem_type in _SCALAR_DTYPES:
                dt = np.dtype(_SCALAR_DTYPES[elem_type])
                arr = np.array(self.take(count * dt.itemsize, what).view(dt))
                return arr.astype(bool) if elem_type == _BOOL else arr
            return [self.value(elem_type, f"{what}[{i}]") for i in range(count)]
        if vtype not in _SCALAR_DTYPES:
            raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")
        v = self.scalar(_SCALAR_DTYPES[vtype], what)
        return bool(v) if vtype == _BOOL else v


class GGUFFile:
    """A loaded GGUF file: `.metadata` (key -> value), `.tensors` (name -> QuantizedTensor), `.config`.

    Metadata strings are `str`, numeric arrays 1-D NumPy arrays, string arrays `list[str]`.
    """

    def __init__(self, path: str | os.PathLike, load: str = DEFAULT_LOAD):
        if load not in LOADS:
            raise ValueError(f"unknown load {load!r} (choose from {', '.join(LOADS)})")
        self.path, self.load = Path(path), load
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except ValueError:  # NumPy cannot map an empty file
            raise NotGGUFError(f"{self.path}: empty file, not a GGUF file") from None
        cur = _Cursor(self._map, self.path)
        if len(self._map) < 4 or self._map[:4].tobytes() != GGUF_MAGIC:
            raise NotGGUFError(f"{self.path}: not a GGUF file (no 'GGUF' magic at byte 0)")
        cur.pos = 4
        self.version = cur.scalar("<u4", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"{self.path}: GGUF version {self.version} is not supported "
                f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        n_tensors = cur.scalar("<u8", "tensor count")
        n_kv = cur.scalar("<u8", "metadata count")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar("<u4", f"type of {key!r}")
            self.metadata[key] = cur.value(vtype, f"value of {key!r}")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("<u4", f"dimension count of {name!r}")
            dims = [cur.scalar("<u8", f"dimension of {name!r}") for _ in range(n_dims)]
            qtype_id = cur.scalar("<u4", f"type of {name!r}")
            offset = cur.scalar("<u8", f"data offset of {name!r}")
            infos.append((name, tuple(reversed(dims)), qtype_id, offset))

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise MetadataError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, QuantizedTensor] = {}
        for name, shape, qtype_id, offset in infos:
            try:
                fmt = block_format(qtype_id)
            except ValueError as e:
                raise UnsupportedTensorTypeError(f"{self.path}: tensor {name!r}: {e}") from None
            try:
                nbytes = fmt.nbytes(shape)
            except ValueError as e:
                raise TensorShapeError(f"{self.path}: tensor {name!r} of shape {shape}: {e}") from None
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise TruncatedGGUFError(
                    f"{self.path}: tensor {name!r} needs bytes {start}..{start + nbytes} "
                    f"but the file ends at {len(self._map)}")
            self.tensors[name] = QuantizedTensor(name, fmt.qtype, shape,
                                                 self._map[start:start + nbytes])
        self.config = _config_from(self)  # checks every shape before a copy reads gigabytes
        if load == "copy":
            copied = read_into_huge_pages(self.path, data_start, len(self._map) - data_start)
            at = lambda t: t.data.ctypes.data - self._map.ctypes.data - data_start  # noqa: E731
            self.tensors = {name: replace(t, data=copied[at(t):at(t) + t.data.nbytes])
                            for name, t in self.tensors.items()}

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensors)} tensors, {self.config})"


def load_gguf(path: str | os.PathLike, load: str = DEFAULT_LOAD) -> GGUFFile:
    """Open a GGUF file: parse its header, check every tensor's type, size and shape, read its
    data into huge-page memory (load="copy") or map it (load="mmap")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    return GGUFFile(path, load)


def _config_from(f: GGUFFile) -> Config:
    md, path = f.metadata, f.path
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if md.get(f"{arch}.expert_count", 0):
        raise UnsupportedArchitectureError(
            f"{path}: mixture-of-experts {arch} models are not supported")

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise MetadataError(f"{path}: required metadata key '{arch}.{key}' is missing")
        if isinstance(value, (str, list, np.ndarray)) or value < 0:
            raise MetadataError(f"{path}: metadata '{arch}.{key}' = {value!r} is not a valid {kind.__name__}")
        return kind(value)

    if "token_embd.weight" not in f.tensors:
        raise MissingTensorError(f"{path}: missing tensor 'token_embd.weight'")
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    if n_heads == 0 or dim % n_heads:
        raise MetadataError(f"{path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise MetadataError(f"{path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    head_dim = get("attention.key_length", dim // n_heads)
    tokens = md.get("tokenizer.ggml.tokens")
    vocab_size = get("vocab_size", len(tokens) if tokens is not None
                     else f.tensors["token_embd.weight"].shape[0])
    config = Config(
        architecture=arch,
        n_layers=get("block_count"),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=get("feed_forward_length"),
        vocab_size=vocab_size,
        context_length=get("context_length"),
        rope_theta=get("rope.freq_base", 10000.0, float),
        rope_dim=get("rope.dimension_count", head_dim),
        norm_eps=get("attention.layer_norm_rms_epsilon", kind=float),
        sliding_window=get("attention.sliding_window", 0) or None,
        tied_embeddings="output.weight" not in f.tensors,
        qk_norm=arch in QK_NORM,
        rope_halves=arch in ROPE_HALVES,
        # (a corrupt block_count past the tensor count fails in _check_shapes)
        no_rope_layers=no_rope_layers(min(get("block_count"), len(f.tensors)), NO_ROPE_INTERVAL.get(arch, 0)),
    )
    if config.rope_halves and config.rope_dim != head_dim:
        raise MetadataError(f"{path}: {arch} rotates all {head_dim} dimensions of a head, not "
                            f"rope.dimension_count {config.rope_dim}")
    if not 0 < config.rope_dim <= head_dim or config.rope_dim % 2:
        raise MetadataError(f"{path}: rope.dimension_count {config.rope_dim} must be even and in "
                            f"1..head_dim ({head_dim})")
    if not config.rope_theta > 0 or not config.norm_eps > 0:
        raise MetadataError(f"{path}: rope.freq_base {config.rope_theta} and layer_norm_rms_epsilon "
                            f"{config.norm_eps} must be positive")
    _check_shapes(f, config)
    return config


def no_rope_layers(n_layers: int, interval: int) -> tuple[int, ...]:
    """The layers without RoPE when every `interval`-th has none (0: all have RoPE)."""
    return tuple(i for i in range(n_layers) if interval and (i + 1) % interval == 0)


def expected_shapes(c: Config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> logical NumPy shape for a llama-family model with config `c`."""
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"token_embd.weight": (c.vocab_size, c.dim), "output_norm.weight": (c.dim,)}
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (c.dim,),
            f"blk.{i}.attn_q.weight": (q_dim, c.dim),
            f"blk.{i}.attn_k.weight": (kv_dim, c.dim),
            f"blk.{i}.attn_v.weight": (kv_dim, c.dim),
            f"blk.{i}.attn_output.weight": (c.dim, q_dim),
            f"blk.{i}.ffn_norm.weight": (c.dim,),
            f"blk.{i}.ffn_gate.weight": (c.ffn_dim, c.dim),
            f"blk.{i}.ffn_up.weight": (c.ffn_dim, c.dim),
            f"blk.{i}.ffn_down.weight": (c.dim, c.ffn_dim),
        })
        if c.qk_norm:
            shapes.update({f"blk.{i}.attn_q_norm.weight": (c.head_dim,),
                           f"blk.{i}.attn_k_norm.weight": (c.head_dim,)})
    return shapes


def _check_shapes(f: GGUFFile, c: Config) -> None:
    # A corrupt block_count must not make names for billions of layers: past len(tensors) // 9 + 1
    # layers some tensor is necessarily missing, and the loop below names it.
    c = replace(c, n_layers=min(c.n_layers, len(f.tensors) // 9 + 1))
    for name, shape in expected_shapes(c).items():
        tensor = f.tensors.get(name)
        if tensor is None:
            raise MissingTensorError(f"{f.path}: missing tensor {name!r}")
        if tensor.shape != shape:
            raise TensorShapeError(
                f"{f.path}: tensor {name!r} has shape {tensor.shape}, the config needs {shape}")
