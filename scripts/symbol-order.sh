#!/usr/bin/env bash
# Regenerate crates/celeriac-cli/symbol-order.txt: the functions a `--python-app` prefork
# supervisor runs (start-up, a drain of each of the bench's two Python tasks, shutdown), hottest
# first, as the linker names them. crates/celeriac-cli/build.rs turns the list into a linker
# script that puts this code together in .text.hot, before .text (ARCHITECTURE.md, "Memory of
# the supervisor"). Regenerate after a dependency update: symbol hashes follow crate metadata.
#
#   CELERIAC_SYMBOL_ORDER=0 cargo build --release -p celeriac-cli -p celeriac-bench
#   scripts/symbol-order.sh [path/to/celeriac]      # default target/release/celeriac
#   cargo build --release -p celeriac-cli           # relinks with the new order
#   scripts/hot-pages.sh && cargo build --release -p celeriac-cli   # what callgrind missed
#
# Profile a binary built without the order (CELERIAC_SYMBOL_ORDER=0): valgrind names no
# function of one linked with it (its symbols are outside the `.text` it reads them from), and
# the list comes out empty.
#
# Needs valgrind (callgrind), RabbitMQ and Redis as for `celeriac-bench compare`, and the test
# virtualenv (scripts/python-env.sh). The supervisor runs under callgrind (about 50x slower), so
# each drain is 3,000 messages (DRAIN=N to change). Every function that ran is listed, start-up
# code too: nothing releases code pages once touched, so all of it is resident at the drain's
# peak and belongs with the hot code. Names the build no longer has are skipped by the linker.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(realpath "${1:-$REPO/target/release/celeriac}")"
BENCH="$REPO/target/release/celeriac-bench"
OUT="$REPO/crates/celeriac-cli/symbol-order.txt"
for f in "$BIN" "$BENCH"; do
    [[ -x "$f" ]] || { echo "symbol-order: $f is missing: cargo build --release -p celeriac-cli -p celeriac-bench" >&2; exit 2; }
done
command -v valgrind >/dev/null || { echo "symbol-order: valgrind is not installed" >&2; exit 2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The bench starts the worker through this wrapper; valgrind execs the tool in the same process,
# so the pid the bench watches and stops is the supervisor's.
cat >"$tmp/celeriac" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --dump-instr=no \
    --callgrind-out-file="$tmp/callgrind.out.%p" "$BIN" "\$@"
WRAP
chmod +x "$tmp/celeriac"

"$BENCH" compare --parts python --skip-celery --no-setup --celery-drain "${DRAIN:-3000}" \
    --celeriac-bin "$tmp/celeriac"

shopt -s nullglob
outs=("$tmp"/callgrind.out.*)
(( ${#outs[@]} > 0 )) || { echo "symbol-order: callgrind wrote no profile" >&2; exit 1; }
python3 "$REPO/scripts/callgrind-symbols.py" "$BIN" "${outs[@]}" >"$tmp/order"
n=$(wc -l <"$tmp/order")
(( n > 100 )) || { echo "symbol-order: only $n functions found; $OUT left as it was" >&2; exit 1; }
mv "$tmp/order" "$OUT"
echo "symbol-order: $n functions from ${#outs[@]} profile(s) written to $OUT" >&2
