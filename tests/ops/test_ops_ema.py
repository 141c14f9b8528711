"""The EMA step (EmaPair.update, ema_update_) with fused=True: one kernel launch (in Triton's interpreter)
against torch._foreach_lerp_ and buffer copies."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rela.ops import EmaPair, ema_update_, ema_update_reference_, flatten_module_, prepare_ema_


def small_net(seed: int, channels_last: bool = False) -> nn.Module:
    """Conv + BN + Linear + BN1d, odd sizes so the flat buffer has ragged parameter boundaries."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                        nn.Linear(5 * 4 * 4, 7), nn.BatchNorm1d(7), nn.Linear(7, 3, bias=False))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def train_forward(net: nn.Module, seed: int) -> None:
    """A forward in train mode: BN running statistics and counters move."""
    net.train()
    net(torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(seed)))


def ema_pair(channels_last: bool = False):
    """(target, online): the target a perturbed copy, the online model one train step ahead in its BN stats."""
    online = small_net(0, channels_last)
    train_forward(online, 1)
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p))
    train_forward(online, 2)
    return target, online


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


MOMENTA = {
    "float": 0.996,                               # weight 0.004: fma(w, o - t, t)
    "float_low": 0.3,                             # weight 0.7: fma(w - 1, o - t, o)
    "tensor": lambda: torch.tensor(0.99),         # read from memory in the kernel
    "tensor_float64": lambda: torch.tensor(0.9, dtype=torch.float64),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum_kind", list(MOMENTA))
def test_ema_matches_foreach_lerp_to_the_bit(momentum_kind, channels_last, launches):
    target, online = ema_pair(channels_last)
    expected_target, expected_online = copy.deepcopy(target), copy.deepcopy(online)
    online_before = state(online)
    momentum = MOMENTA[momentum_kind]
    momentum = momentum() if callable(momentum) else momentum

    for _ in range(3):
        ema_update_(target, online, momentum, fused=True)
        ema_update_reference_(expected_target, expected_online, momentum)

    assert launches == ["ema_kernel"] * 3
    assert_same_state(target, state(expected_target))
    assert_same_state(online, online_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("momentum_kind", ["float", "float_low", "tensor"])
def test_pair_update_matches_foreach_lerp_to_the_bit(momentum_kind, dtype, launches):
    """In bf16 too: the kernel lerps in float32 and rounds to nearest even, as torch does (a truncating store
    differs in about half the elements)."""
    target, online = (m.to(dtype) for m in ema_pair(channels_last=True))
    expected_target, expected_online = copy.deepcopy(target), copy.deepcopy(online)
    momentum = MOMENTA[momentum_kind]
    momentum = momentum() if callable(momentum) else momentum

    pair = prepare_ema_(target, online, fused=True)
    for _ in range(3):
        pair.update(momentum)
        ema_update_reference_(expected_target, expected_online, momentum)

    assert isinstance(pair, EmaPair) and pair.fused and pair.target is target
    assert launches == ["ema_kernel"] * 3
    assert_same_state(target, state(expected_target))


def test_pair_with_fused_false_runs_the_reference_on_the_modules_as_they_are(launches):
    target, online = ema_pair()
    expected_target = copy.deepcopy(target)
    ptrs = [p.data_ptr() for p in target.parameters()]

    pair = prepare_ema_(target, online, fused=False)
    pair.update(0.9)
    ema_update_reference_(expected_target, online, 0.9)

    assert not pair.fused and launches == []
    assert [p.data_ptr() for p in target.parameters()] == ptrs
    assert_same_state(target, state(expected_target))


@pytest.mark.parametrize("fused", [True, False])
def test_pair_refuses_modules_moved_since_prepare(fused, launches):
    target, online = ema_pair()
    pair = prepare_ema_(target, online, fused=fused)
    target.half()
    online.half()
    with pytest.raises(RuntimeError, match="call prepare_ema_ again"):
        pair.update(0.9)
    assert launches == []


def test_buffers_are_copied_from_online(launches):
    target, online = ema_pair()
    assert not torch.equal(target[1].running_mean, online[1].running_mean)
    assert target[1].num_batches_tracked.item() != online[1].num_batches_tracked.item()

    ema_update_(target, online, 0.9, fused=True)

    assert len(launches) == 1
    for name, buffer in online.named_buffers():
        assert torch.equal(target.get_buffer(name), buffer), name
    assert target[5].num_batches_tracked.dtype == torch.int64


def test_prepare_keeps_identity_values_and_strides():
    target, online = ema_pair(channels_last=True)
    params_before = dict(online.named_parameters())
    buffers_before = dict(online.named_buffers())
    online_state, target_state = state(online), state(target)
    strides = {name: p.stride() for name, p in online.named_parameters()}

    prepare_ema_(target, online, fused=True)

    assert_same_state(online, online_state)
    assert_same_state(target, target_state)
    for name, p in online.named_parameters():
        assert p is params_before[name] and p.requires_grad
        assert p.stride() == strides[name]
        assert target.get_parameter(name).stride() == strides[name]
    for name, b in online.named_buffers():
        assert b is buffers_before[name]
    # All parameters are views into one storage, the buffers into one per dtype (float32 stats, int64 counters).
    assert len({p.untyped_storage().data_ptr() for p in online.parameters()}) == 1
    assert len({b.untyped_storage().data_ptr() for b in online.buffers()}) == 2
    assert online[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("optimizer_first", [False, True], ids=["optimizer_after", "optimizer_before"])
def test_online_model_trains_normally_after_prepare(optimizer_first, launches):
    target, online = ema_pair()
    expected_target, expected_online = copy.deepcopy(target), copy.deepcopy(online)
    optimizers = []

    def make_optimizers():
        optimizers.append(torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9))
        optimizers.append(torch.optim.SGD(expected_online.parameters(), lr=0.1, momentum=0.9))

    if optimizer_first:
        make_optimizers()
    prepare_ema_(target, online, fused=True)
    if not optimizer_first:
        make_optimizers()
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    for step in range(2):
        for net, optimizer in zip((online, expected_online), optimizers):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
        ema_update_(target, online, 0.99, fused=True)
        ema_update_reference_(expected_target, expected_online, 0.99)

    assert all(p.grad is not None for p in online.parameters())
    assert_same_state(online, state(expected_online))
    assert_same_state(target, state(expected_target))
    assert launches == ["ema_kernel"] * 2


def test_fresh_containers_reuse_the_prepared_pair(launches):
    """The trainer may pass nn.ModuleList([backbone, head]) made anew at each call."""
    (target_a, online_a), (target_b, online_b) = ema_pair(), ema_pair()
    target_parts, online_parts = [target_a, target_b], [online_a, online_b]
    prepare_ema_(nn.ModuleList(target_parts), nn.ModuleList(online_parts), fused=True)
    flat_ptr = target_parts[0][0].weight.untyped_storage().data_ptr()

    ema_update_(nn.ModuleList(target_parts), nn.ModuleList(online_parts), 0.99, fused=True)

    assert target_parts[0][0].weight.untyped_storage().data_ptr() == flat_ptr
    assert len(launches) == 1


def test_moved_module_is_prepared_again(launches):
    """`.half()` swaps every storage; the next update notices and flattens again."""
    target, online = ema_pair()
    prepare_ema_(target, online, fused=True)
    target.half()
    online.half()
    expected_target, expected_online = copy.deepcopy(target), copy.deepcopy(online)

    ema_update_(target, online, 0.95, fused=True)
    ema_update_reference_(expected_target, expected_online, 0.95)

    assert target[0].weight.dtype == torch.float16
    assert_same_state(target, state(expected_target))
    assert len({p.untyped_storage().data_ptr() for p in target.parameters()}) == 1
    assert len(launches) == 1


def test_float64_parameters(launches):
    target, online = (m.double() for m in ema_pair())
    expected_target = copy.deepcopy(target)
    ema_update_(target, online, 0.9, fused=True)
    ema_update_reference_(expected_target, online, 0.9)
    assert len(launches) == 1
    for got, expected in zip(target.parameters(), expected_target.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15)


def test_buffers_get_one_flat_buffer_per_dtype():
    """BN's float32 statistics share one storage and its int64 counters another: no storage holds two dtypes."""
    net = small_net(3)
    flat = flatten_module_(net)
    assert [b.dtype for b in flat.buffers] == [torch.float32, torch.int64]
    storages: dict[int, set[torch.dtype]] = {}
    for b in net.buffers():
        storages.setdefault(b.untyped_storage().data_ptr(), set()).add(b.dtype)
    assert sorted(map(len, storages.values())) == [1, 1], storages
    assert {ptr for ptr in storages} == {b.untyped_storage().data_ptr() for b in flat.buffers}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_compiled_train_forward_after_prepare(channels_last):
    """torch.compile's AOTAutograd traces a train-mode forward that mutates the flat buffers' views (BN's
    running statistics and counters); it refused views of two dtypes in one storage."""
    target, online = ema_pair(channels_last)
    expected = copy.deepcopy(online)
    prepare_ema_(target, online, fused=True)
    torch._dynamo.reset()
    compiled = torch.compile(online, backend="aot_eager")
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    compiled.train()
    expected.train()
    torch.testing.assert_close(compiled(x), expected(x))
    assert_same_state(online, state(expected))


def test_flatten_module_puts_parameters_into_one_padded_buffer():
    net = small_net(3)
    values = [p.detach().clone() for p in net.parameters()]
    flat = flatten_module_(net)
    assert flat.params.dim() == 1 and flat.params.numel() >= sum(v.numel() for v in values)
    for p, value in zip(net.parameters(), values):
        assert torch.equal(p, value)
        assert p.untyped_storage().data_ptr() == flat.params.untyped_storage().data_ptr()


def test_structure_mismatch_raises():
    with pytest.raises(ValueError, match="parameters"):
        prepare_ema_(nn.Linear(3, 4), nn.Linear(4, 3))


MISMATCH_PATHS = {
    "reference": lambda target, online: ema_update_reference_(target, online, 0.9),
    "update_fused_false": lambda target, online: ema_update_(target, online, 0.9, fused=False),
    "update_fused": lambda target, online: ema_update_(target, online, 0.9, fused=True),
    "prepare_fused_false": lambda target, online: prepare_ema_(target, online, fused=False),
    "prepare_fused": lambda target, online: prepare_ema_(target, online, fused=True),
}


@pytest.mark.parametrize("path", list(MISMATCH_PATHS))
def test_every_path_rejects_a_target_that_would_broadcast(path):
    """A (3, 4) target weight against a (1, 4) online one: torch's lerp would broadcast it silently."""
    message = "the target's parameters (names, shapes, dtypes) differ from the online module's"
    with pytest.raises(ValueError, match=re.escape(message)):
        MISMATCH_PATHS[path](nn.Linear(4, 3), nn.Linear(4, 1))


def test_reference_needs_no_preparation(launches):
    target, online = ema_pair()
    ptr = target[0].weight.data_ptr()
    ema_update_(target, online, 0.5, fused=False)
    assert launches == [] and target[0].weight.data_ptr() == ptr


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_online_wrapped_in_ddp_after_prepare(tmp_path, launches):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        target, online = ema_pair()
        expected_target, expected_online = copy.deepcopy(target), copy.deepcopy(online)
        prepare_ema_(target, online, fused=True)
        model = DistributedDataParallel(online)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        expected_optimizer = torch.optim.SGD(expected_online.parameters(), lr=0.1)
        x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(6))
        for net, opt in ((model, optimizer), (expected_online, expected_optimizer)):
            net(x).square().mean().backward()
            opt.step()
        ema_update_(target, online, 0.9, fused=True)
        ema_update_reference_(expected_target, expected_online, 0.9)
    finally:
        dist.destroy_process_group()
    assert_same_state(online, state(expected_online))
    assert_same_state(target, state(expected_target))
    assert len(launches) == 1
