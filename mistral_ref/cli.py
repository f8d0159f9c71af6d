"""`mistral-ref` command line: one subcommand per function below, registered in `main`."""
from __future__ import annotations

import argparse
import sys

from mistral_ref.errors import MistralRefError


def cmd_fetch(args: argparse.Namespace) -> None:
    """Download the default model (and with --text the default perplexity text) into the cache dir
    and print the paths."""
    from mistral_ref.models import default_model_path, default_text_path

    print(default_model_path())
    if args.text:
        print(default_text_path())


def cmd_info(args: argparse.Namespace) -> None:
    """Print a GGUF file's config and a summary of its tensor types."""
    from collections import Counter

    from mistral_ref.gguf import load_gguf
    from mistral_ref.models import default_model_path

    f = load_gguf(args.model or default_model_path())
    print(f"{f.path} (GGUF v{f.version}, {len(f.tensors)} tensors)")
    for field, value in vars(f.config).items():
        print(f"  {field:16s} {value}")
    types = Counter(t.qtype.name for t in f.tensors.values())
    print("  tensor types     " + ", ".join(f"{n} x{c}" for n, c in types.most_common()))


def cmd_quantize(args: argparse.Namespace) -> None:
    """Requantize a GGUF file to a llama.cpp file type (bytes identical to llama-quantize's)."""
    from collections import Counter

    from mistral_ref.quantize import quantize_file

    types = quantize_file(args.input, args.output, args.type)
    summary = Counter(t.name for t in types.values())
    print(f"{args.output}: {args.type}, " + ", ".join(f"{n} x{c}" for n, c in summary.most_common()))


def cmd_export_hf(args: argparse.Namespace) -> None:
    """Write a GGUF model as a Hugging Face checkpoint directory (safetensors, config, tokenizer)."""
    from mistral_ref.checkpoint import save_checkpoint
    from mistral_ref.models import default_model_path

    print(save_checkpoint(args.model or default_model_path(), args.output, args.dtype,
                          shard_bytes=args.shard_mb << 20 if args.shard_mb else None))


def cmd_synth(args: argparse.Namespace) -> None:
    """Write a Mistral-shaped GGUF file with random weights."""
    from collections import Counter

    from mistral_ref.synth import synth_model

    types = synth_model(args.output, args.preset, args.type, args.sliding_window, args.seed)
    summary = Counter(t.name for t in types.values())
    print(f"{args.output}: {args.preset} {args.type}, "
          + ", ".join(f"{n} x{c}" for n, c in summary.most_common()))


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model over mistral.rs's OpenAI-compatible HTTP API until SIGINT/SIGTERM."""
    from mistral_ref.models import default_model_path
    from mistral_ref.server import serve

    serve(args.model or default_model_path(), host=args.host, port=args.port, api_key=args.api_key,
          model_id=args.model_id, max_queue=args.max_queue, max_running=args.max_running,
          chat_template=args.chat_template, seed=args.seed, shutdown_timeout=args.shutdown_timeout,
          log_level=args.log_level, prefix_cache_n=args.prefix_cache_n, in_situ_quant=args.isq)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat with a model in the terminal (streaming replies, history, /reset, /system, /exit)."""
    from mistral_ref.chat import HELP, chat_loop
    from mistral_ref.models import default_model_path
    from mistral_ref.runner import Runner
    from mistral_ref.which import which_of_path

    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    runner = Runner(which=which_of_path(args.model or default_model_path()),
                    chat_template=args.chat_template, seed=args.seed, in_situ_quant=args.isq)
    print(f"{runner.model_id}: {HELP}")
    chat_loop(runner, input, sys.stdout, system=args.system, max_tokens=args.max_tokens,
              temperature=args.temperature)


def cmd_perplexity(args: argparse.Namespace) -> None:
    """Perplexity of a model on a text by llama.cpp's method; --save-logits / --kl-divergence for
    KL divergence against a base model (llama-perplexity's file format)."""
    import json

    from tqdm import tqdm

    from mistral_ref.distributed import ordered_results
    from mistral_ref.errors import InputError
    from mistral_ref.model import load_model_file
    from mistral_ref.models import default_text_path
    from mistral_ref.perplexity import ChunkScorer, LogProbFile, as_dict, evaluate, text_chunks
    from mistral_ref.tokenizer import Tokenizer

    source = load_model_file(args.model)
    base = LogProbFile.open(args.kl_divergence) if args.kl_divergence else None
    if base is not None:
        if base.n_vocab != source.config.vocab_size:
            raise InputError(f"{args.kl_divergence} has a vocabulary of {base.n_vocab} tokens, the model "
                             f"{source.config.vocab_size}")
        chunks = base.chunks[:args.chunks] if args.chunks else base.chunks
    else:
        text = open(args.text or default_text_path(), encoding="utf-8").read()
        chunks = text_chunks(Tokenizer.of_model(source), text, args.ctx, args.chunks)
    calls = [(chunk, None if base is None else base.data[i], args.save_logits is not None)
             for i, chunk in enumerate(chunks)]
    scores = ordered_results(ChunkScorer, (args.model, args.activations), "score", calls, args.ray,
                             args.workers, args.threads_per_worker)
    with tqdm(total=len(calls), desc="perplexity", unit="chunk", disable=args.json) as bar:
        def on_chunk(running) -> None:
            bar.set_postfix_str(f"PPL {running.ppl:.4f} +/- {running.ppl_stderr:.4f}")
            bar.update()
        result = evaluate(scores, chunks, source.config.vocab_size, base is not None, args.save_logits, on_chunk)
    if args.json:
        print(json.dumps(as_dict(result)))
    elif base is not None:
        print(format_kl_divergence(result))
    else:
        print(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(result.chunk_ppl)))
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f} "
              f"({result.n_scored} tokens scored in {result.n_chunks} chunks of {result.ctx})")


def format_kl_divergence(r) -> str:
    """llama-perplexity's KL-divergence report."""
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {r.ppl:10.6f} ± {r.ppl_stderr:10.6f}",
             f"Mean PPL(base)                : {r.ppl_base:10.6f} ± {r.ppl_base_stderr:10.6f}",
             f"Mean ln(PPL(Q)/PPL(base))     : {r.ln_ppl_ratio:10.6f} ± {r.ln_ppl_ratio_stderr:10.6f}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {r.kld:10.6f} ± {r.kld_stderr:10.6f}"]
    lines += [f"{name:<8}KLD: {value:10.6f}" for name, value in r.kld_percentiles.items()]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * r.p_diff:6.3f} ± {100 * r.p_diff_stderr:5.3f} %"]
    lines += [f"{name:<8}Δp: {100 * value:6.3f}%" for name, value in r.p_diff_percentiles.items()]
    lines += [f"RMS Δp    : {100 * r.rms_p_diff:6.3f} ± {100 * r.rms_p_diff_stderr:5.3f} %",
              f"Same top p: {100 * r.same_top:6.3f} ± {100 * r.same_top_stderr:5.3f} %"]
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> None:
    """Compare mistral-ref with another engine, teacher-forced on the same token ids."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from mistral_ref.compare import Comparer, plot, summary
    from mistral_ref.distributed import ordered_results

    prompts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    results = ordered_results(Comparer, (args.model, args.engine, args.activations), "compare",
                              [(p,) for p in prompts], args.ray, args.workers, args.threads_per_worker)
    report = {"model": str(args.model), "engine": args.engine, "activations": args.activations,
              "restricted": args.engine == "mistralrs",
              "prompts": list(tqdm(results, total=len(prompts), desc=f"compare {args.engine}", unit="prompt"))}
    report["summary"] = summary(report["prompts"])
    Path(args.json).write_text(json.dumps(report, indent=1))
    plot(report, args.plot or Path(args.json).with_suffix(".png"))
    print(json.dumps(report["summary"]))


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="shard the work over a Ray cluster (no address: a local Ray; 'auto': "
                             "the cluster this machine is in; ray://HOST:10001)")
    parser.add_argument("--workers", type=int, default=None, help="Ray actors (default: the cluster's CPUs / threads)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="CPUs (Numba threads) per Ray actor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistral-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help=cmd_fetch.__doc__)
    fetch.add_argument("--text", action="store_true", help="also the default perplexity text (Pride and Prejudice)")
    fetch.set_defaults(func=cmd_fetch)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("model", nargs="?", help="GGUF file (default: the default model)")
    info.set_defaults(func=cmd_info)
    from mistral_ref.quantize import FILE_TYPES  # light: no kernels compiled at import
    quantize = sub.add_parser("quantize", help=cmd_quantize.__doc__)
    quantize.add_argument("input", help="GGUF file to read")
    quantize.add_argument("output", help="GGUF file to write (not the input)")
    quantize.add_argument("--type", required=True, choices=list(FILE_TYPES), help="file type")
    quantize.set_defaults(func=cmd_quantize)
    export = sub.add_parser("export-hf", help=cmd_export_hf.__doc__)
    export.add_argument("output", help="directory to write")
    export.add_argument("--model", help="GGUF file (default: the default model)")
    export.add_argument("--dtype", default="BF16", choices=["F32", "F16", "BF16"])
    export.add_argument("--shard-mb", type=int, default=None, help="split the weights into files of about this size")
    export.set_defaults(func=cmd_export_hf)
    synth = sub.add_parser("synth", help=cmd_synth.__doc__)
    synth.add_argument("output", help="GGUF file to write")
    synth.add_argument("--preset", default="tiny", choices=["tiny", "mistral-1b", "mistral-7b"])
    synth.add_argument("--type", default="Q4_K_M", choices=[t for t in FILE_TYPES if t not in ("F32", "F16")],
                       help="file type")
    synth.add_argument("--sliding-window", type=int, default=None,
                       help="attention window in tokens (default: the preset's; 0: none)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)
    serve = sub.add_parser("serve", help=cmd_serve.__doc__)
    serve.add_argument("--model", help="GGUF file or checkpoint directory (default: the default model)")
    serve.add_argument("--isq", help="quantize the weights while loading (mistral.rs's ISQ names: Q4K, Q8_0, ...)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    serve.add_argument("--model-id", help="the model's name in the API (default: the file's name)")
    serve.add_argument("--max-queue", type=int, default=32, help="requests that may wait (then 503)")
    serve.add_argument("--max-running", "--max-seqs", type=int, default=8,
                       help="requests generating at once, in one batch (mistral.rs: --max-seqs)")
    serve.add_argument("--prefix-cache-n", type=int, default=16,
                       help="sequences whose KV caches the prefix cache keeps (0: off)")
    serve.add_argument("--chat-template", help="Jinja chat template (text or file) replacing the GGUF's")
    serve.add_argument("--seed", type=int, default=None, help="seed of requests that give none")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)
    chat = sub.add_parser("chat", help=cmd_chat.__doc__)
    chat.add_argument("--model", help="GGUF file or checkpoint directory (default: the default model)")
    chat.add_argument("--isq", help="quantize the weights while loading (Q4K, Q8_0, ...)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    chat.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--chat-template", help="Jinja chat template (text or file) replacing the GGUF's")
    chat.set_defaults(func=cmd_chat)
    ppl = sub.add_parser("perplexity", help=cmd_perplexity.__doc__)
    ppl.add_argument("model", help="GGUF file or Hugging Face checkpoint directory")
    ppl.add_argument("--text", help="UTF-8 text file (default: the public-domain text `mistral-ref fetch --text` gets)")
    ppl.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    ppl.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    ppl.add_argument("--activations", default="f32", choices=["f32", "q8"])
    ppl.add_argument("--save-logits", metavar="BASE", help="write the log-probabilities for --kl-divergence")
    ppl.add_argument("--kl-divergence", metavar="BASE", help="compare with a --save-logits file (its tokens)")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    _add_ray_arguments(ppl)
    ppl.set_defaults(func=cmd_perplexity)
    from mistral_ref.compare import ENGINES
    compare = sub.add_parser("compare", help=cmd_compare.__doc__)
    compare.add_argument("model", help="GGUF file (or checkpoint directory for transformers)")
    compare.add_argument("--engine", required=True, choices=ENGINES)
    compare.add_argument("--prompts", required=True, help="text file, one prompt per line")
    compare.add_argument("--activations", default="f32", choices=["f32", "q8"])
    compare.add_argument("--json", default="compare.json", help="report file")
    compare.add_argument("--plot", help="PNG file (default: the report's name with .png)")
    _add_ray_arguments(compare)
    compare.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (MistralRefError, FileNotFoundError) as e:
        print(f"mistral-ref: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
