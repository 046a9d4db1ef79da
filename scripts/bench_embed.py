#!/usr/bin/env python3
"""Embedding speed of the worker against sentence-transformers, side by side in one run.

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers psutil
    cargo build --release -p inference-worker
    /tmp/st/bin/python scripts/bench_embed.py          # --threads N, --reps N, --perf

Same model folder (all-MiniLM-L6-v2), same sentences (~20 tokens), same thread count. Ours
is the release worker over HTTP (JSON and HTTP included), sentence-transformers runs in
this process (no HTTP). The two never run at the same time; each figure is the best of
`--reps` alternating rounds. Printed:

* texts/s at batch 1, 8, 32 and 128, with the ratio ours / sentence-transformers;
* p50 and p99 latency of a single text (ours over HTTP, theirs in process);
* the smallest cosine between our vectors and sentence-transformers' over every sentence.

`--kernels avx2` caps the worker's kernels (as on a CPU without AVX-512). `--perf` records the worker with `perf record` during an extra batch-1 round and prints the
top of its profile (needs `perf` on PATH).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
BATCHES = [1, 8, 32, 128]

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_worker as bw  # noqa: E402

# The first four endings: sentences of about 20 tokens.
TAILS = bw.TAILS[:4]


def sentences(n):
    """~20-token sentences, all different."""
    return [f"{bw.SUBJECTS[i % len(bw.SUBJECTS)]} {bw.VERBS[(i // len(bw.SUBJECTS)) % len(bw.VERBS)]}"
            f"{TAILS[(i * 7) % len(TAILS)]} (note {i})." for i in range(n)]


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_features():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                keep = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
                return " ".join(f for f in keep if f in flags)
    except OSError:
        pass
    return ""


class Worker:
    def __init__(self, threads, profile, kernels):
        binary = ROOT / "target" / profile / "inference-worker"
        if not binary.exists():
            sys.exit(f"{binary} is missing: cargo build --profile {profile} -p inference-worker")
        port = bw.free_port()
        self.proc = subprocess.Popen(
            [str(binary), "--listen", f"127.0.0.1:{port}", "--threads", str(threads),
             "--embedding-model", f"minilm={MINILM}", "--cpu-kernels", kernels],
            env=dict(os.environ, RUST_LOG="warn"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}/v1/embeddings"
        # One connection kept alive, as an SDK client keeps one.
        import http.client
        deadline = time.time() + 120
        while True:
            try:
                self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                self.embed(["ready?"])
                break
            except (OSError, http.client.HTTPException):
                if self.proc.poll() is not None or time.time() > deadline:
                    sys.exit("the worker did not start")
                time.sleep(0.3)

    def embed(self, texts):
        body = json.dumps({"model": "minilm", "input": texts}).encode()
        self.conn.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
        reply = self.conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{reply.status}: {data[:200]!r}")
        return [d["embedding"] for d in json.loads(data)["data"]]

    def close(self):
        self.conn.close()
        self.proc.terminate()
        self.proc.wait()


def measure(embed, texts, batch):
    """texts/s over all `texts` in batches of `batch`, and per-call seconds."""
    calls = []
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        t = time.perf_counter()
        embed(texts[i:i + batch])
        calls.append(time.perf_counter() - t)
    return len(texts) / (time.perf_counter() - start), calls


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--singles", type=int, default=300, help="texts embedded one at a time")
    ap.add_argument("--batched", type=int, default=1024, help="texts embedded in batches")
    ap.add_argument("--perf", action="store_true", help="profile the worker at batch 1")
    ap.add_argument("--kernels", default="auto", choices=["auto", "avx512", "avx2", "portable"],
                    help="the worker's --cpu-kernels (cap its instruction set)")
    ap.add_argument("--profile", default="release",
                    help="cargo profile of the worker binary (`profiling` keeps symbols)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    st = SentenceTransformer(str(MINILM), device="cpu")
    worker = Worker(args.threads, args.profile, args.kernels)
    texts = sentences(max(args.singles, args.batched))

    def st_embed(batch):
        return st.encode(batch, batch_size=len(batch), convert_to_numpy=True)

    # Same outputs first: every sentence, ours against theirs.
    theirs = st.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    ours = np.array([v for i in range(0, len(texts), 64) for v in worker.embed(texts[i:i + 64])])
    cosine = float(np.min(np.sum(ours * theirs, axis=1)
                          / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)))

    best = {}
    latencies = {"ours": [], "st": []}
    for rep in range(args.reps):
        for who, embed in (("st", st_embed), ("ours", worker.embed)):
            for batch in BATCHES:
                sample = texts[: args.singles] if batch == 1 else texts[: args.batched]
                rate, calls = measure(embed, sample, batch)
                key = (who, batch)
                best[key] = max(best.get(key, 0.0), rate)
                if batch == 1:
                    latencies[who].extend(calls)
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(
            f"b{b} {best[('ours', b)]:.0f}/{best[('st', b)]:.0f}" for b in BATCHES), flush=True)

    if args.perf:
        profile(worker, texts[: args.singles])
    worker.close()

    print()
    print(f"CPU: {cpu_name()} ({cpu_features()}), {args.threads} threads, "
          f"worker kernels {args.kernels}, "
          f"torch {torch.__version__}, {args.reps} rounds")
    print(f"{'':22} {'ours':>9} {'sent-tr':>9} {'ratio':>7}")
    for batch in BATCHES:
        o, t = best[("ours", batch)], best[("st", batch)]
        print(f"{'texts/s, batch ' + str(batch):22} {o:9.1f} {t:9.1f} {o / t:7.2f}")
    for p in (50, 99):
        o = percentile(latencies["ours"], p) * 1e3
        t = percentile(latencies["st"], p) * 1e3
        print(f"{'single text p' + str(p) + ', ms':22} {o:9.2f} {t:9.2f} {t / o:7.2f}")
    print(f"smallest cosine to sentence-transformers over {len(texts)} texts: {cosine:.6f}")


def profile(worker, texts):
    if shutil.which("perf") is None:
        print("perf is not on PATH: no profile")
        return
    data = "/tmp/bench_embed.perf.data"
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2000", "-g", "-o", data,
                            "-p", str(worker.proc.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    for t in texts:
        worker.embed([t])
    rec.send_signal(2)
    rec.wait()
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                             "--sort", "symbol", "--percent-limit", "1.5", "-g", "none"],
                            capture_output=True, text=True)
    print("\nworker profile at batch 1 (self time):")
    print("\n".join(line for line in report.stdout.splitlines()
                    if line.strip() and not line.startswith("#")))


if __name__ == "__main__":
    main()
