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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistral-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help=cmd_fetch.__doc__).set_defaults(func=cmd_fetch)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("model", nargs="?", help="GGUF file (default: the default model)")
    info.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (MistralRefError, FileNotFoundError) as e:
        print(f"mistral-ref: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
