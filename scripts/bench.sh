#!/usr/bin/env bash
# Runs every criterion group and the memory comparison RUNS times (default 3) and prints the
# tables of BENCHMARKS.md from them.
#
#   scripts/bench.sh [runs]          # full runs: about 6 minutes each on 2 cores
#   scripts/bench.sh summary         # only print the tables of the runs already made
#
# Each run's criterion output, stdout (inner-call counts) and memory lines are kept in
# target/bench-runs/run<N>/ (criterion itself keeps only the last run).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/bench-runs
if [ "${1:-}" != summary ]; then
    runs="${1:-3}"
    case "$runs" in
        '' | *[!0-9]*) echo "bench.sh: runs must be a number, got '$runs'" >&2; exit 2 ;;
    esac
    rm -rf "$out"
    mkdir -p "$out"
    cargo bench -p tower-refresh-coalesce --no-run
    cargo build --release -p bench-tools --bin memory
    {
        date -u +"start %Y-%m-%dT%H:%M:%SZ"
        git rev-parse --short HEAD
        git status --short | grep -v '^??' || true
        nproc
        grep -m1 'model name' /proc/cpuinfo || true
    } >"$out/machine.txt"
    for run in $(seq 1 "$runs"); do
        dir="$out/run$run"
        mkdir -p "$dir"
        rm -rf target/criterion
        echo "bench.sh: run $run of $runs" >&2
        cat /proc/loadavg >"$dir/loadavg-before.txt"
        cargo bench -p tower-refresh-coalesce --bench coalesce --bench http_front >"$dir/stdout.txt" 2>"$dir/stderr.txt"
        for contender in ours moka; do
            target/release/memory "$contender" 1000000 >>"$dir/memory.txt"
        done
        cat /proc/loadavg >"$dir/loadavg-after.txt"
        cp -r target/criterion "$dir/criterion"
    done
    date -u +"end %Y-%m-%dT%H:%M:%SZ" >>"$out/machine.txt"
fi
exec python3 scripts/bench-summary.py "$out"
