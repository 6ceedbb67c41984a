#!/usr/bin/env bash
# Leak check (issue 7, item 6): the storm, panic, hard-cap, dropped-caller and invalidation
# tests of tests/core.rs under valgrind memcheck, then the fixed scenarios and a few random
# cases of tests/model. Fails on any definite leak, any memcheck error or a failed test;
# prints the definite / indirect / possibly lost / still reachable bytes of each run.
#
#   scripts/leak-check.sh            # the tests below, one valgrind run each
#   scripts/leak-check.sh NAME...    # other tests of tests/core.rs (exact names)
#   MODEL=0 scripts/leak-check.sh    # tests/core.rs only
#
# Left out: `callers_of_ten_thousand_keys_each_get_their_own_keys_result` (100,000 callers
# on a real clock). Under valgrind, spawning them takes longer than the default hard cap
# (30 s), so early flights are aborted and later callers lead again: the test's own count
# assertion fails (21,603 leaders for 10,000 keys in one run), not the layer. The storm of
# 10,000 callers of one key stays in.
#
# RUST_BACKTRACE is unset: a panic (the panic tests have one on purpose) would otherwise
# load the binary's debug info for symbolication, ~50 MB that stay "still reachable".
# The "possibly lost" 48 bytes of every run are the test harness's own main-thread handle
# (std::thread::current, from libtest's result channel), not this crate's.
#
# Why valgrind and not LeakSanitizer: it runs the ordinary debug test binary of the stable
# toolchain (no RUSTC_BOOTSTRAP, no separate target dir, no rebuild of the dependency tree).
# Each test runs in its own valgrind process, so a leak is attributed to one test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind
fi

tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(
        # The storm: 10,000 callers of one key (2 worker threads).
        ten_thousand_callers_of_one_key_make_one_inner_call
        # Panics, errors, the hard cap.
        a_panicking_inner_call_fails_every_waiter_without_panicking_them
        an_inner_error_reaches_its_waiters_and_is_not_replayed
        the_hard_cap_aborts_a_hung_inner_call
        # Dropped callers, timeouts.
        a_dropped_leader_caller_does_not_cancel_the_inner_call
        when_every_caller_is_gone_the_call_completes_once_and_no_task_is_left
        waiters_time_out_at_exactly_the_wait_timeout_and_the_flight_goes_on
        # Invalidation, limits, expiry.
        a_flight_invalidated_while_running_is_not_replayed
        invalidation_removes_a_replay
        invalidating_a_group_removes_each_of_its_entries_and_only_those
        the_waiter_cap_answers_overloaded_at_once
        the_entry_cap_answers_overloaded_at_once
        the_table_is_empty_after_quiescence_and_the_ttl
    )
fi

unset RUST_BACKTRACE

# The test binary of a test target, built if needed (debug profile).
binary() {
    cargo test -p tower-refresh-coalesce "$@" --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}
core=$(binary --test core)
[ -x "$core" ] || { echo "no test binary for tests/core.rs" >&2; exit 1; }
echo "tests/core.rs: $core"

logs=$(mktemp -d)
failed=0
printf '%-72s %8s %10s %10s %10s %16s %8s\n' test result definite indirect possibly "still reachable" seconds

# check LABEL BINARY ARGS...: one valgrind run of a test binary.
check() {
    local label=$1 bin=$2
    shift 2
    local log="$logs/${label//[^A-Za-z0-9_]/_}.log"
    local start result seconds
    start=$(date +%s)
    if valgrind --leak-check=full --show-leak-kinds=definite,indirect,possible \
        --errors-for-leak-kinds=definite --error-exitcode=1 --log-file="$log" \
        "$bin" "$@" --test-threads=1 >"$log.out" 2>&1; then
        result=ok
    else
        result=FAILED
        failed=1
    fi
    seconds=$(($(date +%s) - start))
    grep -Eq "test result: ok\. [1-9][0-9]* passed" "$log.out" || { result="NOT RUN"; failed=1; }
    bytes() {
        local n
        n=$(sed -n "s/.*$1: *\([0-9,]*\) bytes.*/\1/p" "$log" | tail -n 1)
        echo "${n:-0}"
    }
    printf '%-72s %8s %10s %10s %10s %16s %8s\n' "$label" "$result" \
        "$(bytes 'definitely lost')" "$(bytes 'indirectly lost')" \
        "$(bytes 'possibly lost')" "$(bytes 'still reachable')" "$seconds"
    if [ "$result" != ok ]; then
        sed -n '/LEAK SUMMARY/,$p;/definitely lost in/,+30p' "$log" | head -80
        tail -n 20 "$log.out"
    fi
}

for test in "${tests[@]}"; do
    # --exact: this one test; --test-threads=1: no harness threads beyond the test's own.
    check "$test" "$core" --exact "$test"
done

if [ "${MODEL:-1}" != 0 ] && [ $# -eq 0 ]; then
    # The model runs on a paused clock: valgrind's slowdown changes nothing it checks.
    model=$(binary --all-features --test model)
    [ -x "$model" ] || { echo "no test binary for tests/model" >&2; exit 1; }
    echo "tests/model: $model"
    check "model: scenarios::" "$model" scenarios::
    PROPTEST_CASES=${LEAK_CASES:-32} check "model: ${LEAK_CASES:-32} cases per property" \
        "$model" _follows_the_model
fi
echo "valgrind logs: $logs"
exit $failed
