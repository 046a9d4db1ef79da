#!/usr/bin/env python3
"""Chat speed on the GGUF quantisations operators download, ours against llama.cpp's own
server, side by side in one run on the same files and threads.

    scripts/requantize.sh                      # models/derived/*.gguf and llama-server
    cargo build --release -p inference-worker
    python3 scripts/bench_gguf.py              # --threads N, --reps N, FILES...

On a CPU with more than AVX2 (AVX-512, VNNI), compare against llama.cpp built for it:
`LLAMA_NATIVE=1 scripts/llama-cpp.sh llama-server` and
`--llama-server target/llama.cpp/build-native/bin/llama-server`.

For each file, each server is started alone (ours with 8 sequences; llama-server with
`-np 8 -cb`, 8 slots and continuous batching, like the worker) and measured over HTTP
the same way (scripts/bench_worker.py's measures): decode tok/s for 1, 4 and 8 concurrent
streams of 128 tokens (tokens after each stream's first, over the time from the first
stream's first token to the last stream's end; best of the reps) and the time to the first
token of a fresh ~330-token prompt (a one-token reply; best of the reps). Prints one table
row per file with the ratios ours / llama-server.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_worker as bw  # noqa: E402

ROOT = bw.ROOT
DERIVED = ROOT / "models" / "derived"
DEFAULT_TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]


def first_token_seconds(base, model, reps):
    url = f"{base}/v1/chat/completions"
    best = float("inf")
    tokens = 0
    for i in range(reps + 1):
        # A fresh preface each time, so no prefix cache answers any part after it.
        prompt = (f"Request {i * 7919 + int(time.time() * 1000)}. Read this text twice and "
                  f"summarise it. {bw.LONG_TEXT} {bw.LONG_TEXT[:520]}")
        start = time.perf_counter()
        reply = bw.post(url, bw.chat_body(model, prompt, 1))
        elapsed = time.perf_counter() - start
        tokens = reply["usage"]["prompt_tokens"]
        if i > 0:  # the first warms up
            best = min(best, elapsed)
    return best, tokens


def measure(base, proc, what, reps):
    bw.wait_healthy(f"{base}/health", proc, what, timeout=300)
    figures = bw.http_chat_figures(base, "smollm2", reps, what)
    figures["ttft"], figures["prompt_tokens"] = first_token_seconds(base, "smollm2", reps)
    return figures


def ours(path, args):
    binary = ROOT / "target" / "release" / "inference-worker"
    if not binary.exists():
        sys.exit(f"{binary} is missing: cargo build --release -p inference-worker")
    port = bw.free_port()
    proc = subprocess.Popen(
        [str(binary), "--listen", f"127.0.0.1:{port}", "--threads", str(args.threads),
         "--chat-model", f"smollm2={path}", "--max-active-sequences", "8"],
        env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        return measure(f"http://127.0.0.1:{port}", proc, f"ours {path.name}", args.reps)
    finally:
        proc.terminate()
        proc.wait()


def llama_server(path, args):
    port = bw.free_port()
    proc = subprocess.Popen(
        [str(args.llama_server), "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
         "-t", str(args.threads), "-tb", str(args.threads), "-np", "8", "-cb", "-c", "8192",
         "-a", "smollm2", "--no-webui", "--cache-reuse", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return measure(f"http://127.0.0.1:{port}", proc, f"llama-server {path.name}", args.reps)
    finally:
        proc.terminate()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path,
                        help="GGUF files (default: models/derived/ from scripts/requantize.sh)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--llama-server", type=Path,
                        default=ROOT / "target" / "llama.cpp" / "build" / "bin" / "llama-server")
    args = parser.parse_args()
    files = args.files or [DERIVED / f"SmolLM2-135M-Instruct.{t}.gguf" for t in DEFAULT_TYPES]
    missing = [f for f in files if not f.exists()]
    if missing:
        sys.exit(f"missing: {', '.join(map(str, missing))} (run scripts/requantize.sh)")
    if not args.llama_server.exists():
        sys.exit(f"{args.llama_server} is missing (scripts/requantize.sh builds it)")
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown CPU")
    print(f"CPU: {cpu}; {args.threads} threads; best of {args.reps} reps", flush=True)
    rows = []
    for path in files:
        a, b = ours(path, args), llama_server(path, args)
        rows.append((path.name.split(".")[-2], a, b))
    print()
    print(f"{'file':8} | {'decode tok/s 1 / 4 / 8, ours':30} | {'llama-server':22} | "
          f"{'ratio':18} | time to first token (prompt tokens)")
    for name, a, b in rows:
        ours_d = " / ".join(f"{a[k]:.0f}" for k in ("decode_1", "decode_4", "decode_8"))
        ref_d = " / ".join(f"{b[k]:.0f}" for k in ("decode_1", "decode_4", "decode_8"))
        ratio = " / ".join(f"{a[k] / b[k]:.2f}" for k in ("decode_1", "decode_4", "decode_8"))
        print(f"{name:8} | {ours_d:30} | {ref_d:22} | {ratio:18} | {a['ttft']:.2f} s vs "
              f"{b['ttft']:.2f} s ({a['prompt_tokens']} / {b['prompt_tokens']}), "
              f"ratio {b['ttft'] / a['ttft']:.2f}")


if __name__ == "__main__":
    main()
