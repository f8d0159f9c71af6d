"""Tokenizer agreement and speed vs the oracles.

Corpus: the Python standard library's email package source cut into 2,000-character chunks, plus
seeded random strings over a mixed alphabet (ASCII, whitespace runs, emoji, CJK, accents, random BMP
code points). Reports ids-identical counts and tokens/s for:
  Mistral v1 SentencePiece (GGUF metadata from tokenizer.model.v1) vs `sentencepiece`
  SmolLM2 byte-level BPE (GGUF) vs the `mistralrs` wheel's Runner.tokenize_text (when installed)

Usage: python bench/tokenizer_speed.py [--random N] [--repeat R]
"""
from __future__ import annotations

import argparse
import email
import random
import time
from pathlib import Path
from typing import Callable

from mistral_ref.models import default_model_path, mistral_v1_tokenizer_path
from mistral_ref.tokenizer import Tokenizer, sentencepiece_gguf_metadata


def corpus(n_random: int) -> list[str]:
    texts = []
    for path in sorted(Path(email.__file__).parent.glob("*.py")):
        src = path.read_text(encoding="utf-8")
        texts += [src[i:i + 2000] for i in range(0, len(src), 2000)]
    rng = random.Random(0)
    alphabet = ("ab Z\n\t  😀你好éñ\u200b<|>'s0123[]/"
                + "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(200)))
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200))) for _ in range(n_random)]
    return texts


def tokens_per_second(encode: Callable[[str], list[int]], texts: list[str], repeat: int) -> tuple[float, float]:
    """(first pass, best of `repeat` passes) in tokens/s. The first pass is the honest number: the
    `tokenizers` backends cache words, so later passes over the same texts are partly lookups."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        n = sum(len(encode(t)) for t in texts)
        times.append(time.perf_counter() - start)
    return n / times[0], n / min(times)


def compare(name: str, ours: Callable[[str], list[int]], oracle: Callable[[str], list[int]],
            texts: list[str], repeat: int) -> None:
    # Speed first, on cold tokenizers; the agreement pass would warm their caches.
    ours_cold, ours_warm = tokens_per_second(ours, texts, repeat)
    oracle_cold, oracle_warm = tokens_per_second(oracle, texts, repeat)
    same = sum(ours(t) == oracle(t) for t in texts)
    print(f"{name}: ids identical on {same} of {len(texts)} texts\n"
          f"  tokens/s, one text per call, first pass / best of {repeat}: "
          f"ours {ours_cold:,.0f} / {ours_warm:,.0f}, oracle {oracle_cold:,.0f} / {oracle_warm:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, default=3000, help="number of random strings")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    texts = corpus(args.random)

    import sentencepiece
    spm_path = str(mistral_v1_tokenizer_path())
    spm_tok = Tokenizer.from_metadata(sentencepiece_gguf_metadata(spm_path))
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    compare("Mistral v1 SPM vs sentencepiece", spm_tok.encode, sp.encode, texts, args.repeat)

    try:
        import mistralrs
    except ImportError:
        print("SmolLM2 vs mistralrs: skipped (pip install mistralrs)")
        return
    path = default_model_path()
    smol_tok = Tokenizer.from_gguf(path)
    runner = mistralrs.Runner(which=mistralrs.Which.GGUF(quantized_model_id=str(path.parent),
                                                         quantized_filename=path.name),
                              token_source="none")
    compare("SmolLM2 BPE vs mistralrs", lambda t: smol_tok.encode(t, parse_special=True),
            lambda t: runner.tokenize_text(t, False, None), texts, args.repeat)


if __name__ == "__main__":
    main()
