"""CUDA kernel throughput on Mistral-7B-shaped matrices, as a fraction of the device's peak.

    .venv/bin/python bench/cuda_kernels.py [--shapes 4096x4096 14336x4096] [--types Q4_K ...]
                                           [--tokens 512] [--model synth-7b.gguf]

Decode (T = 1): effective GB/s of each fused matvec (bytes of quantized weights read per call /
time) against the peak DRAM bandwidth from the device's memory clock and bus width. Prefill:
TFLOP/s of the tiled matmul (2 T n_rows n / time) against the FP32 peak (SMs x clock x FP32 lanes
per SM x 2). With --model, decode tokens/s of a whole model once mistral_ref.Model runs on
device="cuda". On a machine without a GPU (or on the simulator) it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType as QType

from matvec import random_rows  # bench/matvec.py: random blocks with sane fp16 scales

# FP32 lanes per SM by compute capability (CUDA C Programming Guide, arithmetic instructions).
FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 9): 128, (9, 0): 128}


def device_peaks(device) -> tuple[float, float]:
    """(DRAM bytes/s, FP32 FLOP/s) from the device's attributes (clocks in kHz)."""
    bandwidth = 2 * device.MEMORY_CLOCK_RATE * 1e3 * device.GLOBAL_MEMORY_BUS_WIDTH / 8
    lanes = FP32_LANES.get(device.compute_capability, 128)
    flops = 2 * device.MULTIPROCESSOR_COUNT * lanes * device.CLOCK_RATE * 1e3
    return bandwidth, flops


def time_call(fn, repeats: int) -> float:
    """Best seconds per call of fn over `repeats` event-timed calls, after a warm-up call."""
    from numba import cuda
    fn()
    cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, stop = cuda.event(), cuda.event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)  # milliseconds
    return best


def bench_kernels(args, bandwidth: float, flops: float) -> None:
    from numba import cuda

    from mistral_ref_kernels import cuda as gpu
    rng = np.random.default_rng(0)
    print(f"{'type':6} {'shape':>11} {'decode GB/s':>12} {'of peak':>8} "
          f"{'prefill TFLOP/s':>16} {'of peak':>8}")
    for name in args.types:
        qtype = QType[name]
        for shape in args.shapes:
            n_rows, n = (int(s) for s in shape.split("x"))
            rows = random_rows(qtype, n_rows, n, rng)
            rows_dev = gpu.upload(rows)
            x1 = cuda.to_device(rng.standard_normal((1, n)).astype(np.float32))
            xt = cuda.to_device(rng.standard_normal((args.tokens, n)).astype(np.float32))
            decode = time_call(lambda: gpu.matmul(rows_dev, qtype, x1), args.repeats)
            prefill = time_call(lambda: gpu.matmul(rows_dev, qtype, xt), max(1, args.repeats // 4))
            gbs = rows.nbytes / decode
            tflops = 2 * args.tokens * n_rows * n / prefill
            print(f"{name:6} {shape:>11} {gbs / 1e9:12.1f} {gbs / bandwidth:8.1%} "
                  f"{tflops / 1e12:16.2f} {tflops / flops:8.1%}", flush=True)


def bench_model(path: str, n_prompt: int = 16, n_decode: int = 32) -> None:
    """Decode tokens/s of a whole model on device="cuda"; skips with a message until
    mistral_ref.Model supports that device."""
    from mistral_ref.model import Model
    try:
        model = Model.from_gguf(path, device="cuda")
    except (TypeError, ValueError, NotImplementedError) as e:
        print(f"model decode: skipped, Model.from_gguf(device='cuda') failed: {e}")
        return
    cache = model.new_cache(n_prompt + n_decode + 1)
    logits = model.forward(list(range(1, n_prompt + 1)), cache)
    token = int(np.argmax(logits[-1] if logits.ndim > 1 else logits))
    start = time.perf_counter()
    for _ in range(n_decode):
        logits = model.forward([token], cache)
        token = int(np.argmax(logits[-1] if logits.ndim > 1 else logits))
    elapsed = time.perf_counter() - start
    print(f"model decode: {n_decode / elapsed:.1f} tokens/s ({os.path.basename(path)}, "
          f"{n_decode} tokens after a {n_prompt}-token prompt)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"])
    parser.add_argument("--types", nargs="+",
                        default=["Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_0", "Q4_1", "Q5_K", "F16"])
    parser.add_argument("--tokens", type=int, default=512, help="prefill tokens")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", help="a Mistral-7B-shaped GGUF for decode tokens/s")
    args = parser.parse_args()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("NUMBA_ENABLE_CUDASIM=1: the simulator has no meaningful speed; nothing to measure")
        return
    from numba import cuda
    if not cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure")
        return
    device = cuda.get_current_device()
    bandwidth, flops = device_peaks(device)
    print(f"{device.name.decode() if isinstance(device.name, bytes) else device.name}: "
          f"cc {device.compute_capability}, peak DRAM {bandwidth / 1e9:.0f} GB/s, "
          f"peak FP32 {flops / 1e12:.1f} TFLOP/s")
    bench_kernels(args, bandwidth, flops)
    if args.model:
        bench_model(args.model)


if __name__ == "__main__":
    sys.exit(main())
