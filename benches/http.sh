#!/usr/bin/env bash
# The latency the authentication extractor adds to a request, measured with wrk on loopback:
# the same route of examples/axum_host.rs (`/hello`, which takes `Option<Authenticated>`) without
# a key (no verification) and with one (one verification on SQLite). Needs wrk (Debian: wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "install wrk first (apt-get install wrk)" >&2; exit 1; }
cargo build -q --release --example axum_host --features http,sqlite
dir="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
APIKEYS_EXAMPLE_DB="$dir/keys.db" target/release/examples/axum_host > "$dir/out" 2>&1 &
server=$!
for _ in $(seq 1 50); do grep -q listening "$dir/out" 2>/dev/null && break; sleep 0.1; done
key="$(grep -o 'as_live_v1_[a-z2-7]*' "$dir/out" | head -n 1)"
run() { wrk -t1 -c1 -d"${SECONDS_PER_RUN:-10}s" --latency "$@" http://127.0.0.1:3000/hello; }
echo "== /hello without a key (no verification)"
run | grep -E "Latency|50%|99%|Requests/sec"
echo "== /hello with a valid key (one verification on SQLite)"
run -H "x-api-key: $key" | grep -E "Latency|50%|99%|Requests/sec"
