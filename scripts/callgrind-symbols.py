#!/usr/bin/env python3
"""Functions of one executable that ran in callgrind profiles, hottest first.

    scripts/callgrind-symbols.py EXECUTABLE callgrind.out.* > symbol-order.txt

Reads callgrind's output files (recorded with --demangle=no, so names are as the linker sees
them), adds up each function's own cost (instructions, the first event) over all files, keeps
the functions of EXECUTABLE (by the object callgrind attributed them to) and prints their names,
one a line, by cost, highest first. Used by scripts/symbol-order.sh.
"""
import os
import re
import sys
from collections import defaultdict

NAMED = re.compile(r"^\((\d+)\)(?: (.*))?$")
RECURSION = re.compile(r"'\d+$")


def resolve(table, value):
    """A compressed name: "(12) name" defines id 12, "(12)" refers to it."""
    m = NAMED.match(value)
    if not m:
        return value
    ident, name = m.groups()
    if name is not None:
        table[ident] = name
        return name
    return table.get(ident, "")


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: callgrind-symbols.py EXECUTABLE CALLGRIND_OUT...")
    exe = os.path.realpath(sys.argv[1])
    cost = defaultdict(int)
    for path in sys.argv[2:]:
        obs, fns = {}, {}
        ob = fn = ""
        skip_next = False
        with open(path, errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if skip_next:  # the inclusive cost of the call above: not the caller's own
                    skip_next = False
                    continue
                if not line:
                    continue
                c = line[0]
                if c.isdigit() or c in "+-*":
                    parts = line.split()
                    if len(parts) >= 2 and fn and ob == exe:
                        try:
                            cost[fn] += int(parts[1])
                        except ValueError:
                            pass
                    continue
                key, _, value = line.partition("=")
                if key == "ob":
                    ob = os.path.realpath(resolve(obs, value)) if value else ""
                elif key == "cob":
                    resolve(obs, value)
                elif key == "fn":
                    # "name'2": a recursion level of name (callgrind's --separate-recs).
                    fn = RECURSION.sub("", resolve(fns, value))
                elif key == "cfn":
                    resolve(fns, value)
                elif key == "calls":
                    skip_next = True
    for name, c in sorted(cost.items(), key=lambda kv: (-kv[1], kv[0])):
        # Not a symbol: an address without one ("0x..."), "(below main)".
        if c > 0 and name and not name.startswith("0x") and " " not in name and "(" not in name:
            print(name)


if __name__ == "__main__":
    main()
