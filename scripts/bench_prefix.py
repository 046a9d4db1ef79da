#!/usr/bin/env python3
"""Prefix caching side by side: our worker against llama-server, same GGUF, same threads.

    cargo build --release -p inference-worker
    # llama-server from the llama-cpp-python sdist's vendored llama.cpp:
    pip download --no-deps --no-binary llama-cpp-python 'llama-cpp-python==0.3.36' -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama
    cd /tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF \
        -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-server -j2
    python3 scripts/bench_prefix.py --llama-server /tmp/llama/.../build/bin/llama-server

Both servers are asked the same streamed chats at temperature 0 (one at a time), and the
time to the first content token is printed for:

* turns 1..10 of a growing conversation (each turn resends the history plus a new
  question; turn 1 is a fresh prompt for both);
* requests sharing a ~1,000-token system prompt, each with a new question (the first
  reads the system prompt, the rest may find it cached);
* a fresh ~330-token prompt and then the same prefix with a new last line.

Each server gets its default prompt cache: ours `--prefix-cache-bytes` (256 MiB), llama-server
`-np 8 -cb` with its slot cache. The last lines print the floor (a repeated >= 300-token
prefix's first token within 0.2x our own fresh-prompt time) and the ratio to llama-server
(theirs / ours: above 1.0 we are faster), and our cache's bytes from `/metrics`.
"""

import argparse
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_worker import GGUF, LONG_TEXT, ROOT, free_port, post, sentences, wait_healthy  # noqa: E402


def ttft(base, model, messages, max_tokens=8):
    """Seconds to the first content token of a streamed chat, and its usage."""
    import json
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    start = time.perf_counter()
    first, usage = None, {}
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = time.perf_counter()
    return (first or time.perf_counter()) - start, usage


def conversation(base, model, turns):
    messages = [{"role": "system", "content": "You are a helpful travel assistant. "
                 "Answer in two sentences."}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t + 1}: {sentences(t + 1)[-1]} "
                         "What should a visitor see first?"})
        secs, usage = ttft(base, model, messages, max_tokens=24)
        out.append((secs, usage.get("prompt_tokens", 0)))
        # The reply as the model gave it becomes history (greedy: the same for both servers
        # only if the models agree; the history lengths are printed to compare).
        messages.append({"role": "assistant", "content": f"Answer {t + 1}: {sentences(t + 7)[-1]}"})
    return out


def shared_system(base, model, n, tag):
    system = " ".join([LONG_TEXT] * 7)  # ~1,000 tokens
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"{tag} question {i}: name one thing in the text."}]
        out.append(ttft(base, model, messages))
    return out


def fresh_then_next_turn(base, model, reps, tag):
    fresh, again = [], []
    for i in range(reps):
        prompt = f"{tag} run {i} at {time.time()}. Summarise this text. {LONG_TEXT} {LONG_TEXT}"
        messages = [{"role": "user", "content": prompt}]
        fresh.append(ttft(base, model, messages)[0])
        messages = [{"role": "user", "content": prompt + " Now in one word."}]
        again.append(ttft(base, model, messages)[0])
    return statistics.median(fresh), statistics.median(again)


def measure(base, model, args, tag):
    ttft(base, model, [{"role": "user", "content": "Warm up."}])
    return {
        "turns": conversation(base, model, args.turns),
        "shared": shared_system(base, model, args.shared, tag),
        "fresh_next": fresh_then_next_turn(base, model, args.reps, tag),
    }


def ours(args):
    binary = ROOT / "target" / "release" / "inference-worker"
    if not binary.exists():
        sys.exit(f"{binary} is missing: cargo build --release -p inference-worker")
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--listen", f"127.0.0.1:{port}", "--threads", str(args.threads),
         "--chat-model", f"smollm2={GGUF}", "--max-active-sequences", "8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/health", proc, "inference-worker")
        figures = measure(base, "smollm2", args, "ours")
        with urllib.request.urlopen(f"{base}/metrics") as r:
            metrics = r.read().decode()
        figures["cache_bytes"] = sum(
            float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("worker_prefix_cache_bytes"))
        return figures
    finally:
        proc.terminate()
        proc.wait()


def llama_server(args):
    port = free_port()
    proc = subprocess.Popen(
        [args.llama_server, "-m", str(GGUF), "--host", "127.0.0.1", "--port", str(port),
         "-t", str(args.threads), "-tb", str(args.threads), "-np", "8", "-cb", "-c", "16384",
         "--jinja"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/health", proc, "llama-server")
        return measure(base, "smollm2", args, "llama")
    finally:
        proc.terminate()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-server", help="path of llama-server; leave out to measure ours alone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--shared", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print("ours...", flush=True)
    a = ours(args)
    b = llama_server(args) if args.llama_server else None
    ms = lambda s: f"{s * 1e3:8.1f} ms"  # noqa: E731
    print(f"\n{'time to first token':<44}{'ours':>11}{'llama-server':>14}{'ratio':>8}")
    for i, (secs, prompt) in enumerate(a["turns"]):
        theirs = b["turns"][i][0] if b else float("nan")
        label = f"conversation turn {i + 1} ({prompt} prompt tokens)"
        print(f"{label:<44}{ms(secs):>11}{ms(theirs):>14}{theirs / secs:>8.2f}")
    for i, (secs, usage) in enumerate(a["shared"]):
        theirs = b["shared"][i][0] if b else float("nan")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        label = f"shared system prompt, call {i + 1} ({cached}/{usage.get('prompt_tokens')} cached)"
        print(f"{label:<44}{ms(secs):>11}{ms(theirs):>14}{theirs / secs:>8.2f}")
    (fresh, again) = a["fresh_next"]
    (t_fresh, t_again) = b["fresh_next"] if b else (float("nan"), float("nan"))
    print(f"{'a fresh ~330-token prompt (median)':<44}{ms(fresh):>11}{ms(t_fresh):>14}{t_fresh / fresh:>8.2f}")
    print(f"{'same prefix, new last line (median)':<44}{ms(again):>11}{ms(t_again):>14}{t_again / again:>8.2f}")
    print(f"\nfloor: repeated prefix / own fresh prompt = {again / fresh:.3f} (<= 0.2 holds: {again / fresh <= 0.2})")
    shared_later = statistics.median(s for s, _ in a["shared"][1:])
    print(f"shared 1,000-token system prompt, later calls: {shared_later * 1e3:.1f} ms vs first "
          f"{a['shared'][0][0] * 1e3:.1f} ms ({shared_later / a['shared'][0][0]:.3f})")
    if b:
        theirs = statistics.median(s for s, _ in b["shared"][1:])
        turns = statistics.median(t / o for (o, _), (t, _) in zip(a["turns"][1:], b["turns"][1:]))
        print(f"medians against llama-server (theirs / ours): shared-prompt later calls "
              f"{theirs * 1e3:.1f} / {shared_later * 1e3:.1f} ms = {theirs / shared_later:.2f}; "
              f"conversation turns 2+ {turns:.2f}")
    print(f"our prefix cache holds {a['cache_bytes'] / 2**20:.1f} MiB after the run")


if __name__ == "__main__":
    main()
