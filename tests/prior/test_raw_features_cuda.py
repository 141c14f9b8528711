"""The raw bank from a prior on CUDA: outputs go through the pinned ring on a side stream and the writer
thread, which makes the ring's device current first (on a multi-GPU machine the last GPU is used, so a
thread left on GPU 0 would show as a context there). Bit for bit the bank of the CPU path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from rela.prior.raw_features import build_raw_features

WORKER = Path(__file__).with_name("raw_features_worker.py")
_spec = importlib.util.spec_from_file_location("raw_features_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.mark.gpu
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.float16])
def test_cuda_prior_writes_the_same_bank_as_the_cpu_path(tmp_path, storage_dtype):
    from rela import _C

    assert _C.built_with_cuda(), "rela._C was built without CUDA on a CUDA machine (see setup.py's warning)"
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    prior = worker.make_prior(24)

    def run(where: torch.device, name: str):
        return build_raw_features(lambda x: prior(x.cpu()).to(where), lambda i: worker.load_batch(i).to(where),
                                  37, 24, tmp_path / name, "key", batch_size=8, device=where,
                                  storage_dtype=storage_dtype, flush_seconds=0.0)

    with torch.cuda.device(device):
        on_gpu = run(device, "gpu.raw")
    on_cpu = run(torch.device("cpu"), "cpu.raw")
    assert np.array_equal(np.asarray(on_gpu.features), np.asarray(on_cpu.features))
    assert on_gpu.rows_computed == 37
