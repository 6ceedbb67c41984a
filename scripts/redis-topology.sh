#!/usr/bin/env bash
# Starts a Redis topology on loopback for the load tool's measurements, and prints the load
# tool's flags for it; `stop` kills it again. Every server runs with `--save "" --appendonly
# no` and keeps its files in DIR.
#
#   scripts/redis-topology.sh standalone DIR   # one server on 127.0.0.1:7300
#   scripts/redis-topology.sh sentinel DIR     # master 7310, replica 7311, sentinels 27310-27312
#   scripts/redis-topology.sh cluster DIR      # 3 masters on 7320-7322
#   scripts/redis-topology.sh stop DIR
#
# For example:
#   flags=$(scripts/redis-topology.sh cluster target/topology)
#   cargo run --release -p load --features redis -- multi --instances 3 --requests 300 $flags
#   scripts/redis-topology.sh stop target/topology
set -euo pipefail

mode="${1:?usage: redis-topology.sh standalone|sentinel|cluster|stop DIR}"
dir="${2:?usage: redis-topology.sh standalone|sentinel|cluster|stop DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

server() { # port [args...]
    local port="$1"
    shift
    mkdir -p "$dir/$port"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
        --dir "$dir/$port" --logfile "$dir/$port/redis.log" --pidfile "$dir/$port/redis.pid" "$@"
}

ping() { # port: waits until it answers
    for _ in $(seq 1 200); do
        redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "redis-topology: 127.0.0.1:$1 does not answer" >&2
    exit 1
}

case "$mode" in
standalone)
    server 7300
    ping 7300
    echo "--redis redis://127.0.0.1:7300/"
    ;;
sentinel)
    server 7310
    ping 7310
    server 7311 --replicaof 127.0.0.1 7310 --repl-diskless-sync-delay 0
    ping 7311
    for port in 27310 27311 27312; do
        mkdir -p "$dir/$port"
        printf 'port %s\nbind 127.0.0.1\nsentinel monitor refresh 127.0.0.1 7310 2\nsentinel down-after-milliseconds refresh 1000\nsentinel failover-timeout refresh 3000\n' \
            "$port" >"$dir/$port/sentinel.conf"
        redis-server "$dir/$port/sentinel.conf" --sentinel --daemonize yes \
            --logfile "$dir/$port/redis.log" --pidfile "$dir/$port/redis.pid"
        ping "$port"
    done
    # Until every sentinel knows the replica.
    for port in 27310 27311 27312; do
        for _ in $(seq 1 200); do
            redis-cli -p "$port" sentinel replicas refresh 2>/dev/null | grep -q 7311 && break
            sleep 0.05
        done
    done
    echo "--redis-sentinel redis://127.0.0.1:27310/ --redis-sentinel redis://127.0.0.1:27311/ --redis-sentinel redis://127.0.0.1:27312/ --redis-master refresh"
    ;;
cluster)
    for port in 7320 7321 7322; do
        server "$port" --cluster-enabled yes --cluster-config-file nodes.conf \
            --cluster-node-timeout 2000
        ping "$port"
    done
    redis-cli --cluster create 127.0.0.1:7320 127.0.0.1:7321 127.0.0.1:7322 \
        --cluster-replicas 0 --cluster-yes >"$dir/create.log"
    for port in 7320 7321 7322; do
        for _ in $(seq 1 200); do
            redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' && break
            sleep 0.05
        done
    done
    echo "--redis-cluster redis://127.0.0.1:7320/ --redis-cluster redis://127.0.0.1:7321/ --redis-cluster redis://127.0.0.1:7322/ --redis-min-replicas 0"
    ;;
stop)
    for pidfile in "$dir"/*/redis.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$dir"
    ;;
*)
    echo "usage: redis-topology.sh standalone|sentinel|cluster|stop DIR" >&2
    exit 2
    ;;
esac
