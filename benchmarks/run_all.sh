#!/bin/sh
# Run every benchmarks/bench_*.py in turn (bench_deliver, bench_idle_memory,
# bench_pop3, bench_receive), passing all arguments through (e.g. --quick,
# --only mailengine).  Prints everything; exits non-zero only when a benchmark
# reports a harness error (its exit status is non-zero).
#
#   --bench NAME[,NAME]   run only these benchmarks (e.g. --bench deliver
#                         runs bench_deliver.py); not passed on
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
if [ -x "$repo/.venv/bin/python" ]; then
    py="$repo/.venv/bin/python"
else
    py=$(command -v python3)
fi

# Take --bench out of the arguments; everything else goes to each benchmark.
selected=""
n=$#
while [ "$n" -gt 0 ]; do
    arg=$1
    shift
    n=$((n - 1))
    case $arg in
        --bench)
            if [ "$n" -eq 0 ]; then
                echo "run_all.sh: --bench needs a value" >&2
                exit 2
            fi
            selected="$selected,$1"
            shift
            n=$((n - 1))
            ;;
        --bench=*)
            selected="$selected,${arg#--bench=}"
            ;;
        *)
            set -- "$@" "$arg"
            ;;
    esac
done

status=0
for bench in "$here"/bench_*.py; do
    [ -e "$bench" ] || continue
    name=$(basename "$bench" .py)
    if [ -n "$selected" ]; then
        case ",$selected," in
            *",${name#bench_},"*|*",$name,"*) ;;
            *) continue ;;
        esac
    fi
    echo "=== $name"
    "$py" "$bench" "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "=== $name: exit status $rc (harness error)" >&2
        status=1
    fi
done
exit $status
