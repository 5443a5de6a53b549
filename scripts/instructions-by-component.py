#!/usr/bin/env python3
"""Instructions per delivered message by component, from two counted runs
of `cargo bench --bench mkc_bench -- --instructions` (docs/bench.md).

    scripts/instructions-by-component.py SHORT_COUNTS R1 LONG_COUNTS R2 [--functions N]

SHORT_COUNTS and LONG_COUNTS are the `counts/` directories of a row's two
counted runs (target/bench/runs/instructions-ROW-20000/counts and
...-40000/counts), R1 and R2 the requests the sink received in each (the
bench prints them: "counted: R requests"). Every process's
cachegrind.out.* or callgrind.out.* is read; each function's own
instructions (callgrind: not the inclusive cost of its calls) are summed
by the source file they come from (inlined code where it was written),
and the slope (long - short) / (R2 - R1) is printed by component and, with
--functions N, for the N functions that grew most per message.
"""

import collections
import os
import re
import sys

CRATES = {
    "hyper": "hyper, hyper-util, http", "hyper_util": "hyper, hyper-util, http",
    "http": "hyper, hyper-util, http", "http_body": "hyper, hyper-util, http",
    "http_body_util": "hyper, hyper-util, http", "httparse": "hyper, hyper-util, http",
    "h2": "hyper, hyper-util, http",
    "tokio": "tokio", "tokio_util": "tokio",
    "serde_json": "serde_json",
    "bytes": "bytes",
    "tracing": "tracing", "tracing_core": "tracing", "tracing_subscriber": "tracing",
    "mkc": "mkc's own code",
    "rdkafka": "librdkafka (and its Rust binding)", "rdkafka_sys": "librdkafka (and its Rust binding)",
    "mlua": "Lua (mlua)",
    "core": "Rust std/core/alloc", "alloc": "Rust std/core/alloc", "std": "Rust std/core/alloc",
    "hashbrown": "Rust std/core/alloc",
}
MALLOC = re.compile(r"(__libc_)?(malloc|free|realloc|calloc|cfree)$|_int_(malloc|free|realloc)"
                    r"|malloc_consolidate|unlink_chunk|tcache|arena_get|__rust_(alloc|dealloc|realloc)")


def crates_in(name):
    """The crate names of the paths in a demangled Rust name, in order."""
    return re.findall(r"(?<![A-Za-z0-9_:])([a-z_][a-z0-9_]*)::", name)


def component(path, name):
    """Each function's own instructions go to the crate its name says
    (the outer function: inlined code counts where it was inlined); a
    generic std/core function to the first other crate in its name
    (`drop_in_place<hyper::...>`); C functions by name or file."""
    if MALLOC.match(name) or "/malloc/" in path or path.endswith("malloc.c"):
        return "malloc/free (glibc)"
    if re.search(r"mem(cpy|move|set)", name):
        return "memcpy/memmove/memset"
    if "::" not in name:
        if name.startswith("rd_") or "rdkafka-sys" in path:
            return "librdkafka (and its Rust binding)"
        if name.startswith("pthread_") or "futex" in name or "nptl/" in path:
            return "pthread and futex (user side)"
        if "lua" in name.lower() or "mlua" in path:
            return "Lua (mlua)"
        return "other (libc, vDSO, unknown)"
    if "hash::sip" in name or "siphash" in name.lower():
        return "hashing (SipHash)"
    crates = crates_in(name)
    if not crates:
        return "other (libc, vDSO, unknown)"
    for c in crates:
        if c not in ("core", "alloc", "std"):
            return CRATES.get(c, "other crates")
    return "Rust std/core/alloc"


def read(dir_):
    """{(file, function): own instructions} over every count file in dir_."""
    costs = collections.Counter()
    for entry in os.listdir(dir_):
        if not (entry.startswith("cachegrind.out.") or entry.startswith("callgrind.out.")):
            continue
        text = open(os.path.join(dir_, entry), errors="replace").read()
        if "\nsummary:" not in text and "\ntotals:" not in text:
            continue  # a process killed before it wrote its count
        names = {"fl": {}, "fn": {}}
        fl = fi = fn = "?"
        skip_next = False
        for line in text.splitlines():
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    try:
                        costs[(fi, fn)] += int(parts[1])
                    except ValueError:
                        pass
                continue
            key, _, value = line.partition("=")
            if key in ("fl", "fi", "fe", "fn"):
                table = names["fn" if key == "fn" else "fl"]
                m = re.match(r"\((\d+)\)(?: (.*))?$", value)
                if m:
                    if m.group(2) is not None:
                        table[m.group(1)] = m.group(2)
                    value = table.get(m.group(1), value)
                if key == "fl":
                    fl = fi = value
                elif key in ("fi", "fe"):
                    fi = value
                else:
                    fn = value
                    fi = fl
            elif key == "calls":
                skip_next = True
    return costs


def main():
    args = sys.argv[1:]
    top = 0
    if "--functions" in args:
        i = args.index("--functions")
        top = int(args[i + 1])
        del args[i : i + 2]
    short_dir, r1, long_dir, r2 = args
    short, long_ = read(short_dir), read(long_dir)
    messages = int(r2) - int(r1)
    diff = collections.Counter(long_)
    diff.subtract(short)
    total = sum(diff.values())
    by_comp = collections.Counter()
    for (path, name), v in diff.items():
        by_comp[component(path, name)] += v
    print(f"{total / messages:,.0f} instructions per message ({messages} messages between the runs)")
    for comp, v in by_comp.most_common():
        print(f"  {comp:<36} {v / messages:>9,.0f}  {100 * v / total:5.1f}%")
    if top:
        print(f"\nfunctions, own instructions per message:")
        for (path, name), v in diff.most_common(top):
            print(f"  {v / messages:>9,.0f}  {name[:90]}  [{os.path.basename(path)}]")


if __name__ == "__main__":
    main()
