"""A CIFAR batch is a pickle, and may come from anywhere: one that names a function to call is refused in one
line naming the file, in rela.train and in rela.eval, and what it names never runs."""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from badfiles import run_trainer
from builders import FAST_ARGS, write_cifar10
from rela.data.datasets import load_dataset
from rela.errors import RelaError


class CreatesAFile:
    """Unpickling this calls exec(...), which creates the marker file: what a crafted batch could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def crafted_cifar(root: Path, marker: Path) -> Path:
    """A CIFAR-10 folder whose data_batch_3 carries the payload among good-looking arrays."""
    write_cifar10(root, per_batch=20)
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20, b"note": CreatesAFile(marker)}, fh)
    return root / "data_batch_3"


def test_load_dataset_refuses_a_batch_that_would_run_code(tmp_path):
    marker = tmp_path / "marker"
    batch = crafted_cifar(tmp_path / "cifar", marker)
    with pytest.raises(RelaError) as err:
        load_dataset("cifar10", str(tmp_path / "cifar"))
    assert not marker.exists(), "the batch's payload ran"
    assert str(err.value) == (f"cannot read CIFAR batch {batch}: refused: the file asks the unpickler for "
                              "builtins.exec, which could run code (a CIFAR batch holds only numpy arrays, lists "
                              "and numbers)")


def test_rela_train_and_rela_eval_refuse_it_in_one_line(tmp_path, capsys):
    from rela.eval.standalone import main as eval_main
    from rela.models.backbones import build_backbone

    marker = tmp_path / "marker"
    batch = crafted_cifar(tmp_path / "cifar", marker)
    args = [*FAST_ARGS, "--dataset", "cifar10", "--data", str(tmp_path / "cifar"), "--prior", "none"]
    line = run_trainer(capsys, tmp_path, *args).error_line
    assert line.startswith(f"rela.train: error: cannot read CIFAR batch {batch}: refused: ")

    backbone = tmp_path / "backbone.pt"
    torch.save({"arch": "small_resnet", "state_dict": build_backbone("small_resnet").state_dict()}, backbone)
    assert eval_main([str(backbone), "--dataset", "cifar10", "--data", str(tmp_path / "cifar"), "--device", "cpu",
                      "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rela.eval: error: cannot read CIFAR batch {batch}: refused: ") and "Traceback" not in err
    assert not marker.exists(), "the batch's payload ran"


@pytest.mark.parametrize("protocol, numpy_path", [(2, "numpy._core"), (4, "numpy._core"), (5, "numpy._core"),
                                                  (2, "numpy.core")])
def test_the_restricted_unpickler_reads_real_batches(protocol, numpy_path):
    """The official batches are protocol-2 pickles naming numpy.core (numpy 1); numpy 2 writes numpy._core."""
    from rela.data.datasets import CifarUnpickler

    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [3, 7], b"fine_labels": np.array([1, 2])}, protocol=protocol)
    raw = raw.replace(b"numpy._core.", numpy_path.encode() + b".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 reading numpy 1's paths
        batch = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    assert np.array_equal(batch[b"data"], data) and batch[b"labels"] == [3, 7]
    assert batch[b"fine_labels"].tolist() == [1, 2]
