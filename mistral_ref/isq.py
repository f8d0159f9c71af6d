"""In-situ quantization (mistral.rs's ISQ): the linear layers of a model quantized while it loads.

`in_situ_quantize(source, "Q4K")` takes a loaded GGUF file or Hugging Face checkpoint and returns
it with every linear weight (attention q, k, v, o; feed-forward gate, up, down; the output matrix
unless tied to the embedding) requantized by `kernels.quantize`: each tensor's bytes are exactly
what `kernels.quantize` writes for its float32 values, and so what `mistral-ref quantize` writes
for a tensor of that type. Embeddings and norms keep their type, as in mistral.rs.

Names are mistral.rs's (`parse_isq_value`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K, and the
bit counts 4, 5, 6, 8, which mistral.rs resolves on a CPU to Q4K, Q5K, Q6K and Q8_0. A row that
a k-quant's 256-weight blocks do not tile falls back as mistral.rs's `get_fallback` does.
"""
from __future__ import annotations

import copy
from typing import TypeVar

from gguf import GGMLQuantizationType as QType
from tqdm import tqdm

import mistral_ref_kernels as kernels
from mistral_ref.errors import QuantizeError
from mistral_ref.gguf import Config, QuantizedTensor

ISQ_TYPES = {"q4_0": QType.Q4_0, "q4_1": QType.Q4_1, "q5_0": QType.Q5_0, "q5_1": QType.Q5_1,
             "q8_0": QType.Q8_0, "q4k": QType.Q4_K, "q5k": QType.Q5_K, "q6k": QType.Q6_K}
BITS = {"4": "q4k", "5": "q5k", "6": "q6k", "8": "q8_0"}
# mistral.rs's other ISQ types: formats this engine has no quantizer or kernels for
NOT_IMPLEMENTED = ("Q8_1", "Q2K", "Q3K", "Q8K", "HQQ4", "HQQ8", "FP8", "AFQ2", "AFQ3", "AFQ4",
                   "AFQ6", "AFQ8", "F8Q8", "MXFP4")
FALLBACK = {QType.Q4_K: QType.Q4_1, QType.Q5_K: QType.Q5_0, QType.Q6_K: QType.Q5_1}

Source = TypeVar("Source")  # a GGUFFile or a Checkpoint


def isq_type(name: str) -> QType:
    """The tensor type an ISQ name stands for (case-insensitive). Raises QuantizeError."""
    key = str(name).lower()
    key = BITS.get(key, key)
    if key not in ISQ_TYPES:
        known = "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K, 4, 5, 6, 8"
        why = ("mistral.rs has it, this engine has no kernels for it" if key.upper() in NOT_IMPLEMENTED
               else "unknown")
        raise QuantizeError(f"in_situ_quant {name!r}: {why} (supported: {known})")
    return ISQ_TYPES[key]


def linear_weights(config: Config) -> list[str]:
    """The GGUF names of the weights ISQ quantizes, in load order."""
    per_layer = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    names = [f"blk.{i}.{t}.weight" for i in range(config.n_layers) for t in per_layer]
    return names + ([] if config.tied_embeddings else ["output.weight"])


def tensor_type(qtype: QType, n_cols: int) -> QType:
    """`qtype`, or mistral.rs's fallback when its blocks do not tile rows of `n_cols` weights."""
    while n_cols % kernels.block_format(qtype).block_size:
        if qtype not in FALLBACK:
            raise QuantizeError(f"rows of {n_cols} weights fit no {qtype.name} block")
        qtype = FALLBACK[qtype]
    return qtype


def in_situ_quantize(source: Source, name: str, progress: bool = True) -> Source:
    """A shallow copy of `source` (a GGUFFile or Checkpoint) whose linear weights are quantized to
    ISQ type `name`; the others stay views of the file."""
    qtype = isq_type(name)
    out = copy.copy(source)
    out.tensors = dict(source.tensors)
    for key in tqdm(linear_weights(source.config), desc=f"ISQ {name}", unit="tensor", disable=not progress):
        t = source.tensors[key]
        target = tensor_type(qtype, t.shape[-1])
        data = kernels.quantize(kernels.dequantize(t.data, t.qtype, t.shape), target)
        out.tensors[key] = QuantizedTensor(key, target, t.shape, data.reshape(-1))
    return out
