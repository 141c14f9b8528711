"""Picks the compiled or the interpreted form of a kernel when it is launched, not when it is defined.

`triton.jit` reads TRITON_INTERPRET once, when the decorator runs, so a kernel module imported before
the variable was set would stay compiled (and fail on CPU tensors) and one imported after would stay
interpreted. Launch helpers call `launchable(kernel)` instead, which reads the variable at each launch.

For this to work whichever way Triton itself was imported, kernels call only Triton builtins, never
other jitted functions, including those of triton.language's own library (tl.sum, tl.cdiv, tl.zeros,
tl.zeros_like are jitted): a compiled function cannot run inside the interpreter. Use tl.reduce with
tl.standard._sum_combine, integer arithmetic and tl.full instead. One direction stays out of reach:
a process that imported Triton under TRITON_INTERPRET=1 cannot compile kernels for the GPU later.
"""
from __future__ import annotations

import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_forms: dict[tuple[int, bool], object] = {}


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set now: kernels then run in Triton's interpreter on the host."""
    return bool(triton.knobs.runtime.interpret)


def launchable(kernel):
    """`kernel` (made by @triton.jit) in the form that TRITON_INTERPRET asks for at this moment."""
    interpret = interpreting()
    if isinstance(kernel, InterpretedFunction) == interpret:
        return kernel
    key = (id(kernel), interpret)
    form = _forms.get(key)
    if form is None:
        form = InterpretedFunction(kernel.fn) if interpret else JITFunction(kernel.fn)
        _forms[key] = form
    return form
