"""CUDA kernels (kernels.cuda) against the NumPy reference and the Numba CPU kernels.

Runs on the numba-cuda simulator unless NUMBA_ENABLE_CUDASIM is set otherwise (set it to 0 on a
machine with a GPU to run the same tests on hardware). The simulator runs each GPU thread as a
Python thread, so shapes are tiny, but they still cross the kernels' tile boundaries.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numba.core.config  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf import GGMLQuantizationType as QType  # noqa: E402

# numba.cuda picks the simulator when first imported, from numba's config, which was read when
# numba was first imported (by other test modules, perhaps): set the variable and re-read it.
SIMULATE = os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1") == "1"
if "numba.cuda" not in sys.modules:
    numba.core.config.reload_config()
from numba import cuda  # noqa: E402

import mistral_ref_kernels as kernels  # noqa: E402
from mistral_ref_kernels import cuda as gpu  # noqa: E402
from mistral_ref_kernels.cuda import backend  # noqa: E402
from mistral_ref_kernels.reference import ops as ref  # noqa: E402

FORMATS = list(gpu.SUPPORTED)


def close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal within rtol of the largest magnitude (sums of mixed signs cancel elementwise)."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def weights(qtype: QType, n_rows: int, n: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n_rows, n)).astype(np.float32)
    return kernels.quantize(w, qtype)


def activations(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


if SIMULATE and not gpu.simulated():
    raise RuntimeError("numba.cuda was imported in hardware mode before tests/test_cuda.py "
                       "could select the simulator: set NUMBA_ENABLE_CUDASIM=1 at the top of "
                       "tests/conftest.py")


def test_backend_available():
    assert gpu.available()
    assert gpu.simulated() == SIMULATE


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matvec(qtype):
    n_rows, n = 11, 512  # 11 rows: a partly filled block of MATVEC_WARPS rows
    rows, x = weights(qtype, n_rows, n), activations((1, n))
    out = gpu.matmul(gpu.upload(rows), qtype, cuda.to_device(x)).copy_to_host()
    close(out[0], ref.matvec(rows, qtype, x[0]))
    close(out, kernels.matmul(rows, qtype, x, backend="cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K, QType.F16], ids=lambda t: t.name)
def test_matvec_crosses_x_tiles(qtype):
    n = backend.X_TILE + 256  # x staged in two tiles, the second partial
    rows, x = weights(qtype, 3, n), activations((1, n))
    out = gpu.matmul(gpu.upload(rows), qtype, cuda.to_device(x)).copy_to_host()
    close(out[0], ref.matvec(rows, qtype, x[0]))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_prefill_matmul(qtype):
    n_rows, n, n_tokens = 9, 256, 3
    rows, x = weights(qtype, n_rows, n), activations((n_tokens, n))
    out = gpu.matmul(gpu.upload(rows), qtype, cuda.to_device(x)).copy_to_host()
    close(out, np.stack([ref.matvec(rows, qtype, xt) for xt in x]))
    close(out, kernels.matmul(rows, qtype, x, backend="cpu"))


@pytest.mark.slow
def test_prefill_matmul_crosses_tiles():
    n_rows, n_tokens = backend.TILE + 5, backend.TILE + 2  # 2 x 2 blocks, the last ones partial
    rows, x = weights(QType.Q8_0, n_rows, 64), activations((n_tokens, 64))
    out = gpu.matmul(gpu.upload(rows), QType.Q8_0, cuda.to_device(x)).copy_to_host()
    close(out, np.stack([ref.matvec(rows, QType.Q8_0, xt) for xt in x]))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_embed(qtype):
    vocab, dim = 7, 256
    rows = weights(qtype, vocab, dim)
    tokens = np.array([3, 0, 6, 3])
    out = gpu.embed(gpu.upload(rows), qtype, tokens).copy_to_host()
    table = kernels.dequantize(rows, qtype, (vocab, dim), backend="reference")
    if gpu.simulated():  # no FMA contraction: llama.cpp's arithmetic, bit for bit
        np.testing.assert_array_equal(out, table[tokens])
    else:
        close(out, table[tokens], rtol=1e-6)


def test_rmsnorm():
    x, w = activations((3, 300)), activations((300,), seed=2)
    out = gpu.rmsnorm(cuda.to_device(x), cuda.to_device(w), 1e-5).copy_to_host()
    close(out, ref.rmsnorm(x, w, 1e-5))
    close(out, kernels.rmsnorm(x, w, 1e-5, backend="cpu"))


def test_rope():
    x = activations((3, 4, 16))
    positions = np.array([0, 7, 40000], dtype=np.int64)
    inv_freq = 10000.0 ** (-np.arange(0, 12, 2, dtype=np.float64) / 16)  # rope_dim 12 < D 16
    out = gpu.rope(cuda.to_device(x), cuda.to_device(positions), cuda.to_device(inv_freq))
    close(out.copy_to_host(), ref.rope(x, positions, inv_freq))
    close(out.copy_to_host(), kernels.rope(x.copy(), kernels.rope_rotations(positions, inv_freq), backend="cpu"))


def test_swiglu_and_add():
    gate, up = activations((2, 50)), activations((2, 50), seed=2)
    out = gpu.swiglu(cuda.to_device(gate), cuda.to_device(up))
    close(out.copy_to_host(), ref.swiglu(gate, up))
    close(out.copy_to_host(), kernels.swiglu(gate, up, backend="cpu"))
    gpu.add_(out, cuda.to_device(gate))
    close(out.copy_to_host(), ref.swiglu(gate, up) + gate)


def ring(keys: np.ndarray, n_slots: int) -> np.ndarray:
    """Cache (KV, S, D) holding positions 0..L-1 of keys (L, KV, D) at slot p % S, last wins."""
    cache = np.zeros((keys.shape[1], n_slots, keys.shape[2]), np.float32)
    for p, key in enumerate(keys):
        cache[:, p % n_slots] = key
    return cache


# (start_pos, T, S, window): prefill; decode after a wrapped ring with a window; a chunk that
# spans two key tiles (KEY_TILE = 32) without a window; a chunk longer than its window.
ATTENTION_CASES = [(0, 5, 8, 0), (13, 1, 8, 6), (38, 3, 48, 0), (20, 4, 8, 3)]


@pytest.mark.parametrize("start_pos,n_tokens,n_slots,window", ATTENTION_CASES)
def test_attention(start_pos, n_tokens, n_slots, window):
    n_heads, n_kv, head_dim = 4, 2, 16
    length = start_pos + n_tokens
    q = activations((n_tokens, n_heads, head_dim))
    k, v = activations((length, n_kv, head_dim), seed=2), activations((length, n_kv, head_dim), 3)
    k_cache, v_cache = ring(k[:start_pos], n_slots), ring(v[:start_pos], n_slots)
    k_new, v_new = k[start_pos:], v[start_pos:]
    out = gpu.attention(*(cuda.to_device(a) for a in (q, k_new, v_new, k_cache, v_cache)),
                        start_pos, window).copy_to_host()
    positions = np.arange(start_pos, length)
    close(out, ref.attention(q, k, v, positions, np.arange(length), window))
    close(out, kernels.attention(q, k_new, v_new, k_cache, v_cache, start_pos, window))


@pytest.mark.parametrize("start_pos,n_tokens", [(5, 2), (6, 4), (3, 11)])  # wrap: part, all
def test_kv_write(start_pos, n_tokens):
    """The device's and the host's ring writes against sequential writes."""
    n_slots = 8
    k_cache, v_cache = activations((2, n_slots, 4)), activations((2, n_slots, 4), seed=2)
    k, v = activations((n_tokens, 2, 4), seed=3), activations((n_tokens, 2, 4), seed=4)
    k_dev, v_dev = cuda.to_device(k_cache), cuda.to_device(v_cache)
    gpu.kv_write_(k_dev, v_dev, start_pos, cuda.to_device(k), cuda.to_device(v))
    k_host, v_host = k_cache.copy(), v_cache.copy()
    kernels.kv_write_(k_host, v_host, start_pos, k, v)
    for t in range(n_tokens):  # sequential writes: the last position of a slot wins
        k_cache[:, (start_pos + t) % n_slots] = k[t]
        v_cache[:, (start_pos + t) % n_slots] = v[t]
    for k_out, v_out in ((k_dev.copy_to_host(), v_dev.copy_to_host()), (k_host, v_host)):
        np.testing.assert_array_equal(k_out, k_cache)
        np.testing.assert_array_equal(v_out, v_cache)


def test_bad_input():
    rows = gpu.upload(weights(QType.Q4_0, 2, 64))
    x = cuda.to_device(activations((1, 64)))
    with pytest.raises(ValueError, match="does not support Q2_K"):
        gpu.matmul(rows, QType.Q2_K, x)
    with pytest.raises(ValueError, match="rows of 32 weights"):
        gpu.matmul(rows, QType.Q4_0, cuda.to_device(activations((1, 32))))
    with pytest.raises(ValueError, match="token ids"):
        gpu.embed(rows, QType.Q4_0, np.array([2]))
    with pytest.raises(ValueError, match="uint8"):
        gpu.upload(np.zeros((2, 4), np.float32))
    q = cuda.to_device(activations((1, 1, gpu.MAX_HEAD_DIM + 2)))
    with pytest.raises(ValueError, match="head dim"):
        gpu.attention(q, q, q, q, q, 0, 0)


@pytest.fixture
def tiny_mixed_model(tmp_path):
    """A tiny Mistral model (window 4) whose matrices use several formats."""
    from conftest import tiny_tensors, write_tiny_gguf

    dims = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab=40)
    tensors = tiny_tensors(**dims)
    types = {"token_embd.weight": QType.F16, "attn_q.weight": QType.Q4_0,
             "attn_k.weight": QType.Q4_0, "attn_v.weight": QType.Q5_0,
             "attn_output.weight": QType.Q8_0, "ffn_gate.weight": QType.Q4_1,
             "ffn_up.weight": QType.Q4_1, "ffn_down.weight": QType.Q8_0}
    raw_types = {name: qtype for name in tensors for suffix, qtype in types.items()
                 if name.endswith(suffix)}
    for name, qtype in raw_types.items():
        tensors[name] = kernels.quantize(tensors[name], qtype)
    return write_tiny_gguf(tmp_path / "m.gguf", arch="mistral", tensors=tensors,
                           raw_types=raw_types, context=16,
                           metadata={"{arch}.attention.sliding_window": 4}, **dims)


@pytest.mark.slow
def test_whole_model_matches_cpu(tiny_mixed_model):
    """Prefill 4 tokens, then two batched steps (continuous batching) in which that sequence
    decodes past its ring of 4 while a second one prefills 2 tokens and decodes 1; every
    sequence's logits within 1e-3 of the CPU device running it alone."""
    from mistral_ref.model import Model

    cpu_model = Model.from_gguf(tiny_mixed_model)
    gpu_model = Model.from_gguf(tiny_mixed_model, device="cuda")
    cpu_caches = [cpu_model.new_cache(8) for _ in range(2)]
    gpu_caches = [gpu_model.new_cache(8) for _ in range(2)]
    np.testing.assert_allclose(gpu_model.forward([1, 5, 19, 2], gpu_caches[0]),
                               cpu_model.forward([1, 5, 19, 2], cpu_caches[0]), atol=1e-3, rtol=0)
    for step in (([11], [7, 3]), ([37], [12])):
        batched = gpu_model.forward_batch(list(zip(step, gpu_caches)))
        for tokens, cache, logits in zip(step, cpu_caches, batched):
            np.testing.assert_allclose(logits, cpu_model.forward(tokens, cache), atol=1e-3, rtol=0)
    assert gpu_caches[0].k.shape[2] == 4  # the ring holds the window, not the sequence


def test_real_device_arrays_have_no_copy_method():
    """Why the next test patches the simulator: numba-cuda's DeviceNDArray has no .copy() (asked
    in a process without the simulator), while the simulator's array forwards it to NumPy."""
    code = ("from numba.cuda.cudadrv.devicearray import DeviceNDArray as A\n"
            "print(hasattr(A, 'copy'), hasattr(A, 'copy_to_device'))")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_kv_cache_fork_on_the_device(tiny_mixed_model, monkeypatch):
    """KVCache.fork copies through the device, with the simulator's arrays stripped of the
    .copy() a real GPU array lacks: the fork holds the parent's keys and values, and what the
    parent writes afterwards stays out of it. (Runner tests fork on the CPU end to end.)"""
    from mistral_ref.model import Model

    if SIMULATE:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        def no_copy(self):
            raise AttributeError("'DeviceNDArray' object has no attribute 'copy'")
        monkeypatch.setattr(FakeCUDAArray, "copy", no_copy, raising=False)
    model = Model.from_gguf(tiny_mixed_model, device="cuda")
    parent = model.new_cache(8)
    layer = 1
    _, n_kv, n_slots, head_dim = parent.k.shape
    k, v = (np.random.default_rng(seed).standard_normal((3, n_kv, head_dim)).astype(np.float32)
            for seed in (1, 2))
    model.device.kv_write_(parent.k[layer], parent.v[layer], 0, cuda.to_device(k), cuda.to_device(v))
    child = parent.fork()
    model.device.kv_write_(parent.k[layer], parent.v[layer], 0, cuda.to_device(k + 1),
                           cuda.to_device(v + 1))
    for cache, shift in ((child, 0), (parent, 1)):
        assert np.array_equal(cache.k.copy_to_host()[layer, :, :3], (k + shift).transpose(1, 0, 2))
        assert np.array_equal(cache.v.copy_to_host()[layer, :, :3], (v + shift).transpose(1, 0, 2))
    prefix = model.new_cache(8)  # the prefix cache's copy: the first slots of every layer and head
    model.device.copy_slots_(prefix.k, parent.k, 2)
    assert np.array_equal(prefix.k.copy_to_host()[:, :, :2], parent.k.copy_to_host()[:, :, :2])
    assert not prefix.k.copy_to_host()[:, :, 2:].any()


def test_model_with_unsupported_weights_is_refused_at_load(tmp_path):
    from conftest import tiny_tensors, write_tiny_gguf
    from mistral_ref.errors import UnsupportedTensorTypeError
    from mistral_ref.model import Model

    dims = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=256, vocab=40)
    tensors = tiny_tensors(**dims)
    tensors["blk.0.ffn_down.weight"] = np.zeros((32, kernels.block_format(QType.Q2_K).row_bytes(256)), np.uint8)
    path = write_tiny_gguf(tmp_path / "m.gguf", tensors=tensors,
                           raw_types={"blk.0.ffn_down.weight": QType.Q2_K}, **dims)
    Model.from_gguf(path)  # the CPU reads every format
    with pytest.raises(UnsupportedTensorTypeError, match="blk.0.ffn_down.weight.*Q2_K"):
        Model.from_gguf(path, device="cuda")

