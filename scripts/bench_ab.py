#!/usr/bin/env python3
"""A/B benchmark of two gateway builds (not a test).

`bench_gateway.py` compares targets (nginx, the stub, the gateway's modes) within one build.
This compares two builds of the gateway with each other: on a shared 2-CPU machine the same
build measures 10-20 % apart from one minute to the next, so two builds are only comparable
when measured in turns, at the same moments. Each round starts both builds' gateways afresh
(a new SQLite store each, the same stub upstream), then drives every mode of each build with
a closed loop in turn, A then B. It prints each run, then the median per build and mode,
with the CPU each spent per request by thread (serving, spool, shipper with its store).

Modes: `interval` (--spool-fsync-interval-ms 10), `default` (an fsync per group) and
`unmetered` (--benchmark-unmetered), all with a key whose tenant has no plan.

Usage: scripts/bench_ab.py A_GATEWAY B_GATEWAY [--rounds 3] [--seconds 5] [--connections 32]
                           [--modes interval,unmetered]
Keep a build's binary before building the other: `cp target/release/gateway /tmp/gateway-a`.
The stub upstream and the load generator come from target/release (this script builds them).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gateway import (  # noqa: E402
    BIN, ROOT, free_port, loadgen, log, start, stop_all, thread_cpu)

MODES = {
    "interval": ["--spool-fsync-interval-ms", "10"],
    "default": [],
    "unmetered": ["--benchmark-unmetered"],
}


def cli(gateway, db_url, *argv):
    env = dict(os.environ, DATABASE_URL=db_url)
    return subprocess.run([gateway, *argv], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--modes", default="interval,unmetered")
    args = p.parse_args()
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            sys.exit(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    builds = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    for label, path in builds.items():
        if not os.access(path, os.X_OK):
            sys.exit(f"{label}: {path} is not an executable")
    log("building the stub upstream and the load generator")
    subprocess.run(["cargo", "build", "--release", "-p", "e2e-tests", "--bins"], cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="gw-ab-")
    procs = []
    runs = {}
    try:
        stub, stub_url = start([os.path.join(BIN, "stub-upstream"), "127.0.0.1:0"],
                               "stub-upstream listening on ")
        procs.append(stub)
        for r in range(args.rounds):
            for label, gateway in builds.items():
                folder = os.path.join(work, f"{label}-{r}")
                os.makedirs(folder)
                db_url = f"sqlite://{folder}/gateway.db"
                key = cli(gateway, db_url, "create-key", "--tenant", "bench-ab")
                started = []
                for mode in modes:
                    env = dict(os.environ, DATABASE_URL=db_url, RUST_LOG="warn")
                    proc, url = start(
                        [gateway, "serve", "--listen", "127.0.0.1:0",
                         "--metrics-listen", f"127.0.0.1:{free_port()}", "--worker", stub_url,
                         "--spool-dir", os.path.join(folder, f"spool-{mode}"), *MODES[mode]],
                        "gateway listening on ", env=env)
                    procs.append(proc)
                    started.append((mode, proc, url))
                time.sleep(0.5)
                for mode, proc, url in started:
                    before = thread_cpu(proc)
                    res = loadgen(url + "/v1/chat/completions", 0, args, key)
                    if res["errors"]:
                        sys.exit(f"{label} {mode} answered errors: {res}")
                    after = thread_cpu(proc)
                    done = max(1, res["completed"])
                    cpu = {g: (after.get(g, 0.0) - before.get(g, 0.0)) * 1e6 / done for g in after}
                    runs.setdefault((mode, label), []).append((res["rate"], cpu))
                    split = ", ".join(f"{g} {v:.1f}" for g, v in sorted(cpu.items(), key=lambda x: -x[1]))
                    log(f"round {r + 1}/{args.rounds} {label} {mode}: {res['rate']:.0f} req/s "
                        f"(CPU us/req: {split})")
                for _, proc, _ in started:
                    proc.terminate()
                    proc.wait(timeout=30)
        print()
        print(f"A: {builds['A']}")
        print(f"B: {builds['B']}")
        print(f"{args.rounds} rounds, {args.seconds} s closed loop, {args.connections} connections, "
              f"{os.cpu_count()} CPUs; builds in turns within each round")
        print(f"{'mode':<11}{'build':<7}{'median req/s':>14}{'B/A':>7}   rounds; median CPU us/req by thread")
        for mode in modes:
            a_median = median(x[0] for x in runs[(mode, "A")])
            for label in builds:
                xs = runs[(mode, label)]
                m = median(x[0] for x in xs)
                groups = sorted({g for _, cpu in xs for g in cpu})
                cpu = {g: median(c.get(g, 0.0) for _, c in xs) for g in groups}
                ratio = f"{m / a_median:>7.3f}" if label == "B" else f"{'':>7}"
                print(f"{mode:<11}{label:<7}{m:>14.0f}{ratio}   "
                      + " ".join(f"{x[0]:.0f}" for x in xs) + "; "
                      + ", ".join(f"{g} {v:.1f}" for g, v in sorted(cpu.items(), key=lambda x: -x[1])))
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
