"""Soak: the locust users against a running lmserve for minutes, watching memory and the KV cache.

    python loadtests/soak.py --url http://127.0.0.1:23333 [--minutes 10] [--users 64] [--pid PID]
        [--json soak.json]

Runs ``locustfile.py`` headless (every user class: chats, completions, interactive
sessions, dropped streams, bad requests) and meanwhile samples the resident memory
of the server's process and its children (``--pid``; default: the process listening
on the URL's port) every few seconds, with the KV cache memory written so far
(``lmserve:kv_cache_written_bytes``). Before and after the load it reads the KV
cache gauges of ``/metrics``. Prints: requests and failures; RSS after the first
minute (warm) and at the end, as a whole and without the KV cache's pages (on the
CPU they are committed when a block is first used, so RSS rises to the high-water
mark of blocks in use: memory the server holds by design, not a leak); the KV cache
usage and kept sessions before and after (after: once the server is idle and the
last sessions are ended).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOCUSTFILE = Path(__file__).parent / "locustfile.py"
SAMPLE_S = 5.0


def gauges(url: str) -> dict[str, float]:
    """The lmserve gauges of /metrics by name (labels dropped)."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("lmserve:") and "_bucket" not in line:
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            values[name.removeprefix("lmserve:")] = float(value)
    return values


def listening_pid(port: int) -> int:
    """The process with a listening socket on ``port`` (from /proc/net/tcp and the fds)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    raise SystemExit(f"no process listens on port {port}; pass --pid")


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (the ranks of --tp, compile workers)."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        index += 1
    return pids


def rss_mib(pid: int) -> float:
    total = 0
    for member in family(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:23333")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--pid", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    pid = args.pid or listening_pid(urlparse(args.url).port or 80)
    before = gauges(args.url)
    samples: list[tuple[float, float, float]] = []  # (seconds, RSS MiB, KV cache written MiB)
    done = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not done.is_set():
            written = gauges(args.url).get("kv_cache_written_bytes", 0.0) / 2**20
            samples.append((time.monotonic() - start, rss_mib(pid), written))
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as folder:
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--users", str(args.users),
             "--spawn-rate", "16", "--run-time", f"{int(args.minutes * 60)}s", "--stop-timeout", "30",
             "--host", args.url, "--csv", f"{folder}/soak", "--only-summary"], capture_output=True, text=True)
        with open(f"{folder}/soak_stats.csv") as stats:
            rows = {row["Name"]: row for row in csv.DictReader(stats)}
        with open(f"{folder}/soak_failures.csv") as failed:
            failures = [{"request": f"{row['Method']} {row['Name']}", "error": row["Error"],
                         "occurrences": int(row["Occurrences"])} for row in csv.DictReader(failed)]
    for _ in range(60):  # the server finishes what the stopped users left
        after = gauges(args.url)
        if not after.get("num_requests_running") and not after.get("num_requests_waiting"):
            break
        time.sleep(1)
    done.set()
    sampler.join()
    warm = next((sample for sample in samples if sample[0] >= 60), samples[0])
    end = samples[-1]
    total = rows["Aggregated"]
    report = {
        "minutes": args.minutes, "users": args.users,
        "requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
        "locust_exit_code": locust.returncode, "failed": failures,
        "rss_mib_start": samples[0][1], "rss_mib_warm": warm[1], "rss_mib_end": end[1],
        "rss_growth_after_warm_up": end[1] / warm[1] - 1,
        "kv_written_mib_start": samples[0][2], "kv_written_mib_warm": warm[2], "kv_written_mib_end": end[2],
        "rss_without_kv_growth_after_warm_up": (end[1] - end[2]) / (warm[1] - warm[2]) - 1,
        "kv_cache_usage_before": before.get("kv_cache_usage_perc"),
        "kv_cache_usage_after": after.get("kv_cache_usage_perc"),
        "sessions_with_kept_kv_before": before.get("num_sessions_with_kept_kv"),
        "sessions_with_kept_kv_after": after.get("num_sessions_with_kept_kv"),
        "rss_samples": samples,
    }
    print(f"{report['requests']} requests, {report['failures']} failures (locust exit {locust.returncode}) "
          f"in {args.minutes:g} min at {args.users} users")
    print(f"RSS (server + children): {samples[0][1]:.0f} MiB at start, {warm[1]:.0f} MiB warm (1 min), "
          f"{end[1]:.0f} MiB at the end ({report['rss_growth_after_warm_up']:+.1%} after warm-up)")
    print(f"KV cache written: {samples[0][2]:.0f} MiB at start, {warm[2]:.0f} MiB warm, {end[2]:.0f} MiB at the end; "
          f"RSS without it: {warm[1] - warm[2]:.0f} MiB warm, {end[1] - end[2]:.0f} MiB at the end "
          f"({report['rss_without_kv_growth_after_warm_up']:+.1%} after warm-up)")
    print(f"KV cache usage: {report['kv_cache_usage_before']:.4%} before, {report['kv_cache_usage_after']:.4%} "
          f"after; sessions with kept KV: {report['sessions_with_kept_kv_before']:g} before, "
          f"{report['sessions_with_kept_kv_after']:g} after")
    for failure in failures:
        print(f"  failed {failure['occurrences']}x: {failure['request']}: {failure['error'][:300]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
