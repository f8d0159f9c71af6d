"""IEEE half-precision conversion inside Numba CPU code (Numba's CPU target has no float16 type).

Decoding is one LLVM `fpext half` instruction, encoding one `fptrunc`. The CUDA kernels
decode with their own table (kernels/cuda/blocks.py): an LLVM intrinsic cannot run on the
simulator.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def half_to_float(typingctx, bits):
    """float32 value of the IEEE half with bits `bits` (an integer; its low 16 bits): one
    `fpext half` (vcvtph2ps / vcvtsh2ss), which LLVM vectorizes. Exact for every half; NaNs keep
    their payload and come back quiet, as in NumPy's astype(float32)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0]
        return builder.fpext(builder.bitcast(low, ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def bfloat16_to_float(typingctx, bits):
    """float32 value of the bfloat16 with bits `bits` (an integer; its low 16 bits): the float32
    whose high half they are (a shift and a bitcast, which LLVM vectorizes). Exact."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(builder.trunc(args[0], ir.IntType(16)), ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
    return types.float32(bits), codegen


@numba.njit(inline="always", cache=True)
def fp16_at(raw: np.ndarray, i: int) -> np.float32:
    """The little-endian fp16 stored at byte `i` of `raw` (uint8), as float32."""
    return half_to_float(np.uint16(raw[i]) | (np.uint16(raw[i + 1]) << 8))


@intrinsic
def _fptrunc_bits(typingctx, x):
    """The bits of float x as an IEEE half, rounded to nearest even once: one `fptrunc`
    (vcvtps2ph for a float32)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(x), codegen


@numba.njit(inline="always", cache=True)
def f32_to_fp16_bits(x: np.float32) -> np.uint16:
    """IEEE fp16 bits of `x`, rounded to nearest even: the same bits as NumPy's astype(float16)
    and GGML_FP32_TO_FP16, but one NaN (0x7E00) for every NaN. In hardware (the float64
    arithmetic this replaced cost Q8_0's activation quantizer half its time)."""
    if x != x:
        return np.uint16(0x7E00)
    return _fptrunc_bits(x)
