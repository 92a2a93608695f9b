"""bench/bench_linear_cross_entropy.py's --help lists --memory-gate among its options (it used to be
read off sys.argv, so only the description mentioned it). Nothing is measured."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_linear_cross_entropy.py"


def test_help_lists_the_memory_gate():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    options = r.stdout.split("options:", 1)[1]
    assert "--memory-gate" in options and "--full" in options and "--out" in options, options
