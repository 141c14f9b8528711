"""EMA of a target network towards an online network: the reference, and a pair object that does the step.

    target.param <- momentum * target.param + (1 - momentum) * online.param   (every parameter)
    target.buffer <- online.buffer                                          (BN running stats, counters)

`prepare_ema_(target, online)` returns an `EmaPair`, whose `update(momentum)` is this step. On the
fused path (CUDA modules; CPU ones only with fused=True, in Triton's interpreter) the pair does it
in ONE kernel launch for the parameters and one copy per buffer dtype: `prepare_ema_` first moves the
parameters of both modules into one flat buffer each, and their buffers into one flat buffer per dtype
(BN's float32 statistics in one, its int64 counters in another), in place, and the pair owns these
buffers. A storage never holds two dtypes: torch.compile's AOTAutograd refuses a train-mode forward that
mutates two buffers sharing a storage through views of different dtypes (BN's running_mean and
num_batches_tracked: "non-differentiable view input mutations"). Every parameter and buffer keeps its identity (same tensor object, same requires_grad, same .grad) and only its storage
becomes a view into the flat buffer. An optimizer built before therefore keeps working (it holds the
same objects), but the safe order is to build the optimizer, DDP and torch.compile after. On the
reference path the modules are left as they are and the pair runs `ema_update_reference_`.

Trainer contract:
    ema = prepare_ema_(target, online, fused=fused)  # once, after both are on their device, before the
                                                     # optimizer, DDP and torch.compile are built
    ...
    ema.update(momentum)                             # every step; momentum a float or a 0-dim device tensor

`ema.update` raises if a module's storage was replaced since (by `.to()`, `.cuda()`, `.half()`: it
checks the first and last parameter and buffer); it does not notice a single parameter or buffer
swapped for a new tensor in the middle of a module (`module.fc = nn.Linear(...)`), so prepare again
after such a change. `ema_update_(target, online, momentum)` is the same step without a pair to keep:
it finds the flat buffers behind the parameters when `prepare_ema_` made them (a walk over the
modules: milliseconds per call for a ResNet-50, so a training loop keeps the pair), and prepares the
modules otherwise. The modules may then be containers made afresh at each call
(`nn.ModuleList([backbone, head])`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torch.library import triton_op, wrap_triton

from rela.ops._dispatch import INTERPRETED, use_kernels

try:
    from rela.kernels.ema import PAD, ema_launch
except ImportError:  # no Triton: use_kernels() then never picks the fused path
    PAD, ema_launch = 1, None

# As in cosine_losses: under the interpreter wrap_triton hands back the plain kernel, launched as it is.
_wrap = (lambda kernel: kernel) if INTERPRETED else wrap_triton


@triton_op("rela::ema_lerp_", mutates_args={"target"})
def _ema_lerp_(target: torch.Tensor, online: torch.Tensor, momentum: torch.Tensor | None,
               momentum_value: float) -> None:
    """The fused parameter step as a torch custom op (torch.compile traces into its one kernel): target <-
    lerp(target, online, 1 - m); m is `momentum` (0-dim, read on the device) when given, else `momentum_value`."""
    ema_launch(target, online, momentum_value if momentum is None else momentum, _wrap)


def _fused_update(target_flat: FlatModule, online_flat: FlatModule, momentum: float | torch.Tensor) -> None:
    tensor = momentum if isinstance(momentum, torch.Tensor) else None
    torch.ops.rela.ema_lerp_(target_flat.params, online_flat.params, tensor,
                             0.0 if tensor is not None else float(momentum))
    if target_flat.buffers:
        torch._foreach_copy_(list(target_flat.buffers), list(online_flat.buffers))

# (name, shape, dtype) of every parameter, then of every buffer, in named_parameters()/named_buffers() order.
_Structure = tuple[tuple[tuple[str, torch.Size, torch.dtype], ...], tuple[tuple[str, torch.Size, torch.dtype], ...]]


@dataclass(frozen=True)
class _Layout:
    """Where each parameter and buffer lives in the flat buffers, shared by a target/online pair."""
    structure: _Structure
    strides: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]                             # in elements of the parameter dtype
    numel: int                                           # padded length of the parameter buffer
    dtype: torch.dtype
    buffer_dtypes: tuple[torch.dtype, ...]               # one flat buffer each, in order of first use
    buffer_slots: tuple[tuple[int, int], ...]            # each buffer's (flat buffer, offset in its elements)
    buffer_numels: tuple[int, ...]                       # padded length of each flat buffer


@dataclass(frozen=True)
class FlatModule:
    """A module whose parameters are views into `params` (1-D) and whose buffers are views into `buffers`,
    one 1-D tensor per buffer dtype (`layout.buffer_dtypes`)."""
    params: torch.Tensor
    buffers: tuple[torch.Tensor, ...]
    layout: _Layout


def _structure(module: nn.Module) -> _Structure:
    return (tuple((n, p.shape, p.dtype) for n, p in module.named_parameters()),
            tuple((n, b.shape, b.dtype) for n, b in module.named_buffers()))


def _check_structure(module: nn.Module, expected: _Structure, what: str) -> None:
    params, buffers = _structure(module)
    if params != expected[0]:
        raise ValueError(f"{what}'s parameters (names, shapes, dtypes) differ from the online module's")
    if buffers != expected[1]:
        raise ValueError(f"{what}'s buffers (names, shapes, dtypes) differ from the online module's")


def _device(target: nn.Module, online: nn.Module) -> torch.device:
    first_target, first_online = next(target.parameters(), None), next(online.parameters(), None)
    if first_target is None or first_online is None:
        raise ValueError("the module has no parameters to average")
    if first_target.device != first_online.device:
        raise ValueError(f"target is on {first_target.device}, online on {first_online.device}")
    return first_target.device


def _aligned(n: int) -> int:
    """n rounded up to 16 elements: each view starts aligned, so vector loads stay aligned within it."""
    return -(-n // 16) * 16


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides if they cover exactly t.numel() elements (contiguous, channels_last), else contiguous."""
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        try:
            if t.is_contiguous(memory_format=fmt):
                return t.stride()
        except RuntimeError:  # channels_last on a tensor of the wrong rank
            continue
    return torch.empty(t.shape, device="meta").stride()


def _layout_of(module: nn.Module) -> _Layout:
    params = list(module.parameters())
    if not params:
        raise ValueError("the module has no parameters to average")
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not params[0].is_floating_point():
        raise ValueError(f"all parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
    offsets, offset = [], 0
    for p in params:
        offsets.append(offset)
        offset += _aligned(p.numel())
    buffer_dtypes: list[torch.dtype] = []
    slots, ends = [], []
    for b in module.buffers():
        if b.dtype not in buffer_dtypes:
            buffer_dtypes.append(b.dtype)
            ends.append(0)
        group = buffer_dtypes.index(b.dtype)
        slots.append((group, ends[group]))
        ends[group] += _aligned(b.numel())
    return _Layout(
        structure=_structure(module), strides=tuple(_dense_strides(p) for p in params), offsets=tuple(offsets),
        numel=-(-offset // PAD) * PAD, dtype=params[0].dtype, buffer_dtypes=tuple(buffer_dtypes),
        buffer_slots=tuple(slots), buffer_numels=tuple(ends))


@torch.no_grad()
def flatten_module_(module: nn.Module, layout: _Layout | None = None) -> FlatModule:
    """Moves `module`'s parameters into one flat buffer and its buffers into one flat buffer per dtype, in place.

    Each parameter and buffer keeps its identity and value; its storage becomes a view (`.data` is
    swapped), with its strides kept when dense (channels_last stays channels_last). `layout` (from the
    other module of a pair) makes two modules' flat buffers line up element for element.
    Parameters: one floating dtype. Buffers: any dtypes.
    """
    layout = _layout_of(module) if layout is None else layout
    _check_structure(module, layout.structure, "the module")
    params = list(module.parameters())
    device = params[0].device
    flat = torch.zeros(layout.numel, dtype=layout.dtype, device=device)
    for p, stride, offset in zip(params, layout.strides, layout.offsets):
        view = flat.as_strided(p.shape, stride, offset)
        view.copy_(p)
        p.data = view
    flat_buffers = tuple(torch.zeros(n, dtype=dtype, device=device)
                         for dtype, n in zip(layout.buffer_dtypes, layout.buffer_numels))
    for b, (group, offset) in zip(module.buffers(), layout.buffer_slots):
        view = flat_buffers[group][offset:offset + b.numel()].view(b.shape)
        view.copy_(b)
        b.data = view
    return FlatModule(flat, flat_buffers, layout)


def _flat_of(module: nn.Module, layout: _Layout) -> FlatModule | None:
    """The flat buffers behind `module` when `flatten_module_(module, layout)` made them, else None."""
    params, buffers = list(module.parameters()), list(module.buffers())
    storage = params[0].untyped_storage()
    if (storage.nbytes() != layout.numel * layout.dtype.itemsize
            or any(p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != offset
                   or p.stride() != stride for p, stride, offset in zip(params, layout.strides, layout.offsets))):
        return None
    flat = params[0].detach().as_strided((layout.numel,), (1,), 0)
    flat_buffers: list[torch.Tensor | None] = [None] * len(layout.buffer_dtypes)
    for b, (group, offset) in zip(buffers, layout.buffer_slots):
        whole = flat_buffers[group]
        if whole is None:  # the group's first buffer starts its flat buffer
            if offset != 0 or b.storage_offset() != 0:
                return None
            whole = flat_buffers[group] = b.detach().as_strided((layout.buffer_numels[group],), (1,), 0)
        if (b.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
                or b.untyped_storage().nbytes() != whole.numel() * whole.element_size()
                or b.storage_offset() != offset or not b.is_contiguous()):
            return None
    return FlatModule(flat, tuple(flat_buffers), layout)


def _tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return list(module.parameters()), list(module.buffers())


def _lerp_and_copy_(target: tuple[list[torch.Tensor], list[torch.Tensor]],
                    online: tuple[list[torch.Tensor], list[torch.Tensor]], momentum: float | torch.Tensor) -> None:
    """The reference step over (parameters, buffers) lists of matching tensors."""
    (target_params, target_buffers), (online_params, online_buffers) = target, online
    if isinstance(momentum, torch.Tensor):
        weight = 1 - momentum
        torch._foreach_lerp_(target_params, online_params, [weight] * len(target_params))
    else:
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    if target_buffers:
        torch._foreach_copy_(target_buffers, online_buffers)


@torch.no_grad()
def ema_update_reference_(target: nn.Module, online: nn.Module, momentum: float | torch.Tensor) -> None:
    """The definition, in plain torch: `_foreach_lerp_` over the parameters, `_foreach_copy_` of buffers.

    target, online: modules of identical structure (parameter and buffer names, shapes, dtypes; a
    mismatch raises ValueError). momentum: a Python float or a 0-dim tensor (read on the device: no
    host sync). Nothing is differentiated; `online` is only read.
    """
    _check_structure(target, _structure(online), "the target")
    _lerp_and_copy_(_tensors(target), _tensors(online), momentum)


def _momentum_on(device: torch.device, momentum: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0:
            raise ValueError(f"momentum must be a float or a 0-dim tensor, got shape {tuple(momentum.shape)}")
        if momentum.device != device:
            momentum = momentum.to(device, non_blocking=True)
    return momentum


class EmaPair:
    """A target module that follows an online module by EMA (made by `prepare_ema_`), in the manner of
    timm's ModelEmaV3: it holds the modules' tensors and, on the fused path, owns their flat buffers.

    `target`, `online`: the modules. `fused`: whether `update` is one kernel launch over the flat
    parameter buffers `target_flat`, `online_flat` (None on the reference path), and one copy of each
    flat buffer of buffers.
    """

    def __init__(self, target: nn.Module, online: nn.Module, target_flat: FlatModule | None = None,
                 online_flat: FlatModule | None = None):
        self.target, self.online = target, online
        self.target_flat, self.online_flat = target_flat, online_flat
        self.device = _device(target, online)
        # Listed once: walking a ResNet-50's modules costs about a millisecond per step.
        self._target_tensors, self._online_tensors = _tensors(target), _tensors(online)
        # (tensor, data_ptr it must keep): a moved or re-cast module fails these.
        self._sentinels = [(t, t.data_ptr()) for params, buffers in (self._target_tensors, self._online_tensors)
                           for t in params[:1] + params[-1:] + buffers[:1] + buffers[-1:]]

    @property
    def fused(self) -> bool:
        return self.target_flat is not None

    @torch.no_grad()
    def update(self, momentum: float | torch.Tensor) -> None:
        """target <- momentum * target + (1 - momentum) * online for every parameter; buffers copied.

        momentum: a Python float or a 0-dim tensor (any floating dtype, moved to the modules' device if
        elsewhere) that the kernel reads from device memory, so a momentum schedule kept on the device
        costs no host sync. Nothing is differentiated; `online` is only read.
        """
        if any(t.data_ptr() != ptr for t, ptr in self._sentinels):
            raise RuntimeError("a module's parameters or buffers were moved or re-cast since prepare_ema_ "
                               "(.to(), .cuda(), .half()?): call prepare_ema_ again")
        momentum = _momentum_on(self.device, momentum)
        if self.fused:
            _fused_update(self.target_flat, self.online_flat, momentum)
        else:
            _lerp_and_copy_(self._target_tensors, self._online_tensors, momentum)


def prepare_ema_(target: nn.Module, online: nn.Module, *, fused: bool | None = None) -> EmaPair:
    """The pair that updates `target` towards `online`; on the fused path both are flattened in place first.

    target, online: modules of identical structure (names, shapes, dtypes), on one device; all
    parameters of one floating dtype. Call once after moving them to their device and before
    building the optimizer, DDP or torch.compile around `online` (pass the unwrapped module).
    The online module's values are untouched; the target's parameters take the online's strides.
    fused: None picks the kernels for CUDA modules and the reference for CPU ones, False the
    reference (nothing is flattened), True demands the kernels (see rela.ops._dispatch).
    """
    _check_structure(target, _structure(online), "the target")
    device = _device(target, online)
    if not use_kernels(fused, device):
        return EmaPair(target, online)
    layout = _layout_of(online)
    online_flat = flatten_module_(online, layout)
    return EmaPair(target, online, flatten_module_(target, layout), online_flat)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float | torch.Tensor, *,
                fused: bool | None = None) -> None:
    """target <- momentum * target + (1 - momentum) * online for every parameter; buffers copied.

    target, online: nn.Modules of identical structure (pass the module inside DDP, not the wrapper),
    parameters of one floating dtype (float32 usually; bf16/fp16/float64 work), buffers of any dtype
    (BN running_mean, running_var, num_batches_tracked). momentum: as for `EmaPair.update`. The fused
    path is one kernel launch over the flat buffers that `prepare_ema_` made (found again from the
    parameters' storage; the modules are prepared here when they are not flat, or no longer), then one
    copy per buffer dtype; for
    float32/bf16/fp16 parameters it matches `torch._foreach_lerp_` bit for bit (tested on the CPU
    under the interpreter). fused: as for `prepare_ema_`.
    """
    if not use_kernels(fused, _device(target, online)):
        ema_update_reference_(target, online, momentum)
        return
    layout = _layout_of(online)
    _check_structure(target, layout.structure, "the target")
    target_flat, online_flat = _flat_of(target, layout), _flat_of(online, layout)
    if target_flat is None or online_flat is None:
        pair = prepare_ema_(target, online, fused=True)
    else:
        pair = EmaPair(target, online, target_flat, online_flat)
    pair.update(momentum)
