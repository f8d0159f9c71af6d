"""Quantized matmul throughput (prefill): integer GOPS of our q8 kernel (kernels.cpu.vec_dot) for T
activation columns, next to llama.cpp's ggml_mul_mat on the same weights and this CPU's int8 peak.

    .venv/bin/python bench/matmul.py [--columns 1 8 32 128 512] [--shapes 4096x4096 14336x4096]
                                     [--types Q4_K ...] [--threads 2] [--plot PNG]

GOPS = 2 * rows * n * T / seconds (a multiply and an add per weight and column), best of
--repeats calls; both sides include quantizing x to 8 bits, as a mul_mat does. The peak is
measured here, in 12 independent chains per core on every thread, of the int8 instruction our
tiles are built on: `vpdpbusd` on the lanes of a tile (64 multiply-adds an instruction on 512-bit
lanes with AVX-512 VNNI, 32 on 256-bit with AVX-VNNI), else `vpmaddubsw` (32, the instruction
both engines' AVX2 kernels are built on). llama.cpp's side is a
one-node ggml graph through the libggml-cpu that llama-cpp-python ships, on the weights as files
store them: a model llama.cpp loads itself may repack Q4_0 / Q4_K rows for a gemm of its own
(bench/generate.py --compare measures that whole path).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numba
import numpy as np
from gguf import GGMLQuantizationType as QType
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mistral_ref_kernels.cpu import lanes
from mistral_ref_kernels.cpu.vec_dot import MATMUL_Q8, TILE_ROWS, matmul_q8

sys.path.insert(0, os.path.dirname(__file__))
from matvec import LlamaCppMatmul, best_seconds, random_rows  # noqa: E402

PEAK_CHAINS = 12  # independent chains: more than latency x throughput (vpdpbusd: 5 x 2) on these CPUs
PEAK_LANES = TILE_ROWS if lanes.VNNI else 8  # int32 lanes of the peak's instruction
PEAK_INSTRUCTION = f"vpdpbusd {32 * PEAK_LANES}-bit" if lanes.VNNI else "vpmaddubsw"


@intrinsic
def _dot_chains(typingctx, iterations):
    """Runs PEAK_CHAINS chains of `iterations` dependent PEAK_INSTRUCTIONs each; returns a lane
    of the result so that nothing is optimized away."""
    def codegen(context, builder, signature, args):
        weights = lanes.constant(4 * PEAK_LANES, 3)
        chains = [cgutils.alloca_once_value(builder, lanes.constant(4 * PEAK_LANES, k + 1))
                  for k in range(PEAK_CHAINS)]
        with cgutils.for_range(builder, args[0]):
            for chain in chains:
                x = builder.load(chain)
                if lanes.VNNI:
                    sums = lanes.dot_bytes(builder, builder.bitcast(x, ir.VectorType(lanes.I32, PEAK_LANES)), weights, x)
                else:
                    sums = lanes.maddubs(builder, weights, x)
                builder.store(builder.bitcast(sums, x.type), chain)
        total = builder.load(chains[0])
        for chain in chains[1:]:
            total = builder.add(total, builder.load(chain))
        return builder.sext(builder.extract_element(total, ir.Constant(lanes.I32, 0)), ir.IntType(64))
    return types.int64(iterations), codegen


@numba.njit(parallel=True)
def _peak_run(iterations, threads):
    out = np.zeros(threads, np.int64)
    for t in prange(threads):
        out[t] = _dot_chains(iterations)
    return out


def int8_peak_gops(threads: int) -> float:
    """Measured int8 GOPS of PEAK_INSTRUCTION on `threads` threads (2 ops per multiply-add)."""
    iterations = 20_000_000
    seconds = best_seconds(lambda: _peak_run(iterations, threads), 3)
    return 2 * 4 * PEAK_LANES * PEAK_CHAINS * iterations * threads / seconds / 1e9


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"])
    parser.add_argument("--types", nargs="+", default=[t.name for t in MATMUL_Q8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                        "figures", "matmul.png"))
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    try:
        llama = LlamaCppMatmul()
    except (ImportError, IndexError, OSError, AttributeError):
        llama = None
    peak = int8_peak_gops(args.threads)
    print(f"{cpu_name()}, {args.threads} threads: {PEAK_INSTRUCTION} peak {peak:.0f} GOPS (measured)")
    print(f"{'type':6} {'shape':>11} {'T':>4} {'ours GOPS':>10} {'llama.cpp':>10} {'ours/llama':>10} "
          f"{'% peak':>7}")
    rng = np.random.default_rng(0)
    results = {}  # (shape, type) -> [(T, ours, theirs)]
    for shape in args.shapes:
        n_rows, n = (int(v) for v in shape.split("x"))
        for name in args.types:
            qtype = QType[name]
            rows = random_rows(qtype, n_rows, n, rng)
            for n_columns in args.columns:
                x = rng.standard_normal((n_columns, n)).astype(np.float32)
                ops = 2 * n_rows * n * n_columns
                ours = ops / best_seconds(lambda: matmul_q8(rows, qtype, x), args.repeats) / 1e9
                theirs = float("nan")
                if llama is not None:
                    compute, _ = llama.prepare(rows, qtype, x, args.threads)
                    theirs = ops / best_seconds(compute, args.repeats) / 1e9
                    llama.free()
                results.setdefault((shape, name), []).append((n_columns, ours, theirs))
                print(f"{name:6} {shape:>11} {n_columns:>4} {ours:10.1f} {theirs:10.1f} "
                      f"{ours / theirs:10.2f} {100 * ours / peak:6.0f}%", flush=True)
    plot(results, args.shapes, peak, f"{cpu_name()}, {args.threads} threads", args.plot)


def plot(results: dict, shapes: list[str], peak: float, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for k, ((s, name), points) in enumerate(r for r in results.items() if r[0][0] == shape):
            columns, ours, theirs = zip(*points)
            color = f"C{k}"
            ax.plot(columns, ours, "o-", color=color, label=f"{name} ours")
            ax.plot(columns, theirs, "x--", color=color, alpha=0.6, label=f"{name} llama.cpp")
        ax.axhline(peak, color="black", linestyle=":", label=f"int8 peak ({PEAK_INSTRUCTION})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("activation columns T (tokens)")
        ax.set_ylabel("integer GOPS")
        ax.set_title(f"{shape} (rows x n)")
        ax.set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"q8 matmul: ours (solid) vs llama.cpp ggml_mul_mat (dashed); {title}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
