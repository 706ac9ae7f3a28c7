#!/usr/bin/env python3
"""The functions on code pages a `--python-app` supervisor touched outside `.text.hot`.

    scripts/hot-pages.py sample OUT.json     # until killed: the newest worker's resident pages
    scripts/hot-pages.py functions EXECUTABLE OUT.json [ORDER]   # their functions, one a line

`sample` follows every `celeriac ... worker ... --python-app` process and, at each new peak of
its resident memory (`VmRSS`, read every 50 ms), keeps which pages of its executable's code
mapping are resident (`/proc/PID/pagemap`, bit 63; needs root). `functions` maps the pages that
lie outside the `.text.hot` section to the functions on them (`nm -S`), leaves out the names
ORDER already lists, and prints the rest: a page holds several small functions, so this may list
a few that did not run, never misses one that did. Used by scripts/hot-pages.sh, which runs it
with the page cache dropped and read-ahead off, so a resident page is a touched page.
"""
import bisect
import json
import os
import re
import struct
import subprocess
import sys
import time

PAGE = 4096


def workers():
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).startswith(b"celeriac") and b"worker" in argv and b"--python-app" in argv:
            yield int(entry)


def resident_code_pages(pid):
    """File offsets of the resident pages of the executable's code (r-xp) mappings."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    pages = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or fields[1] != "r-xp" or fields[5] != exe:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            pagemap.seek(start // PAGE * 8)
            data = pagemap.read((end - start) // PAGE * 8)
            for i in range(len(data) // 8):
                (entry,) = struct.unpack_from("<Q", data, i * 8)
                if entry >> 63:
                    pages.append(offset + i * PAGE)
    return pages


def sample(out):
    peaks = {}
    while True:
        for pid in list(workers()):
            try:
                status = open(f"/proc/{pid}/status").read()
                rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
                if rss > peaks.get(pid, (0, []))[0]:
                    peaks[pid] = (rss, resident_code_pages(pid))
                    with open(out + ".tmp", "w") as f:
                        json.dump({str(p): v for p, v in peaks.items()}, f)
                    os.replace(out + ".tmp", out)
            except (OSError, AttributeError, ValueError):
                pass
        time.sleep(0.05)


def functions(exe, sampled, order=None):
    sections = subprocess.run(["readelf", "-SW", exe], capture_output=True, text=True, check=True).stdout
    # [Nr] Name Type Address Off Size ...: the section's address and file offset.
    text = {}
    for m in re.finditer(r"\]\s+(\.text\S*)\s+PROGBITS\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", sections):
        text[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16))
    if ".text.hot" not in text:
        sys.exit(f"hot-pages: {exe} has no .text.hot section (built without the symbol order?)")
    hot_addr, hot_off, hot_size = text[".text.hot"]
    delta = hot_addr - hot_off  # one code segment: address = file offset + delta
    symbols = []
    nm = subprocess.run(["nm", "-S", "--defined-only", exe], capture_output=True, text=True, check=True).stdout
    for line in nm.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tTwW":
            symbols.append((int(fields[0], 16), int(fields[1], 16), fields[3]))
    symbols.sort()
    starts = [s[0] for s in symbols]
    known = set()
    if order:
        known = {line.strip() for line in open(order)}
    names = set()
    for rss, pages in json.load(open(sampled)).values():
        for offset in pages:
            addr = offset + delta
            if hot_addr <= addr < hot_addr + hot_size:
                continue
            i = bisect.bisect_right(starts, addr + PAGE - 1) - 1
            while i >= 0 and symbols[i][0] + max(symbols[i][1], 1) > addr:
                names.add(symbols[i][2])
                i -= 1
    for name in sorted(names - known):
        print(name)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sample":
        sample(sys.argv[2])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "functions":
        functions(*sys.argv[2:])
    else:
        sys.exit(__doc__)
