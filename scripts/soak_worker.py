#!/usr/bin/env python3
"""Soak test for the inference worker: steady mixed load for a while, RSS sampled throughout.

    cargo build --release -p inference-worker
    python3 scripts/soak_worker.py                 # 10 minutes; --minutes N, --clients N

Load: `--clients` threads loop over streamed chats (a fifth of them hang up after a few
chunks, so cancellation is exercised), non-streamed chats, and embedding batches. Every
10 s it prints the worker's RSS, requests done and errors. At the end it compares the mean
RSS of the last minute with that of the first minute after warm-up and exits non-zero when it
grew by more than `--max-growth-mib` (default 32), or when any request failed.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(url, body, timeout=300):
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-growth-mib", type=float, default=32)
    args = parser.parse_args()

    binary = ROOT / "target" / "release" / "inference-worker"
    models = Path(os.environ.get("MODELS_DIR", ROOT / "models"))
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--listen", f"127.0.0.1:{port}",
         "--chat-model", f"smollm2={models / 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
         "--embedding-model", f"minilm={models / 'all-MiniLM-L6-v2'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                break
        except Exception:
            time.sleep(0.2)
    else:
        proc.kill()
        sys.exit("worker did not become healthy")

    stop = threading.Event()
    counts = {"done": 0, "cancelled": 0, "errors": 0}
    lock = threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            i += 1
            kind = (k + i) % 5
            try:
                if kind in (0, 1):
                    body = {"model": "smollm2", "stream": True, "max_tokens": 48,
                            "messages": [{"role": "user", "content": f"Tell story {k}-{i}."}]}
                    with request(f"{base}/v1/chat/completions", body) as r:
                        for n, _ in enumerate(r):
                            if kind == 1 and n > 4 and i % 2 == 0:
                                with lock:
                                    counts["cancelled"] += 1
                                break
                elif kind in (2, 3):
                    body = {"model": "smollm2", "max_tokens": 32, "seed": i,
                            "messages": [{"role": "user", "content": f"Question {i}: why?"}]}
                    request(f"{base}/v1/chat/completions", body).read()
                else:
                    texts = [f"sentence {i} number {j} about the sea" for j in range(16)]
                    request(f"{base}/v1/embeddings", {"model": "minilm", "input": texts}).read()
                with lock:
                    counts["done"] += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    counts["errors"] += 1
                print(f"  error: {e}", flush=True)
                time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(k,), daemon=True)
               for k in range(args.clients)]
    for t in threads:
        t.start()
    samples = []
    start = time.time()
    end = start + args.minutes * 60
    try:
        while time.time() < end:
            time.sleep(10)
            elapsed = time.time() - start
            rss = rss_mib(proc.pid)
            samples.append((elapsed, rss))
            with lock:
                print(f"{elapsed:6.0f} s  RSS {rss:7.1f} MiB  done {counts['done']:6}  "
                      f"hung up {counts['cancelled']:5}  errors {counts['errors']}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        proc.terminate()
        proc.wait()

    warm = [r for t, r in samples if 60 <= t < 120] or [samples[0][1]]
    last = [r for t, r in samples if t >= samples[-1][0] - 60]
    growth = sum(last) / len(last) - sum(warm) / len(warm)
    print(f"RSS after warm-up {sum(warm) / len(warm):.1f} MiB, last minute "
          f"{sum(last) / len(last):.1f} MiB, growth {growth:+.1f} MiB; "
          f"{counts['done']} requests, {counts['cancelled']} hung up, {counts['errors']} errors")
    if growth > args.max_growth_mib or counts["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
