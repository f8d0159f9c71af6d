"""In-situ quantization (mistral.rs's ISQ): the linear layers of a model quantized while it loads.

`in_situ_quantize(source, "Q4K")` takes a loaded GGUF file or Hugging Face checkpoint and returns
it with every linear weight (attention q, k, v, o; feed-forward gate, up, down; the output matrix
unless tied to the embedding) requantized by `kernels.quantize`: each tensor's bytes are exactly
what `kernels.quantize` writes for its float32 values, and so what `mistral-ref quantize` writes
for a tensor of that type. Embeddings and norms keep their type, as in mistral.rs.

Names are mistral.rs's (`parse_isq_value`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3K, Q4K, Q5K, Q6K, and
the bit counts 3, 4, 5, 6, 8, which mistral.rs resolves on a CPU to Q3K, Q4K, Q5K, Q6K and Q8_0. A row that
a k-quant's 256-weight blocks do not tile falls back as mistral.rs's `get_fallback` does.

`in_situ_quantize(source, choose)` takes, instead of one name, a function from each linear
weight's GGUF name to its ISQ name (None: keep it as stored): a topology file's per-layer types
(mistral_ref.topology).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Callable, TypeVar

import numpy as np
from gguf import GGMLQuantizationType as QType
from tqdm import tqdm

import mistral_ref_kernels as kernels
from mistral_ref.errors import QuantizeError
from mistral_ref.gguf import Config, QuantizedTensor

ISQ_TYPES = {"q4_0": QType.Q4_0, "q4_1": QType.Q4_1, "q5_0": QType.Q5_0, "q5_1": QType.Q5_1,
             "q8_0": QType.Q8_0, "q3k": QType.Q3_K, "q4k": QType.Q4_K, "q5k": QType.Q5_K, "q6k": QType.Q6_K}
BITS = {"3": "q3k", "4": "q4k", "5": "q5k", "6": "q6k", "8": "q8_0"}
# mistral.rs's other ISQ types: formats this engine has no quantizer or kernels for
NOT_IMPLEMENTED = ("Q8_1", "Q2K", "Q8K", "HQQ4", "HQQ8", "FP8", "AFQ2", "AFQ3", "AFQ4",
                   "AFQ6", "AFQ8", "F8Q8", "MXFP4")
LEGACY = (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0)  # quantized without importance
FALLBACK = {QType.Q3_K: QType.Q4_0, QType.Q4_K: QType.Q4_1, QType.Q5_K: QType.Q5_0, QType.Q6_K: QType.Q5_1}

Source = TypeVar("Source")  # a GGUFFile or a Checkpoint


def isq_type(name: str, what: str = "in_situ_quant") -> QType:
    """The tensor type an ISQ name stands for (case-insensitive). Raises QuantizeError, its message
    starting with `what` (the setting that named it)."""
    key = str(name).lower()
    key = BITS.get(key, key)
    if key not in ISQ_TYPES:
        known = "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3K, Q4K, Q5K, Q6K, 3, 4, 5, 6, 8"
        why = ("mistral.rs has it, this engine has no kernels for it" if key.upper() in NOT_IMPLEMENTED
               else "unknown")
        raise QuantizeError(f"{what} {name!r}: {why} (supported: {known})")
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


def in_situ_quantize(source: Source, isq: str | Callable[[str], str | None], progress: bool = True,
                     importance: Mapping[str, np.ndarray] | None = None) -> Source:
    """A shallow copy of `source` (a GGUFFile or Checkpoint) whose linear weights are quantized to
    ISQ type `isq`, or to `isq(gguf_name)` when `isq` is a function (None: that weight keeps its
    stored type, as the others do: views of the file).

    importance: GGUF name -> float32 (n_columns,), an importance matrix (mistral_ref.imatrix) that
    Q4K and Q5K weights are quantized with; the legacy types a row falls back to take none, as in
    mistral.rs. Q3K and Q6K have no importance-weighted quantizer here: a QuantizeError."""
    if callable(isq):
        choose, desc = isq, "ISQ (topology)"
    else:
        isq_type(isq)  # an unknown name fails before any work
        choose, desc = (lambda _: isq), f"ISQ {isq}"
    out = copy.copy(source)
    out.tensors = dict(source.tensors)
    for key in tqdm(linear_weights(source.config), desc=desc, unit="tensor", disable=not progress):
        name = choose(key)
        if name is None:
            continue
        t = source.tensors[key]
        target = tensor_type(isq_type(name), t.shape[-1])
        weighted = importance.get(key) if importance is not None else None
        if weighted is not None and target not in kernels.IMPORTANCE_WEIGHTED:
            if target in LEGACY:
                weighted = None
            else:
                raise QuantizeError(f"{key}: quantizing to {target.name} with an importance matrix is not "
                                    "supported (Q4K and Q5K are)")
        data = kernels.quantize(kernels.dequantize(t.data, t.qtype, t.shape), target, importance=weighted)
        out.tensors[key] = QuantizedTensor(key, target, t.shape, data.reshape(-1))
    return out
