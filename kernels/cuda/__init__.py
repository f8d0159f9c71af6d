"""numba-cuda backend: the transformer's kernels on device arrays (see kernels.cuda.backend).

Importing this package imports numba.cuda, which fixes for the whole process whether kernels
run on a GPU or on the simulator (set NUMBA_ENABLE_CUDASIM=1 before the first import).
"""
from kernels.cuda.backend import (MAX_HEAD_DIM, add_, attention, available, embed, kv_write,
                                  matmul, rmsnorm, rope, simulated, swiglu, upload)
from kernels.cuda.blocks import UNITS

SUPPORTED = tuple(UNITS)

__all__ = ["MAX_HEAD_DIM", "SUPPORTED", "add_", "attention", "available", "embed", "kv_write",
           "matmul", "rmsnorm", "rope", "simulated", "swiglu", "upload"]
