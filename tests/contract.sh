#!/usr/bin/env bash
# The contract test: `apikeys serve` on a fresh SQLite file, then schemathesis with every check
# against the OpenAPI document it serves. Needs the `apikeys` binary (feature cli) and
# schemathesis (pip install schemathesis). Usage: tests/contract.sh [path/to/apikeys]
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${1:-${CARGO_TARGET_DIR:-target}/debug/apikeys}"
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# The verification endpoint is served only with a service credential.
service_token="contract-test-service-credential-$(date +%s%N)"
# GitHub's leak endpoint is served only with GitHub's public keys: a P-256 key made here stands in.
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl ec -pubout 2>/dev/null > "$dir/github.pem"
python3 -c 'import json, sys; print(json.dumps({"public_keys": [{"key_identifier": "contract", "key": open(sys.argv[1]).read(), "is_current": True}]}))' \
  "$dir/github.pem" > "$dir/github.json"
# The same secret is the administrator's, so that the one Authorization header reaches /admin too;
# schemathesis's requests without it would soon spend the budget of wrong credentials.
(cd "$dir" && APIKEYS_SERVICE_TOKEN="$service_token" APIKEYS_ADMIN_TOKEN="$service_token" exec "$binary" serve --listen "127.0.0.1:$port" --github-keys github.json --admin-guesses-per-minute 1000000 > out.txt 2> err.txt) &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$dir/err.txt" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$dir/err.txt" || { cat "$dir/err.txt" >&2; echo "serve did not start" >&2; exit 1; }
key="$(grep -o 'as_live_v1_[a-z2-7]*' "$dir/out.txt" | head -n 1 || true)"
[ -n "$key" ] || { cat "$dir/err.txt" >&2; echo "serve printed no first key" >&2; exit 1; }
schemathesis --config-file schemathesis.toml run "http://127.0.0.1:$port/openapi.json" \
  --checks all --header "x-api-key: $key" --header "Authorization: Bearer $service_token" --max-examples "${APIKEYS_CONTRACT_EXAMPLES:-50}" --no-color \
  --seed "${APIKEYS_CONTRACT_SEED:-1}"
