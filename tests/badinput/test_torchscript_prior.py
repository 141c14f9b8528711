"""A `torchscript:` prior is a program, not weights: a crafted one writes a file of its choice while the bank
is built, and the run still succeeds. The run's log says so in one warning line naming the safer route (a
weights file: timm:NAME:WEIGHTS.safetensors, torchvision:NAME:WEIGHTS.pth), which runs nothing."""
from __future__ import annotations

import pytest
import torch

from badfiles import run_trainer
from builders import FAST_ARGS

allow_torchscript = pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:FutureWarning")


class WritesAFile(torch.nn.Module):
    """A prior that does its job (features of the images) and, on the side, creates `path` on disk."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # shared=True creates the file (the result is used, or TorchScript drops the call as dead code)
        written = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
        return self.linear(x.mean((2, 3))) + 0 * written[:1].float()


@allow_torchscript
def test_a_torchscript_prior_runs_code_and_the_log_says_so(tmp_path, capsys):
    written = tmp_path / "written-by-the-prior"
    script = tmp_path / "prior.pt"
    torch.jit.script(WritesAFile(str(written))).save(str(script))
    outcome = run_trainer(capsys, tmp_path, *FAST_ARGS, "--prior", f"torchscript:{script}", "--prior-size", "16",
                          "--stop-after-steps", "1")
    assert outcome.code == 0, outcome.err[-3000:]
    assert written.is_file(), "the TorchScript prior ran its code: what the warning is about"
    [line] = [line for line in outcome.err.splitlines() if f"warning: --prior torchscript:{script}" in line]
    assert line.endswith(f"warning: --prior torchscript:{script}: a TorchScript file runs code (it can read and "
                         "write any file this run can); load only files you trust. Weights run nothing: "
                         "timm:NAME:WEIGHTS.safetensors (CLIP image towers, e.g. "
                         "timm:vit_base_patch16_clip_224.openai:model.safetensors) or torchvision:NAME:WEIGHTS.pth")


def test_a_weights_prior_logs_no_such_warning(tmp_path, capsys):
    outcome = run_trainer(capsys, tmp_path, *FAST_ARGS, "--prior", "rand", "--stop-after-steps", "1")
    assert outcome.code == 0 and "runs code" not in outcome.err
