#!/usr/bin/env bash
# The latency the authentication extractor adds to a request, measured with wrk on loopback:
# the same route of examples/axum_host.rs (`/hello`, which takes `Option<Authenticated>`) without
# a key (no verification) and with one (one verification on SQLite). Needs wrk (Debian: wrk).
#
# The two are measured in alternating rounds (ROUNDS, default 7, of SECONDS_PER_RUN, default 5,
# each), so that a machine that speeds up or slows down during the run affects both alike; the
# summary is the median over rounds of each percentile, and of the per-round difference.
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

# One wrk run; prints "p50 p99" in microseconds.
run() {
  wrk -t1 -c1 -d"${SECONDS_PER_RUN:-5}s" --latency "$@" http://127.0.0.1:3000/hello |
    awk '
      function micros(value) {
        if (value ~ /us$/) return value + 0
        if (value ~ /ms$/) return value * 1000
        if (value ~ /s$/) return value * 1000000
        return value
      }
      $1 == "50%" { p50 = micros($2) }
      $1 == "99%" { p99 = micros($2) }
      END { printf "%.1f %.1f\n", p50, p99 }'
}

run > /dev/null # warm up the server and the page cache
for round in $(seq 1 "${ROUNDS:-7}"); do
  read -r bare50 bare99 < <(run)
  read -r keyed50 keyed99 < <(run -H "x-api-key: $key")
  echo "$bare50 $bare99 $keyed50 $keyed99" >> "$dir/rounds"
  echo "round $round: without a key p50 $bare50 µs p99 $bare99 µs; with a key p50 $keyed50 µs p99 $keyed99 µs"
done

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
column() { awk "{ print $1 }" "$dir/rounds" | median; }
echo "median over rounds (µs):"
echo "  without a key: p50 $(column '$1')  p99 $(column '$2')"
echo "  with a key:    p50 $(column '$3')  p99 $(column '$4')"
echo "  added:         p50 $(column '$3 - $1')  p99 $(column '$4 - $2')"
