"""`mistral-ref` command line: one subcommand per function below, registered in `main`."""
from __future__ import annotations

import argparse
import sys

from mistral_ref.errors import MistralRefError


def cmd_fetch(args: argparse.Namespace) -> None:
    """Download the default model into the cache dir and print its path."""
    from mistral_ref.models import default_model_path

    print(default_model_path())


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
          log_level=args.log_level, prefix_cache_n=args.prefix_cache_n)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat with a model in the terminal (streaming replies, history, /reset, /system, /exit)."""
    from mistral_ref.chat import HELP, chat_loop
    from mistral_ref.models import default_model_path
    from mistral_ref.runner import Runner, Which

    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    runner = Runner(which=Which.GGUF(str(args.model or default_model_path())),
                    chat_template=args.chat_template, seed=args.seed)
    print(f"{runner.model_id}: {HELP}")
    chat_loop(runner, input, sys.stdout, system=args.system, max_tokens=args.max_tokens,
              temperature=args.temperature)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistral-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help=cmd_fetch.__doc__).set_defaults(func=cmd_fetch)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("model", nargs="?", help="GGUF file (default: the default model)")
    info.set_defaults(func=cmd_info)
    from mistral_ref.quantize import FILE_TYPES  # light: no kernels compiled at import
    quantize = sub.add_parser("quantize", help=cmd_quantize.__doc__)
    quantize.add_argument("input", help="GGUF file to read")
    quantize.add_argument("output", help="GGUF file to write (not the input)")
    quantize.add_argument("--type", required=True, choices=list(FILE_TYPES), help="file type")
    quantize.set_defaults(func=cmd_quantize)
    synth = sub.add_parser("synth", help=cmd_synth.__doc__)
    synth.add_argument("output", help="GGUF file to write")
    synth.add_argument("--preset", default="tiny", choices=["tiny", "mistral-1b", "mistral-7b"])
    synth.add_argument("--type", default="Q4_K_M", choices=list(FILE_TYPES), help="file type")
    synth.add_argument("--sliding-window", type=int, default=None,
                       help="attention window in tokens (default: the preset's; 0: none)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)
    serve = sub.add_parser("serve", help=cmd_serve.__doc__)
    serve.add_argument("--model", help="GGUF file (default: the default model)")
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
    chat.add_argument("--model", help="GGUF file (default: the default model)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    chat.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--chat-template", help="Jinja chat template (text or file) replacing the GGUF's")
    chat.set_defaults(func=cmd_chat)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (MistralRefError, FileNotFoundError) as e:
        print(f"mistral-ref: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
