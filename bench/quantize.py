"""Quantizer throughput: MB/s of float32 input, NumPy reference vs Numba, per tensor type; with
llama-cpp-python installed, llama.cpp's own C reference quantizer (one thread) for comparison
and a byte-identity check against it.

    .venv/bin/python bench/quantize.py [--rows 256] [--cols 4096] [--repeat 3]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as QType

import mistral_ref_kernels as kernels
from mistral_ref_kernels.formats import block_format

TYPES = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K]


def llama_cpp_quantizer():
    """ggml_quantize_chunk from llama-cpp-python's libggml-base, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.*"))
    fn = ctypes.CDLL(libs[0]).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def quantize(x, qtype):
        out = np.empty(block_format(qtype).nbytes(x.shape), np.uint8)
        fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out.reshape(x.shape[0], -1)
    return quantize


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    oracle = llama_cpp_quantizer()
    print(f"{args.rows} x {args.cols} float32 ({mb:.1f} MB), best of {args.repeat}; "
          f"Numba threads: {numba.get_num_threads()}")
    print(f"{'type':6s} {'numpy MB/s':>11s} {'numba MB/s':>11s} {'llama.cpp MB/s':>15s}  bytes equal llama.cpp")
    for qtype in TYPES:
        kernels.quantize(x[:1], qtype)  # compile
        ref = best_seconds(lambda: kernels.quantize(x, qtype, "reference"), 1)
        cpu = best_seconds(lambda: kernels.quantize(x, qtype, "cpu"), args.repeat)
        if oracle is None:
            c_col, same = "-", "-"
        else:
            c_col = f"{mb / best_seconds(lambda: oracle(x, qtype), args.repeat):.0f}"
            same = str(np.array_equal(oracle(x, qtype), kernels.quantize(x, qtype)))
        print(f"{qtype.name:6s} {mb / ref:11.1f} {mb / cpu:11.1f} {c_col:>15s}  {same}")


if __name__ == "__main__":
    main()
