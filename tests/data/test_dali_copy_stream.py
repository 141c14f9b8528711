"""The DALI driver hands a step's outputs to the training stream without a host sync: each output is copied
on the private copy stream (feed_ndarray with that stream: DALI's own stream then waits for the copy
before reusing its buffer), the consumer stream waits for the copies on the device, and each tensor is
recorded on the consumer stream for the caching allocator. CUDA is not needed: the streams and DALI's
tensors are stand-ins that log what is asked of them; the CPU path is checked with real DALI in
test_dali.py."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import nvidia.dali.plugin.pytorch as dali_torch  # (the [dali] extra; a missing install must fail, not skip)
from nvidia.dali import types as dali_types

from rela.data.dali import driver
from rela.data.datasets import ArrayImages


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def synchronize(self):
        self.log.append(("host waits for", self.name))

    def wait_stream(self, other: "FakeStream"):
        self.log.append(("wait", self.name, other.name))


class FakeDaliOutput:
    """A pipeline output (a TensorList) whose as_tensor() is itself: shape(), dtype and the data."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.dtype = dali_types.DALIDataType.FLOAT

    def as_tensor(self):
        return self

    def shape(self):
        return list(self.data.shape)


class FakePipe:
    def __init__(self, outputs, log):
        self.outputs, self.log = outputs, log

    def share_outputs(self):
        return self.outputs

    def release_outputs(self):
        self.log.append(("release",))


@pytest.fixture
def logged_cuda(monkeypatch):
    """The CUDA calls the driver makes, logged in order; host-blocking calls are logged as such."""
    log: list = []
    consumer = FakeStream("consumer", log)

    @contextlib.contextmanager
    def stream(s):
        log.append(("enter", s.name))
        yield
        log.append(("leave", s.name))

    def feed_ndarray(tensor, arr, cuda_stream=None):
        log.append(("copy on", getattr(cuda_stream, "name", None)))
        arr.copy_(torch.from_numpy(tensor.data))
        return arr

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: consumer)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("host waits for", "device")))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", t.data_ptr(), s.name)))
    monkeypatch.setattr(dali_torch, "feed_ndarray", feed_ndarray)
    return log


def _pipeline_with_copy_stream(log: list) -> driver.FedPipeline:
    """A FedPipeline as on CUDA (a copy stream) whose pipe hands out two outputs, as a training step does."""
    dataset = ArrayImages(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4), "zeros")
    pipeline = driver.FedPipeline(dataset, torch.device("cpu"), graph=None, num_threads=1, skip_corrupt=False,
                                  prefetch=1)
    pipeline._copy_stream = FakeStream("copy", log)
    return pipeline


def test_a_steps_outputs_reach_the_consumer_stream_without_a_host_sync(logged_cuda):
    log = logged_cuda
    pipeline = _pipeline_with_copy_stream(log)
    views = [np.random.default_rng(k).random((2, 3, 4, 4), dtype=np.float32) for k in range(2)]
    pipeline.pipe = FakePipe([FakeDaliOutput(v) for v in views], log)
    pipeline.in_flight.append(driver.Step(0, None, None))

    step, tensors = pipeline.take()

    assert step.position == 0 and not pipeline.in_flight
    for tensor, view in zip(tensors, views):
        assert torch.equal(tensor, torch.from_numpy(view))
    assert not [entry for entry in log if entry[0] == "host waits for"], log
    copies = [i for i, entry in enumerate(log) if entry[0] == "copy on"]
    assert len(copies) == 2 and all(log[i] == ("copy on", "copy") for i in copies)
    waits = [i for i, entry in enumerate(log) if entry == ("wait", "consumer", "copy")]
    assert waits and min(waits) > max(copies), "the consumer must wait for the copies, after they are queued"
    recorded = {entry[1] for entry in log if entry[0] == "record" and entry[2] == "consumer"}
    assert recorded == {t.data_ptr() for t in tensors}, "every output is recorded on the consumer stream"
    assert log[-1] == ("release",) and max(copies) < log.index(("release",))


def test_the_cpu_path_copies_without_streams(logged_cuda):
    log = logged_cuda
    pipeline = _pipeline_with_copy_stream(log)
    pipeline._copy_stream = None  # as on the CPU
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    pipeline.pipe = FakePipe([FakeDaliOutput(data)], log)
    pipeline.in_flight.append(driver.Step(0, None, None))
    _, (tensor,) = pipeline.take()
    assert torch.equal(tensor, torch.from_numpy(data))
    assert log == [("copy on", None), ("release",)]
