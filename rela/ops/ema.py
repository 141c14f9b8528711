"""EMA of a target network towards an online network: reference, flat-buffer preparation, dispatch.

    target.param <- momentum * target.param + (1 - momentum) * online.param   (every parameter)
    target.buffer <- online.buffer                                          (BN running stats, counters)

The fused path does this in ONE kernel launch. `prepare_ema_(target, online)` moves the parameters of
both modules into one flat buffer each (and their buffers into one word buffer each), in place: every
parameter and buffer keeps its identity (same tensor object, same requires_grad, same .grad) and only
its storage becomes a view into the flat buffer. An optimizer built before therefore keeps working
(it holds the same objects), but the safe order is to build the optimizer, DDP and torch.compile
after. The modules may be containers made afresh at each call (`nn.ModuleList([backbone, head])`):
the pair is recognised by its parameters.

Trainer contract:
    prepare_ema_(target, online)          # once, after both are on their device, before the
                                          # optimizer, DDP and torch.compile are built
    ...
    ema_update_(target, online, momentum) # every step; momentum a float or a 0-dim device tensor

`ema_update_` prepares the pair itself on first use, and again if a module's storage was replaced
(e.g. by `.to()`, `.cuda()`, `.half()`: it checks the first and last parameter and buffer); it does
not notice a single parameter or buffer swapped for a new tensor in the middle of a module
(`module.fc = nn.Linear(...)`), so call `prepare_ema_` again after such a change.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from rela.ops._dispatch import use_kernels

try:
    from kernels.ema import PAD, ema_launch
except ImportError:  # no Triton: use_kernels() then never picks the fused path
    PAD, ema_launch = 1, None


@dataclass(frozen=True)
class _Layout:
    """Where each parameter and buffer lives in the flat buffers, shared by a target/online pair."""
    names: tuple[str, ...]                               # parameters, in named_parameters() order
    shapes: tuple[torch.Size, ...]
    strides: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]                             # in elements of the parameter dtype
    numel: int                                           # padded length of the parameter buffer
    dtype: torch.dtype
    buffer_names: tuple[str, ...]
    buffer_dtypes: tuple[torch.dtype, ...]
    buffer_shapes: tuple[torch.Size, ...]
    word_offsets: tuple[int, ...]                        # in int64 words
    words: int


@dataclass(frozen=True)
class FlatModule:
    """A module whose parameters are views into `params` (1-D) and buffers views into `words` (int64)."""
    params: torch.Tensor
    words: torch.Tensor
    layout: _Layout


@dataclass
class _EmaPair:
    target: FlatModule
    online: FlatModule
    online_first: weakref.ref           # the online module's first parameter, identifying the pair
    # (weak tensor, data_ptr it must have): a moved or re-cast module fails these.
    sentinels: tuple[tuple[weakref.ref, int], ...]


# Keyed by id() of the target's first parameter, not by the module: callers may hand in a fresh
# container (nn.ModuleList([backbone, head])) at every call. An entry goes when that parameter does.
_pairs: dict[int, _EmaPair] = {}


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
    params = list(module.named_parameters())
    if not params:
        raise ValueError("the module has no parameters to average")
    dtypes = {p.dtype for _, p in params}
    if len(dtypes) != 1 or not params[0][1].is_floating_point():
        raise ValueError(f"all parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
    offsets, offset = [], 0
    for _, p in params:
        offsets.append(offset)
        # Each parameter starts 16-element aligned: vector loads stay aligned within the views too.
        offset += -(-p.numel() // 16) * 16
    buffers = list(module.named_buffers())
    word_offsets, word = [], 0
    for _, b in buffers:
        word_offsets.append(word)
        word += -(-b.numel() * b.element_size() // 8)
    return _Layout(
        names=tuple(n for n, _ in params), shapes=tuple(p.shape for _, p in params),
        strides=tuple(_dense_strides(p) for _, p in params), offsets=tuple(offsets),
        numel=-(-offset // PAD) * PAD, dtype=params[0][1].dtype,
        buffer_names=tuple(n for n, _ in buffers), buffer_dtypes=tuple(b.dtype for _, b in buffers),
        buffer_shapes=tuple(b.shape for _, b in buffers), word_offsets=tuple(word_offsets), words=word)


def _check_matches(layout: _Layout, module: nn.Module, what: str) -> None:
    params = list(module.named_parameters())
    buffers = list(module.named_buffers())
    if (tuple(n for n, _ in params) != layout.names or tuple(p.shape for _, p in params) != layout.shapes
            or any(p.dtype != layout.dtype for _, p in params)):
        raise ValueError(f"{what}'s parameters (names, shapes, dtypes) differ from the online module's")
    if (tuple(n for n, _ in buffers) != layout.buffer_names
            or tuple(b.shape for _, b in buffers) != layout.buffer_shapes
            or tuple(b.dtype for _, b in buffers) != layout.buffer_dtypes):
        raise ValueError(f"{what}'s buffers (names, shapes, dtypes) differ from the online module's")


@torch.no_grad()
def flatten_module_(module: nn.Module, layout: _Layout | None = None) -> FlatModule:
    """Moves `module`'s parameters into one flat buffer and its buffers into one int64 word buffer, in place.

    Each parameter and buffer keeps its identity and value; its storage becomes a view (`.data` is
    swapped), with its strides kept when dense (channels_last stays channels_last). `layout` (from the
    other module of a pair) makes two modules' flat buffers line up element for element.
    Parameters: one floating dtype. Buffers: any dtypes.
    """
    layout = _layout_of(module) if layout is None else layout
    _check_matches(layout, module, "the module")
    params = [p for _, p in module.named_parameters()]
    buffers = [b for _, b in module.named_buffers()]
    device = params[0].device
    flat = torch.zeros(layout.numel, dtype=layout.dtype, device=device)
    for p, shape, stride, offset in zip(params, layout.shapes, layout.strides, layout.offsets):
        view = flat.as_strided(shape, stride, offset)
        view.copy_(p)
        p.data = view
    words = torch.zeros(-(-max(layout.words, 1) // 16) * 16, dtype=torch.int64, device=device)
    for b, word in zip(buffers, layout.word_offsets):
        n_words = -(-b.numel() * b.element_size() // 8)
        view = words[word:word + n_words].view(b.dtype)[:b.numel()].view(b.shape)
        view.copy_(b)
        b.data = view
    return FlatModule(flat, words, layout)


def prepare_ema_(target: nn.Module, online: nn.Module) -> None:
    """Flattens both modules in place (see `flatten_module_`) and remembers the pair for `ema_update_`.

    target, online: modules of identical structure (names, shapes, dtypes), on one device; all
    parameters of one floating dtype. Call once after moving them to their device and before
    building the optimizer, DDP or torch.compile around `online` (pass the unwrapped module).
    The online module's values are untouched; the target's parameters take the online's strides.
    """
    layout = _layout_of(online)
    _check_matches(layout, target, "the target")
    flat_online = flatten_module_(online, layout)
    flat_target = flatten_module_(target, layout)
    if flat_online.params.device != flat_target.params.device:
        raise ValueError(f"target is on {flat_target.params.device}, online on {flat_online.params.device}")
    sentinels = []
    for module, flat in ((target, flat_target), (online, flat_online)):
        params = list(module.parameters())
        sentinels += [(weakref.ref(params[0]), flat.params.data_ptr()),
                      (weakref.ref(params[-1]),
                       flat.params.data_ptr() + layout.offsets[-1] * flat.params.element_size())]
        buffers = list(module.buffers())
        if buffers:
            sentinels += [(weakref.ref(buffers[0]), flat.words.data_ptr()),
                          (weakref.ref(buffers[-1]), flat.words.data_ptr() + layout.word_offsets[-1] * 8)]
    target_first, online_first = next(target.parameters()), next(online.parameters())
    key = id(target_first)
    if key not in _pairs:
        weakref.finalize(target_first, _pairs.pop, key, None)
    _pairs[key] = _EmaPair(flat_target, flat_online, weakref.ref(online_first), tuple(sentinels))


def _alive_at(ref: weakref.ref, ptr: int) -> bool:
    t = ref()
    return t is not None and t.data_ptr() == ptr


def _prepared(target: nn.Module, online: nn.Module) -> _EmaPair:
    target_first = next(target.parameters())
    pair = _pairs.get(id(target_first))
    if (pair is None or pair.sentinels[0][0]() is not target_first
            or pair.online_first() is not next(online.parameters())
            or not all(_alive_at(ref, ptr) for ref, ptr in pair.sentinels)):
        prepare_ema_(target, online)
        pair = _pairs[id(target_first)]
    return pair


@torch.no_grad()
def ema_update_reference_(target: nn.Module, online: nn.Module, momentum: float | torch.Tensor) -> None:
    """The definition, in plain torch: `_foreach_lerp_` over the parameters, `_foreach_copy_` of buffers.

    target, online: modules of identical structure. momentum: a Python float or a 0-dim tensor
    (read on the device: no host sync). Nothing is differentiated; `online` is only read.
    """
    target_params, online_params = list(target.parameters()), list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(f"target has {len(target_params)} parameters, online {len(online_params)}")
    if isinstance(momentum, torch.Tensor):
        weight = 1 - momentum
        torch._foreach_lerp_(target_params, online_params, [weight] * len(target_params))
    else:
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    target_buffers, online_buffers = list(target.buffers()), list(online.buffers())
    if target_buffers:
        torch._foreach_copy_(target_buffers, online_buffers)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float | torch.Tensor, *,
                fused: bool | None = None) -> None:
    """target <- momentum * target + (1 - momentum) * online for every parameter; buffers copied.

    target, online: nn.Modules of identical structure (pass the module inside DDP, not the wrapper),
    parameters of one floating dtype (float32 usually; bf16/fp16/float64 work), buffers of any dtype
    (BN running_mean, running_var, num_batches_tracked). momentum: a Python float or a 0-dim tensor
    (any floating dtype, moved to the modules' device if elsewhere) that the kernel reads from device
    memory, so a momentum schedule kept on the device costs no host sync. Nothing is differentiated;
    `online` is only read. The fused path is one kernel launch over the flat buffers that
    `prepare_ema_` made (done here on first use); for float32/bf16/fp16 parameters it matches
    `torch._foreach_lerp_` bit for bit (tested on the CPU under the interpreter).
    fused: None picks the kernels for CUDA modules (and CPU ones under TRITON_INTERPRET=1),
    False forces `ema_update_reference_`, True demands the kernels.
    """
    device = next(target.parameters()).device
    if not use_kernels(fused, device):
        ema_update_reference_(target, online, momentum)
        return
    pair = _prepared(target, online)
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0:
            raise ValueError(f"momentum must be a float or a 0-dim tensor, got shape {tuple(momentum.shape)}")
        if momentum.device != device:
            momentum = momentum.to(device, non_blocking=True)
    ema_launch(pair.target.params, pair.online.params, pair.target.words, pair.online.words, momentum)
