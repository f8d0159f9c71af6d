"""Every CUDA kernel compiles for real GPUs (sm_80, sm_90) with the argument types the model
launches it with.

The simulator (tests/test_cuda.py) runs kernels as Python and never compiles them: a kernel
using something the CUDA target lacks passes every simulator test and fails on the first GPU.
NVVM compiles kernels to PTX without a GPU once the nvidia-nvvm and nvidia-cuda-nvrtc wheels are
installed (the `test` extra, so `make test`, installs them; without them the compile tests skip).

The model runs here, on the simulator, inside backend.recording_launches(run=False): the argument
types of each launch depend only on the host code, so the kernels need not run (which would take
minutes on the simulator). A subprocess without NUMBA_ENABLE_CUDASIM (numba.cuda chooses the
simulator once per process) rebuilds each recorded kernel and compiles it with
`cuda.compile_ptx(kernel.py_func, argument types, cc=cc)`. Run this file as a script (what the
subprocess does) with: recorded launches (pickle) in, results (JSON) out, compute capability.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import pickle
import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType as QType

from mistral_ref_kernels.cuda import backend

CCS = [(8, 0), (9, 0)]


def nvvm_wheel() -> str | None:
    try:
        return importlib.metadata.version("nvidia-nvvm")
    except importlib.metadata.PackageNotFoundError:
        return None


def rebuild(kernel: tuple[str, str | None]):
    """The kernel recording_launches names (factory, format) or (name, None)."""
    name, fmt = kernel
    return getattr(backend, name) if fmt is None else backend._kernel(getattr(backend, name),
                                                                      QType[fmt])


def compile_all(launches: list, cc: tuple[int, int]) -> list[dict]:
    """Compile each (kernel, argument types) to PTX for cc: a row each, the error or PTX facts."""
    from numba import cuda

    assert not backend.simulated(), "the compiling process must not use the simulator"
    results = []
    for kernel, argtypes in launches:
        row = {"kernel": list(kernel), "argtypes": [str(t) for t in argtypes]}
        try:
            ptx, _ = cuda.compile_ptx(rebuild(kernel).py_func, argtypes, cc=cc)
        except Exception as e:  # report every kernel, not just the first failure
            row["error"] = f"{type(e).__name__}: {e}"
        else:
            lines = ptx.splitlines()
            row["targets"] = [line for line in lines if line.startswith(".target")]
            row["entries"] = [line.split()[-1].rstrip("(") for line in lines if " .entry " in line]
        results.append(row)
    return results


# ---------------------------------------------------------------- recording (simulator process)

@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> list:
    """The unique (kernel, argument types) launched by a prefill and two decode steps of one tiny
    model per supported format (every matrix and the embedding in that format)."""
    from conftest import random_rows, tiny_tensors, write_tiny_gguf
    from mistral_ref.model import Model
    from mistral_ref_kernels.cuda import SUPPORTED

    if not backend.available():
        pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)")
    # dim and ffn_dim 256: rows of the K-quant formats; head dim 128 = MAX_HEAD_DIM; window 4 < the
    # 6 positions run, so the decode steps wrap the KV ring.
    dims = dict(dim=256, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=256, vocab=16)
    seen = set()
    for qtype in SUPPORTED:
        tensors = tiny_tensors(**dims)
        raw_types = {name: qtype for name, array in tensors.items() if array.ndim == 2}
        for name in raw_types:
            tensors[name] = random_rows(qtype, *tensors[name].shape)
        path = write_tiny_gguf(tmp_path_factory.mktemp("ptx") / f"{qtype.name}.gguf",
                               arch="mistral", tensors=tensors, raw_types=raw_types, context=16,
                               metadata={"{arch}.attention.sliding_window": 4}, **dims)
        model = Model.from_gguf(path, device="cuda")
        cache = model.new_cache(8)
        with backend.recording_launches(run=False) as recorded:
            for tokens in ([1, 5, 9, 2], [11], [7]):  # prefill (T = 4: matmul), decode (matvec)
                model.forward(tokens, cache)
        seen.update(recorded)
    return sorted(seen, key=str)


def is_kernel(obj) -> bool:
    """A cuda.jit kernel (not a device function), real or simulated."""
    if not isinstance(obj, type(backend._add)):
        return False
    return not (obj._device if backend.simulated() else obj.targetoptions["device"])


def test_model_launches_every_kernel(launches):
    """A kernel the model never launches here would never be compiled below. Per-format kernels
    are the functions named _*_kernel that build one from a format's unit."""
    from mistral_ref_kernels.cuda import SUPPORTED

    factories = [name for name, obj in vars(backend).items()
                 if name.endswith("_kernel") and name != "_kernel" and inspect.isfunction(obj)]
    kernels = [name for name, obj in vars(backend).items() if is_kernel(obj)]
    assert {"_matvec_kernel", "_matmul_kernel", "_embed_kernel"} <= set(factories)
    assert {"_rmsnorm", "_rope", "_attention", "_kv_write", "_swiglu", "_add"} <= set(kernels)
    expected = ({(f, qtype.name) for f in factories for qtype in SUPPORTED}
                | {(name, None) for name in kernels})
    assert expected - {kernel for kernel, _ in launches} == set()


# ---------------------------------------------------------------- compiling (a subprocess)

@pytest.fixture(scope="module")
def compiled(launches, tmp_path_factory) -> dict:
    """cc -> compile_all's rows, from one subprocess per compute capability, run concurrently."""
    if nvvm_wheel() is None:
        pytest.skip("NVVM is not installed: `pip install nvidia-nvvm nvidia-cuda-nvrtc` (the test "
                    "extra; `make test` installs it) to compile the CUDA kernels to PTX")
    folder = tmp_path_factory.mktemp("ptx")
    (folder / "launches.pkl").write_bytes(pickle.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    runs = {cc: subprocess.Popen([sys.executable, __file__, str(folder / "launches.pkl"),
                                  str(folder / f"sm_{cc[0]}{cc[1]}.json"), f"{cc[0]}.{cc[1]}"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
            for cc in CCS}
    results = {}
    for cc, run in runs.items():
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, f"the sm_{cc[0]}{cc[1]} compile process failed:\n{output}"
        results[cc] = json.loads((folder / f"sm_{cc[0]}{cc[1]}.json").read_text())
    return results


@pytest.mark.slow
@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_kernels_compile_to_ptx(compiled, launches, cc):
    rows = compiled[cc]
    assert len(rows) == len(launches)
    errors = [f"{row['kernel']}{tuple(row['argtypes'])}: {row['error']}" for row in rows
              if "error" in row]
    assert not errors, f"{len(errors)} kernels do not compile for sm_{cc[0]}{cc[1]}:\n" + \
        "\n".join(errors)
    for row, (kernel, _) in zip(rows, launches):
        name = rebuild(kernel).py_func.__name__
        assert row["targets"] == [f".target sm_{cc[0]}{cc[1]}"], row
        assert len(row["entries"]) == 1 and f"{len(name)}{name}" in row["entries"][0], row


if __name__ == "__main__":  # the compiling subprocess: launches.pkl results.json major.minor
    source, target, cc = sys.argv[1:]
    with open(source, "rb") as f:
        recorded = pickle.load(f)
    with open(target, "w") as f:
        json.dump(compile_all(recorded, tuple(int(v) for v in cc.split("."))), f)
