"""The soak's 2-minute CI version: tests/soak.py against the built pgw.pyz.

The full soak (1,000 stages) is run by hand: `.venv/bin/python tests/soak.py
--stages 1000 --pyz`. This runs the same script for 90 s of sending (with no
stage count limit: about 1,100 stages), with a forced disconnect (a close or a
reset; the 30 s silent path is left to the full soak and test_faults) about
every 30 s, and fails with its report if any of its checks fails. The seed is new each run and printed, so a failure can be
replayed with `--seed`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent / "soak.py"


@pytest.mark.takes_s(97)
def test_soak_for_ninety_seconds_loses_leaks_and_orphans_nothing():
    done = subprocess.run(
        [sys.executable, str(SOAK), "--stages", "100000", "--seconds", "90", "--disconnect-every", "30", "--pyz",
         "--disconnects", "close-1000,close-1011,backend-reset,proxy-reset"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    assert "soak: PASS" in done.stdout
