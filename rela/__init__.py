"""RELA: BYOL accelerated by static targets from a frozen prior (Representation Learning Accelerator)."""
__version__ = "0.1.0"
