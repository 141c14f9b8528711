"""Public fused ops: BYOL, RELA and DINO losses, the EMA step; each with its pure-torch reference.

CUDA tensors run Triton kernels, registered as torch custom ops (`torch.ops.rela.*`, through
torch.library.triton_op) so that torch.compile calls them without a graph break; CPU tensors run the references, or the kernels in Triton's
interpreter when TRITON_INTERPRET=1 was set before Triton was imported. `fused=False` on a call (or on
`prepare_ema_`) forces the references (the trainer's --fused-ops off), `fused=True` demands the kernels.
"""
from rela.ops.cosine_losses import (byol_loss, byol_loss_fused, byol_loss_reference, rela_loss, rela_loss_fused,
                                    rela_loss_reference)
from rela.ops.dino_loss import dino_loss, dino_loss_fused, dino_loss_reference
from rela.ops.ema import EmaPair, FlatModule, ema_update_, ema_update_reference_, flatten_module_, prepare_ema_

__all__ = [
    "byol_loss", "byol_loss_reference", "byol_loss_fused",
    "rela_loss", "rela_loss_reference", "rela_loss_fused",
    "dino_loss", "dino_loss_reference", "dino_loss_fused",
    "prepare_ema_", "EmaPair", "ema_update_", "ema_update_reference_", "flatten_module_", "FlatModule",
]
