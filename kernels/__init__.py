"""Triton kernels and their launch helpers: jitted functions, block sizes, grids, nothing else.

Only `rela.ops` imports from here; autograd, references and dispatch live there.
"""
