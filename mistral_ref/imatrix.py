"""Importance matrices: how much each input column of each linear weight matters, measured on text.

llama.cpp's imatrix and mistral.rs's `calibration_file` run the model over calibration text and
keep, for every matmul, the mean square of each input column over the tokens it saw. K-quant
quantization then weighs each weight's rounding error by its column's importance
(`kernels.quantize(..., importance=...)`, llama.cpp's quantize_row_q4_K_impl), so the columns that
carry large activations are kept more exactly.

`ImportanceRecorder` is a device that passes every call on to the model's and records each
matmul's input (q, k and v share one input, as do gate and up). `collect_importance` runs a model
over tokens in chunks of CHUNK tokens (mistral.rs's CALIBRATION_CHUNK_SIZE), each chunk from
position 0 with BOS first, as mistral.rs's calibration does; the Runner's online calibration
records live requests instead. Files: mistral.rs's `.cimatrix` (read and written) and llama.cpp's
GGUF `.imatrix` (read).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mistral_ref.checkpoint import hf_name
from mistral_ref.errors import ModelSourceError
from mistral_ref.gguf import Config
from mistral_ref.isq import linear_weights
from mistral_ref.model import Model

CHUNK = 1024  # tokens per calibration forward (mistral.rs: pipeline/isq_flow/drive.rs)


@dataclass(frozen=True)
class CalibrationStatus:
    """mistralrs.CalibrationStatus: whether matmul inputs are being recorded, over how many of the
    model's linear weights, and how many token rows each has seen (total, fewest, most)."""

    collecting: bool
    layers: int
    layers_tracking: int
    total_rows: int
    min_rows: int
    max_rows: int


class ImportanceRecorder:
    """A device that runs every operation on the model's device and adds up the squares of each
    matmul's input columns, under the GGUF names of the weights that matmul multiplies. Install it
    as `model.device`; `device` is the one it passes calls to."""

    def __init__(self, model: Model):
        self.device, self.names = model.device, linear_weights(model.config)
        self._inputs: dict[int, list[str]] = {id(model.output): [] if model.config.tied_embeddings
                                              else ["output.weight"]}
        for i, layer in enumerate(model.layers):
            self._inputs[id(layer.qkv)] = [f"blk.{i}.attn_{t}.weight" for t in "qkv"]
            self._inputs[id(layer.wo)] = [f"blk.{i}.attn_output.weight"]
            self._inputs[id(layer.gate_up)] = [f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"]
            self._inputs[id(layer.down)] = [f"blk.{i}.ffn_down.weight"]
        self.sums: dict[str, np.ndarray] = {}
        self.rows = dict.fromkeys(self.names, 0)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.device, attribute)

    def matmuls(self, prepared: Any, x: Any) -> list[Any]:
        self.record(prepared, x)
        return self.device.matmuls(prepared, x)

    def record(self, prepared: Any, x: Any) -> None:
        """Add the rows of x (T, n), the input of the matmul of `prepared` weights."""
        squares = np.square(self.device.to_host(x), dtype=np.float64).sum(axis=0)
        for name in self._inputs[id(prepared)]:
            self.sums[name] = self.sums.get(name, 0.0) + squares
            self.rows[name] += x.shape[0]

    def importance(self) -> dict[str, np.ndarray]:
        """GGUF weight name -> float32 (n_columns,): mean square input of each column so far."""
        return {name: (total / self.rows[name]).astype(np.float32) for name, total in self.sums.items()}

    def status(self) -> CalibrationStatus:
        rows = list(self.rows.values())
        return CalibrationStatus(True, len(rows), len(rows), sum(rows), min(rows), max(rows))


def collect_importance(model: Model, token_ids: Sequence[int], bos_id: int | None,
                       chunk: int = CHUNK, progress: bool = True) -> dict[str, np.ndarray]:
    """GGUF weight name -> float32 (n_columns,): the mean square of each input column of that
    weight's matmul, over `token_ids` run through `model` in chunks of `chunk` tokens (BOS first
    when `bos_id` is not None; a chunk never longer than the model's context)."""
    chunk = min(chunk, model.config.context_length - (bos_id is not None))
    recorder = ImportanceRecorder(model)
    model.device = recorder
    try:
        for start in tqdm(range(0, len(token_ids), chunk), desc="imatrix", unit="chunk", disable=not progress):
            ids = ([] if bos_id is None else [bos_id]) + list(token_ids[start:start + chunk])
            recorder.record(model.output, model.hidden_states(ids))  # the logits themselves are not needed
    finally:
        model.device = recorder.device
    return recorder.importance()


# -- files --------------------------------------------------------------------------------------
def save_cimatrix(path: str | os.PathLike, importance: dict[str, np.ndarray]) -> None:
    """Write mistral.rs's `.cimatrix` (mistralrs-quant's CollectedImatrixData::save_imatrix):
    u64 count, then per entry u64 key length, the key (the Hugging Face module name), u64 n and n
    float32, all little-endian."""
    if Path(path).suffix != ".cimatrix":
        raise ModelSourceError(f"save_cimatrix: expected a .cimatrix file to save collected imatrix "
                               f"data to, got {str(path)!r}")
    parts = [struct.pack("<Q", len(importance))]
    for name, values in importance.items():
        key = hf_name(name).removesuffix(".weight").encode()
        parts += [struct.pack("<Q", len(key)), key, struct.pack("<Q", len(values)),
                  np.asarray(values, "<f4").tobytes()]
    Path(path).write_bytes(b"".join(parts))


def load_importance(path: str | os.PathLike, config: Config) -> dict[str, np.ndarray]:
    """GGUF weight name -> importance, from mistral.rs's `.cimatrix` or llama.cpp's GGUF
    `.imatrix` (tensors `<name>.in_sum2` and `<name>.counts`). Raises ModelSourceError naming the
    file and the problem."""
    path = Path(path)
    by_key = {hf_name(name).removesuffix(".weight"): name for name in linear_weights(config)}
    try:
        if path.suffix == ".cimatrix":
            raw, out, at = path.read_bytes(), {}, 8
            for _ in range(struct.unpack_from("<Q", raw)[0]):
                (n,) = struct.unpack_from("<Q", raw, at)
                key = raw[at + 8:at + 8 + n].decode()
                (count,) = struct.unpack_from("<Q", raw, at + 8 + n)
                values = np.frombuffer(raw, "<f4", count, at + 16 + n).astype(np.float32)
                at += 16 + n + 4 * count
                if key in by_key:
                    out[by_key[key]] = values
            return out
        from gguf import GGUFReader
        tensors = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in GGUFReader(path).tensors}
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ModelSourceError(f"imatrix {str(path)!r}: not a readable .cimatrix or GGUF imatrix file ({e})") from None
    names = [name for name in linear_weights(config) if f"{name}.in_sum2" in tensors]
    if not names:
        raise ModelSourceError(f"imatrix {str(path)!r}: no '<tensor>.in_sum2' entries for this model's weights")
    return {name: (tensors[f"{name}.in_sum2"] / tensors[f"{name}.counts"][0]).astype(np.float32) for name in names}
