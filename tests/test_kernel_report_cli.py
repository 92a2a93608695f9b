"""scripts/kernel_report.py's command line: a request it cannot carry out is a one-line error with exit
status 2 before anything is built (under --check, exit 1 means that a gate failed). Nothing is built."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel_report():
    """The script as a module; it sets TRITON_INTERPRET=0 for its builds, restored here (the other tests
    of this process run the interpreter)."""
    before = os.environ.get("TRITON_INTERPRET")
    try:
        spec = importlib.util.spec_from_file_location("kernel_report_cli", ROOT / "scripts" / "kernel_report.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
    return mod


@pytest.mark.parametrize(
    "argv, says",
    [
        # a ValueError traceback and exit 1, which --check uses for a failed gate
        (["--family", "nosuch", "--check"], "--family nosuch"),
        (["--family", "attention", "nosuch"], "nosuch"),
        # it used to build everything and record nothing (docs/kernels.md: --candidates --write-gates)
        (["--write-gates"], "--candidates"),
    ],
)
def test_impossible_requests_are_refused_before_any_build(kernel_report, argv, says, monkeypatch, capsys):
    monkeypatch.setattr(kernel_report, "run_tasks", lambda *a, **k: pytest.fail("kernel_report built something"))
    assert kernel_report.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err
