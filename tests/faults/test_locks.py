"""Two runs on the same --out: the second is refused, not interleaved. Two runs that need the same target
bank at once: one builds it, the other waits for it and reuses it."""
from __future__ import annotations

import subprocess
import sys
import time

from fault_runs import ARGS, REPO
from rela.train import main


def test_a_second_run_on_the_same_out_is_refused_and_a_second_bank_build_waits_and_reuses(tmp_path, capsys):
    banks, out = tmp_path / "banks", tmp_path / "first"
    args = [*ARGS, "--bank-dir", str(banks), "--stop-after-steps", "1"]
    # The first run holds both locks: it pauses in its bank's raw pass (rows 0..63 being encoded).
    first = subprocess.Popen(
        [sys.executable, "-m", "rela.train", *args, "--out", str(out)], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**__import__("os").environ, "PYTHONPATH": f"{REPO}", "RELA_SLEEP_AT": "bank-build:0:10"})
    try:
        deadline = time.time() + 120
        while not list(banks.glob("raw-*.bank")):  # created once the first run holds the bank's lock
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)

        assert main([*args, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"rela.train: error: {out} is in use by another run (pid {first.pid} holds {out / '.lock'}); " \
               "wait for it to end, or pass another --out" in err, err[-3000:]

        assert main([*args, "--out", str(tmp_path / "second")]) == 0  # waits for the first run's bank
        err = capsys.readouterr().err
        assert f"is building {next(banks.glob('bank-*.pt'))}; waiting for it" in err, err[-3000:]
        assert "target bank: reusing" in err and "(reused)" in err
    finally:
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert "(built)" in first_err
    assert first_err.count("stopping after step 1") == 1
