"""Triton kernels and their launch helpers: jitted functions, block sizes, grids, nothing else.

Installed as `rela.kernels` (setup.py maps this folder there); only `rela.ops` imports from here, and
autograd, references and dispatch live there.
"""
import triton

# triton.jit reads TRITON_INTERPRET when it decorates a function, so the kernels below (and Triton's
# own library, tl.sum included) are interpreted or compiled for good from the moment they are
# imported. Set the variable before Triton is imported to run the kernels on CPU tensors.
INTERPRETED: bool = triton.knobs.runtime.interpret
