"""bench/base_compression.py refuses what it cannot measure, in one line, before building anything."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "base_compression.py"


@pytest.mark.parametrize(("option", "value"), [("--runs", "0"), ("--scale", "-1"), ("--scale", "big")])
def test_a_number_not_above_zero_is_refused_by_name(option, value):
    proc = subprocess.run([sys.executable, str(SCRIPT), option, value], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"argument {option}: {value!r} is not a number above zero" in proc.stderr
