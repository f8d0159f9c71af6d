"""Hugging Face checkpoints: a model directory (config.json, *.safetensors, tokenizer files) read
the way the model reads a GGUF file, and written from a GGUF file.

safetensors (huggingface.co/docs/safetensors): a u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data,
offsets counted from its start. It is read here with NumPy, each tensor a view of the file's
memory map, so neither the `safetensors` package nor torch is needed to run a checkpoint.

Names and layout: HF's `model.layers.{i}.self_attn.q_proj.weight` is GGUF's `blk.{i}.attn_q.weight`
(`hf_name`). HF's RoPE rotates the two halves of each head (rotate_half); llama.cpp's converter
reorders the rows of q_proj and k_proj so that RoPE rotates adjacent pairs, as our kernels do.
`pairs_from_halves` applies that order at load and `halves_from_pairs` undoes it at export: those
two matrices are copies, every other tensor is a view of the mapped file (F32, F16 and BF16 are
GGUF types the kernels read).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QType
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

import mistral_ref_kernels as kernels
from mistral_ref.errors import CheckpointError
from mistral_ref.gguf import (QK_NORM, ROPE_HALVES, Config, GGUFFile, QuantizedTensor, expected_shapes, load_gguf,
                             no_rope_layers)
from mistral_ref.tokenizer import Tokenizer, sentencepiece_gguf_metadata

# safetensors dtype -> the GGUF type of the same bytes
DTYPES = {"F32": QType.F32, "F16": QType.F16, "BF16": QType.BF16}
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# config.json model_type -> the GGUF architecture it runs as
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen3": "qwen3", "smollm3": "smollm3"}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "smollm3": "SmolLM3ForCausalLM"}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit

_LAYER_NAMES = {  # GGUF per-layer tensor -> HF
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """The HF checkpoint name of a llama-family GGUF tensor name ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight")."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return f"{_GLOBAL_NAMES[gguf_name.removesuffix('.weight')]}.weight"


def pairs_from_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of an HF q_proj / k_proj (n_heads * D, n) in llama.cpp's order: per head, row 2i + s
    takes HF row s * D/2 + i, so rotating adjacent pairs equals HF's rotate_half. A new array."""
    return np.ascontiguousarray(w.reshape(n_heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def halves_from_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `pairs_from_halves`. A new array."""
    return np.ascontiguousarray(w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# -- safetensors --------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (dtype, shape, raw bytes) of every tensor in a safetensors file; the bytes are a
    read-only uint8 view of the file's memory map. Raises CheckpointError naming the problem."""
    path = Path(path)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    except ValueError:
        raise CheckpointError(f"{path}: empty file, not a safetensors file") from None
    if len(raw) < 8:
        raise CheckpointError(f"{path}: {len(raw)} bytes, too short for a safetensors file")
    n = int(raw[:8].view("<u8")[0])
    if n > min(len(raw) - 8, MAX_HEADER_BYTES):
        raise CheckpointError(f"{path}: header length {n} runs past the file's {len(raw)} bytes")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    data = raw[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            itemsize = int(re.fullmatch(r"[A-Z]+(\d+)", dtype).group(1)) // 8 if dtype != "BOOL" else 1
            ok = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end))
        except (TypeError, KeyError, ValueError, AttributeError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if not ok or end - begin != math.prod(shape) * itemsize or end > len(data):
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype} {list(shape)}) claims bytes "
                                  f"{begin}..{end} of the {len(data)} data bytes")
        tensors[name] = (dtype, shape, data[begin:end])
    return tensors


def write_safetensors(path: str | os.PathLike, tensors: list[tuple[str, str, tuple[int, ...]]],
                      tensor_bytes, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of (name, dtype, shape) `tensors`, streaming the raw bytes
    `tensor_bytes(name)` returns one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * block_bytes(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the format recommends
    with open(path, "wb") as out:
        out.write(np.uint64(len(text)).tobytes() + text)
        for name, _, _ in tensors:
            out.write(np.ascontiguousarray(tensor_bytes(name)).tobytes())


def block_bytes(dtype: str) -> int:
    return kernels.block_format(DTYPES[dtype]).type_size


# -- loading ------------------------------------------------------------------------------------
class Checkpoint:
    """A Hugging Face model directory, read as `GGUFFile` reads a GGUF file: `.config`, `.tensors`
    (GGUF name -> QuantizedTensor, as llama.cpp's converter would write them: q/k rows reordered
    for pairwise RoPE except in `rope_halves` architectures), `.metadata` (the GGUF keys its tokenizer files give:
    BOS/EOS ids, add_bos, chat template), `.tokenizer_json` (its tokenizer.json, or None when it
    has only a SentencePiece tokenizer.model, which `.metadata` then holds), `.path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        hf = _read_json(self.path / "config.json")
        self.config = config_from_hf(hf, self.path / "config.json")
        files = _weight_files(self.path)
        stored = {}
        for file in files:
            stored.update({name: (file, *t) for name, t in read_safetensors(file).items()})
        self.tensors = {name: self._tensor(name, stored) for name in expected_shapes(self.config)}
        self.metadata, self.tokenizer_json = _tokenizer_files(self.path, hf)
        self.metadata["general.architecture"] = self.config.architecture
        self.metadata["general.name"] = self.path.name

    def _tensor(self, name: str, stored: dict) -> QuantizedTensor:
        c, key = self.config, hf_name(name)
        if key not in stored:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in {', '.join(sorted({str(f.name) for f, *_ in stored.values()}))}")
        file, dtype, shape, data = stored[key]
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} is {dtype} (readable: {', '.join(DTYPES)})")
        if shape != expected_shapes(c)[name]:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(shape)}, config.json "
                                  f"needs {list(expected_shapes(c)[name])}")
        if name.endswith(("attn_q.weight", "attn_k.weight")) and not c.rope_halves:
            heads = c.n_heads if "attn_q" in name else c.n_kv_heads
            data = pairs_from_halves(data.view(np.uint8).reshape(shape[0], -1), heads).reshape(-1)
        return QuantizedTensor(name, DTYPES[dtype], shape, data)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.config})"


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a Hugging Face llama/mistral checkpoint directory: config.json, model.safetensors (or
    shards listed by model.safetensors.index.json), tokenizer.json or tokenizer.model, and
    tokenizer_config.json. Raises CheckpointError naming the file and the problem."""
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    return Checkpoint(path)


def config_from_hf(hf: dict[str, Any], where: Path) -> Config:
    """The model Config of a HF config.json (LlamaConfig / MistralConfig / Qwen3Config /
    SmolLM3Config fields)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported (supported: "
                              f"{', '.join(MODEL_TYPES)})")
    for key, allowed in (("hidden_act", ("silu", None)), ("attention_bias", (False, None)),
                         ("mlp_bias", (False, None))):
        if hf.get(key) not in allowed:
            raise CheckpointError(f"{where}: {key} = {hf[key]!r} is not supported (the model runs "
                                  f"{allowed[0]!r})")
    rope = hf.get("rope_parameters") or {}  # transformers 5 moved rope_theta here
    scaling = hf.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise CheckpointError(f"{where}: RoPE scaling {scaling!r} is not supported")

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        value = hf.get(key, default) if hf.get(key) is not None else default
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise CheckpointError(f"{where}: {key} = {value!r} is missing or not a valid {kind.__name__}")
        return kind(value)

    dim, n_heads = get("hidden_size"), get("num_attention_heads")
    if n_heads == 0 or dim % n_heads:
        raise CheckpointError(f"{where}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}")
    n_kv_heads = get("num_key_value_heads", n_heads)
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {n_kv_heads}")
    head_dim = get("head_dim", dim // n_heads)
    if head_dim % 2:
        raise CheckpointError(f"{where}: head_dim {head_dim} is odd")
    arch, n_layers = MODEL_TYPES[model_type], get("num_hidden_layers")
    if hf.get("use_sliding_window") and model_type == "qwen3":
        raise CheckpointError(f"{where}: use_sliding_window (a window on some Qwen3 layers only) is "
                              "not supported")
    window = 0 if hf.get("use_sliding_window") is False else get("sliding_window", 0)
    no_rope = no_rope_layers(n_layers, get("no_rope_layer_interval", 4) if model_type == "smollm3" else 0)
    if model_type == "smollm3" and hf.get("no_rope_layers") is not None:
        flags = hf["no_rope_layers"]  # 1: the layer applies RoPE
        if not isinstance(flags, list) or len(flags) != n_layers or set(flags) - {0, 1}:
            raise CheckpointError(f"{where}: no_rope_layers must list 0 or 1 for each of the "
                                  f"{n_layers} layers, got {flags!r}")
        no_rope = tuple(i for i, rotates in enumerate(flags) if not rotates)
    return Config(architecture=arch, n_layers=n_layers, dim=dim,
                  n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                  ffn_dim=get("intermediate_size"), vocab_size=get("vocab_size"),
                  context_length=get("max_position_embeddings"),
                  rope_theta=get("rope_theta", rope.get("rope_theta", 10000.0), float), rope_dim=head_dim,
                  norm_eps=get("rms_norm_eps", 1e-6, float),
                  sliding_window=window or None,
                  tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  qk_norm=arch in QK_NORM, rope_halves=arch in ROPE_HALVES, no_rope_layers=no_rope)


def _read_json(path: Path, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent}: no {path.name}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weight_files(path: Path) -> list[Path]:
    index = _read_json(path / "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / 'model.safetensors.index.json'}: no weight_map object")
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (.bin and .pt files are not read)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: the index lists {', '.join(missing)}, which is missing")
    return files


def _tokenizer_files(path: Path, hf: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """GGUF tokenizer metadata from tokenizer_config.json (and tokenizer.model when there is no
    tokenizer.json), and the tokenizer.json path."""
    tc = _read_json(path / "tokenizer_config.json", required=False) or {}
    md: dict[str, Any] = {}
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            backend = HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise CheckpointError(f"{tokenizer_json}: not a usable tokenizer.json ({e})") from None
        token_id = backend.token_to_id
        post = json.loads(backend.to_str()).get("post_processor")
    elif (path / "tokenizer.model").is_file():
        md.update(sentencepiece_gguf_metadata(path / "tokenizer.model"))
        tokenizer_json, post = None, None
        vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
        token_id = vocab.get
    else:
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model")
    for key in ("bos", "eos"):
        token = _token(tc, key)
        found = token_id(token) if isinstance(token, str) else hf.get(f"{key}_token_id")
        if isinstance(found, int):
            md[f"tokenizer.ggml.{key}_token_id"] = found
    add_bos = tc.get("add_bos_token")
    if add_bos is None:  # newer checkpoints add BOS in the tokenizer.json's post-processor
        add_bos = md.get("tokenizer.ggml.add_bos_token") or _template_adds(post, _token(tc, "bos"))
    md["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    md["tokenizer.ggml.add_eos_token"] = bool(tc.get("add_eos_token", False))
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        md["tokenizer.chat_template"] = template
    return md, tokenizer_json


def _token(tc: dict[str, Any], key: str) -> str | None:
    token = tc.get(f"{key}_token")
    return token.get("content") if isinstance(token, dict) else token


def _template_adds(post: Any, token: str | None) -> bool:
    """Whether a tokenizer.json post-processor starts every single text with `token`."""
    if not isinstance(post, dict) or token is None:
        return False
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or [{}]
        return single[0].get("SpecialToken", {}).get("id") == token
    return any(_template_adds(p, token) for p in post.get("processors") or [])


# -- writing ------------------------------------------------------------------------------------
def save_checkpoint(src: str | os.PathLike | GGUFFile, dst: str | os.PathLike, dtype: str = "F32",
                    shard_bytes: int | None = None, progress: bool = True) -> Path:
    """Write GGUF model `src` as a Hugging Face checkpoint directory `dst`: config.json, the
    weights dequantized to `dtype` ("F32", "F16" or "BF16") in model.safetensors (or shards of
    about `shard_bytes` with model.safetensors.index.json), tokenizer.json and
    tokenizer_config.json (with the chat template). Returns `dst`."""
    f = src if isinstance(src, GGUFFile) else load_gguf(src)
    c, dst = f.config, Path(dst)
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if c.rope_dim != c.head_dim:
        raise CheckpointError(f"{f.path}: RoPE on {c.rope_dim} of {c.head_dim} dimensions has no "
                              "llama/mistral config.json spelling")
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_metadata(f.metadata)
    (dst / "config.json").write_text(json.dumps(hf_config(c, tokenizer, dtype), indent=2))
    (dst / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    text = lambda i: None if i is None else tokenizer.tokens[i]  # noqa: E731
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": text(tokenizer.bos_id), "eos_token": text(tokenizer.eos_id),
        "add_bos_token": tokenizer.add_bos, "add_eos_token": tokenizer.add_eos,
        "chat_template": tokenizer.chat_template, "model_max_length": c.context_length,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, ensure_ascii=False), encoding="utf-8")

    names = [n for n in expected_shapes(c) if n in f.tensors]
    shards, size = [[]], 0
    for name in names:
        nbytes = math.prod(f.tensors[name].shape) * block_bytes(dtype)
        if shard_bytes and shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = tqdm(total=len(names), desc=f"export {dtype}", unit="tensor", disable=not progress)

    def tensor_bytes(key: str) -> np.ndarray:
        name = by_hf[key]
        t = f.tensors[name]
        w = kernels.dequantize(t.data, t.qtype, t.shape)
        if name.endswith(("attn_q.weight", "attn_k.weight")) and not c.rope_halves:
            w = halves_from_pairs(w, c.n_heads if "attn_q" in name else c.n_kv_heads)
        bar.update()
        return _cast(w, dtype)

    by_hf = {hf_name(n): n for n in names}
    for file, shard in zip(files, shards):
        write_safetensors(dst / file, [(hf_name(n), dtype, f.tensors[n].shape) for n in shard],
                          tensor_bytes, {"format": "pt"})
    bar.close()
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({
            "metadata": {}, "weight_map": {hf_name(n): file for file, shard in zip(files, shards) for n in shard}},
            indent=2))
    return dst


def hf_config(c: Config, tokenizer: Tokenizer, dtype: str = "F32") -> dict[str, Any]:
    """The config.json of `c`'s architecture (a llama model with a sliding window as mistral)."""
    model_type = "mistral" if c.architecture == "llama" and c.sliding_window else c.architecture
    extra = {"qwen3": {"use_sliding_window": False},
             "smollm3": {"no_rope_layers": [int(i not in c.no_rope_layers) for i in range(c.n_layers)]}}
    return {
        "architectures": [HF_CLASSES[model_type]], "model_type": model_type, **extra.get(model_type, {}),
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps, "sliding_window": c.sliding_window,
        "tie_word_embeddings": c.tied_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "torch_dtype": TORCH_DTYPES[dtype],
    }


def _cast(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 weights as `dtype`'s raw values; BF16 rounds to nearest, ties to even."""
    if dtype == "BF16":
        bits = w.astype(np.float32).view(np.uint32)
        return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return w.astype(np.float32 if dtype == "F32" else np.float16)
