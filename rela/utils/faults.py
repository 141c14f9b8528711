"""Fault injection for the tests that prove nothing is lost when a process dies.

RELA_KILL_AT=STAGE:STEP makes the process SIGKILL itself when it reaches STAGE at STEP, as a node failure
or the OOM killer would: no handler runs, no file is closed. Unset (always, outside tests) it costs one
dictionary lookup.
"""
from __future__ import annotations

import os
import signal


def kill_point(stage: str, step: int) -> None:
    if os.environ.get("RELA_KILL_AT") == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
