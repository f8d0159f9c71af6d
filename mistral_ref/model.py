"""The Mistral transformer: RMSNorm, RoPE, grouped-query attention with an optional sliding window,
a rotating KV cache, and a SwiGLU feed-forward, over weights that stay quantized in the file's map.

Shapes: T tokens in a chunk, H query heads, KV key/value heads, D head dimension. The forward pass
is written once, for a chunk of T tokens at positions start..start+T-1: a prompt is a few chunks,
a decode step is a chunk of one.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QType

import mistral_ref_kernels as kernels
from mistral_ref.errors import ContextLengthError, InputError, UnsupportedTensorTypeError
from mistral_ref.checkpoint import Checkpoint, load_checkpoint, pairs_from_halves
from mistral_ref.gguf import DEFAULT_LOAD, Config, GGUFFile, load_gguf
from mistral_ref.isq import in_situ_quantize

PREFILL_CHUNK = 256  # tokens per prefill step: bounds activations and attention scratch


class KVCache:
    """Keys and values of past positions, float32 (n_layers, KV, slots, D), preallocated.

    Position p lives in slot p % slots. With a sliding window of W, slots = W (or fewer when
    max_tokens is smaller), so memory stays bounded and generation can run past the window:
    a query only ever looks back W - 1 positions, and those are still in the ring.
    """

    def __init__(self, config: Config, max_tokens: int, device=None):
        if not 0 < max_tokens <= config.context_length:
            raise ContextLengthError(
                f"a cache of {max_tokens} tokens does not fit the model's context of "
                f"{config.context_length} tokens")
        self.max_tokens = max_tokens
        self.window = config.sliding_window or 0
        self.slots = min(max_tokens, self.window) if self.window else max_tokens
        shape = (config.n_layers, config.n_kv_heads, self.slots, config.head_dim)
        self.device = device or kernels.device("cpu")
        self.k, self.v = self.device.zeros(shape), self.device.zeros(shape)  # on the model's device
        self.length = 0  # positions written so far: the next token goes to position `length`

    def fork(self) -> KVCache:
        """An independent copy, on the same device (a choice continuing from a shared prompt)."""
        forked = copy.copy(self)
        forked.k, forked.v = self.device.copy(self.k), self.device.copy(self.v)
        return forked


class Weight(NamedTuple):
    """A weight matrix as the kernels take it: its rows in the file's block format."""

    rows: np.ndarray  # uint8 (n_rows, row_bytes): on the CPU a read-only view of the file's map
    qtype: QType


@dataclass(frozen=True)
class Layer:
    """One transformer block's weights; the matrices as the device prepared them (`Device.prepare`),
    those that share an input together."""
    attn_norm: np.ndarray  # float32 (dim,)
    qkv: Any               # wq (H * D, dim), wk (KV * D, dim), wv (KV * D, dim)
    wo: Any                # (dim, H * D)
    ffn_norm: np.ndarray   # float32 (dim,)
    gate_up: Any           # w_gate, w_up (ffn_dim, dim)
    down: Any              # (dim, ffn_dim)
    q_norm: Any = None     # float32 (D,): Qwen3's per-head norms of q and k, else None
    k_norm: Any = None
    rope: bool = True      # False: SmolLM3's layers without positions


class Model:
    """A llama-family model (llama, mistral, qwen3, smollm3) read from a GGUF file or a Hugging
    Face checkpoint."""

    def __init__(self, source: GGUFFile | Checkpoint, device: str = "cpu", activations: str = "f32"):
        """source: a loaded GGUF file or HF checkpoint (the same interface: `.config`, `.tensors`
        by GGUF name, `.metadata`, `.path`); activations: "f32" (exact float32 arithmetic) or "q8"
        (activations quantized to 8 bits before each quantized matmul, as llama.cpp and
        mistral.rs do); see kernels.ACTIVATIONS."""
        self.file, self.config, self.activations = source, source.config, activations
        self.device = kernels.device(device, activations)  # the forward's operations
        t, c, dev = source.tensors, source.config, self.device
        backend = getattr(dev, "backend", "cpu")  # a host device's; the cuda device's host side
        # The kernels rotate adjacent pairs: q/k stored for rotating halves (c.rope_halves) are
        # reordered once here, the rows of q and k and the entries of their norms alike.
        def order(name: str, n: int):
            heads = {"attn_q": c.n_heads, "attn_k": c.n_kv_heads, "attn_q_norm": 1, "attn_k_norm": 1}
            kind = name.split(".")[-2]
            return pairs_from_halves(np.arange(n), heads[kind]) if c.rope_halves and kind in heads else slice(None)

        vector = lambda name: dev.upload(kernels.dequantize(t[name].data, t[name].qtype, t[name].shape,
                                                            backend)[order(name, t[name].shape[0])])
        rows = lambda name: self._check_type(t[name], name).rows[order(name, t[name].shape[0])]
        matrix = lambda name: Weight(dev.upload(rows(name)), t[name].qtype)
        matrices = lambda i, *names: dev.prepare([matrix(f"blk.{i}.{name}.weight") for name in names])
        norm = lambda i, name: vector(f"blk.{i}.{name}.weight") if c.qk_norm else None
        self.layers = [Layer(vector(f"blk.{i}.attn_norm.weight"), matrices(i, "attn_q", "attn_k", "attn_v"),
                             matrices(i, "attn_output"), vector(f"blk.{i}.ffn_norm.weight"),
                             matrices(i, "ffn_gate", "ffn_up"), matrices(i, "ffn_down"),
                             norm(i, "attn_q_norm"), norm(i, "attn_k_norm"), i not in c.no_rope_layers)
                       for i in range(c.n_layers)]
        self.embedding = matrix("token_embd.weight")
        self.output_norm = vector("output_norm.weight")
        self.output = dev.prepare([self.embedding if c.tied_embeddings else matrix("output.weight")])
        # RoPE frequency of pair i: theta^(-2i / rope_dim), in float64 (see kernels.cpu.ops.rope).
        self.inv_freq = dev.upload(c.rope_theta ** (-np.arange(0, c.rope_dim, 2, dtype=np.float64) / c.rope_dim))

    def _check_type(self, tensor, name: str):
        """The tensor, when the device can multiply its format."""
        if tensor.qtype not in self.device.weight_types:
            raise UnsupportedTensorTypeError(
                f"{self.file.path}: tensor {name!r} is {tensor.qtype.name}, which the "
                f"{self.device.name} device does not read (it reads "
                f"{', '.join(t.name for t in self.device.weight_types)})")
        return tensor

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, device: str = "cpu", activations: str = "f32",
                  load: str = DEFAULT_LOAD, isq: str | Callable[[str], str | None] | None = None,
                                      importance: Mapping[str, np.ndarray] | None = None) -> Model:
        """Load a model; the weights stay quantized (or with `isq`, an ISQ type such as "Q4K", its
        linear weights are requantized while loading: mistral_ref.isq).

        device: "cpu", "cuda" or "reference" (the NumPy kernels that read like the spec: slow,
        for checking); activations: "f32" (exact) or "q8" (llama.cpp's numerics; not on cuda);
        load: "copy" (read into anonymous memory on huge pages first, as llama.cpp's --no-mmap:
        decode reads them faster) or "mmap" (the CPU reads the weights in the file's memory map:
        instant, shared with the page cache); see mistral_ref.gguf.DEFAULT_LOAD; importance:
        an importance matrix ISQ weighs its Q4K / Q5K errors by (mistral_ref.imatrix)."""
        source = load_gguf(path, load)
        return cls(in_situ_quantize(source, isq, importance=importance) if isq else source, device, activations)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", activations: str = "f32",
                        isq: str | Callable[[str], str | None] | None = None,
                        importance: Mapping[str, np.ndarray] | None = None) -> Model:
        """Load a Hugging Face checkpoint directory (mistral_ref.checkpoint): weights in F32, F16
        or BF16 stay views of the mapped safetensors files, or with `isq` (an ISQ type such as
        "Q4K") the linear weights are quantized while loading (mistral_ref.isq)."""
        source = load_checkpoint(path)
        return cls(in_situ_quantize(source, isq, importance=importance) if isq else source, device, activations)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", activations: str = "f32",
             isq: str | Callable[[str], str | None] | None = None,
             importance: Mapping[str, np.ndarray] | None = None) -> Model:
        """`from_checkpoint` for a directory, `from_gguf` for a file."""
        source = load_model_file(path)
        return cls(in_situ_quantize(source, isq, importance=importance) if isq else source, device, activations)

    def take_weights(self, other: Model) -> None:
        """Use `other`'s weights from now on (the same config, requantized: online calibration);
        caches stay valid, computed with the old weights."""
        if other.config != self.config or other.device.name != self.device.name:
            raise InputError("take_weights needs a model of the same config on the same device")
        self.file, self.layers, self.embedding = other.file, other.layers, other.embedding
        self.output_norm, self.output = other.output_norm, other.output

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        """An empty KV cache for up to `max_tokens` positions (default: the model's context)."""
        return KVCache(self.config, max_tokens or self.config.context_length, self.device)

    def forward(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run `token_ids` at the cache's next positions; returns the last position's logits,
        float32 (vocab,)."""
        return self._run(token_ids, cache, all_logits=False)[-1]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of `token_ids` from a fresh cache: float32 (n_tokens, vocab)."""
        return self._run(token_ids, self.new_cache(max(1, len(token_ids))), all_logits=True)

    def hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        """The final-normed hidden states at every position of `token_ids` from a fresh cache,
        the output matrix's input: float32 (n_tokens, dim) on the host. One chunk: the tokens
        must fit the context."""
        cache = self.new_cache(max(1, len(token_ids)))
        return self.device.to_host(self._hidden([(self._check_tokens(token_ids, cache), cache)]))

    def forward_batch(self, batch: Sequence[tuple[Sequence[int], KVCache]],
                      interrupt: Callable[[int], bool] | None = None) -> list[np.ndarray] | None:
        """Several sequences in one pass through the weights (continuous batching): each
        (token_ids, cache) runs at its cache's next positions, as `forward(token_ids, cache)`
        would, with its own positions, window and attention. Returns each one's last-position
        logits, float32 (vocab,).

        interrupt: asked with each layer's index before it runs; True stops the pass, which then
        returns None and advances no cache (the layers that ran have written keys and values
        where the same pass run again writes them again).

        A sequence's logits do not depend on what it is batched with: with q8 activations they
        equal forward's bit for bit (each matmul column is computed alone, attention per
        sequence); with f32 to float32 rounding (BLAS blocks a matrix by its column count)."""
        checked = [(self._check_tokens(ids, cache), cache) for ids, cache in batch]
        if not checked:
            raise InputError("an empty batch")
        if len({id(cache) for _, cache in checked}) != len(checked):
            raise InputError("a KV cache appears twice in one batch")
        hidden = self._hidden(checked, interrupt)
        if hidden is None:
            return None
        ends = np.cumsum([len(tokens) for tokens, _ in checked])
        last = self.device.concat([hidden[end - 1:end] for end in ends])
        return list(self.device.to_host(self._linear(self.output, last)))

    def _run(self, token_ids: Sequence[int], cache: KVCache, all_logits: bool) -> np.ndarray:
        tokens = self._check_tokens(token_ids, cache)
        outputs = []
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start:start + PREFILL_CHUNK]
            last = start + len(chunk) == len(tokens)
            hidden = self._hidden([(chunk, cache)])
            if all_logits or last:
                hidden = hidden if all_logits else hidden[-1:]
                outputs.append(self.device.to_host(self._linear(self.output, hidden)))
        return np.concatenate(outputs)

    def _hidden(self, batch: Sequence[tuple[np.ndarray, KVCache]], interrupt: Callable[[int], bool] | None = None):
        """The transformer on each (tokens, cache) at positions cache.length.., the tokens of all
        side by side as the rows of one (T, dim) activation; returns the final-normed hidden
        states (T, dim) and advances the caches (None, advancing none, if interrupted)."""
        c, dev = self.config, self.device
        tokens = np.concatenate([t for t, _ in batch])
        positions = np.concatenate([np.arange(cache.length, cache.length + len(t), dtype=np.int64)
                                    for t, cache in batch])
        bounds = np.cumsum([0] + [len(t) for t, _ in batch])
        n_tokens = len(tokens)
        # The leading one-token sequences (decode steps: the scheduler puts them first) attend in
        # one call per layer; prompt chunks one at a time.
        n_decode = next((i for i, (t, _) in enumerate(batch) if len(t) != 1), len(batch))
        decoding = batch[:n_decode]
        if decoding:
            k_caches = dev.cache_list([cache.k for _, cache in decoding])
            v_caches = dev.cache_list([cache.v for _, cache in decoding])
            starts = np.array([cache.length for _, cache in decoding], dtype=np.int64)
        rotations = dev.rope_rotations(positions, self.inv_freq)
        x = dev.embed(self.embedding.rows, self.embedding.qtype, tokens, c.dim)
        for i, layer in enumerate(self.layers):
            if interrupt is not None and interrupt(i):
                return None
            h = dev.rmsnorm(x, layer.attn_norm, c.norm_eps)
            q, k, v = dev.matmuls(layer.qkv, h)
            q = self._position(layer, q.reshape(n_tokens, c.n_heads, c.head_dim), layer.q_norm, rotations)
            k = self._position(layer, k.reshape(n_tokens, c.n_kv_heads, c.head_dim), layer.k_norm, rotations)
            v = v.reshape(n_tokens, c.n_kv_heads, c.head_dim)
            parts = [self._attend(i, q[a:b], k[a:b], v[a:b], cache)
                     for a, b, (_, cache) in zip(bounds[n_decode:], bounds[n_decode + 1:], batch[n_decode:])]
            if decoding:
                parts.insert(0, dev.decode_attention_(q[:n_decode], k[:n_decode], v[:n_decode], k_caches,
                                                      v_caches, i, starts, c.sliding_window or 0))
            attn = dev.concat(parts)
            dev.add_(x, self._linear(layer.wo, attn.reshape(n_tokens, c.n_heads * c.head_dim)))
            h = dev.rmsnorm(x, layer.ffn_norm, c.norm_eps)
            gate_up = dev.swiglu(*dev.matmuls(layer.gate_up, h))
            dev.add_(x, self._linear(layer.down, gate_up))
        for t, cache in batch:
            cache.length += len(t)
        return dev.rmsnorm(x, self.output_norm, c.norm_eps)

    def _position(self, layer: Layer, x, norm, rotations):
        """Queries or keys x (T, heads, D) as attention takes them: normed per head where the
        architecture does (Qwen3), then rotated (`rotations`: the tokens' positions, as
        device.rope_rotations made them) where the layer has RoPE."""
        if norm is not None:
            x = self.device.rmsnorm(x.reshape(-1, x.shape[-1]), norm, self.config.norm_eps).reshape(x.shape)
        return self.device.rope(x, rotations) if layer.rope else x

    def _attend(self, layer: int, q, k, v, cache: KVCache):
        """One sequence's attention in `layer` (q (T, H, D); k, v (T, KV, D), rotated), then its
        keys and values into its cache."""
        out = self.device.attention(q, k, v, cache.k[layer], cache.v[layer], cache.length, cache.window)
        self.device.kv_write_(cache.k[layer], cache.v[layer], cache.length, k, v)
        return out

    def _linear(self, prepared, x):
        return self.device.matmuls(prepared, x)[0]

    def _check_tokens(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise InputError("no tokens to run")
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.size:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if cache.length + tokens.size > cache.max_tokens:
            raise ContextLengthError(
                f"{cache.length} cached + {tokens.size} new tokens exceed the cache's "
                f"{cache.max_tokens} positions (model context: {self.config.context_length})")
        return tokens


def load_model_file(path: str | os.PathLike) -> GGUFFile | Checkpoint:
    """A GGUF file, or a Hugging Face checkpoint when `path` is a directory: what `Model` reads."""
    return load_checkpoint(path) if os.path.isdir(path) else load_gguf(path)


def generate(model: Model, token_ids: Sequence[int], max_new_tokens: int,
             stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Greedy decoding: yields up to `max_new_tokens` new token ids, one forward per token.

    Stops after yielding a token in `stop_ids`. The prompt is run once (prefill); each new token
    then runs alone against the KV cache.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    cache = model.new_cache(min(model.config.context_length, len(token_ids) + max_new_tokens))
    logits = model.forward(token_ids, cache)
    for n in range(max_new_tokens):
        token = int(np.argmax(logits))
        yield token
        if token in stop_ids or n + 1 == max_new_tokens:
            return
        logits = model.forward([token], cache)
