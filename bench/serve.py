"""HTTP server throughput: requests/s, tokens/s and time to first token at 1, 4 and 8 concurrent
streaming clients.

Starts `mistral-ref serve` on a free loopback port, then for each concurrency C runs C client
threads, each sending `--requests` streamed chat requests one after another (greedy,
`--max-tokens` tokens). Time to first token (TTFT): from sending the request to the first `data:`
line with text. Usage:

    python bench/serve.py                      # tiny random Mistral (real Mistral tokenizer)
    python bench/serve.py --model default      # SmolLM2-135M-Instruct Q4_1
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def start_server(model: Path, max_running: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mistral_ref.cli", "serve", "--model", str(model),
                             "--port", str(port), "--log-level", "warning", "--max-running", str(max_running)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def one_request(url: str, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, total s, completion tokens) of one streamed chat request."""
    body = {"model": "", "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"]["content"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else float("nan")), time.perf_counter() - start, tokens


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results, lock = [], threading.Lock()

    def client() -> None:
        for _ in range(requests):
            r = one_request(url, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "tok_per_s": sum(r[2] for r in results) / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_max_s": ttfts[-1], "latency_p50_s": statistics.median(r[1] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file, or 'default' for SmolLM2 (default: tiny random Mistral)")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
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
        proc, url = start_server(model, max_running=max(levels))
        try:
            one_request(url, 4)  # warm up: kernels loaded, first-call dispatch done
            print(f"model {model.name}, {args.requests} requests per client, {args.max_tokens} tokens each, "
                  f"{os.cpu_count()} CPUs")
            print(f"{'clients':>7} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT max':>9} {'latency p50':>12}")
            for c in levels:
                r = run_level(url, c, args.requests, args.max_tokens)
                print(f"{r['clients']:>7} {r['req_per_s']:>7.2f} {r['tok_per_s']:>7.1f} {r['ttft_p50_s']:>8.3f}s "
                      f"{r['ttft_max_s']:>8.3f}s {r['latency_p50_s']:>11.3f}s")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
