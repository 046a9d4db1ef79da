#!/usr/bin/env bash
# The long run of the property tests of every parser that reads outside bytes: the
# one-pass chat body parser, the SSE usage comment and event classification, the
# spool's record decoder, key parsing and admin-token (JWT) handling. `cargo test` runs a bounded number of cases of the same
# properties; this runs PROPTEST_CASES of each (default 100000). Failures are kept in
# each crate's proptest-regressions/ folder and replayed first on every later run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES=${PROPTEST_CASES:-100000}
echo "[fuzz] ${PROPTEST_CASES} cases per property" >&2
cargo test -p openai-types --lib -- usage_comment::tests::fuzz
cargo test -p gateway --lib -- proxy::call::tests::fuzz proxy::meter::tests::fuzz \
  keys::tests::properties admin::token::tests::properties
cargo test -p billing --lib -- spool::segment::tests::fuzz
