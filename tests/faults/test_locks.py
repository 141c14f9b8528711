"""Two runs on the same --out: the second is refused, not interleaved. Two runs that need the same target
bank at once: one builds it, the other waits for it and reuses it."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fault_runs import ARGS, REPO
from rela.train import main

pytestmark = pytest.mark.slow  # subprocess runs: the slow tier (README: Tests)


def test_a_second_run_on_the_same_out_is_refused_and_a_second_bank_build_waits_and_reuses(tmp_path, capsys):
    """No timing window: the first run holds its locks until the test opens a gate, and the gate opens only
    once the second run has said that it waits for the first's bank."""
    banks, out, gate = tmp_path / "banks", tmp_path / "first", tmp_path / "gate"
    args = [*ARGS, "--bank-dir", str(banks), "--stop-after-steps", "1"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}"}
    # The first run holds both locks: it pauses in its bank's raw pass (rows 0..63 being encoded).
    first = subprocess.Popen(
        [sys.executable, "-m", "rela.train", *args, "--out", str(out)], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "RELA_WAIT_AT": f"bank-build:0:{gate}"})
    second = None
    try:
        deadline = time.time() + 300
        while not list(banks.glob("raw-*.bank")):  # created once the first run holds the bank's lock
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)

        assert main([*args, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"rela.train: error: {out} is in use by another run (pid {first.pid} holds {out / '.lock'}); " \
               "wait for it to end, or pass another --out" in err, err[-3000:]

        second = subprocess.Popen([sys.executable, "-m", "rela.train", *args, "--out", str(tmp_path / "second")],
                                  cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        second_err = []
        for line in second.stderr:  # until it waits for the first run's bank
            second_err.append(line)
            if "waiting for it" in line:
                break
        gate.touch()
        rest = second.communicate(timeout=300)[1]
        assert second.returncode == 0, rest[-3000:]
        assert f"is building {next(banks.glob('bank-*.pt'))}; waiting for it" in "".join(second_err), \
            "".join(second_err)[-3000:]
        assert "target bank: reusing" in rest and "(reused)" in rest
    finally:
        gate.touch()
        if second is not None and second.poll() is None:
            second.kill()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert "(built)" in first_err
    assert first_err.count("stopping after step 1") == 1
