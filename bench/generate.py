"""End-to-end greedy generation speed of one GGUF file: prefill and decode tokens/s, first-token
latency (cold and warm), peak RSS and effective weight bandwidth; with --compare the same file on
llama-cpp-python and mistralrs at the same thread count, with ratios ours / theirs.

Usage: python bench/generate.py [--model PATH] [--prompt-tokens 128] [--gen-tokens 128]
           [--threads N] [--repeat 3] [--compare] [--activations f32|q8] [--profile] [--plot PNG]

Every engine runs in its own subprocess (this script with --worker ENGINE), so the peak RSS
(VmHWM) is that engine's alone. Ours runs twice: first with NUMBA_CACHE_DIR pointing at a fresh
temporary directory, so its first token includes compiling every kernel (cold), then again on
that now-filled cache (warm; the repo's own cache is never touched). For the other engines "cold"
is the first request after loading the model. Decode tok/s = (generated - 1) / time after the
first token. --profile instead times one decode step of ours kernel call by kernel call.
"""
from __future__ import annotations

import argparse
import contextlib
import heapq
import inspect
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bandwidth import read_gbs  # bench/, this script's folder

THREAD_ENV = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "RAYON_NUM_THREADS")  # Numba, numpy's OpenBLAS, llama.cpp's OpenMP, mistralrs's rayon
ENGINES = ("ours", "llama.cpp", "mistralrs")


def prose() -> str:
    """Real English text, fixed by the Python version: the Zen of Python and heapq's essay."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    zen = "".join(this.d.get(c, c) for c in this.s)
    return zen + "\n\n" + heapq.__about__


def prompt_text(model: Path, n_tokens: int) -> str:
    """A prefix of `prose()` that is `n_tokens` tokens long in the model's own tokenizer (special
    tokens such as BOS included), so every engine tokenizes it to (about) the same length."""
    from mistral_ref import Tokenizer
    tok = Tokenizer.from_gguf(model)
    text = prose()
    while len(tok.encode(text, add_special_tokens=True)) < n_tokens:
        text += "\n\n" + prose()
    ids = tok.encode(text, add_special_tokens=True)[:n_tokens]
    return tok.decode(ids, skip_special_tokens=True)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- one engine per process: each returns the prompt length and (first-token s, decode s) per run -
def run_ours(args, text: str) -> dict:
    import numba
    numba.set_num_threads(args.threads)
    from mistral_ref import Tokenizer
    from mistral_ref.model import Model
    ids = Tokenizer.from_gguf(args.model).encode(text, add_special_tokens=True)
    t = time.perf_counter()
    model = Model.from_gguf(args.model, **activations_option(args))
    load_s = time.perf_counter() - t
    runs = []
    for _ in range(args.runs):
        cache = model.new_cache(len(ids) + args.gen_tokens)
        t0 = time.perf_counter()
        token = int(np.argmax(model.forward(ids, cache)))
        t1 = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            token = int(np.argmax(model.forward([token], cache)))
        runs.append((t1 - t0, time.perf_counter() - t1))
    return dict(prompt_tokens=len(ids), load_s=load_s, runs=runs)


def run_llama_cpp(args, text: str) -> dict:
    import llama_cpp
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(args.model), n_threads=args.threads,
                          n_threads_batch=args.threads, n_ctx=args.prompt_tokens + args.gen_tokens + 64,
                          n_batch=max(512, args.prompt_tokens), logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # argmax of the last evaluated position's logits
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    runs = []
    for _ in range(args.runs):
        llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        t0 = time.perf_counter()
        llm.eval(ids)
        token = next_token()
        t1 = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            llm.eval([token])
            token = next_token()
        runs.append((t1 - t0, time.perf_counter() - t1))
    return dict(prompt_tokens=len(ids), load_s=load_s, runs=runs)


def run_mistralrs(args, text: str) -> dict:
    import mistralrs
    t = time.perf_counter()
    runner = mistralrs.Runner(
        which=mistralrs.Which.GGUF(quantized_model_id=str(args.model.parent),
                                   quantized_filename=args.model.name),
        token_source="none", prefix_cache_n=0)  # no prefix cache: every run prefills the prompt
    load_s = time.perf_counter() - t
    runs, prompt_tokens = [], None
    for _ in range(args.runs):
        response = runner.send_completion_request(mistralrs.CompletionRequest(
            prompt=text, model="default", max_tokens=args.gen_tokens, temperature=0.0,
            ignore_eos=True))
        usage = response.usage
        if usage.completion_tokens != args.gen_tokens:
            raise RuntimeError(f"mistralrs generated {usage.completion_tokens} tokens, "
                               f"asked for {args.gen_tokens}")
        prompt_tokens = usage.prompt_tokens
        # Its prompt time ends with the first token; its completion time covers the rest.
        runs.append((usage.total_prompt_time_sec, usage.total_completion_time_sec))
    return dict(prompt_tokens=prompt_tokens, load_s=load_s, runs=runs)


RUNNERS = {"ours": run_ours, "llama.cpp": run_llama_cpp, "mistralrs": run_mistralrs}
MODULES = {"ours": "numba", "llama.cpp": "llama_cpp", "mistralrs": "mistralrs"}


def activations_option(args) -> dict:
    """{"activations": ..., "load": ...} for the flags given; an error if the model cannot take
    them yet (the script also measures older checkouts)."""
    from mistral_ref.model import Model
    options = {name: getattr(args, name) for name in ("activations", "load") if getattr(args, name)}
    for name in options:
        if name not in inspect.signature(Model.from_gguf).parameters:
            sys.exit(f"--{name}: this mistral_ref's Model.from_gguf has no {name}= option yet")
    return options


def worker(args) -> None:
    result = RUNNERS[args.worker](args, sys.stdin.read())
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, engine: str, text: str, runs: int, env: dict[str, str]) -> dict:
    """Run one engine in a fresh process; returns its RESULT dict."""
    command = [sys.executable, __file__, "--worker", engine, "--model", str(args.model),
               "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
               "--threads", str(args.threads), "--runs", str(runs)]
    if args.activations:
        command += ["--activations", args.activations]
    if args.load:
        command += ["--load", args.load]
    proc = subprocess.run(command, input=text, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{engine} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def summarize(args, engine: str, result: dict, cold: dict | None, tensor_bytes: int) -> dict:
    """Medians over the warm runs (all but the first); "cold" is the first run of `cold`."""
    runs = result["runs"][1:] or result["runs"]
    first = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    per_token = decode / max(1, args.gen_tokens - 1)
    return dict(engine=engine, prompt=result["prompt_tokens"],
                prefill=result["prompt_tokens"] / first,
                decode=(args.gen_tokens - 1) / decode if args.gen_tokens > 1 else float("nan"),
                cold=(cold or result)["runs"][0][0], warm=first, load=result["load_s"],
                rss=result["peak_rss_mb"], gbs=tensor_bytes / per_token / 1e9,
                of_read=100 * tensor_bytes / per_token / 1e9 / args.read_gbs)


COLUMNS = [("prompt", "prompt", "{:.0f}"), ("prefill", "prefill tok/s", "{:.1f}"),
           ("decode", "decode tok/s", "{:.2f}"), ("cold", "1st tok cold s", "{:.3f}"),
           ("warm", "1st tok warm s", "{:.3f}"), ("load", "load s", "{:.2f}"),
           ("rss", "peak RSS MB", "{:.0f}"), ("gbs", "weights GB/s", "{:.2f}"),
           ("of_read", "% of read GB/s", "{:.0f}")]


def print_table(rows: list[dict]) -> None:
    print("| engine | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for row in rows:
        print(f"| {row['engine']} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS)
              + " |")
    ours = rows[0]
    for theirs in rows[1:]:
        print(f"| ours / {theirs['engine']} | " + " | ".join(
            "" if key == "prompt" else f"{ours[key] / theirs[key]:.2f}x" for key, _, _ in COLUMNS)
            + " |")


def cpu_name() -> str:
    """The CPU's model name and widest vector extension (machines of one name differ)."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    vector = ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags
              else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{name}, {vector}, {os.cpu_count()} cores"


def save_plot(args, rows: list[dict], path: Path) -> None:
    """Prefill and decode tok/s of each engine as bars, with the run's settings in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in zip(axes, ("prefill", "decode"), ("prefill tok/s", "decode tok/s")):
        bars = ax.bar([r["engine"] for r in rows], [r[key] for r in rows],
                      color=["tab:blue"] + ["tab:gray"] * (len(rows) - 1))
        ax.bar_label(bars, fmt="%.1f")
        ax.margins(y=0.15)
        ax.set_title(title)
    fig.suptitle(f"{args.model.name}, {args.prompt_tokens} + {args.gen_tokens} tokens, "
                 f"{args.threads} threads, activations {args.activations or 'default'}\n"
                 f"{cpu_name()}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"# plot: {path}")


def bench(args) -> None:
    from mistral_ref.gguf import load_gguf
    tensor_bytes = sum(t.data.nbytes for t in load_gguf(args.model).tensors.values())
    text = prompt_text(args.model, args.prompt_tokens)
    env = {**os.environ, **{name: str(args.threads) for name in THREAD_ENV}}
    args.read_gbs = read_gbs(args.threads)
    print(f"# {args.model.name}: {tensor_bytes / 1e9:.3f} GB of tensors; {args.prompt_tokens} prompt "
          f"+ {args.gen_tokens} generated tokens, {args.threads} threads, median of "
          f"{args.repeat} warm runs; activations {args.activations or 'default'}, load "
          f"{args.load or 'default'}; this machine reads {args.read_gbs:.1f} GB/s with "
          f"{args.threads} threads (bench/bandwidth.py); load average at start "
          f"{os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="numba-cold-") as numba_cache:
        cold_env = {**env, "NUMBA_CACHE_DIR": numba_cache}
        cold = spawn(args, "ours", text, 1, cold_env)
        rows.append(summarize(args, "ours", spawn(args, "ours", text, args.repeat + 1, cold_env),
                              cold, tensor_bytes))
    for engine in ENGINES[1:] if args.compare else ():
        try:
            __import__(MODULES[engine])
        except ImportError:
            print(f"# {engine}: not installed ({MODULES[engine]}), skipped")
            continue
        rows.append(summarize(args, engine, spawn(args, engine, text, args.repeat + 1, env), None,
                              tensor_bytes))
    print_table(rows)
    save_plot(args, rows, args.plot or Path(__file__).parent.parent / "docs" / "figures" /
              f"generate-{args.model.stem}-{args.activations or 'default'}.png")
    print(f"# load average at end {os.getloadavg()[0]:.1f} (other processes share the cores)")
    print("# weights GB/s = file's tensor bytes / decode time per token (every weight is read once "
          "per token; the input embedding only one row of it, so untied-output models overstate)")


def profile(args) -> None:
    """Time one decode step of ours per kernel call, by wrapping the kernel entry points."""
    import numba
    numba.set_num_threads(args.threads)
    import mistral_ref_kernels as kernels
    from mistral_ref import Tokenizer
    from mistral_ref.model import Model
    model = Model.from_gguf(args.model, **activations_option(args))
    ids = Tokenizer.from_gguf(args.model).encode(prompt_text(args.model, args.prompt_tokens),
                                                 add_special_tokens=True)
    # (object, attribute, label): every operation of the model's device (the forward pass calls
    # nothing else), and inside kernels.matmul and kernels.attention the compiled kernels they wrap
    # (indented labels: already counted in their caller).
    dev = model.device
    operations = ("embed", "matmul", "matmuls", "rmsnorm", "rope", "attention", "decode_attention_",
                  "kv_write_", "add_", "swiglu")
    points = [(dev, name, f"device.{name}") for name in operations if hasattr(dev, name)]
    points.append((kernels.dispatch.cpu_ops, "attention", "  numba attention kernel"))
    points.append((kernels.dispatch.FusedQ8, "__call__", "  numba matmul kernels (q8 activations)"))
    kernel_maps = [(kernels.dispatch.CPU_MATVEC, "  numba matvec kernels (f32 activations)")]
    spent = {label: [0, 0.0] for _, _, label in points + [(None, None, label) for _, label in kernel_maps]}

    def timed(fn, label):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                entry = spent[label]
                entry[0] += 1
                entry[1] += time.perf_counter() - t
        return wrapper

    cache = model.new_cache(len(ids) + args.gen_tokens + 1)
    token = int(np.argmax(model.forward(ids, cache)))
    for _ in range(3):  # warm-up: JIT cache loads, page faults
        token = int(np.argmax(model.forward([token], cache)))
    steps = max(1, args.gen_tokens - 4)
    plain = []
    for _ in range(steps // 2):
        t = time.perf_counter()
        token = int(np.argmax(model.forward([token], cache)))
        plain.append(time.perf_counter() - t)
    originals = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in points]
    map_originals = [(kernel_map, dict(kernel_map)) for kernel_map, _ in kernel_maps]
    for obj, name, label in points:
        setattr(obj, name, timed(getattr(obj, name), label))
    for kernel_map, label in kernel_maps:
        kernel_map.update({t: timed(fn, label) for t, fn in kernel_map.items()})
    try:
        n = steps - steps // 2
        t = time.perf_counter()
        for _ in range(n):
            token = int(np.argmax(model.forward([token], cache)))
        total = (time.perf_counter() - t) / n
    finally:
        for obj, name, fn in originals:  # the device's methods live on its class: drop the shadow
            setattr(obj, name, fn) if fn is not None else delattr(obj, name)
        for kernel_map, original in map_originals:
            kernel_map.update(original)
    step = statistics.median(plain)
    print(f"# {args.model.name}: one decode step at position ~{len(ids)}, {args.threads} threads; "
          f"{step * 1e3:.2f} ms unwrapped (median of {len(plain)}), {total * 1e3:.2f} ms wrapped "
          f"(mean of {n})")
    print("| call | calls/token | µs/call | ms/token | % of step |\n|---|---|---|---|---|")
    for label, (calls, seconds) in spent.items():
        if calls:
            print(f"| {label} | {calls / n:.0f} | {seconds / calls * 1e6:.1f} | "
                  f"{seconds / n * 1e3:.3f} | {100 * seconds / n / total:.1f} |")
    top = sum(spent[label][1] for _, _, label in points if not label.startswith(" "))
    print(f"| rest (model.py Python, argmax, logits copy) | | | {(total - top / n) * 1e3:.3f} "
          f"| {100 * (1 - top / n / total):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3, help="warm runs per engine (median)")
    parser.add_argument("--compare", action="store_true", help="also llama-cpp-python, mistralrs")
    parser.add_argument("--activations", choices=("f32", "q8"),
                        help="our matmul input precision (passed to Model.from_gguf when given)")
    parser.add_argument("--load", choices=("mmap", "copy"),
                        help="how we hold the weights (passed to Model.from_gguf when given)")
    parser.add_argument("--profile", action="store_true", help="time one decode step by kernel")
    parser.add_argument("--plot", type=Path,
                        help="where to save the plot (default: docs/figures/generate-MODEL-ACT.png)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prompt_tokens < 1 or args.gen_tokens < 2:
        parser.error("need --prompt-tokens >= 1 and --gen-tokens >= 2")
    if args.model is None:
        from mistral_ref.models import default_model_path
        args.model = default_model_path()
    args.model = args.model.resolve()
    if args.worker:
        worker(args)
    elif args.profile:
        profile(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
