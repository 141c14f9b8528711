"""Public fused ops: BYOL and RELA losses, the EMA step; each with its pure-torch reference.

CUDA tensors run Triton kernels; CPU tensors run the references, or the kernels in Triton's
interpreter when TRITON_INTERPRET=1 is set at call time. `fused=False` on a call, or
`set_fused_ops(False)` for the process, forces the references (the trainer's --fused-ops off).
"""
from rela.ops._dispatch import fused_ops_mode, set_fused_ops
from rela.ops.cosine_losses import (ByolLossFunction, RelaLossFunction, byol_loss, byol_loss_reference,
                                    rela_loss, rela_loss_reference)
from rela.ops.ema import FlatModule, ema_update_, ema_update_reference_, flatten_module_, prepare_ema_

__all__ = [
    "byol_loss", "byol_loss_reference", "ByolLossFunction",
    "rela_loss", "rela_loss_reference", "RelaLossFunction",
    "ema_update_", "ema_update_reference_", "prepare_ema_", "flatten_module_", "FlatModule",
    "set_fused_ops", "fused_ops_mode",
]
