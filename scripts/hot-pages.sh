#!/usr/bin/env bash
# Add to crates/celeriac-cli/symbol-order.txt the functions a `--python-app` supervisor runs at
# full speed that its callgrind profile missed (scripts/symbol-order.sh runs it 50x slower, so
# code that only a fast drain reaches, a wide window, the packed reserve, is not in it). Such a
# function stays in .text, where each page of it it touches costs 64 KiB of resident code
# (ARCHITECTURE.md, "Memory of the supervisor").
#
#   cargo build --release -p celeriac-cli -p celeriac-bench   # with the current symbol-order.txt
#   scripts/hot-pages.sh [path/to/celeriac]                  # default target/release/celeriac
#   cargo build --release -p celeriac-cli                     # relinks with the longer list
#
# Needs root, RabbitMQ and Redis as for `celeriac-bench compare`, and the test virtualenv. For
# the run it turns the disk's read-ahead off and drops the page cache, so that the only pages of
# the executable in memory are those the worker touched (the kernel's fault-around maps only
# cached pages); read-ahead is put back on exit. Then it reads which code pages the supervisor
# holds at its peak (scripts/hot-pages.py) and appends the functions on those outside .text.hot.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(realpath "${1:-$REPO/target/release/celeriac}")"
BENCH="$REPO/target/release/celeriac-bench"
ORDER="$REPO/crates/celeriac-cli/symbol-order.txt"
for f in "$BIN" "$BENCH"; do
    [[ -x "$f" ]] || { echo "hot-pages: $f is missing: cargo build --release -p celeriac-cli -p celeriac-bench" >&2; exit 2; }
done
[[ $(id -u) -eq 0 ]] || { echo "hot-pages: needs root (page cache, read-ahead, pagemap)" >&2; exit 2; }

# The disk the executable is on: /sys/block/<disk>/queue/read_ahead_kb.
dev="$(basename "$(df --output=source "$BIN" | tail -1)")"
disk="$dev"
[[ -e /sys/block/$disk ]] || disk="$(basename "$(readlink -f "/sys/class/block/$dev/..")")"
ra="/sys/block/$disk/queue/read_ahead_kb"
[[ -w "$ra" ]] || { echo "hot-pages: cannot set the read-ahead of $dev ($ra)" >&2; exit 2; }

tmp="$(mktemp -d)"
old_ra="$(cat "$ra")"
sampler=""
cleanup() {
    echo "$old_ra" >"$ra"
    [[ -n "$sampler" ]] && kill "$sampler" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

echo 0 >"$ra"
sync
echo 1 >/proc/sys/vm/drop_caches
python3 "$REPO/scripts/hot-pages.py" sample "$tmp/pages.json" &
sampler=$!
"$BENCH" compare --parts python --skip-celery --no-setup --celeriac-bin "$BIN"
kill "$sampler"
sampler=""
[[ -s "$tmp/pages.json" ]] || { echo "hot-pages: no worker was sampled" >&2; exit 1; }
python3 "$REPO/scripts/hot-pages.py" functions "$BIN" "$tmp/pages.json" "$ORDER" >"$tmp/new"
n=$(wc -l <"$tmp/new")
cat "$tmp/new" >>"$ORDER"
echo "hot-pages: $n functions appended to $ORDER" >&2
