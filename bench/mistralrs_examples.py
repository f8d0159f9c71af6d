"""Run mistral.rs's Python examples against mistral-ref, changing only the import and the model
location, and report which run.

    python bench/mistralrs_examples.py MISTRALRS_SOURCE [--only NAME ...] [--timeout S]

MISTRALRS_SOURCE is a checkout of github.com/EricLBuehler/mistral.rs (its examples/python/*.py,
run with the checkout as the working directory, since some read files from it). The text
examples are the ones that send no image or audio and ask for no embedding, image or speech
(`NOT_TEXT`). Each runs
in its own process after these edits, and no others:
  - `mistralrs` imports become `mistral_ref` imports;
  - Which.Plain's `model_id` becomes a Hugging Face checkpoint directory: the default model
    (SmolLM2-135M-Instruct) exported with `mistral-ref export-hf` (BF16); for an example whose
    `arch=` is Architecture.Qwen3 or .SmolLm3, the same weights dressed as that architecture
    (`as_architecture`: Qwen3 with q/k norms of ones, SmolLM3 with every 4th layer's RoPE
    left out), since no such model reaches this machine: the API runs, the text is SmolLM2's,
    somewhat changed;
  - Which.GGUF's `quantized_model_id` / `quantized_filename` become the default model's GGUF
    file, and `tok_model_id` that checkpoint directory.
An example passes when it exits with status 0. Prints a table; --json writes the results.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what makes an example not a text-generation one: images or audio in, embeddings, images or
# speech out
NOT_TEXT = re.compile(r"image_url|audio_url|Which\.(Embedding|DiffusionPlain|Speech)\b|generate_(image|audio)")


def rewrite(source: str, checkpoint: Path, gguf: Path) -> str:
    """An example's source with mistral-ref's import and local model paths."""
    source = re.sub(r"^from mistralrs import", "from mistral_ref import", source, flags=re.M)
    source = re.sub(r"^import mistralrs$", "import mistral_ref as mistralrs", source, flags=re.M)
    replacements = {"model_id": checkpoint, "tok_model_id": checkpoint,
                    "quantized_model_id": gguf.parent, "quantized_filename": gguf.name}
    for field, value in replacements.items():
        source = re.sub(rf"\b{field}=(\"[^\"]*\"|'[^']*')", f"{field}={str(value)!r}", source)
    return source


def as_architecture(checkpoint: Path, arch: str, dst: Path) -> Path:
    """`checkpoint` (a llama model) as a `arch` ("qwen3" or "smollm3") checkpoint of the same
    weights: its files linked, config.json rewritten, Qwen3's q/k norms (ones) in a second file."""
    import numpy as np
    from mistral_ref.checkpoint import HF_CLASSES, write_safetensors

    dst.mkdir(parents=True, exist_ok=True)
    for file in checkpoint.iterdir():
        if file.name != "config.json" and not (dst / file.name).exists():
            (dst / file.name).symlink_to(file)
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(model_type=arch, architectures=[HF_CLASSES[arch]], use_sliding_window=False, sliding_window=None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if arch == "qwen3":
        norms = [(f"model.layers.{i}.self_attn.{n}.weight", "F32", (config["head_dim"],))
                 for i in range(config["num_hidden_layers"]) for n in ("q_norm", "k_norm")]
        # a second *.safetensors file: the loader reads every one in a directory without an index
        write_safetensors(dst / "qk_norm.safetensors", norms, lambda name: np.ones(config["head_dim"], np.float32))
    return dst


def last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors or lines or [""])[-1][:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a mistral.rs checkout")
    parser.add_argument("--only", nargs="*", help="example names (without .py)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    from mistral_ref.checkpoint import save_checkpoint
    from mistral_ref.models import cache_dir, default_model_path

    gguf = default_model_path()
    checkpoint = cache_dir() / "SmolLM2-135M-Instruct-hf"
    if not (checkpoint / "config.json").is_file():
        save_checkpoint(gguf, checkpoint, "BF16")
    dressed = {arch: as_architecture(checkpoint, arch.lower(), cache_dir() / f"SmolLM2-135M-Instruct-as-{arch.lower()}")
               for arch in ("Qwen3", "SmolLm3")}
    examples = sorted((args.source / "examples" / "python").glob("*.py"))
    if args.only:
        examples = [e for e in examples if e.stem in args.only]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for example in examples:
            text = example.read_text()
            if NOT_TEXT.search(text):
                continue
            script = Path(tmp) / f"example_{example.name}"  # "gguf.py" would shadow the gguf package
            arch = re.search(r"\barch=Architecture\.(\w+)", text)
            script.write_text(rewrite(text, dressed.get(arch and arch.group(1), checkpoint), gguf))
            start = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, str(script)], cwd=args.source, capture_output=True,
                                      text=True, timeout=args.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                ok, detail = proc.returncode == 0, last_error(proc.stderr) if proc.returncode else proc.stdout.strip()[-120:]
            except subprocess.TimeoutExpired:
                ok, detail = False, f"timed out after {args.timeout:.0f} s"
            seconds = time.perf_counter() - start
            results.append({"example": example.stem, "ok": ok, "seconds": round(seconds, 1), "detail": detail})
            print(f"{'PASS' if ok else 'FAIL'} {example.stem:28s} {seconds:6.1f} s  {detail!r}", flush=True)
    print(f"\n{sum(r['ok'] for r in results)} of {len(results)} text examples run")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
