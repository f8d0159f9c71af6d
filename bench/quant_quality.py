"""Quantization damage on the default model: perplexity and KL divergence of each file type made
by our quantizer, against the F32 file, on Pride and Prejudice.

    python bench/quant_quality.py [--chunks 20] [--ctx 512] [--ray [ADDRESS]]

Makes SmolLM2's F32 file (`mistral-ref quantize --type F32`, from the Q4_1 original), quantizes it
to each TYPES entry, saves the F32 model's log-probabilities, and runs llama.cpp's perplexity and
KL-divergence method on each (f32 activations). Writes docs/figures/quant-quality-smollm2.png
and prints a table (bits per weight from the file sizes).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mistral_ref.distributed import ordered_results
from mistral_ref.model import load_model_file
from mistral_ref.models import default_model_path, default_text_path
from mistral_ref.perplexity import ChunkScorer, LogProbFile, evaluate, text_chunks
from mistral_ref.quantize import quantize_file
from mistral_ref.tokenizer import Tokenizer

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_S", "Q4_K_M")
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "quant-quality-smollm2.png"


def bits_per_weight(path: Path) -> float:
    f = load_model_file(path)
    weights = sum(int(np.prod(t.shape)) for t in f.tensors.values())
    return 8 * sum(t.data.nbytes for t in f.tensors.values()) / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--ray", nargs="?", const="", default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--from-json", type=Path, help="only plot these saved results")
    args = parser.parse_args()
    if args.from_json:
        return plot(json.loads(args.from_json.read_text()), args)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "smollm2-f32.gguf"
        quantize_file(default_model_path(), f32, "F32", progress=False)
        chunks = text_chunks(Tokenizer.of_model(load_model_file(f32)), default_text_path().read_text(encoding="utf-8"),
                             args.ctx, args.chunks)
        base = Path(tmp) / "f32.logits"
        start = time.perf_counter()
        scores = ordered_results(ChunkScorer, (str(f32),), "score", [(c, None, True) for c in chunks], args.ray)
        ref = evaluate(scores, chunks, 49152, save_logits=base)
        print(f"F32     {bits_per_weight(f32):5.2f} bpw  PPL {ref.ppl:8.4f} +/- {ref.ppl_stderr:.4f}  "
              f"({ref.n_scored} tokens, {time.perf_counter() - start:.0f} s)", flush=True)
        rows = LogProbFile.open(base)
        results = {"F32": {"bpw": bits_per_weight(f32), "ppl": ref.ppl, "ppl_stderr": ref.ppl_stderr,
                           "kld": 0.0, "kld_stderr": 0.0, "same_top": 1.0}}
        for file_type in TYPES:
            path = Path(tmp) / f"smollm2-{file_type}.gguf"
            quantize_file(f32, path, file_type, progress=False)
            calls = [(c, rows.data[i], False) for i, c in enumerate(chunks)]
            r = evaluate(ordered_results(ChunkScorer, (str(path),), "score", calls, args.ray), chunks, 49152, True)
            results[file_type] = {"bpw": bits_per_weight(path), "ppl": r.ppl, "ppl_stderr": r.ppl_stderr,
                                  "kld": r.kld, "kld_stderr": r.kld_stderr, "same_top": r.same_top}
            print(f"{file_type:7s} {results[file_type]['bpw']:5.2f} bpw  PPL {r.ppl:8.4f} +/- {r.ppl_stderr:.4f}  "
                  f"KLD {r.kld:.5f} +/- {r.kld_stderr:.5f}  same top {100 * r.same_top:.2f}%", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    plot(results, args)


def plot(results: dict, args: argparse.Namespace) -> None:
    """Perplexity and KL divergence against bits per weight, one colour per file type; the F32
    file as a line (its 32 bits would squash the axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    f32 = results["F32"]
    left.axhline(f32["ppl"], color="grey", linestyle="--", label=f"F32: {f32['ppl']:.2f}")
    for (name, r), colour in zip([(n, r) for n, r in results.items() if n != "F32"], colours):
        left.errorbar(r["bpw"], r["ppl"], yerr=r["ppl_stderr"], fmt="o", color=colour, capsize=3)
        left.annotate(name, (r["bpw"], r["ppl"]), fontsize=8, xytext=(5, 2), textcoords="offset points")
        if r["kld"] > 1e-6:  # Q4_1 is the original's own format: its KLD is 0 within the file's rounding
            right.errorbar(r["bpw"], r["kld"], yerr=r["kld_stderr"], fmt="o", color=colour, capsize=3)
            right.annotate(name, (r["bpw"], r["kld"]), fontsize=8, xytext=(5, 2), textcoords="offset points")
    left.set(xlabel="bits per weight (whole file)", ylabel="perplexity (± standard error)",
             title=f"SmolLM2-135M-Instruct on Pride and Prejudice, {args.chunks} x {args.ctx} tokens")
    right.set(xlabel="bits per weight (whole file)", ylabel="mean KL divergence from F32", yscale="log",
              title="KL divergence from the F32 file (llama.cpp's method)")
    left.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)
    print(f"wrote {FIGURE}")


if __name__ == "__main__":
    main()
