"""The Device interface: every device implements it, and the reference device (the NumPy kernels
that read like the spec) runs the whole model, agreeing with the CPU device."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import mistral_ref_kernels as kernels
from mistral_ref_kernels.device import Device
from mistral_ref.errors import ContextLengthError, InputError
from mistral_ref.model import Model
from mistral_ref.tokenizer import Tokenizer

PROTOCOL_METHODS = [name for name, member in vars(Device).items()
                    if callable(member) and not name.startswith("_")]


@pytest.mark.parametrize("name", kernels.DEVICES)
def test_every_device_implements_the_protocol(name):
    device = kernels.device(name)
    assert isinstance(device, Device) and device.name == name
    assert set(PROTOCOL_METHODS) >= {"matmul", "rope", "attention", "copy", "add_", "kv_write_"}
    for method in PROTOCOL_METHODS:  # the model calls them positionally: same arity
        expected = len(inspect.signature(getattr(Device, method)).parameters) - 1  # no self
        parameters = inspect.signature(getattr(device, method)).parameters.values()
        assert [p.kind for p in parameters] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * expected, method


@pytest.mark.parametrize("name", kernels.DEVICES)
def test_out_of_place_operations_leave_their_input_alone(name):
    """Only names ending in _ write into their arguments: the model relies on rope returning its
    result (it once discarded it, which the in-place CPU kernel hid)."""
    device = kernels.device(name)
    x = np.random.default_rng(0).standard_normal((3, 2, 10)).astype(np.float32)
    x_dev = device.upload(x)
    inv_freq = device.upload(10000.0 ** -(np.arange(0, 8, 2) / 8))  # rope_dim 8 of 10
    rotated = device.to_host(device.rope(x_dev, device.rope_rotations(np.arange(3), inv_freq)))
    assert np.array_equal(device.to_host(x_dev), x)
    assert not np.allclose(rotated[1:, :, :8], x[1:, :, :8]) and np.array_equal(rotated[..., 8:], x[..., 8:])
    copied = device.copy(device.upload(x.reshape(6, 10)))
    device.add_(copied, copied)
    assert np.array_equal(device.to_host(copied), 2 * x.reshape(6, 10))
    assert np.array_equal(device.to_host(x_dev), x)


def test_unknown_device():
    with pytest.raises(ValueError, match="unknown device 'tpu'.*reference, cpu, cuda"):
        kernels.device("tpu")


@pytest.mark.slow
def test_reference_device_runs_the_model_like_the_cpu(default_model):
    """SmolLM2 end to end on the NumPy reference kernels: logits within 1e-4 (relative to their
    range) of the CPU device's exact float32 path, at every position of a prompt and a decode
    step."""
    ids = Tokenizer.from_gguf(default_model).encode("The capital of France is")
    reference, cpu = (Model.from_gguf(default_model, device=d) for d in ("reference", "cpu"))
    assert reference.device.name == "reference"
    expected = cpu.logits(ids)
    got = reference.logits(ids)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)
    assert np.argmax(got[-1]) == np.argmax(expected[-1])
    caches = [model.new_cache(len(ids) + 1) for model in (reference, cpu)]
    for model, cache in zip((reference, cpu), caches):
        model.forward(ids, cache)
    np.testing.assert_allclose(reference.forward([567], caches[0]), cpu.forward([567], caches[1]),
                               rtol=0, atol=1e-4 * scale)


@pytest.fixture
def mixed_formats_model(tmp_path):
    """A tiny mistral model whose matrices use the 8 formats of the q8 kernels, with a sliding
    window (3) shorter than the sequences below."""
    from conftest import tiny_tensors, write_tiny_gguf
    from gguf import GGMLQuantizationType as QType

    dims = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab=50)
    tensors = tiny_tensors(**dims)
    formats = {"attn_q": QType.Q8_0, "attn_k": QType.Q5_0, "attn_v": QType.Q4_1,
               "attn_output": QType.Q5_K, "ffn_gate": QType.Q4_K, "ffn_up": QType.Q5_1,
               "ffn_down": QType.Q6_K}
    raw_types = {name: formats[name.split(".")[2]] for name in tensors
                 if name.startswith("blk.") and name.split(".")[2] in formats}
    raw_types["output.weight"] = QType.Q4_0
    for name, qtype in raw_types.items():
        tensors[name] = kernels.quantize(tensors[name], qtype)
    return write_tiny_gguf(tmp_path / "m.gguf", arch="mistral", tensors=tensors,
                           raw_types=raw_types, metadata={"{arch}.attention.sliding_window": 3},
                           **dims)


TOKENS = [3, 14, 15, 9, 26, 5, 35]


def test_reference_device_with_q8_activations_matches_the_cpu(mixed_formats_model):
    """llama.cpp's numerics on both host devices, token by token: the integer block sums are
    exact, so only float order differs."""
    path = mixed_formats_model
    reference, cpu = (Model.from_gguf(path, device=d, activations="q8") for d in ("reference", "cpu"))
    caches = [model.new_cache(8) for model in (reference, cpu)]
    for token in TOKENS:
        expected = cpu.forward([token], caches[1])
        np.testing.assert_allclose(reference.forward([token], caches[0]), expected, rtol=0,
                                   atol=1e-4 * np.abs(expected).max())


def test_q8_prefill_equals_q8_decode(mixed_formats_model):
    """Every matmul column of a q8 prefill is bit for bit the decode kernel's (tests/test_vec_dot),
    and the CPU attention visits a query's keys in the same order whether they come from the
    chunk or the cache, so a prompt's logits from one prefill equal those from decoding its
    tokens one at a time, bit for bit, past the sliding window too (rounding x and multiplying
    with BLAS used to cost up to ~0.5 logits). Should attention's order ever change, float32
    rounding of its sums is the only difference allowed."""
    model = Model.from_gguf(mixed_formats_model, activations="q8")
    prefill = model.logits(TOKENS)
    cache = model.new_cache(len(TOKENS))
    decode = np.stack([model.forward([token], cache) for token in TOKENS])
    np.testing.assert_array_equal(prefill, decode)


def _batched_and_alone(model: Model, histories, steps) -> tuple[list, list]:
    """Each sequence's logits for its `steps` (a list of token lists per step), run alone and run
    in batches with the others (histories are prefilled first, each alone)."""
    def fresh():
        caches = [model.new_cache(16) for _ in histories]
        for history, cache in zip(histories, caches):
            model.forward(history, cache)
        return caches
    caches, alone = fresh(), []
    for step in steps:
        alone.append([model.forward(tokens, cache) for tokens, cache in zip(step, caches)])
    caches, batched = fresh(), []
    for step in steps:
        batched.append(model.forward_batch(list(zip(step, caches))))
    return np.array(alone), np.array(batched)


def test_a_batched_step_equals_each_sequence_alone(mixed_formats_model):
    """Continuous batching: sequences at different positions (past the window of 3 and not), a
    prefill chunk among the decode tokens, in one forward pass; each sequence's logits are bit for
    bit its logits alone (q8: each matmul column is computed alone, attention per sequence), over
    several steps, so the caches advanced the same too."""
    model = Model.from_gguf(mixed_formats_model, activations="q8")
    histories = [TOKENS[:6], TOKENS[:1], TOKENS[2:4], [7]]
    steps = [[[11], [12], [13], [1, 2, 3, 4]], [[21], [22], [23], [24]], [[31], [32, 33], [34], [35]]]
    alone, batched = _batched_and_alone(model, histories, steps)
    np.testing.assert_array_equal(batched, alone)


@pytest.mark.parametrize("name", ["cpu", "reference"])
def test_a_batched_step_with_f32_activations(mixed_formats_model, name):
    """f32 activations: BLAS (cpu) blocks a matrix by its column count, so a batched sequence
    agrees with itself alone to float32 rounding."""
    model = Model.from_gguf(mixed_formats_model, device=name, activations="f32")
    histories = [TOKENS[:6], TOKENS[:1], [7]]
    steps = [[[11], [12], [1, 2, 3]], [[21], [22], [24]]]
    alone, batched = _batched_and_alone(model, histories, steps)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_forward_batch_rejects_bad_batches(mixed_formats_model):
    model = Model.from_gguf(mixed_formats_model, activations="q8")
    cache = model.new_cache(4)
    with pytest.raises(InputError, match="empty batch"):
        model.forward_batch([])
    with pytest.raises(InputError, match="twice"):
        model.forward_batch([([1], cache), ([2], cache)])
    with pytest.raises(ContextLengthError):
        model.forward_batch([([1, 2, 3, 4, 5], cache)])
    assert cache.length == 0  # nothing ran


@pytest.mark.parametrize("name", ["cpu", "reference"])
@pytest.mark.parametrize("window", [0, 4])
def test_decode_attention_equals_attention_per_sequence(name, window):
    """The batched decode step against `attention` and `kv_write_` per sequence, on caches of
    different slot counts (one ring wraps): the same bits out, the same caches after."""
    rng = np.random.default_rng(0)
    n_layers, n_kv, head_dim, n_heads, layer = 2, 2, 16, 4, 1
    slots, starts = [8, 4, 16], np.array([5, 9, 2], dtype=np.int64)
    dev = kernels.device(name)
    new = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    k_caches = [new(n_layers, n_kv, s, head_dim) for s in slots]
    v_caches = [new(n_layers, n_kv, s, head_dim) for s in slots]
    q, k, v = new(3, n_heads, head_dim), new(3, n_kv, head_dim), new(3, n_kv, head_dim)
    expected_k, expected_v = [c.copy() for c in k_caches], [c.copy() for c in v_caches]
    expected = []
    for b, start in enumerate(starts):
        rows = slice(b, b + 1)
        expected.append(dev.attention(q[rows], k[rows], v[rows], expected_k[b][layer], expected_v[b][layer],
                                      int(start), window))
        dev.kv_write_(expected_k[b][layer], expected_v[b][layer], int(start), k[rows], v[rows])
    out = dev.decode_attention_(q, k, v, dev.cache_list(k_caches), dev.cache_list(v_caches), layer,
                                starts, window)
    np.testing.assert_array_equal(out, np.concatenate(expected))
    for got, want in zip(k_caches + v_caches, expected_k + expected_v):
        np.testing.assert_array_equal(got, want)
