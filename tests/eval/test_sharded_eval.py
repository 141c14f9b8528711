"""Evaluation and the bank's last exchange on two ranks (gloo, CPU): the training features stay on their ranks,
the kNN and the probe on the blocks give the one-process numbers, and the bank's rows are broadcast into the
one tensor every rank returns. One spawn of two ranks runs every part; each part's findings (or its error) are
saved per rank, and each test reads its own part."""
from __future__ import annotations

import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rela.eval.frozen
import rela.eval.linear_probe
from rela.data.datasets import ArrayImages, DatasetSplits
from rela.data.loader import TorchImageSource
from rela.eval.frozen import evaluate_frozen
from rela.eval.knn import knn_accuracy
from rela.eval.linear_probe import linear_probe_accuracy, linear_probe_reference
from rela.options import resolve_config
from rela.prior.pca import pca_from_sums
from rela.prior.target_bank import project_rows
from rela.utils.distributed import DistInfo

# One spawn of two ranks takes 8-15 s: the slow tier (CI runs it).
pytestmark = pytest.mark.slow

WORLD_SIZE = 2
NUM_CLASSES = 4
# (rows on rank 0, rows on rank 1): even, uneven, and a rank with fewer rows than k
KNN_SPLITS = [(100, 103), (3, 200)]
PROBE_SPLITS = [140, 5]  # rows on rank 0 of 301: uneven, and a rank missing from most batches
KNN_SETTINGS = [dict(k=20, temperature=0.07, chunk=16), dict(k=5, temperature=0.5, chunk=1024),
                dict(k=1, temperature=0.07, chunk=7)]


def knn_fixture():
    """(train_x (203, 16), train_y, val_x (61, 16), val_y): clustered, so the accuracy is neither 0 nor 1."""
    generator = torch.Generator().manual_seed(11)
    centres = torch.randn(NUM_CLASSES, 16, generator=generator) * 0.5
    train_y = torch.randint(0, NUM_CLASSES, (203,), generator=generator)
    val_y = torch.randint(0, NUM_CLASSES, (61,), generator=generator)
    train_x = centres[train_y] + torch.randn(203, 16, generator=generator)
    val_x = centres[val_y] + torch.randn(61, 16, generator=generator)
    return train_x, train_y, val_x, val_y


def probe_fixture():
    """(train_x (301, 12), train_y, val_x (97, 12), val_y): off-centre, scaled, noisy linear classes."""
    generator = torch.Generator().manual_seed(12)
    directions = torch.randn(NUM_CLASSES, 12, generator=generator)
    train_x = torch.randn(301, 12, generator=generator) * 3 + 5
    val_x = torch.randn(97, 12, generator=generator) * 3 + 5
    train_y = ((train_x - 5) @ directions.T + 2 * torch.randn(301, NUM_CLASSES, generator=generator)).argmax(1)
    val_y = ((val_x - 5) @ directions.T).argmax(1)
    return train_x, train_y, val_x, val_y


PROBES = {"project": lambda *a, **kw: linear_probe_accuracy(*a, epochs=4, batch_size=64, lr=0.05, seed=3, **kw),
          "reference": lambda *a, **kw: linear_probe_reference(*a, epochs=4, batch_size=32, lr=3e-3, seed=3, **kw)}


def probe_run(protocol: str, train_x, train_y, val_x, val_y, dist_info: DistInfo):
    """The probe's result and the classifier's weights (and bias) each time it was scored."""
    weights = []
    real = rela.eval.linear_probe._accuracy

    def spy(classifier, x, y):
        weights.append(torch.cat([classifier.weight.detach().flatten(), classifier.bias.detach()]).clone())
        return real(classifier, x, y)

    rela.eval.linear_probe._accuracy = spy
    try:
        result = PROBES[protocol](train_x, train_y, val_x, val_y, NUM_CLASSES, dist=dist_info)
    finally:
        rela.eval.linear_probe._accuracy = real
    return result, torch.stack(weights)


def image_fixture():
    """(splits of random 8 x 8 images, a small conv backbone with 8 features, the config evaluate_frozen reads)."""
    rng = np.random.default_rng(4)
    train = ArrayImages(rng.integers(0, 256, (45, 8, 8, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, 45), "t")
    val = ArrayImages(rng.integers(0, 256, (19, 8, 8, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, 19), "v")
    splits = DatasetSplits(train, val, NUM_CLASSES, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 8)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.feature_dim = 8
    cfg = resolve_config({"dataset": "digits", "image_size": 8, "eval_batch_size": 8, "probe_epochs": 3, "knn_k": 5,
                          "progress": False, "device": "cpu"})
    return splits, backbone, cfg


def evaluate_images(dist_info: DistInfo) -> dict:
    splits, backbone, cfg = image_fixture()
    device = torch.device("cpu")
    return evaluate_frozen(backbone, TorchImageSource(splits.train, device), TorchImageSource(splits.val, device),
                           splits, cfg, dist=dist_info, autocast_dtype=None, protocols=["project", "reference"])


def bank_fixture(num_rows: int = 1001, dim: int = 24, k: int = 7):
    """(raw features float32 (num_rows, dim) as an array, their PCA projection)."""
    generator = torch.Generator().manual_seed(5)
    rows = (torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
            @ torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    x = rows.to(torch.float32).numpy()
    x64 = torch.from_numpy(x).double()
    return x, pca_from_sums(x64.sum(0), x64.T @ x64, num_rows, k)


def rank_parts(rank: int) -> dict:
    """Every part's findings on this rank, each {"error": traceback} if it raised."""
    info = DistInfo(rank, WORLD_SIZE, rank)
    parts = {}

    def part(name, run):
        try:
            parts[name] = run()
        except Exception:
            parts[name] = {"error": traceback.format_exc()}

    def knn():
        train_x, train_y, val_x, val_y = knn_fixture()
        found = {}
        for split in KNN_SPLITS:
            begin = sum(split[:rank])
            mine = slice(begin, begin + split[rank])
            for i, settings in enumerate(KNN_SETTINGS):
                found[f"{split}/{i}"] = knn_accuracy(train_x[mine], train_y[mine], val_x, val_y, NUM_CLASSES,
                                                     dist=info, **settings)
        return found

    def probes():
        train_x, train_y, val_x, val_y = probe_fixture()
        found = {}
        for first in PROBE_SPLITS:
            mine = slice(0, first) if rank == 0 else slice(first, None)
            for p in PROBES:
                found[f"{first}/{p}"] = probe_run(p, train_x[mine], train_y[mine], val_x, val_y, info)
        return found

    def frozen():
        held = {}
        real = rela.eval.frozen.probe_and_knn

        def spy(train_x, train_y, val_x, val_y, *args, **kwargs):
            held.update(train_rows=len(train_x), val_rows=len(val_x), train_y=train_y.tolist())
            return real(train_x, train_y, val_x, val_y, *args, **kwargs)

        rela.eval.frozen.probe_and_knn = spy
        try:
            return {"results": evaluate_images(info), **held}
        finally:
            rela.eval.frozen.probe_and_knn = real

    def bank():
        features, projection = bank_fixture()
        written = []
        real = {name: getattr(dist, name) for name in ("broadcast", "all_gather", "all_gather_into_tensor")}

        def recording(name):
            def collective(*args, **kwargs):
                tensors = args[0] if isinstance(args[0], list) else [args[0]]
                if name == "all_gather_into_tensor":
                    tensors = [args[0]]
                written.extend((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)
                return real[name](*args, **kwargs)
            return collective

        for name in real:
            setattr(dist, name, recording(name))
        try:
            out = project_rows(features, projection, torch.device("cpu"), rank=rank, world_size=WORLD_SIZE,
                               chunk=100, dtype=torch.bfloat16)
        finally:
            for name, function in real.items():
                setattr(dist, name, function)
        start, size = out.data_ptr(), out.numel() * out.element_size()
        outside = [w for w in written if not (start <= w[0] and w[0] + w[1] <= start + size)]
        return {"out": out, "collectives": len(written), "written_outside_the_result": outside}

    part("knn", knn)
    part("probes", probes)
    part("frozen", frozen)
    part("bank", bank)
    return parts


def rank_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(rank_parts(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("sharded-eval")
    mp.spawn(rank_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _part(ranks: list[dict], name: str) -> list:
    for rank, parts in enumerate(ranks):
        assert "error" not in parts[name], f"rank {rank}:\n{parts[name].get('error')}"
    return [parts[name] for parts in ranks]


def test_sharded_knn_equals_the_one_process_knn(ranks):
    found = _part(ranks, "knn")
    train_x, train_y, val_x, val_y = knn_fixture()
    accuracies = set()
    for split in KNN_SPLITS:
        for i, settings in enumerate(KNN_SETTINGS):
            alone = knn_accuracy(train_x, train_y, val_x, val_y, NUM_CLASSES, **settings)
            accuracies.add(alone)
            assert [f[f"{split}/{i}"] for f in found] == [alone, alone], (split, settings)
    assert all(0.3 < a < 1.0 for a in accuracies)  # neither trivial nor saturated


@pytest.mark.parametrize("protocol", list(PROBES))
def test_sharded_probe_takes_the_one_process_steps(ranks, protocol):
    found = _part(ranks, "probes")
    train_x, train_y, val_x, val_y = probe_fixture()
    alone, alone_weights = probe_run(protocol, train_x, train_y, val_x, val_y, DistInfo())
    for first in PROBE_SPLITS:
        name = f"{first}/{protocol}"
        for result, weights in (f[name] for f in found):
            # every scoring (one per epoch for the reference protocol): the same classifier, up to float order
            torch.testing.assert_close(weights, alone_weights, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
            assert result == pytest.approx(alone, abs=1.5 / len(val_y))  # at most one held-out row decided otherwise
        assert found[0][name][0] == found[1][name][0]  # every rank reports the same number
        assert torch.equal(found[0][name][1], found[1][name][1])


def test_each_rank_keeps_only_its_block_of_training_features_and_evaluation_gives_the_one_process_numbers(ranks):
    found = _part(ranks, "frozen")
    splits, _, _ = image_fixture()
    assert [f["train_rows"] for f in found] == [22, 23]  # not 45 on each: the training split stays sharded
    assert [f["val_rows"] for f in found] == [19, 19]  # the validation split is gathered
    assert found[0]["train_y"] + found[1]["train_y"] == splits.train.labels.tolist()
    alone = evaluate_images(DistInfo())
    for f in found:
        for protocol, numbers in alone.items():
            sharded = f["results"][protocol]
            assert sharded["knn_top1"] == numbers["knn_top1"]
            assert sharded["linear_probe_top1"] == pytest.approx(numbers["linear_probe_top1"], abs=100 * 1.5 / 19)


def test_bank_rows_are_broadcast_into_the_one_result_tensor(ranks):
    found = _part(ranks, "bank")
    features, projection = bank_fixture()
    expected = project_rows(features, projection, torch.device("cpu"), dtype=torch.bfloat16)
    for f in found:
        assert torch.equal(f["out"], expected)
        assert f["collectives"] > 0
        # every collective reads or writes rows of the returned tensor: no receive buffers, no concatenation
        assert f["written_outside_the_result"] == []
