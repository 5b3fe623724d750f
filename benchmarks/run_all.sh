#!/bin/sh
# Run every benchmarks/bench_*.py in turn, passing all arguments through
# (e.g. --quick, --only mailengine).  Prints everything; exits non-zero only
# when a benchmark reports a harness error (its exit status is non-zero).
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
if [ -x "$repo/.venv/bin/python" ]; then
    py="$repo/.venv/bin/python"
else
    py=$(command -v python3)
fi

status=0
for bench in "$here"/bench_*.py; do
    [ -e "$bench" ] || continue
    name=$(basename "$bench" .py)
    echo "=== $name"
    "$py" "$bench" "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "=== $name: exit status $rc (harness error)" >&2
        status=1
    fi
done
exit $status
