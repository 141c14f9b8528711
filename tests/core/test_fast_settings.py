"""The settings a GPU run turns on, checked where a CPU can check them: backend flags and DDP's arguments."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from rela.methods.byol import Byol
from rela.methods.learner import RELA_PHASE, Learner, method_phase
from rela.methods.rela import RelaMap
from rela.models.backbones import build_backbone
from rela.run import configure_backends, wrap_for_ranks
from rela.utils.distributed import DistInfo


@pytest.fixture
def backend_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_runs_turn_on_cudnn_autotuning_and_tf32_and_cpu_runs_change_nothing(backend_flags):
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    configure_backends(torch.device("cpu"), deterministic=False)
    assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32)
    configure_backends(torch.device("cuda"), deterministic=False)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    configure_backends(torch.device("cuda"), deterministic=True)
    assert not torch.backends.cudnn.benchmark  # repeatable kernels under --deterministic


@pytest.fixture
def one_rank_group(tmp_path):
    # A file store: a port closed after it was found free could be taken by another process before gloo binds it.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=2)  # "enabled", so that the learner is wrapped
    dist.destroy_process_group()


@pytest.mark.parametrize("trainable_map", [False, True])
def test_ddp_looks_for_unused_parameters_only_where_there_are_some(one_rank_group, trainable_map):
    backbone = build_backbone("small_resnet", seed=0)
    learner = Learner(Byol(backbone, 32, 16), RelaMap(backbone.feature_dim, 8, trainable_map, seed=0), 10)
    rela = wrap_for_ranks(learner, one_rank_group, torch.device("cpu"), RELA_PHASE)
    byol = wrap_for_ranks(learner, one_rank_group, torch.device("cpu"), method_phase("byol"))
    assert rela.find_unused_parameters  # the projector and predictor get no gradient in the RELA phase
    assert byol.find_unused_parameters == trainable_map  # only a trainable W goes unused in BYOL
    for model in (rela, byol):
        assert not getattr(model, "forward_sync_buffers", model.broadcast_buffers) and model.gradient_as_bucket_view
    assert wrap_for_ranks(learner, DistInfo(), torch.device("cpu"), RELA_PHASE) is learner  # one process: no DDP


