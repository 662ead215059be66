#!/usr/bin/env python3
"""Turns the results of `cargo bench --bench verify` into the README's performance table.

Reads the interleaved ratios and the byte figures the bench wrote (target/tmp/bench-figures.txt)
and criterion's estimates (median, ns) under target/criterion, and prints Markdown.
Usage: python3 benches/report.py [TARGET_DIR]
"""

import json
import pathlib
import sys

target = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target")
root = target / "criterion"


def ns(*parts):
    path = root.joinpath(*parts, "new", "estimates.json")
    if not path.exists():
        return None
    return json.loads(path.read_text())["median"]["point_estimate"]


def fmt(value):
    if value is None:
        return "—"
    return f"{value / 1000:.2f} µs" if value >= 1000 else f"{value:.0f} ns"


def ratio(a, b):
    return "—" if a is None or b is None else f"{a / b:.2f}×"


def sizes_of(backend):
    return sorted({int(p.name) for p in root.glob(f"{backend}/verify_threads=1/*") if p.name.isdigit()})


sizes = sizes_of("sqlite") or sizes_of("memory")
parse, sha, clock = ns("parts", "parse"), ns("parts", "sha256"), ns("parts", "clock")
hmac, bad = ns("parts", "hmac_sha256_prekeyed"), ns("parts", "reject_bad_checksum")

print("| part | time |")
print("| --- | --- |")
for name, value in [("parse + checksum", parse), ("SHA-256 of the token", sha), ("HMAC-SHA256, pre-keyed", hmac),
                    ("read the clock (`SystemTime::now`)", clock), ("reject a bad checksum (whole `verify`, no store call)", bad)]:
    print(f"| {name} | {fmt(value)} |")
print()

figures_path = target / "tmp" / "bench-figures.txt"
figures = {}
if figures_path.exists():
    for line in figures_path.read_text().splitlines():
        name, value = line.split()
        figures[name] = float(value)


def interleaved(backend, n, name):
    return figures.get(f"interleaved/{backend}/{n}/{name}")


def times(value):
    return "—" if value is None else f"{value:.2f}×"


print("| backend | keys | limit (parse + SHA-256 + clock + raw read, as one operation) | verify | ratio | "
      "lastUsed on/off | 2 threads vs 1: verify | 2 threads vs 1: raw read | verify's scaling / raw's |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for backend in ["memory", "sqlite", "redb", "redb_tuple_baseline", "postgres"]:
    for n in sorted({int(name.split("/")[2]) for name in figures if name.startswith(f"interleaved/{backend}/")}):
        get = lambda name: interleaved(backend, n, name)
        print(f"| {backend} | {n:,} | {fmt(get('limit_ns'))} | {fmt(get('verify_ns'))} | {times(get('verify_vs_limit'))} | "
              f"{times(get('last_used_on_vs_off'))} | {times(get('verify_two_threads_vs_one'))} | "
              f"{times(get('raw_two_threads_vs_one'))} | {times(get('scaling_vs_raw_scaling'))} |")
print()

raw_names = [("memory", "raw_map_hit"), ("sqlite", "raw_select"), ("redb", "raw_get"), ("redb", "raw_tuple_get"),
             ("postgres", "raw_select")]
print("| backend | keys | raw read (criterion) | verify (criterion) | verify / (parts + raw read) |")
print("| --- | ---: | ---: | ---: | ---: |")
for backend, raw_name in raw_names:
    for n in sizes_of(backend):
        raw1 = ns(backend, f"{raw_name}_threads=1", str(n))
        verify1 = ns(backend, "verify_threads=1", str(n))
        if None in (raw1, verify1, parse, sha, clock):
            continue
        label = f"{backend} ({raw_name})" if raw_name == "raw_tuple_get" else backend
        print(f"| {label} | {n:,} | {fmt(raw1)} | {fmt(verify1)} | {ratio(verify1, parse + sha + clock + raw1)} |")
print()

for backend in ["memory", "sqlite"]:
    scoped = figures.get(f"interleaved/scopes_{backend}/10000/three_grants_vs_all")
    if scoped is not None:
        print(f"Scopes, {backend}, 10,000 keys: verify and require with three grants vs `*`, interleaved: {times(scoped)}.")
print()

for n in sizes_of("memory"):
    probe = ns("memory", "raw_map_probe_three_fields_threads=1", str(n))
    verify1 = ns("memory", "verify_threads=1", str(n))
    if None not in (probe, verify1, parse, sha, clock):
        limit = parse + sha + clock + probe
        print(f"Memory, {n:,} keys, against the narrower probe that reads three fields in place: raw {fmt(probe)}, "
              f"parts + probe {fmt(limit)}, ratio {ratio(verify1, limit)}.")
print()

if len(sizes) > 1:
    small, large = sizes[0], sizes[-1]
    print(f"| backend | verify, {small:,} keys | verify, {large:,} keys | growth |")
    print("| --- | ---: | ---: | ---: |")
    for backend in ["memory", "sqlite", "redb"]:
        a, b = ns(backend, "verify_threads=1", str(small)), ns(backend, "verify_threads=1", str(large))
        print(f"| {backend} | {fmt(a)} | {fmt(b)} | {ratio(b, a)} |")
    print()

print("| create (durable) | time per key | keys/s |")
print("| --- | ---: | ---: |")
for backend in ["sqlite", "redb"]:
    single = ns("create", f"{backend}_single")
    batch = ns("create", f"{backend}_batch_100")
    for label, value, per in [("one per transaction", single, 1), ("100 per transaction (import)", batch, 100)]:
        if value is not None:
            print(f"| {backend}, {label} | {fmt(value / per)} | {1e9 * per / value:,.0f} |")
print()

sizes_in_bytes = {name: value for name, value in figures.items() if "_bytes_per_key/" in name}
if sizes_in_bytes:
    print("| size | bytes per key |")
    print("| --- | ---: |")
    for name, value in sorted(sizes_in_bytes.items()):
        print(f"| {name.replace('_bytes_per_key/', ', ')} keys | {value:.0f} |")
