#!/usr/bin/env bash
# Fuzzes the layer with cargo-fuzz (libFuzzer): each target in turn, one process each.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     (default: 60 s; front, token)
#
# Seeds come from fuzz/seeds/<target> (committed); what the fuzzer learns goes to
# fuzz/corpus/<target> and crashes to fuzz/artifacts/<target> (both git-ignored). Exits
# non-zero on a crash, a timeout or an out-of-memory, and prints the reproducer.
#
# Needs: cargo-fuzz (installed here if missing, from crates.io), a C++ compiler (libFuzzer
# is C++; `c++`, `g++` or `clang++`), and nightly compiler flags, which the stable toolchain
# gives with RUSTC_BOOTSTRAP=1. Environment: FUZZ_DEBUG=1 prints every request (for triage
# only).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(front token)
fi
case "$seconds" in
    '' | *[!0-9]*) echo "fuzz.sh: seconds-per-target must be a number, got '$seconds'" >&2; exit 2 ;;
esac

for target in "${targets[@]}"; do
    if [ ! -d "fuzz/seeds/$target" ]; then
        echo "fuzz.sh: unknown target '$target' (no fuzz/seeds/$target)" >&2
        exit 2
    fi
done

# libFuzzer is compiled from C++ by libfuzzer-sys's build script.
cxx="${CXX:-}"
if [ -z "$cxx" ]; then
    for candidate in c++ g++ clang++; do
        if command -v "$candidate" >/dev/null 2>&1; then cxx="$candidate"; break; fi
    done
fi
if [ -z "$cxx" ] || ! command -v "$cxx" >/dev/null 2>&1; then
    echo "fuzz.sh: no C++ compiler found (c++, g++ or clang++, or \$CXX): cargo-fuzz cannot" >&2
    echo "fuzz.sh: build libFuzzer without one. Install one (apt-get install g++) or skip fuzzing." >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...); this lets stable take them.
export RUSTC_BOOTSTRAP=1

cd fuzz
mkdir -p target
status=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="target/fuzz-$target.log"
    echo "fuzz.sh: $target for ${seconds}s (log: fuzz/$log)"
    # Release build with debug assertions (cargo-fuzz's default) and AddressSanitizer.
    cargo fuzz build "$target"
    # One process, one job: the machine is shared. libFuzzer options:
    #  -max_len: room for 16 KiB+ bodies built from repeats, and 5 KiB tokens;
    #  -timeout: one input is a few ms of real time (the clock is paused), 10 s is a hang;
    #  -rss_limit_mb: libFuzzer's default, stated.
    set +e
    nice -n 10 cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    code=$?
    set -e
    grep -E '^#[0-9]+\s+(DONE|pulse)' "$log" | tail -1 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|slowest_unit_time_sec|peak_rss_mb)' "$log" || true
    if [ "$code" -ne 0 ]; then
        echo "fuzz.sh: $target FAILED (exit $code); the end of its log:" >&2
        tail -n 60 "$log" >&2
        ls -l "artifacts/$target" >&2 || true
        status=1
    else
        echo "fuzz.sh: $target ok; corpus: $(ls "corpus/$target" | wc -l) inputs"
    fi
done
exit "$status"
