"""The chaos benchmark itself, small: 2 ranks under torchrun, three faults (a rank stopped past the collective
timeout, a kill during an asynchronous save, a checkpoint folder that cannot be written); the job survives all
three and ends with the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes

ROOT = Path(__file__).resolve().parent.parent


def test_chaos_run_survives_faults_with_identical_weights(tmp_path):
    result_file = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos.py"),
            "--workers",
            "2",
            "--steps",
            "16",
            "--every",
            "3",
            "--faults",
            "3",
            "--kinds",
            "stop",
            "kill-in-save",
            "read-only",
            "--timeout-s",
            "5",
            "--layout",
            "--out",
            str(tmp_path / "out"),
            "--json",
            str(result_file),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["faults_injected"] == result["faults_survived"] == 3
    assert sorted(f["kind"] for f in result["faults"]) == ["kill-in-save", "read-only", "stop"]
    assert all(f["resumed_from"] <= f["done_steps"] for f in result["faults"])
    assert result["bit_identical"] and result["differing_tensors"] == []
    assert result["exit_code"] == 0
