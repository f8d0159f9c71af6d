"""Decode matvec throughput in GB/s of quantized weights: the float32-activation kernel
(kernels.cpu.matvec), the q8-activation kernel with llama.cpp's numerics (kernels.cpu.vec_dot,
with T = 1 column; it quantizes x in each call, as llama.cpp does),
the NumPy reference of the latter, and llama.cpp's own mul_mat when llama-cpp-python is installed,
on Mistral-7B-shaped matrices.

    .venv/bin/python bench/matvec.py [--threads 1 2] [--shapes 4096x4096 14336x4096] [--types Q4_K ...]
                                     [--stream MB]

Weights are random bytes with sane fp16 scales: speed does not depend on the values. Each figure
is the best of --repeats calls (the machines are shared and noisy; the best is the least
disturbed). One matrix of a few MB called again and again stays in the caches; --stream MB makes
copies of it until they hold MB megabytes and times one call on each in turn, so the weights come
from memory as in a model's decode step (use 600 or more).
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

from bandwidth import read_gbs  # bench/, this script's folder
from mistral_ref_kernels.cpu.matvec import MATVEC
from mistral_ref_kernels.cpu.vec_dot import MATMUL_Q8, matmul_q8
from mistral_ref_kernels.formats import FORMATS
from mistral_ref_kernels.reference.vec_dot import matvec_q8 as reference_matvec_q8



def random_rows(qtype: QType, n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random weight bytes whose fp16 fields (d, m, dmin) hold small finite numbers."""
    fmt = FORMATS[qtype]
    rows = rng.integers(0, 256, (n_rows, fmt.row_bytes(n)), dtype=np.uint8)
    blocks = rows.reshape(-1, fmt.type_size)
    for field in ("d", "m", "dmin"):
        if field in fmt.block.names:
            at = fmt.offset(field)
            half = (rng.random(len(blocks)) * 0.01).astype(np.float16)
            blocks[:, at:at + 2] = half.view(np.uint8).reshape(-1, 2)
    rows.flags.writeable = False
    return rows


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class LlamaCppMatmul:
    """llama.cpp's own x @ W.T: a ggml graph with one mul_mat, computed by libggml-cpu (through
    the libraries llama-cpp-python ships), weights as the file stores them (a model loaded by
    llama.cpp may repack Q4_0 / Q4_K rows for its gemm; this does not)."""

    def __init__(self):
        import llama_cpp
        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        self.base = ctypes.CDLL(glob.glob(os.path.join(libdir, "libggml-base.so"))[0])
        self.cpu = ctypes.CDLL(glob.glob(os.path.join(libdir, "libggml-cpu.so"))[0])
        self.cpu.ggml_cpu_init()
        self._contexts = []

        class InitParams(ctypes.Structure):
            _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                        ("no_alloc", ctypes.c_bool)]
        self.InitParams = InitParams
        vp = ctypes.c_void_p
        self.base.ggml_init.restype = vp
        self.base.ggml_init.argtypes = [InitParams]
        self.base.ggml_new_tensor_2d.restype = vp
        self.base.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        self.base.ggml_get_data.restype = vp
        self.base.ggml_get_data.argtypes = [vp]
        self.base.ggml_mul_mat.restype = vp
        self.base.ggml_mul_mat.argtypes = [vp, vp, vp]
        self.base.ggml_new_graph.restype = vp
        self.base.ggml_new_graph.argtypes = [vp]
        self.base.ggml_build_forward_expand.argtypes = [vp, vp]
        self.base.ggml_free.argtypes = [vp]
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]

    def prepare(self, rows: np.ndarray, qtype: QType, x: np.ndarray, n_threads: int):
        """A function computing x @ W.T in llama.cpp (x float32 (n,) or (T, n)), and the array
        (x's leading shape + (n_rows,)) its result lands in."""
        base = self.base
        n_columns, n = (1, x.size) if x.ndim == 1 else x.shape
        ctx = base.ggml_init(self.InitParams(rows.nbytes + x.nbytes * 4 + (64 << 20), None, False))
        w = base.ggml_new_tensor_2d(ctx, int(qtype), n, rows.shape[0])
        ctypes.memmove(base.ggml_get_data(w), rows.ctypes.data, rows.nbytes)
        v = base.ggml_new_tensor_2d(ctx, int(QType.F32), n, n_columns)
        ctypes.memmove(base.ggml_get_data(v), np.ascontiguousarray(x).ctypes.data, x.nbytes)
        y = base.ggml_mul_mat(ctx, w, v)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        out = np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(y), ctypes.POINTER(ctypes.c_float)),
                                    shape=x.shape[:-1] + (rows.shape[0],))
        self._contexts.append(ctx)
        return (lambda: self.cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads)), out

    def free(self):
        for ctx in self._contexts:
            self.base.ggml_free(ctx)
        self._contexts = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"])
    parser.add_argument("--types", nargs="+", default=[t.name for t in MATMUL_Q8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) NumPy reference")
    parser.add_argument("--stream", type=float, default=0,
                        help="MB of weight copies to cycle through (0: one matrix)")
    args = parser.parse_args()
    try:
        llama = LlamaCppMatmul()
    except (ImportError, IndexError, OSError, AttributeError):
        llama = None

    rng = np.random.default_rng(0)
    print("this machine reads " + ", ".join(f"{read_gbs(t):.1f} GB/s with {t} thread{'s' * (t > 1)}"
                                          for t in args.threads)
          + f" (bench/bandwidth.py); figures: GB/s of quantized weights, best of {args.repeats}")
    print(f"{'type':6} {'shape':>11} {'thr':>3} {'f32 kernel':>10} {'q8 kernel':>10} "
          f"{'reference':>10} {'llama.cpp':>10}")
    for shape in args.shapes:
        n_rows, n = (int(v) for v in shape.split("x"))
        x = rng.standard_normal(n).astype(np.float32)
        for name in args.types:
            qtype = QType[name]
            copies = [random_rows(qtype, n_rows, n, rng)]
            while sum(c.nbytes for c in copies) < args.stream * 1e6:
                copies.append(random_rows(qtype, n_rows, n, rng))
            rows = copies[0]
            out = np.empty(n_rows, np.float32)
            gbs = lambda seconds: sum(c.nbytes for c in copies) / seconds / 1e9  # noqa: E731
            reference = "-"
            if not args.no_reference and 1 in args.threads:
                seconds = best_seconds(lambda: reference_matvec_q8(rows, qtype, x), 1)
                reference = f"{rows.nbytes / seconds / 1e9:.2f}"
            for threads in args.threads:
                numba.set_num_threads(threads)
                f32 = gbs(best_seconds(lambda: [MATVEC[qtype](c, x, out)
                                                for c in copies], args.repeats))
                q8 = gbs(best_seconds(lambda: [matmul_q8(c, qtype, x[None]) for c in copies],
                                      args.repeats))
                theirs = "-"
                if llama is not None:
                    computes = [llama.prepare(c, qtype, x, threads)[0] for c in copies]
                    theirs = f"{gbs(best_seconds(lambda: [f() for f in computes], args.repeats)):.1f}"
                    llama.free()
                print(f"{name:6} {shape:>11} {threads:>3} {f32:10.1f} {q8:10.1f} "
                      f"{reference if threads == 1 else '-':>10} {theirs:>10}", flush=True)


if __name__ == "__main__":
    main()
