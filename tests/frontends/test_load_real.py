"""loadtests/locustfile.py, headless, against a live server on the real model: every user class, no failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"
NAMES = {"chat", "chat (stream)", "completions", "interactive turn", "interactive end", "chat (dropped)",
         "bad: not JSON", "TTFT", "TOKENS/S"}


def test_sixteen_users_for_thirty_seconds_without_a_failure(smollm2_server, tmp_path):
    # The steady shape: 16 users for 30 s (the shape ends the run).
    shape = {"LOAD_SHAPE": "steady", "USERS": "16", "DURATION": "30"}
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", smollm2_server.base_url,
         "--csv", str(tmp_path / "load"), "--only-summary"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env={**os.environ, **shape})
    with open(tmp_path / "load_stats.csv") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["Aggregated"]["Request Count"]) > 100
    assert NAMES <= {name for name, row in rows.items() if int(row["Request Count"]) > 0}, sorted(rows)
