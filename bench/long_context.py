"""Decode speed against context length: one-token steps at positions up to 4096, mistral-ref (q8)
and llama.cpp (llama-cpp-python) on the same file in the same run.

    python bench/long_context.py [--model GGUF] [--positions 256 1024 2048 4096] [--steps 16]

A long context makes a decode step read the KV cache as well as the weights: at 4096 positions
SmolLM2's cache is 184 MB per token (30 layers, K and V, 3 KV heads of 64 floats), 50x its
Q4_1 weights. Each engine reads the prompt of random tokens up to each position, then times
`--steps` single-token steps (median). Writes docs/figures/long-context-smollm2.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mistral_ref.model import Model
from mistral_ref.models import default_model_path

FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "long-context-smollm2.png"


def ours(path: Path, tokens: np.ndarray, positions: list[int], steps: int) -> list[float]:
    model = Model.from_gguf(path, activations="q8")
    cache = model.new_cache(positions[-1] + steps + 1)
    out = []
    for pos in positions:
        model.forward(tokens[cache.length:pos], cache)
        times = []
        for s in range(steps):
            start = time.perf_counter()
            model.forward(tokens[pos + s:pos + s + 1], cache)
            times.append(time.perf_counter() - start)
        cache.length = pos  # the next prompt continues where this one stopped
        out.append(float(np.median(times)))
    return out


def llama_cpp(path: Path, tokens: np.ndarray, positions: list[int], steps: int) -> list[float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=positions[-1] + steps + 1, n_batch=512, verbose=False)
    out = []
    llm.reset()
    for pos in positions:
        llm.eval([int(t) for t in tokens[llm.n_tokens:pos]])
        times = []
        for s in range(steps):
            start = time.perf_counter()
            llm.eval([int(tokens[pos + s])])
            times.append(time.perf_counter() - start)
        llm.n_tokens = pos  # rewind: the steps' cells are overwritten by the next prompt
        out.append(float(np.median(times)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--positions", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    path = args.model or default_model_path()
    tokens = np.random.default_rng(0).integers(100, 40000, max(args.positions) + args.steps + 1)
    ref = ours(path, tokens, args.positions, args.steps)
    other = llama_cpp(path, tokens, args.positions, args.steps)
    print(f"{'position':>8} {'mistral-ref ms':>15} {'llama.cpp ms':>13}")
    for i, pos in enumerate(args.positions):
        print(f"{pos:8d} {1000 * ref[i]:15.1f} {1000 * other[i] if other else float('nan'):13.1f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(args.positions, [1000 * t for t in ref], "o-", label="mistral-ref (q8)")
    if other:
        ax.plot(args.positions, [1000 * t for t in other], "s-", label="llama.cpp (llama-cpp-python)")
    ax.set(xlabel="position (tokens in the KV cache)", ylabel="decode step (ms, median)",
           title=f"{path.name}: decode against context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)
    print(f"wrote {FIGURE}")


if __name__ == "__main__":
    main()
