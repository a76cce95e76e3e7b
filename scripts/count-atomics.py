#!/usr/bin/env python3
"""Atomic read-modify-write instructions executed, from a callgrind dump.

    count-atomics.py DUMP REQUESTS

DUMP must come from `valgrind --tool=callgrind --dump-instr=yes`. Every
instruction's own count is matched against `objdump -d` of the object it
belongs to; lock-prefixed instructions and `xchg` with a memory operand
(locked by the processor) are summed and divided by REQUESTS. Prints the
total per request and the functions with the most.
"""

import collections
import os
import re
import subprocess
import sys


def parse(path):
    """Own cost per (object, address), and the function of each address."""
    names = {"ob": {}, "fn": {}}
    cost = collections.Counter()
    function = {}
    ob = fn = None
    addr = 0
    after_call = False

    def name(kind, text):
        m = re.match(r"\((\d+)\)(?: (.*))?", text.strip())
        if not m:
            return text.strip()
        if m.group(2):
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1), m.group(1))

    with open(path, errors="replace") as dump:
        for line in dump:
            key, _, value = line.partition("=")
            if key in ("ob", "cob"):
                n = name("ob", value)
                if key == "ob":
                    ob = n
                continue
            if key in ("fn", "cfn"):
                n = name("fn", value)
                if key == "fn":
                    fn = n
                continue
            if key == "calls":
                after_call = True  # the next line is the call's inclusive cost
                continue
            if not line[:1] or line[0] not in "0123456789+-*":
                continue
            parts = line.split()
            position = parts[0]
            if position.startswith("0x"):
                addr = int(position, 16)
            elif position[0] in "+-":
                step = int(position[1:], 16) if position[1:].startswith("0x") else int(position[1:])
                addr += step if position[0] == "+" else -step
            if after_call:
                after_call = False
                continue
            if len(parts) >= 3:
                cost[(ob, addr)] += int(parts[-1])
                function[(ob, addr)] = fn
    return cost, function


def atomic_addresses(path):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S.*)", line)
        if m and (m.group(2).startswith("lock") or (m.group(2).startswith("xchg") and "(" in m.group(2))):
            found.add(int(m.group(1), 16))
    return found


def main():
    dump, requests = sys.argv[1], int(sys.argv[2])
    cost, function = parse(dump)
    by_object = collections.defaultdict(dict)
    for (ob, addr), n in cost.items():
        by_object[ob][addr] = n
    per_function = collections.Counter()
    total = 0
    for ob, counts in by_object.items():
        if not ob or not os.path.isfile(ob):
            continue
        atomics = atomic_addresses(ob)
        for addr, n in counts.items():
            if addr in atomics:
                total += n
                per_function[function[(ob, addr)]] += n
    print(f"atomic read-modify-writes per request: {total / requests:.1f}")
    for fn, n in per_function.most_common(12):
        print(f"  {n / requests:6.2f}  {fn[:120]}")


if __name__ == "__main__":
    main()
