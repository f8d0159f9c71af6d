"""HTTP server under concurrency (continuous batching): aggregate tokens/s at 1, 2, 4 and 8
concurrent streams, time to first token (TTFT) alone and while 7 other streams run, n=4 against
n=1, and the prefix cache on the second turn of a chat with a long first prompt.

Starts `mistral-ref serve` on a free loopback port. Every request's prompt carries a nonce, so
the prefix cache helps only where it is measured (the chat's second turn). With
`--llama-server PATH` llama.cpp's own server (continuous batching, `-np` slots, its prompt cache)
runs the same measurements on the same file, one engine at a time. (mistralrs 0.9.5's Python
Runner is not safe to call from several threads, "RuntimeError: Already borrowed", and
llama-cpp-python's server runs one request at a time.) The streams are one asyncio client's
(`async_client`, as the official openai client's), so the bench takes little of the CPUs it
shares with the server. TTFT: from sending the request to the first `data:` line with text.
Saves a plot to docs/figures. Usage:

    python bench/serve.py                      # tiny random Mistral (real Mistral tokenizer)
    python bench/serve.py --model default      # SmolLM2-135M-Instruct Q4_1
    python bench/serve.py --model m1b.gguf --plot docs/figures/serve-1b.png
    python bench/serve.py --model default --llama-server llama.cpp/build/bin/llama-server
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

STORY = "Write a short story about a lighthouse keeper."
LONG_CONTEXT = ("The lighthouse stood on a rock at the mouth of the bay, and every night its keeper climbed "
                "the hundred and twelve steps to light the lamp, trim the wick and wind the clockwork that "
                "turned the lens. ") * 12  # ~500 tokens with the system prompt and template
_nonce = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], port: int) -> tuple[subprocess.Popen, str]:
    """Run `command` (a server on `port`) until its /health answers 200."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{command[0]} did not start within 180 s")


def ours(model: Path, max_running: int) -> tuple[list[str], int]:
    port = free_port()
    return [sys.executable, "-m", "mistral_ref.cli", "serve", "--model", str(model), "--port", str(port),
            "--log-level", "warning", "--max-running", str(max_running)], port


def llama_server(binary: str, model: Path, max_running: int) -> tuple[list[str], int]:
    """llama.cpp's server: one slot per stream, each with room for the long chat below."""
    port = free_port()
    return [binary, "-m", str(model), "--port", str(port), "-t", str(os.cpu_count()),
            "-np", str(max_running), "-c", str(1024 * max_running)], port


def fresh(text: str = STORY) -> list[dict]:
    """A one-message chat no earlier request began with (the prefix cache cannot help it)."""
    return [{"role": "user", "content": f"({next(_nonce)}) {text}"}]


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int,
                      started: asyncio.Event | None = None) -> tuple[float, float, int, str]:
    """(TTFT s, total s, completion tokens, text) of one greedy streamed chat request."""
    body = {"model": "", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    ttft, tokens, text, pieces = None, 0, "", 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text += chunk["choices"][0]["delta"]["content"]
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
                    if started is not None:
                        started.set()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    # llama-server streams no usage: one chunk per token there
    return (ttft if ttft is not None else float("nan")), time.perf_counter() - start, tokens or pieces, text


def async_client(connections: int = 1) -> httpx.AsyncClient:
    """An async HTTP client (what the official openai client uses) with a pool of `connections`:
    every stream in one thread, one event loop. (A thread per stream, each with its own client,
    had cost this process a third of a core at 8 streams, taken from the server on these 2 cores;
    and httpx builds an SSL context for every new client, ~20 ms, once counted in each TTFT.)
    A connection per request (no keep-alive): llama-server closes a connection after a stream
    without saying so, and the next request sent on it failed ("Server disconnected")."""
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=connections,
                                                              max_keepalive_connections=0))


def throughput(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent streams, each sending `requests` streamed requests one after another."""
    async def run() -> tuple[list, float]:
        async with async_client(clients) as http:
            async def one_client() -> list:
                return [await stream_chat(http, url, fresh(), max_tokens) for _ in range(requests)]
            start = time.perf_counter()
            results = await asyncio.gather(*(one_client() for _ in range(clients)))
            return [r for rs in results for r in rs], time.perf_counter() - start
    results, wall = asyncio.run(run())
    return {"clients": clients, "tok_per_s": sum(r[2] for r in results) / wall,
            "ttft_p50_s": statistics.median(r[0] for r in results)}


def ttft_under_load(url: str, others: int, repeats: int = 7) -> tuple[float, float]:
    """Median TTFT of a request alone, and of one sent while `others` streams are generating."""
    async def run() -> tuple[list, list]:
        async with async_client(others + 1) as http:
            alone = [(await stream_chat(http, url, fresh(), 1))[0] for _ in range(repeats)]
            loaded = []
            for _ in range(repeats):
                events = [asyncio.Event() for _ in range(others)]
                streams = [asyncio.create_task(stream_chat(http, url, fresh(), 96, e)) for e in events]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
                loaded.append((await stream_chat(http, url, fresh(), 1))[0])
                await asyncio.gather(*streams)
            return alone, loaded
    alone, loaded = asyncio.run(run())
    return statistics.median(alone), statistics.median(loaded)


def chat(url: str, messages: list[dict], max_tokens: int) -> tuple[float, float, int, str]:
    """stream_chat alone, from synchronous code."""
    async def run() -> tuple[float, float, int, str]:
        async with async_client() as http:
            return await stream_chat(http, url, messages, max_tokens)
    return asyncio.run(run())


def n_choices_cost(url: str, n: int, max_tokens: int) -> float:
    body = {"model": "", "messages": fresh(), "max_tokens": max_tokens, "temperature": 1.0, "seed": 1, "n": n}
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        r = client.post(url + "/v1/chat/completions", json=body)
        wall = time.perf_counter() - start
    r.raise_for_status()
    if len(r.json()["choices"]) != n:
        raise ValueError(f"asked for n={n}, got {len(r.json()['choices'])} choices")
    return wall


def second_turn(url: str) -> tuple[float, float]:
    """TTFT of a chat's first turn (a ~550-token prompt) and of its second turn."""
    turn1 = [{"role": "system", "content": f"({next(_nonce)}) {LONG_CONTEXT}"},
             {"role": "user", "content": "How many steps did the keeper climb?"}]
    ttft1, _, _, reply = chat(url, turn1, 16)
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "And why?"}]
    return ttft1, chat(url, turn2, 1)[0]


def measure(name: str, command: list[str], port: int, levels: list[int], args) -> dict:
    """Every measurement on one engine's server, printed as it comes."""
    proc, url = start_server(command, port)
    nan = float("nan")
    try:
        for clients in (1, 2):  # warm up: every kernel loaded (a batch's too), first-call dispatch done
            throughput(url, clients, 1, 4)
        print(f"-- {name}\n{'streams':>7} {'tok/s':>8} {'x one':>6} {'TTFT p50':>9}")
        levels_out = []
        for c in levels:
            r = throughput(url, c, args.requests, args.max_tokens)
            levels_out.append(r)
            print(f"{c:>7} {r['tok_per_s']:>8.1f} {r['tok_per_s'] / levels_out[0]['tok_per_s']:>5.2f}x "
                  f"{r['ttft_p50_s']:>8.3f}s", flush=True)
        others = max(levels) - 1
        alone, loaded = ttft_under_load(url, others)
        print(f"TTFT alone {alone:.3f} s, while {others} others stream {loaded:.3f} s ({loaded / alone:.2f}x)")
        try:
            one, four = n_choices_cost(url, 1, 32), n_choices_cost(url, 4, 32)
            print(f"n=4 wall {four:.2f} s vs n=1 {one:.2f} s ({four / one:.2f}x), 32 tokens each")
        except (httpx.HTTPStatusError, ValueError) as e:
            one = four = nan
            print(f"n=4: not served ({e})")
        before = _reused_tokens(url)
        try:
            ttft1, ttft2 = second_turn(url)
            print(f"chat with a long first prompt: TTFT turn 1 {ttft1:.3f} s, turn 2 {ttft2:.3f} s "
                  f"({ttft2 / ttft1:.2f}x; prefix cache restored {_reused_tokens(url) - before} tokens)")
        except httpx.HTTPStatusError as e:  # the tiny model's context is 512 tokens
            ttft1 = ttft2 = nan
            print(f"chat with a long first prompt: skipped ({e.response.status_code}: the context is too short)")
        return {"levels": levels_out, "ttft": {"alone": alone, f"{others} streaming": loaded,
                                               "turn 1\n(~550 tok)": ttft1, "turn 2": ttft2}}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _reused_tokens(url: str) -> int:
    """Our /health's prefix-cache count (llama-server reports none: -1)."""
    return httpx.get(url + "/health").json().get("prefix_cache", {}).get("reused_tokens", -1)


def plot(path: Path, title: str, engines: dict[str, dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, result) in enumerate(engines.items()):
        levels = result["levels"]
        clients = [r["clients"] for r in levels]
        left.plot(clients, [r["tok_per_s"] for r in levels], "o-", color=f"C{k}", label=name)
        left.plot(clients, [levels[0]["tok_per_s"] * c for c in clients], ":", color=f"C{k}", alpha=0.5)
        labels = list(result["ttft"])
        width = 0.8 / len(engines)
        right.bar(np.arange(len(labels)) + k * width, list(result["ttft"].values()), width, color=f"C{k}",
                  label=name)
    left.set(xlabel="concurrent streams", ylabel="tokens/s (all streams)", xticks=clients,
             title="aggregate decode throughput (dotted: linear in streams)")
    left.legend()
    right.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, fontsize=8)
    right.set(ylabel="time to first token (s)", title="TTFT")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file, or 'default' for SmolLM2 (default: tiny random Mistral)")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--llama-server", help="a llama-server binary: llama.cpp side by side")
    parser.add_argument("--plot", type=Path, help="where to save the plot (default: docs/figures/serve-<model>.png)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "default":
            from mistral_ref.models import default_model_path
            model = default_model_path()
        elif args.model:
            model = Path(args.model)
        else:
            from mistral_ref.synth import synth_model
            model = Path(tmp) / "tiny.gguf"
            synth_model(model, "tiny", "Q4_K_M", sliding_window=16, seed=0, progress=False)
        print(f"model {model.name}, {os.cpu_count()} CPUs, {args.requests} requests per client, "
              f"{args.max_tokens} tokens each")
        engines = {"mistral-ref serve": measure("mistral-ref serve", *ours(model, max(levels)), levels, args)}
        if args.llama_server:
            engines["llama-server"] = measure("llama-server", *llama_server(args.llama_server, model, max(levels)),
                                              levels, args)
        plot(args.plot or Path(__file__).parent.parent / "docs" / "figures" / f"serve-{model.stem}.png",
             f"{model.name}, {os.cpu_count()} CPUs: continuous batching", engines)


if __name__ == "__main__":
    main()
