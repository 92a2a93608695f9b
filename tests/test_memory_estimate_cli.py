"""bench/memory_estimate.py's command line: cases are checked before any model is built (one line,
exit 2), and the rows of the cases that finished are saved even when a later case fails. The child
processes are replaced: nothing is built or measured here."""

import json
import subprocess
import sys

import pytest
from conftest import run_bench_main


def _main(monkeypatch, *argv):
    return run_bench_main(monkeypatch, "memory_estimate", *argv)


@pytest.mark.parametrize(
    "case, says",
    [
        ("nosuch:8:128", "unknown preset 'nosuch'"),
        ("t5-nosuch:8:128", "unknown preset 't5-nosuch'"),
        ("bert-tiny:0:128", "at least 1"),
        ("bert-tiny:8:-1", "at least 1"),
        ("bert-tiny:8", "PRESET:BATCH:LENGTH"),
        ("bert-tiny:eight:128", "PRESET:BATCH:LENGTH"),
        ("bert-tiny:\u00b2:128", "PRESET:BATCH:LENGTH"),  # a digit to str.isdigit, not to int()
    ],
)
def test_bad_cases_are_refused_before_anything_runs(case, says, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: pytest.fail(f"a case ran: {cmd}"))
    assert _main(monkeypatch, "bert-tiny:8:128", case, "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and case in err and says in err, err
    assert not list(tmp_path.iterdir())


def test_rows_before_a_failing_case_are_saved(tmp_path, monkeypatch, capsys):
    calls, real_run = [], subprocess.run

    def fake_run(cmd, **kw):
        if list(cmd[:2]) != [sys.executable, "-c"]:  # the harness's git and uname, for the file's meta
            return real_run(cmd, **kw)
        calls.append(cmd[3:])
        if len(calls) == 2:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback (most recent call last):\nMemoryError: boom\n")
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"measured_mb": 10.0, "estimated_mb": 12.0}) + "\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    rc = _main(monkeypatch, "bert-tiny:8:128", "t5-tiny:2:64", "bert-tiny:2:64", "--out", str(tmp_path))
    assert rc == 1 and len(calls) == 3  # the case after the failure still runs
    (path,) = tmp_path.glob("memory_estimate_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["case"] for r in rows] == ["bert-tiny 8 x 128", "t5-tiny 2 x 64", "bert-tiny 2 x 64"]
    assert rows[0]["estimated_over_measured"] == pytest.approx(1.2)
    assert rows[1]["error"] == "MemoryError: boom" and "Traceback" not in capsys.readouterr().out
