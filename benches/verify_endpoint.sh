#!/usr/bin/env bash
# Throughput of `POST /keys/verify` under wrk on loopback, against `GET /account/api-keys` with
# the same key: `apikeys serve` on a fresh SQLite file, the key it prints (no credits, no limits),
# both routes in alternating rounds (ROUNDS, default 5, of SECONDS_PER_RUN, default 5, each), so
# that a machine that speeds up or slows down affects both alike. Needs wrk (Debian: wrk).
# Prints requests per second per round and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "install wrk first (apt-get install wrk)" >&2; exit 1; }
cargo build -q --release --features cli --bin apikeys
binary="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/apikeys"
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="bench-service-credential-$(date +%s%N)"
(cd "$dir" && APIKEYS_LOG=warn APIKEYS_SERVICE_TOKEN="$token" exec "$binary" \
  serve --listen "127.0.0.1:$port" > out.txt 2> err.txt) &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q 'as_live_v1_' "$dir/out.txt" 2>/dev/null && break; sleep 0.1; done
key="$(grep -o 'as_live_v1_[a-z2-7]*' "$dir/out.txt" | head -n 1)"
[ -n "$key" ] || { cat "$dir/err.txt" >&2; echo "serve printed no first key" >&2; exit 1; }
cat > "$dir/verify.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"key": "$key"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
LUA

# One wrk run; prints requests per second.
run() {
  wrk -t2 -c16 -d"${SECONDS_PER_RUN:-5}s" "$@" | awk '$1 == "Requests/sec:" { print $2 }'
}

run -s "$dir/verify.lua" "http://127.0.0.1:$port/keys/verify" > /dev/null # warm up
for round in $(seq 1 "${ROUNDS:-5}"); do
  verify="$(run -s "$dir/verify.lua" "http://127.0.0.1:$port/keys/verify")"
  list="$(run -H "x-api-key: $key" "http://127.0.0.1:$port/account/api-keys")"
  echo "$verify $list" >> "$dir/rounds"
  echo "round $round: POST /keys/verify $verify/s; GET /account/api-keys $list/s"
done
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "median over rounds (requests/s):"
echo "  POST /keys/verify:      $(awk '{ print $1 }' "$dir/rounds" | median)"
echo "  GET /account/api-keys:  $(awk '{ print $2 }' "$dir/rounds" | median)"
echo "  ratio verify / list:    $(awk '{ print $1 / $2 }' "$dir/rounds" | median)"
