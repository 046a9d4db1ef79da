#!/usr/bin/env python3
"""Worker speed side by side with the references, in one run, on the same files and threads.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install 'llama-cpp-python[server]==0.3.36' \
        sentence-transformers psutil

On a CPU with AMX under a hypervisor that does not enable it, llama.cpp's default native
build dies on its first multi-token batch (`ldtilecfg`); build it without AMX instead:
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" in front of the pip install.
    cargo build --release -p inference-worker
    /tmp/ref/bin/python scripts/bench_worker.py            # --threads N, --quick

What it measures, each for our worker and the reference, printing the ratio ours/reference:

* prompt tok/s: a fresh ~250-token prompt, one token generated (time to first token);
* decode tok/s, one stream: a streamed reply of up to 128 tokens, tokens after the first
  divided by the time after the first;
* aggregate decode tok/s at 4 and 8 concurrent streams, every stream asking for 128 tokens
  like the one-stream figure and measured the same way: the tokens after each stream's
  first, over the time from the first stream's first token to the last stream's end (best
  of the reps, like the one-stream figure); also printed: all completion tokens over the
  wall time from the first request to the last reply (prompts included);
* embeddings/s at batch 1 and 32 (ours over HTTP, sentence-transformers in process);
* peak RSS of each server process (VmHWM) and of the sentence-transformers process.

llama.cpp is measured twice: in process (llama-cpp-python's `Llama`, the figures the worker's
targets are set against) and behind its own OpenAI server (`llama_cpp.server`) for the
concurrent figures. Ours is always measured over HTTP, so its figures include the HTTP
and JSON overhead the reference's in-process figures do not.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"

LONG_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders "
    "stopped to exchange grain, salt and cloth. Over the centuries the settlement grew into "
    "a market town, then into a walled city with a cathedral, a university and a harbour. "
    "Its citizens argued about taxes, bridges and the price of bread; they built canals, "
    "printed newspapers and elected councils. Floods, fires and plagues came and went, and "
    "each time the city rebuilt itself a little differently, keeping the old street plan "
    "but changing almost everything else. Today visitors walk along the same river, past "
    "warehouses turned into museums, and wonder how much of the past is still there. "
)

SUBJECTS = ["The committee", "A small dog", "My neighbour", "The new software release",
            "An old lighthouse keeper", "The orchestra", "Our quarterly report",
            "A sudden thunderstorm", "The museum's curator", "This recipe"]
VERBS = ["surprised everyone", "was delayed again", "explained the rules",
         "changed the schedule", "needs more testing", "arrived before noon",
         "won the regional prize", "described the coastline"]
TAILS = ["", " after a long discussion about budgets and priorities",
         " because nobody had read the instructions carefully",
         " while the rain kept falling on the empty streets of the harbour town",
         " and the results were published in three languages the following week",
         " despite the objections raised by several members of the audience, who felt "
         "that the proposal ignored the needs of families living near the river"]


def sentences(n):
    out = []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        v = VERBS[(i // len(SUBJECTS)) % len(VERBS)]
        t = TAILS[(i * 7) % len(TAILS)]
        out.append(f"{s} {v}{t} (note {i}).")
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=600):
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def stream(url, body):
    """Streams a chat completion; returns (t_start, t_first_content, t_end, completion_tokens)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens = None
    pieces = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    return start, first or end, end, tokens if tokens is not None else pieces


def wait_healthy(url, proc, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.3)
    sys.exit(f"{what} did not become healthy in {timeout} s")


def peak_rss_mib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def chat_body(model, prompt, max_tokens):
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}


def http_chat_figures(base, model, reps, label):
    url = f"{base}/v1/chat/completions"
    out = {}
    # Prompt: every prompt is new (a numbered preface) so no prefix cache can answer it.
    rates = []
    for i in range(reps):
        prompt = f"Request {i * 7919 + int(time.time())}. Summarise this text. {LONG_TEXT}"
        start = time.perf_counter()
        reply = post(url, chat_body(model, prompt, 1))
        elapsed = time.perf_counter() - start
        rates.append(reply["usage"]["prompt_tokens"] / elapsed)
    out["prompt"] = max(rates)
    rates = []
    for i in range(reps):
        prompt = f"Story {i}: write a long story about a lighthouse keeper and a storm."
        start, first, end, tokens = stream(url, chat_body(model, prompt, 128))
        if tokens > 1 and end > first:
            rates.append((tokens - 1) / (end - first))
    out["decode_1"] = max(rates) if rates else float("nan")
    for streams in (4, 8):
        decode, wall_rates = [], []
        for rep in range(reps):
            results = [None] * streams

            def one(k):
                prompt = f"Client {k}: describe a day at the seaside in detail, {time.time()}."
                results[k] = stream(url, chat_body(model, prompt, 128))

            start = time.perf_counter()
            threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            wall_rates.append(sum(r[3] for r in results) / wall)
            # Like the one-stream figure: tokens after each stream's first, over the time
            # from the first stream's first token to the last stream's end.
            window = max(r[2] for r in results) - min(r[1] for r in results)
            if window > 0:
                decode.append(sum(max(r[3] - 1, 0) for r in results) / window)
        out[f"decode_{streams}"] = max(decode) if decode else float("nan")
        out[f"wall_{streams}"] = max(wall_rates)
    print(f"  {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def ours(args):
    binary = ROOT / "target" / "release" / "inference-worker"
    if not binary.exists():
        sys.exit(f"{binary} is missing: cargo build --release -p inference-worker")
    port = free_port()
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.Popen(
        [str(binary), "--listen", f"127.0.0.1:{port}", "--threads", str(args.threads),
         "--chat-model", f"smollm2={GGUF}", "--embedding-model", f"minilm={MINILM}",
         "--max-active-sequences", "8"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/health", proc, "inference-worker")
        figures = http_chat_figures(base, "smollm2", args.reps, "ours")
        texts = sentences(args.sentences)
        url = f"{base}/v1/embeddings"
        post(url, {"model": "minilm", "input": texts[:8]})
        start = time.perf_counter()
        for t in texts[: args.sentences // 2]:
            post(url, {"model": "minilm", "input": t})
        figures["embed_1"] = (args.sentences // 2) / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, len(texts), 32):
            post(url, {"model": "minilm", "input": texts[i:i + 32]})
        figures["embed_32"] = len(texts) / (time.perf_counter() - start)
        figures["rss"] = peak_rss_mib(proc.pid)
        print(f"  ours: embed_1 {figures['embed_1']:.1f}, embed_32 {figures['embed_32']:.1f}, "
              f"peak RSS {figures['rss']:.0f} MiB", flush=True)
        return figures
    finally:
        proc.terminate()
        proc.wait()


def llama_cpp_in_process(args):
    from llama_cpp import Llama

    llm = Llama(model_path=str(GGUF), n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=2048, n_batch=512, verbose=False)
    out = {}
    rates = []
    for i in range(args.reps):
        prompt = f"Request {i * 7919 + int(time.time())}. Summarise this text. {LONG_TEXT}"
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        rates.append(len(tokens) / (time.perf_counter() - start))
    out["prompt"] = max(rates)
    rates = []
    for i in range(args.reps):
        prompt = f"<|im_start|>user\nStory {i}: write a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        generated = 0
        first = None
        for _ in llm.generate(tokens, temp=0.0, reset=True):
            generated += 1
            if first is None:
                first = time.perf_counter()
            if generated >= 128:
                break
        rates.append((generated - 1) / (time.perf_counter() - first))
    out["decode_1"] = max(rates)
    print(f"  llama.cpp in process: prompt {out['prompt']:.1f}, decode_1 {out['decode_1']:.1f}",
          flush=True)
    del llm
    return out


def llama_cpp_server(args):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch",
         str(args.threads), "--n_ctx", "4096", "--model_alias", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/v1/models", proc, "llama_cpp.server")
        figures = http_chat_figures(base, "smollm2", args.reps, "llama.cpp server")
        figures["rss"] = peak_rss_mib(proc.pid)
        return figures
    finally:
        proc.terminate()
        proc.wait()


def sentence_transformers(args):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(MINILM), device="cpu")
    texts = sentences(args.sentences)
    model.encode(texts[:8])
    out = {}
    start = time.perf_counter()
    for t in texts[: args.sentences // 2]:
        model.encode([t], batch_size=1)
    out["embed_1"] = (args.sentences // 2) / (time.perf_counter() - start)
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    out["embed_32"] = len(texts) / (time.perf_counter() - start)
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  sentence-transformers: embed_1 {out['embed_1']:.1f}, embed_32 {out['embed_32']:.1f}",
          flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--skip-server", action="store_true",
                        help="leave out llama.cpp's OpenAI server (concurrent reference figures)")
    parser.add_argument("--ours-only", action="store_true",
                        help="measure only our worker (no reference packages needed)")
    args = parser.parse_args()
    for path in (GGUF, MINILM):
        if not path.exists():
            sys.exit(f"{path} is missing: bash scripts/fetch-models.sh")

    print(f"threads {args.threads}; measuring (each engine alone on the machine)", flush=True)
    mine = ours(args)
    if args.ours_only:
        ref_inproc, ref_server, ref_st = {}, {}, {}
    else:
        ref_inproc = llama_cpp_in_process(args)
        ref_server = {} if args.skip_server else llama_cpp_server(args)
        ref_st = sentence_transformers(args)

    rows = [
        ("prompt tok/s", "prompt", ref_inproc, "llama.cpp (llama-cpp-python)"),
        ("decode tok/s, 1 stream", "decode_1", ref_inproc, "llama.cpp (llama-cpp-python)"),
        ("prompt tok/s, over HTTP", "prompt", ref_server, "llama.cpp server"),
        ("decode tok/s, 1 stream, HTTP", "decode_1", ref_server, "llama.cpp server"),
        ("aggregate decode tok/s, 4 streams", "decode_4", ref_server, "llama.cpp server"),
        ("aggregate decode tok/s, 8 streams", "decode_8", ref_server, "llama.cpp server"),
        ("aggregate tok/s, 4 streams, wall", "wall_4", ref_server, "llama.cpp server"),
        ("aggregate tok/s, 8 streams, wall", "wall_8", ref_server, "llama.cpp server"),
        ("embeddings/s, batch 1", "embed_1", ref_st, "sentence-transformers"),
        ("embeddings/s, batch 32", "embed_32", ref_st, "sentence-transformers"),
    ]
    print()
    print(f"{'figure':38} {'ours':>9} {'reference':>10} {'ratio':>7}  reference")
    shown = set()
    for name, key, ref, who in rows:
        if key not in ref:
            if not args.ours_only or key not in shown:
                print(f"{name:38} {mine[key]:9.1f} {'-':>10} {'-':>7}")
            shown.add(key)
            continue
        ratio = mine[key] / ref[key] if ref[key] else float("nan")
        print(f"{name:38} {mine[key]:9.1f} {ref[key]:10.1f} {ratio:7.2f}  {who}")
    print(f"{'8-stream aggregate / own 1-stream':38} {mine['decode_8'] / mine['decode_1']:9.2f}")
    print(f"{'  the same, 8-stream wall (prompts in)':38} {mine['wall_8'] / mine['decode_1']:9.2f}")
    print(f"{'peak RSS MiB (worker, both models)':38} {mine['rss']:9.0f}"
          + (f" {ref_server['rss']:10.0f}          llama.cpp server (LLM only)" if ref_server else ""))
    if ref_st:
        print(f"{'peak RSS MiB, sentence-transformers':38} {'':9} {ref_st['rss']:10.0f}")


if __name__ == "__main__":
    main()
