"""Dequantization throughput: GB/s of quantized input per format, NumPy reference vs Numba CPU
vs gguf-py, on random valid blocks. Numba CPU is timed twice: returning a new array (what
gguf-py does; the operating system zeroes its pages on first touch, which costs about as much as
the dequantization) and writing into a reused one (`out=`).
Usage: python bench/dequant.py [--mb 64] [--repeat 5] [--formats Q4_K Q6_K]"""
from __future__ import annotations

import argparse
import os
import time

import gguf
import numba
import numpy as np

import mistral_ref_kernels as kernels
from gguf import GGMLQuantizationType as QType
from mistral_ref_kernels.formats import FORMATS


def random_blocks(qtype, nbytes: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """Random bytes with every fp16 field a small finite value, as (rows, row_bytes) + shape."""
    fmt = FORMATS[qtype]
    row_blocks = max(1, 4096 // fmt.block_size)  # rows as long as Mistral-7B's width
    n_rows = max(1, nbytes // (row_blocks * fmt.type_size))
    raw = rng.integers(0, 256, n_rows * row_blocks * fmt.type_size, dtype=np.uint8)
    blocks = raw.view(fmt.block)
    for name in fmt.block.names:
        if fmt.block[name] in (np.dtype("<f2"), np.dtype("<f4")):
            blocks[name] = rng.uniform(-1, 1, blocks[name].shape).astype(fmt.block[name])
    return raw.reshape(n_rows, -1), (n_rows, row_blocks * fmt.block_size)


def seconds(fn, repeat: int) -> float:
    fn()  # warm-up: JIT compile, page faults
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=64, help="MB of quantized input per format")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--formats", nargs="+", default=[q.name for q in FORMATS],
                        help="format names (default: all)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"# {os.cpu_count()} cores, Numba {numba.__version__} with {numba.get_num_threads()} "
          f"threads, {args.mb:g} MB per format, median of {args.repeat}")
    print(f"{'format':7s} {'reference':>10s} {'numba cpu':>10s} {'cpu out=':>10s} {'gguf-py':>10s} "
          f"{'cpu/gguf':>9s} {'out=/gguf':>10s}   (GB/s of quantized input)")
    for qtype in (QType[name.upper()] for name in args.formats):
        raw, shape = random_blocks(qtype, int(args.mb * 1e6), rng)
        out = np.empty(shape, np.float32)
        gbs = {}
        for name, fn in [
            ("reference", lambda: kernels.dequantize(raw, qtype, shape, backend="reference")),
            ("cpu", lambda: kernels.dequantize(raw, qtype, shape, backend="cpu")),
            ("cpu out=", lambda: kernels.dequantize(raw, qtype, shape, backend="cpu", out=out)),
            ("gguf", lambda: gguf.quants.dequantize(raw, qtype)),
        ]:
            gbs[name] = raw.nbytes / seconds(fn, args.repeat) / 1e9
        print(f"{qtype.name:7s} {gbs['reference']:10.2f} {gbs['cpu']:10.2f} {gbs['cpu out=']:10.2f} "
              f"{gbs['gguf']:10.2f} {gbs['cpu'] / gbs['gguf']:8.1f}x {gbs['cpu out='] / gbs['gguf']:9.1f}x")


if __name__ == "__main__":
    main()
