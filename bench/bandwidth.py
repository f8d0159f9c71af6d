"""This machine's memory read bandwidth: the denominator of every GB/s figure in bench/ and docs/.

    .venv/bin/python bench/bandwidth.py [--gb 2] [--threads 1 2] [--file M.gguf] [--plot PNG]

A Numba `prange` over one slice per thread sums the array as int64 (vectorized and unrolled, so
the adds cost nothing next to the loads), over memory well beyond the caches, in three kinds of memory:
anonymous memory on 4 KB pages, anonymous memory advised MADV_HUGEPAGE (mistral_ref.memory, what
`load="copy"` puts the weights in) and a memory-mapped file read through the page cache (what
`load="mmap"` reads: --file, or a scratch file of --gb in $TMPDIR). Best of --repeats passes.
Other benchmarks call `read_gbs()` to print the figure next to theirs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numba
import numpy as np
from numba import prange

from mistral_ref.memory import huge_page_array


@numba.njit(parallel=True, nogil=True, cache=True)
def _sum_slices(words, n_slices):
    totals = np.zeros(n_slices, np.int64)
    per_slice = words.size // n_slices
    for s in prange(n_slices):
        # A slice's .sum() (an unrolled, vectorized reduction): an explicit `total += words[i]`
        # loop here reads only 20 of this machine's 36 GB/s.
        totals[s] = words[s * per_slice:(s + 1) * per_slice].sum()
    return totals.sum()


def read_seconds(data: np.ndarray, threads: int, repeats: int = 5) -> float:
    """Best time of `repeats` reads of data (uint8, a multiple of 8 bytes) on `threads` threads."""
    words = data[:data.size - data.size % 8].view(np.int64)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _sum_slices(words, threads)  # page in, compile
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            _sum_slices(words, threads)
            best = min(best, time.perf_counter() - start)
    finally:
        numba.set_num_threads(previous)
    return best


def read_gbs(threads: int | None = None, nbytes: int = 1 << 30) -> float:
    """GB/s read from anonymous huge-page memory (nbytes of it) with `threads` threads (default:
    Numba's count): the limit a decode step streaming its weights can approach."""
    data = huge_page_array(nbytes)
    data[::4096] = 1  # touch every page
    threads = threads or numba.get_num_threads()
    return nbytes / read_seconds(data, threads) / 1e9


def _memories(nbytes: int, path: str | None):
    small_pages = np.empty(nbytes, np.uint8)
    small_pages[::4096] = 1
    yield "anonymous, 4 KB pages", small_pages
    huge = huge_page_array(nbytes)
    huge[::4096] = 1
    yield "anonymous, MADV_HUGEPAGE", huge
    del small_pages, huge
    if path is None:
        scratch = tempfile.NamedTemporaryFile(prefix="bandwidth-", delete=False)
        with scratch:
            chunk = np.ones(64 << 20, np.uint8)
            for _ in range(nbytes // chunk.size):
                scratch.write(chunk.data)
        path = scratch.name
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        yield f"file map, page cache ({os.path.basename(path)})", mapped[:min(nbytes, mapped.size)]
    finally:
        if path.startswith(tempfile.gettempdir()) and os.path.basename(path).startswith("bandwidth-"):
            os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="bytes read per pass, in GB")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--file", help="a file to map (default: a scratch file of --gb)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                       "figures", "bandwidth.png"))
    args = parser.parse_args()
    nbytes = int(args.gb * 1e9) // 8 * 8
    cpu = _cpu_name()
    print(f"# read bandwidth, {cpu}, {nbytes / 1e9:.1f} GB a pass, best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| memory | " + " | ".join(f"{t} thread{'s' * (t > 1)}, GB/s" for t in args.threads) + " |")
    print("|---|" + "---|" * len(args.threads))
    results = {}
    for name, data in _memories(nbytes, args.file):
        results[name] = [data.size / read_seconds(data, t, args.repeats) / 1e9 for t in args.threads]
        print(f"| {name} | " + " | ".join(f"{g:.1f}" for g in results[name]) + " |", flush=True)
    _plot(results, args.threads, cpu, args.plot)


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    flags = open("/proc/cpuinfo").read()
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return f"{names[0] if names else 'unknown CPU'} ({widest}, {os.cpu_count()} CPUs)"


def _plot(results: dict[str, list[float]], threads: list[int], cpu: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(results)
    for i, (name, gbs) in enumerate(results.items()):
        ax.bar(np.arange(len(threads)) + i * width, gbs, width, label=name)
    ax.set_xticks(np.arange(len(threads)) + width * (len(results) - 1) / 2,
                  [f"{t} thread{'s' * (t > 1)}" for t in threads])
    ax.set_ylabel("read GB/s")
    ax.set_title(f"Memory read bandwidth\n{cpu}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
