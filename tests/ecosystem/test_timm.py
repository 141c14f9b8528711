"""timm: a timm backbone trains (and its backbone.safetensors loads into timm without rela); a timm prior
takes its weights from a local .safetensors or .pth file; a file that does not fit is a one-line error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builders import FAST_ARGS
from rela.errors import RelaError
from rela.models.backbones import build_backbone
from rela.prior.specs import load_prior

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

MODEL = "test_resnet"  # timm's own test model: 0.37M parameters, 96 features


def _prior(spec: str, seed: int = 0):
    return load_prior(spec, arch="small_resnet", image_size=16, seed=seed, prior_size=None,
                      data_mean=(0.5,) * 3, data_std=(0.25,) * 3)


def _trained_timm_state(seed: int) -> dict[str, torch.Tensor]:
    """A timm model's state dict with its classifier, as a user's fine-tuned file would hold it."""
    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False).state_dict()


def test_timm_backbone_trains_and_its_safetensors_loads_without_rela(tmp_path):
    out = tmp_path / "run"
    from rela.train import main

    code = main([*FAST_ARGS, "--arch", f"timm:{MODEL}", "--budget", "0.05", "--log-every", "1", "--no-monitor",
                 "--rela-phase", "0.5", "--out", str(out), "--bank-dir", str(tmp_path / "banks")])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) >= 4 and {r["phase"] for r in rows} == {"rela", "byol"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # A fresh process that imports timm and safetensors, not rela: the file loads strictly, and differs
    # from the same architecture at its initialisation (it trained).
    script = f"""
import sys, timm, torch
from safetensors import safe_open
from safetensors.torch import load_file
path = {str(out / "backbone.safetensors")!r}
with safe_open(path, "pt") as fh:
    meta = fh.metadata()
assert meta["arch"] == "timm:{MODEL}" and meta["image_size"] == "16", meta
net = timm.create_model("{MODEL}", pretrained=False, num_classes=0)
init = {{k: v.clone() for k, v in net.state_dict().items()}}
net.load_state_dict(load_file(path), strict=True)
assert "rela" not in sys.modules
moved = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, init[k])]
print(len(moved))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) > 10


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_prior_from_a_local_weights_file(tmp_path, suffix):
    state = _trained_timm_state(seed=5)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training script's checkpoint
    prior = _prior(f"timm:{MODEL}:{path}")
    reference = timm.create_model(MODEL, pretrained=False, num_classes=0).eval()
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    images = torch.randn(3, 3, prior.input_size, prior.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(prior.encoder(images), reference(images), rtol=0, atol=0)
        assert prior.encoder(images).shape == (3, 96)
        # the file's weights, not a random network's
        assert not torch.allclose(_prior(f"timm:{MODEL}").encoder(images), prior.encoder(images))
    assert prior.input_size == 160 and prior.mean == (0.5, 0.5, 0.5)  # timm's pretrained_cfg for the model
    assert "sha256=" in prior.fingerprint and not any(p.requires_grad for p in prior.encoder.parameters())


def test_random_timm_prior_is_seeded():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, c = (_prior(f"timm:{MODEL}", seed=s).encoder(images) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_weights_file_that_does_not_fit_is_a_one_line_error(tmp_path):
    other = tmp_path / "convnext.safetensors"
    save_file(timm.create_model("test_convnext", pretrained=False).state_dict(), str(other))
    reshaped = _trained_timm_state(seed=0)
    reshaped["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    wrong_shape = tmp_path / "reshaped.pth"
    torch.save(reshaped, wrong_shape)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    cases = [(other, rf"{other} does not fit timm model {MODEL}: tensors \d+ missing"),
             (wrong_shape, rf"does not fit timm model {MODEL}: size mismatch for conv1.0.weight"),
             (garbage, f"cannot load {garbage}"),
             (tmp_path / "absent.pth", "does not exist")]
    for path, message in cases:
        with pytest.raises(RelaError, match=message) as err:
            _prior(f"timm:{MODEL}:{path}")
        assert "\n" not in str(err.value) and str(err.value).startswith(f"--prior timm:{MODEL}:")


def test_unknown_timm_names_and_a_missing_timm_are_one_line_errors(monkeypatch):
    with pytest.raises(RelaError, match="timm has no model 'no_such_net'"):
        build_backbone("timm:no_such_net")
    with pytest.raises(RelaError, match="timm has no model"):
        _prior("timm:no_such_net")
    monkeypatch.setitem(sys.modules, "timm", None)  # as where timm is not installed
    with pytest.raises(RelaError, match=r"--arch timm:resnet18 needs the timm package: pip install"):
        build_backbone("timm:resnet18")
