#!/usr/bin/env bash
# Soak: the load tool's steady mode against the reference server in its own process, with
# the replay TTL expiring continuously, while the server's resident set is sampled.
#
#   scripts/soak.sh [seconds] [rate]          (default: 600 s at 300 refreshes/s)
#
# The server runs with `--ttl 2` on a SQLite file in a temporary directory; the client
# holds each refresh token for 1 s after a newer one arrives (`--hold 1`), over 50 token
# families, so replays, rotations and expiries interleave for the whole run. Prints the
# load tool's report, the server's RSS every 30 s, and the layer's gauges once the last
# replay has expired. Exits non-zero if any request was not answered 200, if a reuse was
# detected, or if a gauge did not return to 0.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-600}"
rate="${2:-300}"
for n in "$seconds" "$rate"; do
    case "$n" in
        '' | *[!0-9]*) echo "soak.sh: arguments must be numbers, got '$n'" >&2; exit 2 ;;
    esac
done

cargo build --release -p server -p load
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
addr="127.0.0.1:$port"
target/release/server --addr "$addr" --db "$dir/tokens.db" --ttl 2 >"$dir/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
    curl -fsS "http://$addr/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

rss() { awk '/^VmRSS:/ { print $2 " kB" }' "/proc/$server/status"; }
gauges() {
    curl -fsS "http://$addr/metrics" \
        | grep -E '^(refresh_coalesce_(flights_active|entries)|refresh_(rotations|reuse_detected)_total)[ {]'
}

echo "soak.sh: server pid $server on $addr, RSS at start $(rss)"
(
    start=$(date +%s)
    while sleep 30; do
        echo "soak.sh: t+$(($(date +%s) - start)) s server RSS $(rss)"
    done
) &
sampler=$!
trap 'kill "$sampler" "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT

status=0
target/release/load steady --target "http://$addr" --rate "$rate" \
    --duration "$seconds" --tokens 50 --hold 1 --ttl 2 | tee "$dir/load.txt" || status=$?
kill "$sampler" 2>/dev/null || true
grep -qE 'requests in .*; 200 ×[0-9]+$' "$dir/load.txt" \
    || { echo "soak.sh: a request was not answered 200" >&2; status=1; }
echo "soak.sh: server RSS at the end of the load $(rss)"

# Past the TTL and the sweeper's period: every replay has expired and been swept.
sleep 4
echo "soak.sh: 4 s after the load, server RSS $(rss); gauges:"
gauges | tee "$dir/gauges.txt"
awk '$1 ~ /^refresh_coalesce_(flights_active|entries)$/ && $2 != 0 { bad = 1 } END { exit bad }' \
    "$dir/gauges.txt" || { echo "soak.sh: a gauge did not return to 0" >&2; status=1; }
awk '$1 == "refresh_reuse_detected_total" && $2 != 0 { bad = 1 } END { exit bad }' \
    "$dir/gauges.txt" || { echo "soak.sh: reuse detected" >&2; status=1; }
exit "$status"
