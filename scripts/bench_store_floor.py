#!/usr/bin/env python3
"""What the SQLite ledger's own insert costs per usage record (a benchmark, not a test).

Metering's cost to the gateway has a floor that no shipper or spool work can go below: the
database engine's work to store one record. This measures that floor with SQLite itself,
driven from C through Python's `sqlite3` module (prepared statement, rows bound straight
from a list, one transaction per 1,000 rows as the shipper batches them, the store's WAL
settings), so neither sqlx nor the shipper is in the figure. Two schemas:

  as migrated   usage_records exactly as `migrations/sqlite/` builds it (the request id's
                unique key, the tenant/time and time indexes the dashboard and exports read,
                the partial invoice index), inserted as the ledger inserts (stored ids
                skipped)
  record only   the same columns in a table keyed by the request id alone (WITHOUT ROWID)
                and no other index: the least a store can do to keep each call's record
                with its id unique (SPEC §6.1-6.2), though no query of the dashboard, the
                usage API or the exports is then served by an index

Request ids are time-ordered (like the gateway's UUIDv7 ids) and two tenants alternate, so
every index is appended to at its right edge: the cheapest case for a B-tree.

With `--unmetered-rps N` (the gateway's maximum without metering, from
`scripts/bench_gateway.py` on the same machine) it also prints each floor as a share of the
machine's CPU per request at that rate: metering cannot cost less than that share of
throughput while the store shares the machine's cores with the gateway.

Usage: scripts/bench_store_floor.py [--rows 300000] [--rounds 3] [--unmetered-rps N]
"""

import argparse
import glob
import os
import sqlite3
import sys
import tempfile
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("request_id, tenant_id, key_id, model, endpoint, prompt_tokens, completion_tokens, "
           "started_at, finished_at, status, delivery")
# The ledger's SQLite insert (billing/src/usage.rs), one row per statement.
SKIP_STORED = "ON CONFLICT (request_id) DO NOTHING"
BATCH = 1000


def migrated(db):
    for path in sorted(glob.glob(os.path.join(ROOT, "migrations", "sqlite", "*.sql"))):
        with open(path) as f:
            db.executescript(f.read())
    return f"INSERT INTO usage_records ({COLUMNS}) VALUES ({','.join('?' * 11)}) {SKIP_STORED}"


def record_only(db):
    db.execute("CREATE TABLE usage_records (request_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, "
               "key_id TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, "
               "prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, "
               "started_at BIGINT NOT NULL, finished_at BIGINT NOT NULL, status TEXT NOT NULL, "
               "delivery TEXT NOT NULL, invoice_id TEXT) WITHOUT ROWID")
    return f"INSERT INTO usage_records ({COLUMNS}) VALUES ({','.join('?' * 11)}) {SKIP_STORED}"


SCHEMAS = (("as migrated", migrated), ("record only", record_only))


def rows(n):
    base = 1_800_000_000_000
    out = []
    for i in range(n):
        at = base + i // 20  # about 20,000 calls a second
        row = (f"req_{at:012x}-7{i % 4096:03x}-8{i:015x}", f"tn_bench_{i % 2}", "key_bench_0001",
               "SmolLM2-135M-Instruct", "/v1/chat/completions", 32, 12, at, at + 3, "success",
               "delivered")
        out.append(row)
    return out


def measure(schema, n):
    _, setup = schema
    data = rows(n)
    with tempfile.TemporaryDirectory(prefix="store-floor-") as work:
        db = sqlite3.connect(os.path.join(work, "ledger.db"), isolation_level=None)
        # The shipper's connection settings (billing/src/db.rs).
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "cache_size = -65536",
                       "temp_store = memory", "wal_autocheckpoint = 10000"):
            db.execute(f"PRAGMA {pragma}")
        sql = setup(db)
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, n, BATCH):
            db.execute("BEGIN")
            db.executemany(sql, data[start:start + BATCH])
            db.execute("COMMIT")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        (stored,) = db.execute("SELECT COUNT(*) FROM usage_records").fetchone()
        db.close()
    if stored != n:
        sys.exit(f"{schema[0]}: stored {stored} records of {n}")
    return cpu * 1e6 / n, n / wall


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--unmetered-rps", type=float, default=None)
    args = p.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}, {args.rows} records per run, "
          f"{BATCH} per transaction, median of {args.rounds} rounds")
    per_request = (os.cpu_count() * 1e6 / args.unmetered_rps) if args.unmetered_rps else None
    if per_request:
        print(f"machine CPU per request at {args.unmetered_rps:.0f} req/s on {os.cpu_count()} "
              f"CPUs: {per_request:.1f} us")
    for schema in SCHEMAS:
        runs = [measure(schema, args.rows) for _ in range(args.rounds)]
        cpu = median(r[0] for r in runs)
        line = (f"{schema[0]:<12} {cpu:6.2f} us CPU per record ({min(r[0] for r in runs):.2f}-"
                f"{max(r[0] for r in runs):.2f}), {median(r[1] for r in runs):>9,.0f} records/s")
        if per_request:
            line += f", {100 * cpu / per_request:4.1f}% of a request's CPU"
        print(line)


if __name__ == "__main__":
    main()
