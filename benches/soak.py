#!/usr/bin/env python3
"""A bounded soak of `apikeys serve`: mixed traffic for a fixed time, then a verdict.

Not run in CI. Python 3.11 standard library only. Usage:

    CARGO_TARGET_DIR=/root/.cache/apikeys-soak-target cargo build --release --features cli --bin apikeys
    python3 benches/soak.py                  # 30 minutes
    python3 benches/soak.py --minutes 5      # a short run

What it does:

- Starts `apikeys serve --listen 127.0.0.1:<free port>` (the binary from `--binary`) in a fresh
  temporary directory, on a new SQLite file, with every `APIKEYS_*` variable removed from its
  environment, so it runs with its defaults (header and body timeouts 10 s, shutdown deadline
  10 s, active-key limit 100). It reads the first key from stdout (the line that starts with
  `as_live_v1_`) and drains stdout and stderr (one log line per request) for the whole run.
- `--threads` client threads (default 4), each on one kept-alive `http.client` connection to
  127.0.0.1, paced to `--rate` requests per second in all (default 200), and at most
  `--max-requests` in all (default: rate x duration). Each request picks, at random:

  | kind | request | expected |
  | --- | --- | --- |
  | verify (58 %) | `GET /account/api-keys` with the first key, or with a key the thread created or rolled to (or rolled from, in its grace period) | 200 |
  | bad key (15 %) | the same with a well-formed unknown key (right checksum), a malformed one (bad checksum, truncated, another environment, garbage, no header), a key the thread revoked, or a rolled key whose grace period ended | 401 |
  | create (11 %) | `POST /account/api-keys`, JSON body, the first key as caller | 201 |
  | revoke (11 %) | `DELETE /account/api-keys/{id}` of a key the thread created, never the first key; 15 % of them, when there is one, a rolled key in its grace period | 204 |
  | roll (5 %) | `POST /account/api-keys/{id}/roll` `{"graceSeconds": 60}` of a key the thread created; most of the old keys are left to expire | 201 |

  Each thread keeps at most `(100 - 4) / threads` active keys of its own, revoking its oldest
  before it creates past that, so the account stays under the server's limit of 100 active keys
  (rolled keys in their grace period do not count towards it). Nothing is purged: revoked and
  expired keys stay in the database, as they do by default.
- One thread keeps `--slow-clients` raw sockets (default 4) open at any time, each opened every
  `--slow-every` seconds at most, alternating: partial headers and then nothing (the server must
  close the connection, without an answer, after its 10 s header timeout), or complete headers
  with `Content-Length: 100`, a part of the body and then nothing (the server must answer 408
  `body_timeout` after its 10 s body timeout and close). Either must close between 9 s and 15 s.
- Every `--sample-seconds` (60: the rows are minutes) and at the end it samples the server's
  VmRSS and RssAnon (/proc/<pid>/status), threads, open file descriptors (/proc/<pid>/fd), the
  sizes of `apikeys.db` and `apikeys.db-wal`, the requests done, errors and latency
  p50/p99/max per kind over that minute (client-side, http.client included), and the CPU time,
  in % of one core, of the server, of this script, and of everything else on the host
  (/proc/stat), so that a p99 that climbs while other work loads the host can be told apart.
- At the end it stops the traffic, sends SIGTERM with the slow clients still open, and checks the
  server exits 0 within its shutdown deadline. Then it counts the records in the database
  (read-only): revoked, expired but never revoked, and the rest.

An error is any answer other than the expected status (a 5xx included), a connection error on a
normal request, a slow client closed outside 9-15 s or answered other than expected, and any
WARN or ERROR line the server logs before SIGTERM.

The verdict (exit 1 if any check fails; thresholds are the constants below):

- zero errors, and every kind of request was made;
- heap: RssAnon levels off: over the second half of the run it rises by at most 25 % of its
  value at the half-way row, plus 1 MiB;
- mapped files: the rest of VmRSS (the binary and the database file, which each of the store's
  read connections maps, up to 4 and the anchor) at the end at most its first-minute value plus
  5x the database's growth: clean page-cache pages, not memory the server holds;
- fds: at the end at most 1.25x the first minute's count plus the sockets the soak may hold
  open at a sample (threads + slow clients); and not climbing: no 3 minute-over-minute rises in
  a row adding up to more than that allowance;
- WAL: every sample at most 2x the first minute's size, or at most 9 MiB (the store's
  `journal_size_limit` of 8 MiB plus 1 MiB);
- database: grows with the records it keeps (nothing is purged), so at the end it is at most
  1 MiB plus 2 KiB per key created or rolled;
- p99 stable: for each request kind, the median p99 of the last n minutes is at most 2x the
  median p99 of the first n minutes after the first one, or at most 2 ms above it
  (n = max(2, minutes / 6): 2 for 5 minutes, 5 for 30), so jitter of a few hundred
  microseconds on a busy VM does not fail it. The first minute is left out because the traffic
  settles only then: rolled keys in their 60 s grace period, which every list returns, build up
  until the first of them expire. (Runs too short for that compare from the first minute.)
  If it fails while other work on the host grew by over 25 % of a core between those rows, the
  verdict says so: the p99 check then says little about the server; rerun on a quiet host;
- server CPU per request: over the last n minutes at most 1.5x what it was over the same
  first n minutes (less sensitive than latency to other load on the host);
- shutdown: exit status 0 within the 10 s shutdown deadline plus 2 s (the final lastUsedAt
  write and the exit).
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import math
import os
import queue
import random
import selectors
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

DEFAULT_BINARY = "/root/.cache/apikeys-soak-target/release/apikeys"
LEAD = "as_live_v1_"
KEY_LIMIT = 100  # the server's active keys per account
HEADER_TIMEOUT = 10.0  # the server's defaults
BODY_TIMEOUT = 10.0
SHUTDOWN_DEADLINE = 10.0
GRACE_SECONDS = 60

# The verdict's thresholds (see the docstring).
HEAP_RISE = 0.25
HEAP_SLACK = 1024 * 1024
MAPPINGS = 5
FD_FACTOR = 1.25
FD_CLIMB_RUN = 3
WAL_FACTOR = 2.0
WAL_CAP = 9 * 1024 * 1024
DB_BASE = 1024 * 1024
DB_PER_KEY = 2048
P99_FACTOR = 2.0
P99_SLACK = 0.002  # seconds
CPU_FACTOR = 1.5
SHUTDOWN_SLACK = 2.0
BUSIER = 25.0  # % of a core: other work that grew this much makes a p99 failure suspect
SLOW_CLOSE_MIN = 9.0
SLOW_CLOSE_MAX = 15.0

TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1

KINDS = ["verify", "bad key", "create", "revoke", "roll"]
SLOW_KINDS = ["slow headers", "slow body"]
WEIGHTS = {"verify": 58, "bad key": 15, "create": 11, "revoke": 11, "roll": 5}
REVOKE_IN_GRACE = 0.15  # of revokes, when the thread has a rolled key in its grace period


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode().lower().rstrip("=")


def token_with_checksum(body32: str) -> str:
    checked = LEAD + body32
    return checked + b32(zlib.crc32(checked.encode()).to_bytes(4, "big"))


def unknown_key() -> str:
    """A well-formed key (right length, alphabet and checksum) that no store holds."""
    return token_with_checksum(b32(os.urandom(20)))


def malformed_key(rng: random.Random) -> str | None:
    """A key the server refuses without a store read; None: send no key at all."""
    good = unknown_key()
    variant = rng.randrange(6)
    if variant == 0:  # a typo: the checksum no longer matches
        i = rng.randrange(len(LEAD), len(good) - 7)
        c = "a" if good[i] != "a" else "b"
        return good[:i] + c + good[i + 1 :]
    if variant == 1:
        return good[:-3]
    if variant == 2:
        return "as_test_v1_" + good[len(LEAD) :]
    if variant == 3:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_-") for _ in range(rng.randrange(1, 80)))
    if variant == 4:
        return good + "x" * rng.randrange(1, 200)
    return None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]  # nearest rank


class Stats:
    """Latencies and errors, per kind, since the last sample; totals for the whole run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: collections.Counter[str] = collections.Counter()
        self.total = collections.Counter()
        self.total_errors = collections.Counter()
        self.error_samples: list[str] = []
        self.connects = 0

    def record(self, kind: str, seconds: float, error: str | None = None) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            self.total[kind] += 1
            if error is not None:
                self.errors[kind] += 1
                self.total_errors[kind] += 1
                if len(self.error_samples) < 30:
                    self.error_samples.append(f"{time.strftime('%H:%M:%S')} {kind}: {error}")

    def take(self) -> tuple[dict[str, list[float]], collections.Counter[str]]:
        with self.lock:
            latencies, errors = self.latencies, self.errors
            self.latencies, self.errors = collections.defaultdict(list), collections.Counter()
        return latencies, errors


class Counted(http.client.HTTPConnection):
    """An http.client connection that counts how often it had to (re)connect."""

    stats: Stats

    def connect(self) -> None:
        super().connect()
        with self.stats.lock:
            self.stats.connects += 1


class Server:
    def __init__(self, binary: str, directory: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIKEYS_")}
        self.directory = directory
        self.lines: queue.Queue[str] = queue.Queue()
        self.listening = threading.Event()
        self.log_lines = 0
        self.warnings: list[str] = []
        self.warnings_before_stop = 0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        for _ in range(5):
            self.lines = queue.Queue()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            self.process = subprocess.Popen(
                [binary, "serve", "--listen", f"127.0.0.1:{self.port}"],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
            threading.Thread(target=self._drain_stdout, daemon=True).start()
            threading.Thread(target=self._drain_stderr, daemon=True).start()
            self.first_key = self._first_key()
            deadline = time.monotonic() + 10
            while not self.listening.is_set() and self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.listening.is_set():
                return
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            for name in os.listdir(directory):  # a port taken meanwhile: start afresh on another
                os.remove(os.path.join(directory, name))
        raise SystemExit("the server did not start; its stderr ended with:\n" + "\n".join(self.stderr_tail))

    def _drain_stdout(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.log_lines += 1
            self.stderr_tail.append(line)
            if "listening on http://" in line:
                self.listening.set()
            if " WARN " in line or " ERROR " in line:
                if len(self.warnings) < 50:
                    self.warnings.append(line)

    def _first_key(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise SystemExit("the server exited before printing a key:\n" + "\n".join(self.stderr_tail))
                continue
            if line.strip().startswith(LEAD):
                return line.strip()
        raise SystemExit("the server printed no key within 30 s")

    def sample(self) -> dict[str, float]:
        pid = self.process.pid
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                status[name] = value.strip()

        def size(name: str) -> int:
            try:
                return os.path.getsize(os.path.join(self.directory, name))
            except FileNotFoundError:
                return 0

        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/stat") as f:
            host = [int(v) for v in f.readline().split()[1:]]
        own = os.times()
        return {
            "server_cpu": (int(fields[11]) + int(fields[12])) / TICKS,  # utime + stime
            "soak_cpu": own.user + own.system,
            "host_busy": (sum(host[:8]) - host[3] - host[4]) / TICKS,  # all but idle and iowait
            "host_iowait": host[4] / TICKS,
            "rss": int(status["VmRSS"].split()[0]) * 1024,
            "anon": int(status.get("RssAnon", "0 kB").split()[0]) * 1024,
            "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "wal": size("apikeys.db-wal"),
            "db": size("apikeys.db"),
        }


class Budget:
    """Bounds the run's requests, in count and in time."""

    def __init__(self, max_requests: int, end: float) -> None:
        self.lock = threading.Lock()
        self.left = max_requests
        self.end = end

    def take(self) -> bool:
        if time.monotonic() >= self.end:
            return False
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class Client(threading.Thread):
    """One kept-alive connection, paced, making mixed requests with keys of its own."""

    def __init__(self, index, port, first_key, stats, budget, stop, interval, key_budget, seed) -> None:
        super().__init__(daemon=True, name=f"client-{index}")
        self.index = index
        self.port = port
        self.first_key = first_key
        self.stats = stats
        self.budget = budget
        self.stop = stop
        self.interval = interval
        self.key_budget = key_budget
        self.rng = random.Random(seed)
        self.live: list[tuple[str, str]] = []  # (id, token), oldest first
        self.graced: list[tuple[str, str, float]] = []  # rolled: (id, token, grace ends, monotonic)
        self.revoked: collections.deque[str] = collections.deque(maxlen=32)
        self.expired: collections.deque[str] = collections.deque(maxlen=32)  # rolled, grace over
        self.created = 0
        self.conn = self._connect()

    def _connect(self) -> Counted:
        conn = Counted("127.0.0.1", self.port, timeout=30)
        conn.stats = self.stats
        return conn

    def request(self, kind, method, path, key, body, expected):
        headers = {"Host": "127.0.0.1"}
        if key is not None:
            headers["x-api-key"] = key
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.stats.record(kind, time.perf_counter() - started, f"{method} {path}: {type(error).__name__}: {error}")
            self.conn.close()
            self.conn = self._connect()
            return None, None
        elapsed = time.perf_counter() - started
        if response.status != expected:
            snippet = payload[:160].decode(errors="replace")
            self.stats.record(kind, elapsed, f"{method} {path}: {response.status}, expected {expected}: {snippet}")
            return response.status, None
        self.stats.record(kind, elapsed)
        return response.status, payload

    def tidy(self) -> None:
        """Moves rolled keys whose grace period ended (2 s ago, for clock slack) to `expired`."""
        now = time.monotonic()
        while self.graced and self.graced[0][2] + 2 <= now:
            self.expired.append(self.graced.pop(0)[1])

    def in_grace(self) -> list[tuple[str, str, float]]:
        """Rolled keys with at least 5 s of their grace period left."""
        now = time.monotonic()
        return [g for g in self.graced if g[2] - 5 > now]

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set() and self.budget.take():
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            elif now - next_at > 1:
                next_at = now  # far behind: do not burst to catch up
            next_at += self.interval
            kind = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            self.tidy()
            getattr(self, "do_" + kind.replace(" ", "_"))()
        self.conn.close()

    def do_verify(self) -> None:
        usable = [token for _, token in self.live] + [g[1] for g in self.in_grace()]
        key = self.first_key if not usable or self.rng.random() < 0.3 else self.rng.choice(usable)
        _, payload = self.request("verify", "GET", "/account/api-keys", key, None, 200)
        if payload is not None and self.rng.random() < 0.02:
            # Keys in their grace period (with replacedBy) are listed but do not count.
            counted = sum(1 for item in json.loads(payload)["data"] if "replacedBy" not in item)
            if counted > KEY_LIMIT:
                self.stats.record("verify", 0.0, f"the list holds {counted} keys, over the limit of {KEY_LIMIT}")

    def do_bad_key(self) -> None:
        choice = self.rng.random()
        if choice < 0.15 and self.revoked:
            key = self.rng.choice(self.revoked)
        elif choice < 0.3 and self.expired:
            key = self.rng.choice(self.expired)
        elif choice < 0.65:
            key = unknown_key()
        else:
            key = malformed_key(self.rng)
        self.request("bad key", "GET", "/account/api-keys", key, None, 401)

    def make_room(self) -> bool:
        """Revokes its oldest key if the thread is at its share of the limit. Rolled keys in
        their grace period do not count towards the limit, on the server either."""
        if len(self.live) < self.key_budget:
            return True
        victim = self.live.pop(0)
        return self.revoke(victim[0], victim[1])

    def revoke(self, key_id: str, token: str) -> bool:
        status, _ = self.request("revoke", "DELETE", f"/account/api-keys/{key_id}", self.first_key, None, 204)
        if status == 204:
            self.revoked.append(token)
        return status == 204

    def do_create(self) -> None:
        if not self.make_room():
            return self.do_verify()
        self.created += 1
        body = {"name": f"soak-{self.index}-{self.created}"}
        _, payload = self.request("create", "POST", "/account/api-keys", self.first_key, body, 201)
        if payload is not None:
            created = json.loads(payload)
            self.live.append((created["id"], created["key"]))

    def do_revoke(self) -> None:
        in_grace = self.in_grace()
        if in_grace and self.rng.random() < REVOKE_IN_GRACE:  # a rotation finished early
            victim = self.rng.choice(in_grace)
            self.graced.remove(victim)
            self.revoke(victim[0], victim[1])
            return
        if not self.live:
            return self.do_create()
        key_id, token = self.live.pop(self.rng.randrange(len(self.live)))
        self.revoke(key_id, token)

    def do_roll(self) -> None:
        if not self.live:
            return self.do_create()
        index = self.rng.randrange(len(self.live))
        key_id, token = self.live[index]
        body = {"graceSeconds": GRACE_SECONDS}
        status, payload = self.request("roll", "POST", f"/account/api-keys/{key_id}/roll", self.first_key, body, 201)
        if payload is not None:
            rolled = json.loads(payload)
            del self.live[index]
            self.graced.append((key_id, token, time.monotonic() + GRACE_SECONDS))
            self.live.append((rolled["id"], rolled["key"]))
        else:
            del self.live[index]  # refused, or in an unknown state: leave it alone


class SlowClients(threading.Thread):
    """Keeps a bounded number of stalled raw connections open, and times how the server ends them."""

    def __init__(self, port, first_key, stats, stop, limit, every) -> None:
        super().__init__(daemon=True, name="slow-clients")
        self.port = port
        self.first_key = first_key
        self.stats = stats
        self.stop = stop  # no new slow clients after this
        self.done = threading.Event()  # the server has exited: close the rest
        self.shutting_down = threading.Event()  # closes from now on are the shutdown's
        self.limit = limit
        self.every = every
        self.open = 0
        self.opened = 0
        self.closed_at_shutdown = 0

    def payload(self, kind: str) -> bytes:
        if kind == "slow headers":
            return b"POST /account/api-keys HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-"
        return (
            "POST /account/api-keys HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"x-api-key: {self.first_key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            '{"name": "slo'
        ).encode()

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        last_open = 0.0
        while not self.done.is_set():
            now = time.monotonic()
            if not self.stop.is_set() and self.open < self.limit and now - last_open >= self.every:
                kind = SLOW_KINDS[self.opened % 2]
                self.opened += 1
                last_open = now
                started = time.perf_counter()
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    sock.sendall(self.payload(kind))
                    sock.setblocking(False)
                except OSError as error:
                    self.stats.record(kind, time.perf_counter() - started, f"connect: {error}")
                else:
                    selector.register(sock, selectors.EVENT_READ, [kind, started, b""])
                    self.open += 1
            for key, _ in selector.select(timeout=0.2):
                sock, state = key.fileobj, key.data
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data:
                    state[2] += data
                    continue
                self.finish(selector, sock, state, time.perf_counter())
            # A connection the server has not closed in time.
            for key in list(selector.get_map().values()):
                kind, started, _ = key.data
                if time.perf_counter() - started > SLOW_CLOSE_MAX + 5 and not self.shutting_down.is_set():
                    self.finish(selector, key.fileobj, key.data, time.perf_counter())
        for key in list(selector.get_map().values()):
            selector.unregister(key.fileobj)
            key.fileobj.close()

    def finish(self, selector, sock, state, now) -> None:
        kind, started, received = state
        selector.unregister(sock)
        sock.close()
        self.open -= 1
        if self.shutting_down.is_set():
            self.closed_at_shutdown += 1
            return
        elapsed = now - started
        error = None
        if not SLOW_CLOSE_MIN <= elapsed <= SLOW_CLOSE_MAX:
            error = f"closed after {elapsed:.1f} s, expected {SLOW_CLOSE_MIN:.0f}-{SLOW_CLOSE_MAX:.0f} s"
        elif kind == "slow headers" and received:
            error = f"expected no answer, got {received[:60]!r}"
        elif kind == "slow body" and (not received.startswith(b"HTTP/1.1 408") or b"body_timeout" not in received):
            error = f"expected 408 body_timeout, got {received[:60]!r}"
        self.stats.record(kind, elapsed, error)


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "—"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    return f"{seconds * 1000:.1f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def mib(n: float) -> str:
    return f"{n / 1048576:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30, help="how long the traffic runs (default 30)")
    parser.add_argument("--binary", default=DEFAULT_BINARY, help=f"the apikeys binary (default {DEFAULT_BINARY})")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--rate", type=float, default=200, help="requests per second, all threads (default 200)")
    parser.add_argument("--max-requests", type=int, help="at most this many requests (default: rate x duration)")
    parser.add_argument("--slow-clients", type=int, default=4, help="stalled connections open at once (default 4)")
    parser.add_argument("--slow-every", type=float, default=2.0, help="seconds between slow clients (default 2)")
    parser.add_argument("--sample-seconds", type=float, default=60, help="seconds per row (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"no binary at {args.binary}; build it first (see the docstring)")
    key_budget = (KEY_LIMIT - 4) // args.threads
    if key_budget < 2:
        raise SystemExit("too many threads for the account's key limit")
    duration = args.minutes * 60
    max_requests = args.max_requests or int(args.rate * duration) + args.threads

    directory = tempfile.mkdtemp(prefix="apikeys-soak-")
    server = Server(args.binary, directory)
    print(f"soak: server pid {server.process.pid} on 127.0.0.1:{server.port} in {directory}", file=sys.stderr)
    stats = Stats()
    stop = threading.Event()
    started = time.monotonic()
    budget = Budget(max_requests, started + duration)
    clients = [
        Client(i, server.port, server.first_key, stats, budget, stop, args.threads / args.rate, key_budget, args.seed * 100 + i)
        for i in range(args.threads)
    ]
    slow = SlowClients(server.port, server.first_key, stats, stop, args.slow_clients, args.slow_every)
    for thread in clients + [slow]:
        thread.start()

    rows = []
    previous, previous_t = server.sample(), time.monotonic()
    next_sample = started + args.sample_seconds
    while True:
        traffic_done = not any(c.is_alive() for c in clients)
        now = time.monotonic()
        if now < next_sample and not traffic_done:
            time.sleep(min(0.25, next_sample - now))
            continue
        if traffic_done:
            stop.set()
        end_of_run = traffic_done
        if end_of_run and rows and now - rows[-1]["t"] < 1:
            break  # the last row was taken just now
        sample = server.sample()
        latencies, errors = stats.take()
        row = dict(sample, t=now, minute=(now - started) / 60, latencies=latencies, errors=errors)
        row["requests"] = sum(len(latencies[k]) for k in KINDS)
        row["slow"] = sum(len(latencies[k]) for k in SLOW_KINDS)
        # CPU over the row, in % of one core: the server, this script, everything else on the host.
        wall = max(now - previous_t, 1e-9)
        server_cpu = sample["server_cpu"] - previous["server_cpu"]
        soak_cpu = sample["soak_cpu"] - previous["soak_cpu"]
        row["seconds"] = wall
        row["server_pct"] = 100 * server_cpu / wall
        row["soak_pct"] = 100 * soak_cpu / wall
        row["other_pct"] = max(0.0, 100 * (sample["host_busy"] - previous["host_busy"] - server_cpu - soak_cpu) / wall)
        row["iowait_pct"] = 100 * (sample["host_iowait"] - previous["host_iowait"]) / wall
        previous, previous_t = sample, now
        rows.append(row)
        print(
            f"soak: {row['minute']:5.1f} min  {row['requests']} requests, {sum(errors.values())} errors, "
            f"RSS {mib(row['rss'])} MiB, {row['fds']} fds, WAL {mib(row['wal'])} MiB, DB {mib(row['db'])} MiB, "
            f"CPU % of a core: server {row['server_pct']:.0f}, soak {row['soak_pct']:.0f}, other {row['other_pct']:.0f}",
            file=sys.stderr,
        )
        next_sample += args.sample_seconds
        if end_of_run:
            break
    for client in clients:
        client.join()
    server.warnings_before_stop = len(server.warnings)

    # Shut down with the slow clients still open.
    slow.shutting_down.set()
    still_open = slow.open
    stop_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=SHUTDOWN_DEADLINE + SHUTDOWN_SLACK + 10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        code = None
    shutdown_seconds = time.monotonic() - stop_at
    slow.done.set()
    slow.join()
    time.sleep(0.2)  # let the drains read the last lines

    records = count_records(os.path.join(directory, "apikeys.db"))
    report(args, server, stats, rows, clients, slow, still_open, code, shutdown_seconds, records)
    verdict = judge(args, server, stats, rows, clients, slow, code, shutdown_seconds)
    print()
    print("Verdict:")
    for ok, line in verdict:
        print(f"- {'PASS' if ok else 'FAIL'}: {line}")
    passed = all(ok for ok, _ in verdict)
    print(f"\n**{'PASS' if passed else 'FAIL'}**")
    if not args.keep:
        for name in os.listdir(directory):
            os.remove(os.path.join(directory, name))
        os.rmdir(directory)
    return 0 if passed else 1


def count_records(path: str) -> str:
    """What the database holds once the server has exited, read-only."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            now_us = int(time.time() * 1_000_000)
            total, unrevoked, expired = db.execute(
                "SELECT count(*), count(*) FILTER (WHERE revoked_at IS NULL), "
                "count(*) FILTER (WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= ?) "
                "FROM api_keys",
                (now_us,),
            ).fetchone()
        return f"{total:,} records: {total - unrevoked:,} revoked, {expired:,} expired but not revoked, {unrevoked - expired:,} active or in a grace period"
    except sqlite3.Error as error:
        return f"could not read it ({error})"


def report(args, server, stats, rows, clients, slow, still_open, code, shutdown_seconds, records) -> None:
    print(
        f"Soak of `apikeys serve` (SQLite): {args.threads} client threads paced to {args.rate:g} requests/s, "
        f"{args.slow_clients} slow clients at a time, {args.minutes:g} min."
    )
    print()
    header = ["min", "requests", "errors", "RSS MiB", "anon MiB", "threads", "fds", "WAL MiB", "DB MiB"]
    header += ["CPU % server / soak / other"]
    header += [f"{k} p50 / p99 / max ms" for k in KINDS] + ["slow clients closed (s)"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---:"] * len(header)) + " |")
    for row in rows:
        cells = [
            f"{row['minute']:.1f}",
            f"{row['requests']:,}",
            str(sum(row["errors"].values())),
            mib(row["rss"]),
            mib(row["anon"]),
            str(row["threads"]),
            str(row["fds"]),
            mib(row["wal"]),
            mib(row["db"]),
            f"{row['server_pct']:.0f} / {row['soak_pct']:.0f} / {row['other_pct']:.0f}",
        ]
        for kind in KINDS:
            values = sorted(row["latencies"].get(kind, []))
            if values:
                cells.append(" / ".join(fmt_ms(v) for v in (percentile(values, 0.5), percentile(values, 0.99), values[-1])))
            else:
                cells.append("—")
        closes = sorted(v for k in SLOW_KINDS for v in row["latencies"].get(k, []))
        cells.append(f"{len(closes)}: {closes[0]:.1f}–{closes[-1]:.1f}" if closes else "—")
        print("| " + " | ".join(cells) + " |")
    print()
    totals = ", ".join(f"{kind} {stats.total[kind]:,}" for kind in KINDS + SLOW_KINDS)
    print(f"Totals: {totals}; {stats.connects} client connections opened; {server.log_lines:,} server log lines.")
    created = sum(c.created for c in clients)
    print(
        f"Keys created {created:,} and rolled {stats.total['roll']:,}; "
        f"SIGTERM with {still_open} slow clients open ({slow.closed_at_shutdown} closed during the shutdown): "
        f"exit status {code} after {shutdown_seconds:.1f} s."
    )
    print(f"The database at the end: {records}.")
    if stats.error_samples:
        print("\nFirst errors:\n")
        for line in stats.error_samples:
            print(f"    {line}")
    if server.warnings:
        print("\nServer WARN/ERROR lines:\n")
        for line in server.warnings:
            print(f"    {line}")


def judge(args, server, stats, rows, clients, slow, code, shutdown_seconds) -> list[tuple[bool, str]]:
    out = []
    errors = sum(stats.total_errors.values())
    missing = [k for k in KINDS + SLOW_KINDS if stats.total[k] == 0]
    detail = ", ".join(f"{k} {n}" for k, n in stats.total_errors.items() if n) or "none"
    out.append((errors == 0 and not missing, f"errors: {errors} ({detail}); kinds never made: {', '.join(missing) or 'none'}"))
    warnings = server.warnings_before_stop
    out.append((warnings == 0, f"server WARN/ERROR log lines before SIGTERM: {warnings}"))
    if len(rows) < 2:
        out.append((False, "fewer than two samples: run longer"))
        return out
    first, last = rows[0], rows[-1]

    middle = rows[len(rows) // 2]
    heap_limit = middle["anon"] * (1 + HEAP_RISE) + HEAP_SLACK
    heaps = " ".join(mib(r["anon"]) for r in rows)
    out.append((
        last["anon"] <= heap_limit,
        f"heap (RssAnon) {heaps} MiB: at {middle['minute']:.1f} min {mib(middle['anon'])} → end "
        f"{mib(last['anon'])} MiB (limit +{HEAP_RISE:.0%} + 1 MiB = {mib(heap_limit)} MiB)",
    ))
    db_growth = max(0, last["db"] - first["db"])
    mapped_first, mapped_last = first["rss"] - first["anon"], last["rss"] - last["anon"]
    mapped_limit = mapped_first + MAPPINGS * db_growth
    out.append((
        mapped_last <= mapped_limit,
        f"mapped files (VmRSS - RssAnon) {mib(mapped_first)} → {mib(mapped_last)} MiB (limit + {MAPPINGS}× the "
        f"database's growth of {mib(db_growth)} = {mib(mapped_limit)} MiB); VmRSS {mib(first['rss'])} → "
        f"{mib(last['rss'])} MiB",
    ))

    allowance = args.threads + args.slow_clients
    fd_limit = FD_FACTOR * first["fds"] + allowance
    fds = [r["fds"] for r in rows]
    climb, worst = 0, 0
    for i in range(1, len(fds)):
        if fds[i] > fds[i - 1]:
            climb += 1
            if climb >= FD_CLIMB_RUN:
                worst = max(worst, fds[i] - fds[i - climb])
        else:
            climb = 0
    out.append((
        last["fds"] <= fd_limit and worst <= allowance,
        f"fds {' '.join(map(str, fds))} (end limit {FD_FACTOR}× + {allowance} = {fd_limit:.0f}; "
        f"rises of {FD_CLIMB_RUN}+ minutes in a row: largest {worst}, limit {allowance})",
    ))

    wal_limit = max(WAL_FACTOR * first["wal"], WAL_CAP)
    wal_max = max(r["wal"] for r in rows)
    out.append((wal_max <= wal_limit, f"WAL at most {mib(wal_max)} MiB, end {mib(last['wal'])} MiB (limit {mib(wal_limit)} MiB)"))

    keys = sum(c.created for c in clients) + stats.total["roll"] + 1
    db_limit = DB_BASE + DB_PER_KEY * keys
    out.append((
        last["db"] <= db_limit,
        f"database {mib(last['db'])} MiB for {keys:,} keys made, {last['db'] / keys:.0f} bytes each "
        f"(limit {mib(db_limit)} MiB)",
    ))

    # The first minute is a warm-up: rolled keys in their 60 s grace period, which every list
    # returns, build up until it ends. So the first rows compared start at the second one.
    n = max(2, int(args.minutes // 6))
    skip = 1
    if len(rows) < 2 * n + skip:
        skip = 0
        n = max(1, min(n, len(rows) // 2))
    head_rows, tail_rows = rows[skip : skip + n], rows[-n:]
    parts = []
    stable = True
    for kind in KINDS:
        head = [v for v in (percentile(sorted(r["latencies"].get(kind, [])), 0.99) for r in head_rows) if v == v]
        tail = [v for v in (percentile(sorted(r["latencies"].get(kind, [])), 0.99) for r in tail_rows) if v == v]
        if not head or not tail:
            stable = False
            parts.append(f"{kind}: no data")
            continue
        before, after = statistics.median(head), statistics.median(tail)
        ok = after <= max(P99_FACTOR * before, before + P99_SLACK)
        stable &= ok
        parts.append(f"{kind} {fmt_ms(before)} → {fmt_ms(after)} ms{'' if ok else ' (over)'}")
    other_head = statistics.median(r["other_pct"] for r in head_rows)
    other_tail = statistics.median(r["other_pct"] for r in tail_rows)
    which = f"rows {skip + 1}–{skip + n}" if n > 1 else f"row {skip + 1}"
    out.append((
        stable,
        f"p99, median of {which} → of the last {n} (limit {P99_FACTOR}× or +{P99_SLACK * 1000:.0f} ms): "
        + "; ".join(parts)
        + f" (other work on the host meanwhile: {other_head:.0f} → {other_tail:.0f} % of a core)"
        + (
            f"; the host was busier with other work in the last rows (over {BUSIER:.0f} % of a core more): "
            "rerun on a quiet host before blaming the server"
            if not stable and other_tail - other_head > BUSIER
            else ""
        ),
    ))

    def cpu_per_request(part):
        requests = sum(r["requests"] for r in part)
        return sum(r["server_pct"] * r["seconds"] / 100 for r in part) / max(requests, 1)

    before, after = cpu_per_request(head_rows), cpu_per_request(tail_rows)
    out.append((
        after <= CPU_FACTOR * before,
        f"server CPU per request, {which} → the last {n}: {before * 1e6:.0f} → {after * 1e6:.0f} µs "
        f"(limit {CPU_FACTOR}×)",
    ))

    limit = SHUTDOWN_DEADLINE + SHUTDOWN_SLACK
    out.append((
        code == 0 and shutdown_seconds <= limit,
        f"shutdown: exit status {code} after {shutdown_seconds:.1f} s (limit {limit:.0f} s)",
    ))
    return out


if __name__ == "__main__":
    sys.exit(main())
