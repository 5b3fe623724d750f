#!/usr/bin/env bash
# Build every csrc/fuzz/fuzz_*.c with libFuzzer + ASan + UBSan and run each
# for a while from its seed corpus; exit non-zero if any fails to build or
# finds a crash.
#
#   csrc/fuzz/run.sh [seconds]        (default 20 per target)
#
# A target's first two lines name what it links, as the C unit tests do:
#   /* sources: csrc/smtp/parse.c */
#   /* libs: */
# Seeds live in csrc/fuzz/corpus/<target>/ and are only read; what the
# fuzzer finds goes to $FUZZ_BUILD/corpus/<target>/ (default build/fuzz), and
# crashing inputs to $FUZZ_BUILD/artifacts/<target>/.
# Env: FUZZ_BUILD, CLANG (default clang), FUZZ_FLAGS (extra libFuzzer flags).
set -u

seconds=${1:-20}
case $seconds in
    '' | *[!0-9]*) echo "usage: $0 [seconds]" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root" || exit 2
build=${FUZZ_BUILD:-build/fuzz}
clang=${CLANG:-clang}
cflags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
        -Icsrc -D_GNU_SOURCE)

# The text of the "/* key: ... */" comment on line `n` of file `f`.
header() {
    local f=$1 n=$2 key=$3 line
    line=$(sed -n "${n}p" "$f")
    case $line in
        "/* $key:"*"*/") line=${line#"/* $key:"}; echo "${line%"*/"}" ;;
        *) echo "$f: line $n must be '/* $key: ... */'" >&2; return 1 ;;
    esac
}

failed=()
targets=("$here"/fuzz_*.c)
if [ ! -e "${targets[0]}" ]; then
    echo "no fuzz targets in $here" >&2
    exit 2
fi

for src in "${targets[@]}"; do
    name=$(basename "$src" .c)
    echo "=== $name: build"
    if ! sources=$(header "$src" 1 sources) || ! libs=$(header "$src" 2 libs); then
        failed+=("$name (header)")
        continue
    fi
    mkdir -p "$build/corpus/$name" "$build/artifacts/$name" || exit 2
    # shellcheck disable=SC2086  # sources and libs are word lists
    if ! "$clang" "${cflags[@]}" $sources "$src" -o "$build/$name" $libs; then
        failed+=("$name (build)")
        continue
    fi

    seeds=()
    [ -d "$here/corpus/$name" ] && seeds=("$here/corpus/$name")
    echo "=== $name: run ${seconds}s"
    # shellcheck disable=SC2086  # FUZZ_FLAGS is a word list
    "$build/$name" -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="$build/artifacts/$name/" ${FUZZ_FLAGS:-} \
        "$build/corpus/$name" ${seeds[@]+"${seeds[@]}"} 2>"$build/$name.log"
    rc=$?
    if [ $rc -eq 0 ]; then
        tail -n 6 "$build/$name.log"
    else
        # the report starts at the sanitizer's or libFuzzer's first line
        sed -n '/^==[0-9]*==\|runtime error\|^INFO: .*deadly\|==ERROR/,$p' "$build/$name.log" | head -n 80
        echo "=== $name: FAILED (exit $rc); log $build/$name.log, inputs in $build/artifacts/$name/"
        failed+=("$name")
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz: failed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets clean, ${seconds}s each"
