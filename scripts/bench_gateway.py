#!/usr/bin/env python3
"""Gateway overhead benchmark (not a test).

Side by side, in one run, on the same stub upstream that answers at once:
  direct   the stub itself
  nginx    nginx proxying to the stub (keep-alive upstream, access log off)
  hyper-bare  the floor of the gateway's HTTP stack: a hyper server forwarding every request
           as it came over the gateway's own worker connections (gateway::upstream), one
           event loop per CPU like the gateway, and nothing else (no auth, JSON, limits,
           metering or metrics)
  gateway  our gateway with everything on: key auth, a plan with rate limits, concurrency,
           monthly quota and spend cap (so every request is admitted and settled against
           the store), a price, and metering (spool + shipper to the store)
  gw-nolimit  the same gateway process, with a key whose tenant has no plan: auth and
           metering, no admission (what limits cost)
  gw-interval  everything on, as `gateway`, in a gateway started with
           --spool-fsync-interval-ms 10: usage is written to the OS before each response
           (safe through kill -9) and fsynced every 10 ms instead of before each response
  gw-interval-nolimit  that gateway with the no-plan key (what metering costs there)
  gw-unmetered  a second gateway started with the benchmark-only switch that discards
           usage, same no-plan key: auth and forwarding only (what metering costs)

For each target: the most it serves (closed loop), then latency at fixed request rates
(open loop; latency counts from when a request was due). Prints throughput, p50/p99, the
latency each proxy adds over direct, and ratios to nginx. Every measurement is taken
--rounds times, the targets taking turns within each round, and the median is reported
(with the spread), so a neighbour's burst on a shared machine moves one sample, not the
result. For the metered gateway it also prints where its CPU went, by thread (serving,
spool, shipper with its store thread) and how many usage events each fsync covered.

Usage: scripts/bench_gateway.py [--seconds 5] [--connections 32] [--rounds 3] [--database-url URL]
Needs: nginx on PATH (Debian: apt-get install nginx); builds the release binaries.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
BODY = json.dumps(
    {"model": "stub-chat", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
)


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def start(cmd, prefix, env=None):
    """Starts a process that prints `prefix<url>` on its first stdout line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline().strip()
    if not line.startswith(prefix):
        proc.kill()
        sys.exit(f"{cmd[0]} did not start: {line!r}")
    return proc, line[len(prefix):]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadgen(url, rate, args, key=None):
    cmd = [
        os.path.join(BIN, "loadgen"),
        "--url", url,
        "--body", BODY,
        "--rate", str(rate),
        "--seconds", str(args.seconds),
        "--connections", str(args.connections),
    ]
    if key:
        cmd += ["--key", key]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def stat_cpu(path):
    """(name, user + system CPU seconds) from a /proc stat file."""
    with open(path) as f:
        stat = f.read()
    fields = stat.rsplit(")", 1)[1].split()
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(proc):
    """User + system CPU time of a running process, in seconds."""
    if proc is None:
        return 0.0
    return stat_cpu(f"/proc/{proc.pid}/stat")[1]


THREAD_GROUPS = (
    ("serving", ("gateway-serve",)),
    ("spool", ("usage-spool", "usage-outcomes")),
    ("shipper+store", ("usage-shipper", "sqlx-sqlite")),
)


def thread_cpu(proc):
    """CPU seconds of a process's threads, summed by THREAD_GROUPS (the rest as 'other')."""
    out = {}
    task_dir = f"/proc/{proc.pid}/task"
    for tid in os.listdir(task_dir):
        try:
            name, seconds = stat_cpu(f"{task_dir}/{tid}/stat")
        except OSError:  # the thread ended
            continue
        group = next((g for g, prefixes in THREAD_GROUPS if name.startswith(prefixes)), "other")
        out[group] = out.get(group, 0.0) + seconds
    return out


def metric(url, name):
    """The value of an unlabelled metric from a Prometheus endpoint (0 if absent)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def stop_all(procs):
    """Terminates the processes still running (killing any that do not stop in 10 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def gateway_cli(db_url, *argv):
    env = dict(os.environ, DATABASE_URL=db_url)
    return subprocess.run(
        [os.path.join(BIN, "gateway"), *argv], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="samples per measurement (median kept)")
    p.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    args = p.parse_args()

    if not shutil.which("nginx"):
        sys.exit("nginx is not installed (Debian: apt-get install nginx)")
    log("building release binaries")
    subprocess.run(
        ["cargo", "build", "--release", "-p", "gateway", "-p", "e2e-tests", "--bins"],
        cwd=ROOT, check=True,
    )
    work = tempfile.mkdtemp(prefix="gw-bench-")
    procs = []
    try:
        stub, stub_url = start([os.path.join(BIN, "stub-upstream"), "127.0.0.1:0"], "stub-upstream listening on ")
        procs.append(stub)

        nginx_port = free_port()
        stub_hostport = stub_url.removeprefix("http://")
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream stub {{ server {stub_hostport}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{nginx_port};
        location / {{
            proxy_pass http://stub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        nginx = subprocess.Popen(["nginx", "-p", work, "-c", conf], stderr=subprocess.DEVNULL)
        procs.append(nginx)

        db_url = args.database_url or f"sqlite://{work}/gateway.db"
        gateway_cli(db_url, "create-plan", "--name", f"bench-{os.getpid()}",
                    "--rpm", "1000000000", "--tpm", "100000000000", "--concurrency", "1000000",
                    "--monthly-tokens", "1000000000000000", "--monthly-spend", "1000000000000")
        tenant = f"bench-{os.getpid()}"
        gateway_cli(db_url, "set-plan", "--tenant", tenant, "--plan", f"bench-{os.getpid()}")
        gateway_cli(db_url, "add-price", "--model", "stub-chat", "--input-per-mtok", "15",
                    "--output-per-mtok", "60", "--effective-from", "0")
        key = gateway_cli(db_url, "create-key", "--tenant", tenant)
        # A tenant on no plan: the same gateway with admission skipped (metering still on).
        open_key = gateway_cli(db_url, "create-key", "--tenant", f"{tenant}-unlimited")

        metrics_urls = {}

        def serve(extra, name):
            env = dict(os.environ, DATABASE_URL=db_url, RUST_LOG="warn")
            metrics_port = free_port()
            proc, url = start(
                [os.path.join(BIN, "gateway"), "serve", "--listen", "127.0.0.1:0",
                 "--metrics-listen", f"127.0.0.1:{metrics_port}", "--worker", stub_url,
                 "--spool-dir", os.path.join(work, f"spool-{name}"), *extra],
                "gateway listening on ", env=env)
            procs.append(proc)
            metrics_urls[url] = f"http://127.0.0.1:{metrics_port}/metrics"
            time.sleep(0.5)
            return proc, url

        bare, bare_url = start([os.path.join(BIN, "bare-proxy"), stub_url], "bare-proxy listening on ")
        procs.append(bare)

        targets = [("direct", stub_url, None, stub), ("nginx", f"http://127.0.0.1:{nginx_port}", None, None),
                   ("hyper-bare", bare_url, None, bare)]
        gw_proc, gw_url = serve([], "metered")
        targets.append(("gateway", gw_url, key, gw_proc))
        targets.append(("gw-nolimit", gw_url, open_key, gw_proc))
        iv_proc, iv_url = serve(["--spool-fsync-interval-ms", "10"], "interval")
        targets.append(("gw-interval", iv_url, key, iv_proc))
        targets.append(("gw-interval-nolimit", iv_url, open_key, iv_proc))
        unmetered_proc, unmetered_url = serve(["--benchmark-unmetered"], "unmetered")
        targets.append(("gw-unmetered", unmetered_url, open_key, unmetered_proc))
        time.sleep(0.5)

        path = "/v1/chat/completions"
        rounds = max(1, args.rounds)
        samples = {name: {"max": []} for name, _, _, _ in targets}
        metered_requests = {gw_url: 0, iv_url: 0}
        spool_before = (metric(metrics_urls[gw_url], "gateway_usage_spool_durable_appends_total"),
                        metric(metrics_urls[gw_url], "gateway_usage_spool_fsyncs_total"))
        for r in range(rounds):
            for name, url, k, proc in targets:
                log(f"round {r + 1}/{rounds} {name}: maximum rate")
                cpu = cpu_seconds(proc)
                threads = thread_cpu(proc) if proc in (gw_proc, iv_proc) else None
                res = loadgen(url + path, 0, args, k)
                if res["errors"]:
                    sys.exit(f"{name} answered errors: {res}")
                done = max(1, res["completed"])
                if proc is not None:
                    # CPU the serving process spent per request (its own threads only).
                    res["cpu_us"] = (cpu_seconds(proc) - cpu) * 1e6 / done
                if threads is not None:
                    after = thread_cpu(proc)
                    res["threads_us"] = {g: (after.get(g, 0.0) - threads.get(g, 0.0)) * 1e6 / done
                                         for g in after}
                samples[name]["max"].append(res)
                if url in metered_requests:
                    metered_requests[url] += res["ok_total"]
        spool_after = (metric(metrics_urls[gw_url], "gateway_usage_spool_durable_appends_total"),
                       metric(metrics_urls[gw_url], "gateway_usage_spool_fsyncs_total"))
        results = {}
        for name, _, _, _ in targets:
            runs = samples[name]["max"]
            best = sorted(runs, key=lambda x: x["rate"])[len(runs) // 2]
            results[name] = {"max": dict(best, rate=median([x["rate"] for x in runs]),
                                         rates=[x["rate"] for x in runs])}
            if "cpu_us" in runs[0]:
                results[name]["cpu_us"] = median([x["cpu_us"] for x in runs])
            if "threads_us" in runs[0]:
                groups = sorted({g for x in runs for g in x["threads_us"]})
                results[name]["threads_us"] = {
                    g: median([x["threads_us"].get(g, 0.0) for x in runs]) for g in groups}
        # Half of each metered gateway's own maximum, for every target.
        halves = {name: max(100, int(results[name]["max"]["rate"] * 0.5) // 100 * 100)
                  for name in ("gateway", "gw-interval")}
        rates = sorted(set(halves.values()))
        for r in range(rounds):
            for rate in rates:
                for name, url, k, _ in targets:
                    log(f"round {r + 1}/{rounds} {name}: {rate} req/s")
                    res = loadgen(url + path, rate, args, k)
                    samples[name].setdefault(rate, []).append(res)
                    if url in metered_requests:
                        metered_requests[url] += res["ok_total"]
        for name, _, _, _ in targets:
            for rate in rates:
                runs = samples[name][rate]
                results[name][rate] = {
                    key: median([x[key] for x in runs])
                    for key in ("rate", "p50_us", "p90_us", "p99_us", "p999_us", "errors")}
        # Metering is only kept up with if the store has every call soon after the load
        # stops: wait for the shipper to catch up, and say how long it took. (Each success,
        # warm-up included, is one record; the shipped count also counts an `unknown`
        # delivery resolved later, which a run this short never has.)
        load_ended = time.monotonic()
        shipped = {}
        drain_s = {}
        for url, proc in ((gw_url, gw_proc), (iv_url, iv_proc)):
            while time.monotonic() - load_ended < 300:
                shipped[url] = metric(metrics_urls[url], "gateway_usage_shipped_events")
                if shipped[url] >= metered_requests[url] and metric(
                        metrics_urls[url], "gateway_usage_spool_backlog_events") == 0:
                    break
                time.sleep(0.1)
            drain_s[url] = time.monotonic() - load_ended
            proc.terminate()
            proc.wait(timeout=60)

        print()
        print(f"Gateway overhead, {os.cpu_count()} CPUs, {args.connections} connections, "
              f"{args.seconds} s per run, median of {rounds} rounds, store {db_url.split(':')[0]}")
        print(f"{'target':<20}{'max req/s':>12}{'vs nginx':>10}{'CPU us/req':>12}   spread of rounds")
        for name, _, _, _ in targets:
            m = results[name]["max"]["rate"]
            cpu = results[name].get("cpu_us")
            cpu = f"{cpu:>12.1f}" if cpu is not None else f"{'':>12}"
            spread = results[name]["max"]["rates"]
            print(f"{name:<20}{m:>12.0f}{m / results['nginx']['max']['rate']:>10.2f}{cpu}"
                  f"   {min(spread):.0f}-{max(spread):.0f}")
        print("(CPU us/req: the serving process's own CPU time per request at its maximum rate;")
        print(" the load generator and the stub share the same cores.)")
        for name in ("gateway", "gw-nolimit", "gw-interval", "gw-interval-nolimit"):
            split = results[name].get("threads_us", {})
            print(f"{name} CPU us/req by thread: " + ", ".join(
                f"{g} {v:.1f}" for g, v in sorted(split.items(), key=lambda x: -x[1])))
        appends = spool_after[0] - spool_before[0]
        fsyncs = spool_after[1] - spool_before[1]
        if fsyncs:
            print(f"spool group commits at maximum rate: {appends / fsyncs:.1f} usage events per fsync "
                  f"({appends:.0f} events, {fsyncs:.0f} fsyncs)")
        unmetered = results["gw-unmetered"]["max"]["rate"]
        for name, label in (("gw-nolimit", "fsync before each response"),
                            ("gw-interval-nolimit", "fsync every 10 ms")):
            metered = results[name]["max"]["rate"]
            print(f"metering cost, {label}: {1 - metered / unmetered:.1%} of throughput "
                  f"({metered:.0f} metered vs {unmetered:.0f} unmetered req/s; target <= 5%)")
        for url, label in ((gw_url, "fsync before each response"), (iv_url, "fsync every 10 ms")):
            state = "all" if shipped[url] >= metered_requests[url] else "NOT all"
            print(f"usage shipped to the store, {label}: {state} {metered_requests[url]} metered calls "
                  f"({shipped[url]:.0f} records) {drain_s[url]:.1f} s after the load stopped")
        print()
        print("Latency counts from when each request was due (open loop); it includes up to")
        print("1 ms of timer granularity, the same for every target, so compare 'added'.")
        print(f"{'target':<20}{'rate':>8}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}{'errors':>8}")
        for rate in rates:
            direct = results["direct"][rate]
            for name, _, _, _ in targets:
                r = results[name][rate]
                added50 = (r["p50_us"] - direct["p50_us"]) / 1000
                added99 = (r["p99_us"] - direct["p99_us"]) / 1000
                print(f"{name:<20}{rate:>8}{r['p50_us'] / 1000:>9.3f}{r['p99_us'] / 1000:>9.3f}"
                      f"{added50:>11.3f}{added99:>11.3f}{r['errors']:>8}")
        print()
        for name in ("gateway", "gw-interval"):
            half = halves[name]
            ratio = results[name]["max"]["rate"] / results["nginx"]["max"]["rate"]
            added99 = (results[name][half]["p99_us"] - results["direct"][half]["p99_us"]) / 1000
            print(f"{name}/nginx throughput: {ratio:.2f} (target >= 0.80); "
                  f"p99 added at {half} req/s: {added99:.3f} ms (target <= 0.5)")
        bare_max = results["hyper-bare"]["max"]["rate"]
        print(f"hyper-bare/nginx throughput: {bare_max / results['nginx']['max']['rate']:.2f} "
              "(the stack with nothing on it); the gateway's share of it: " + ", ".join(
                  f"{name} {results[name]['max']['rate'] / bare_max:.2f}"
                  for name in ("gateway", "gw-interval", "gw-interval-nolimit", "gw-unmetered")))
        with open(os.path.join(ROOT, "target", "bench-gateway.json"), "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=2)
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
