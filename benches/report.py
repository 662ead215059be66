#!/usr/bin/env python3
"""Turns the results of `cargo bench --bench verify` into the README's performance table.

Reads criterion's estimates (median, ns) under target/criterion and the byte figures the bench
wrote, computes every ratio against the raw parts measured in the same run, and prints Markdown.
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

raw_names = {"memory": "raw_map_hit", "sqlite": "raw_select", "redb": "raw_get", "postgres": "raw_select"}
print("| backend | keys | raw read | limit (parse + SHA-256 + clock + raw read) | verify | ratio | "
      "verify, lastUsed off | on/off | 2 threads vs 1: verify | 2 threads vs 1: raw read |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for backend, raw_name in raw_names.items():
    for n in sizes_of(backend):
        raw1 = ns(backend, f"{raw_name}_threads=1", str(n))
        raw2 = ns(backend, f"{raw_name}_threads=2", str(n))
        verify1 = ns(backend, "verify_threads=1", str(n))
        verify2 = ns(backend, "verify_threads=2", str(n))
        off = ns(backend, "verify_without_last_used_threads=1", str(n))
        if None in (raw1, verify1, parse, sha, clock):
            continue
        limit = parse + sha + clock + raw1
        print(f"| {backend} | {n:,} | {fmt(raw1)} | {fmt(limit)} | {fmt(verify1)} | {ratio(verify1, limit)} | "
              f"{fmt(off)} | {ratio(verify1, off)} | {ratio(verify1, verify2)} | {ratio(raw1, raw2)} |")
print()

for n in sizes_of("memory"):
    probe = ns("memory", "raw_map_probe_three_fields_threads=1", str(n))
    verify1 = ns("memory", "verify_threads=1", str(n))
    if None not in (probe, verify1, parse, sha, clock):
        limit = parse + sha + clock + probe
        print(f"Memory, {n:,} keys, against the narrower probe that reads three fields in place: raw {fmt(probe)}, "
              f"limit {fmt(limit)}, ratio {ratio(verify1, limit)}.")
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

figures = target / "tmp" / "bench-figures.txt"
if figures.exists():
    latest = {}
    for line in figures.read_text().splitlines():
        name, value = line.split()
        latest[name] = float(value)
    print("| size | bytes per key |")
    print("| --- | ---: |")
    for name, value in sorted(latest.items()):
        print(f"| {name.replace('_bytes_per_key/', ', ')} keys | {value:.0f} |")
