"""Two torchrun "nodes" on this machine (--nnodes 2, static rendezvous on 127.0.0.1, one CPU rank each), as a
cluster runs them: each node has its own copy of the images (staged to its local disk: other modification
times) and its own working folder; --bank-dir and --out are on storage both see. The run must neither hang
nor build the target bank twice, and a second run reuses it whichever node's copy has which times."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import FAST_ARGS, write_imagefolder

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow  # subprocess runs: the slow tier (README: Tests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_copies(tmp_path: Path) -> list[Path]:
    """The same tree on two 'nodes': node 1's copy is a plain cp (new modification times, an hour later)."""
    first = write_imagefolder(tmp_path / "node0" / "data", classes=2, per_class=8)
    second = tmp_path / "node1" / "data"
    shutil.copytree(first, second, copy_function=shutil.copyfile)
    later = time.time_ns() + 3600 * 10**9
    for path in second.rglob("*.jpg"):
        os.utime(path, ns=(later, later))
    return [first, second]


def run_two_nodes(tmp_path: Path, data: list[Path], *args: str, node_args: list[list[str]] | None = None,
                  torchrun: bool = True, timeout: int = 120) -> list[subprocess.CompletedProcess]:
    """Starts both nodes at once, each in its own working folder, on its own data: under torchrun (--nnodes 2,
    --node-rank, static rendezvous), or as the two ranks torchrun would start (RANK, WORLD_SIZE, MASTER_ADDR in
    the environment; no agents, which spares each test the launcher's start and shutdown, ~15 s here)."""
    port = free_port()
    procs = []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        train = ["-m", "rela.train", *FAST_ARGS, "--dataset", "imagefolder", "--data", str(data[node]), "--prior",
                 "rand", "--probe-epochs", "1", "--batch-size", "8", "--no-monitor", *args,
                 *(node_args[node] if node_args else [])]
        env = ENV
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "--monitor-interval", "0.1", *train]
        else:
            cmd = [sys.executable, *train]
            env = {**ENV, "RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results, deadline = [], time.monotonic() + timeout
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:  # a hang fails the test instead of stalling it
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def logs(results) -> str:
    return "".join(r.stdout + r.stderr for r in results)


def test_two_nodes_with_their_own_copies_build_the_bank_once_and_reuse_it(tmp_path):
    data = stage_copies(tmp_path)
    shared = tmp_path / "shared"
    banks = shared / "banks"
    first = run_two_nodes(tmp_path, data, "--bank-dir", str(banks), "--out", str(shared / "first"))
    assert [r.returncode for r in first] == [0, 0], logs(first)[-6000:]
    text = logs(first)
    assert text.count("target bank ready in") == 1 and text.count("(built)") == 1, text[-6000:]
    assert len(list(banks.glob("bank-*.pt"))) == 1
    # One shard file per rank, one file list (rank 0's), no probe file left behind.
    assert len(list(banks.glob("raw-*.bank.shard*of2"))) == 2
    assert len(list(banks.glob("files-*.list"))) == 1
    assert not list(banks.glob(".shared-probe.tmp-*")) and not list((shared / "first").glob(".shared-probe.tmp-*"))

    # Again: node 1's copy has other modification times, and still no rank rebuilds (rank 0's fingerprint keys it).
    second = run_two_nodes(tmp_path, data, "--bank-dir", str(banks), "--out", str(shared / "second"),
                           "--stop-after-steps", "1", torchrun=False)
    assert [r.returncode for r in second] == [0, 0], logs(second)[-6000:]
    text = logs(second)
    assert "target bank: reusing" in text and text.count("(reused)") == 1 and "(built)" not in text, text[-6000:]
    assert "rebuilding" not in text and "encoding" not in text


def test_a_file_missing_on_one_node_is_one_error_naming_it_on_every_rank(tmp_path):
    data = stage_copies(tmp_path)
    missing = data[1] / "class_1" / "img_003.jpg"
    missing.unlink()
    results = run_two_nodes(tmp_path, data, "--bank-dir", str(tmp_path / "shared" / "banks"),
                            "--out", str(tmp_path / "shared" / "run"), torchrun=False)
    assert [r.returncode for r in results] != [0, 0]
    text = logs(results)
    assert f"lacks {missing}, which rank 0 has (1 file(s) missing there)" in text, text[-6000:]
    assert "every node needs the same files under --data" in text
    assert "Traceback" not in text, text[-6000:]


def test_a_bank_folder_that_is_not_shared_is_named(tmp_path):
    data = stage_copies(tmp_path)
    results = run_two_nodes(tmp_path, data, "--out", str(tmp_path / "shared" / "run"), torchrun=False,
                            node_args=[["--bank-dir", str(tmp_path / f"node{n}" / "banks")] for n in range(2)])
    assert [r.returncode for r in results] != [0, 0]
    text = logs(results)
    assert f"--bank-dir {tmp_path / 'node1' / 'banks'} is not shared by every node: rank 1" in text, text[-6000:]
    assert "Traceback" not in text, text[-6000:]
