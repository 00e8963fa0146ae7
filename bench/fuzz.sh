#!/usr/bin/env bash
# Fuzzes kiln's parsers with the cargo-fuzz targets of fuzz/ (issue 17, item 4), one target after
# the other, and reports per target the executions, the time, and whether a crash was found.
#
# Installs: cargo-fuzz (`cargo install cargo-fuzz --locked`, into ~/.cargo/bin) when
# `cargo fuzz` is missing. Needs a nightly toolchain (`rustup toolchain install nightly`); the
# targets build with ASan into fuzz/target/ (honours CARGO_BUILD_JOBS). The first crash report of
# a build also builds the targets once without ASan into fuzz/target/release/ (cargo-fuzz prints
# the failing input with it), which can take minutes.
#
# Usage: bench/fuzz.sh [seconds-per-target] [target...]   (default: 60 s, every target)
#   Each target runs as
#     cargo +nightly fuzz run <t> fuzz/target/corpus-work/<t> fuzz/corpus/<t> -- \
#       -max_total_time=N -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 -print_final_stats=1
#   plus -max_len=16384 for model_ron and -max_len=4096 for expr, and $FUZZ_ARGS if set.
#   FUZZ_KEEP_GOING=1 adds -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1: the
#   target keeps fuzzing after a crash for the whole time, and every crashing input is kept.
#
#   New inputs go to fuzz/target/corpus-work/<t>/ (ignored by git), so the seed corpus in
#   fuzz/corpus/<t>/ stays as fuzz/make_corpus.sh wrote it; crashing inputs go to
#   fuzz/artifacts/<t>/ (copy one to fuzz/regressions/<t>/ to replay it in `cargo test`); each is
#   re-run to classify it (panic message and first kiln frame, or the libFuzzer/ASan error).
#   Full logs: fuzz/target/fuzz-logs/<t>.log.
# Exits 1 if a target crashed (panic, abort, OOM over 2 GB, timeout, stack overflow), 2 if a
# target did not build (and none crashed).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
all=(gguf safetensors_checkpoint engine model_ron expr gguf_tokenizer)
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
fi

limits=(-rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10)
keep_going=()
[[ ${FUZZ_KEEP_GOING:-0} == 1 ]] &&
    keep_going=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)

extra_args() {
    case $1 in
        model_ron) echo "-max_len=16384" ;;
        expr) echo "-max_len=4096" ;;
    esac
}

# Scratch folders of fuzzer processes that have ended (fuzz/harness.rs writes its inputs there).
clean_scratch() {
    local d pid
    for d in /dev/shm/kiln-fuzz-* "${TMPDIR:-/tmp}"/kiln-fuzz-*; do
        [[ -d $d ]] || continue
        pid=${d##*/kiln-fuzz-}
        pid=${pid%%-*}
        kill -0 "$pid" 2>/dev/null || rm -rf "$d"
    done
}

# What a crashing input does, in one line: the panic message and the first kiln frame, or the
# libFuzzer / AddressSanitizer error.
classify() {
    local out what where
    out=$("$1" "${limits[@]}" "$2" 2>&1 || true)
    what=$(grep -m1 -A1 ' panicked at ' <<<"$out" | tail -1 || true)
    if [[ -n $what ]]; then
        where=$(grep -m1 -oE 'at \./(compiler|runtime|src|fuzz)/[^ ]+' <<<"$out" || true)
        echo "panic: $what ${where:+($where)}"
    elif grep -q 'overflowed its stack\|stack-overflow' <<<"$out"; then
        echo "stack overflow"
    else
        what=$(grep -m1 -oE '(libFuzzer|AddressSanitizer): [a-z-]+[^(]*' <<<"$out" || true)
        echo "${what:-unknown (see the log)}"
    fi
}

# Build first, so that the time budget is spent fuzzing.
if [[ ${#targets[@]} -eq 1 ]]; then
    cargo +nightly fuzz build "${targets[0]}"
else
    cargo +nightly fuzz build
fi
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
crashed=0
printf '%-24s %12s %8s  %s\n' target executions seconds result
for t in "${targets[@]}"; do
    work=fuzz/target/corpus-work/$t
    log=$logs/$t.log
    mkdir -p "$work" "fuzz/corpus/$t" "fuzz/artifacts/$t"
    marker=$logs/$t.started
    touch "$marker"
    # shellcheck disable=SC2046,SC2086
    if cargo +nightly fuzz run "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" "${limits[@]}" -print_final_stats=1 "${keep_going[@]}" \
        $(extra_args "$t") ${FUZZ_ARGS:-} >"$log" 2>&1; then
        rc=0
    else
        rc=$?
    fi
    mapfile -t found < <(find "fuzz/artifacts/$t" -type f -newer "$marker" | sort)
    if [[ ${#keep_going[@]} -gt 0 ]]; then
        # Fork mode: the last status line holds the totals ("#N: … time: Ss …").
        execs=$(grep -oE '^#[0-9]+:' "$log" | tail -1 | tr -d '#:' || true)
        fuzz_secs=$(grep -oE 'time: [0-9]+s' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    else
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
        fuzz_secs=$([[ -n $execs && ${rate:-0} -gt 0 ]] && echo $((execs / rate)) || true)
    fi
    if [[ $rc -eq 0 && ${#found[@]} -eq 0 ]]; then
        result=ok
    elif grep -q 'failed to build fuzz script' "$log"; then
        [[ $crashed -eq 1 ]] || crashed=2
        result="BUILD FAILED (see $log)"
    else
        crashed=1
        result="CRASH: ${#found[@]} crashing input(s), exit status $rc"
    fi
    printf '%-24s %12s %8s  %s\n' "$t" "${execs:-?}" "${fuzz_secs:-?}" "$result"
    if [[ ${#found[@]} -gt 0 ]]; then
        bin=fuzz/target/$host/release/$t
        for a in "${found[@]:0:50}"; do
            echo "$(classify "$bin" "$a")	$a"
        done | sort | awk -F'\t' '{n[$1]++; if (!($1 in ex)) ex[$1]=$2}
            END {for (k in n) printf "    %dx %s\n        e.g. %s\n", n[k], k, ex[k]}'
    elif [[ $rc -ne 0 && $result != BUILD* ]]; then
        echo "    no input saved; see $log"
    fi
    clean_scratch
done
exit $crashed
