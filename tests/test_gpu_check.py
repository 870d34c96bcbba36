"""`make gpu-check` (benchmarks/gpu_check.py) is the one script a GPU session runs: it must not rot on the CPU.
Without a GPU it refuses in one line; ``--smoke`` runs every section at toy sizes on the CPU, and every check
that has a pass/fail verdict passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", tmp_path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) + len(done.stdout.strip().splitlines()) == 1
    assert "GPU" in done.stderr + done.stdout


def test_smoke_run_passes_every_check(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--out", tmp_path], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {row["section"] for row in rows} >= {"a", "b", "c", "d"}
    verdicts = [row for row in rows if row["passed"] is not None]
    assert len(verdicts) >= 5 and all(row["passed"] for row in verdicts), verdicts
    assert all("no GPU figures" in row["device"] for row in rows)
