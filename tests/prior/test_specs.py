"""Priors load what their spec names: encode_image of a TorchScript module, the weights of a state-dict file,
the backbone of a run. Checked on the features the prior's encoder gives, not through the trainer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from rela.models.backbones import build_backbone
from rela.prior.specs import CLIP_MEAN, CLIP_STD, load_prior

DATA_MEAN, DATA_STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
# TorchScript is how CLIP's files come; torch 2.x warns that it is deprecated.
allow_torchscript = pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:FutureWarning")


def _load(spec: str, *, arch: str = "small_resnet", image_size: int = 16, seed: int = 0, prior_size=None):
    return load_prior(spec, arch=arch, image_size=image_size, seed=seed, prior_size=prior_size,
                      data_mean=DATA_MEAN, data_std=DATA_STD)


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(11))


def _assert_frozen(encoder: nn.Module) -> None:
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


class _ClipLike(nn.Module):
    """Like CLIP's TorchScript files: forward is not the image encoder; encode_image is, at another width."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(3, 5)
        self.text = nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.text(x.mean((2, 3)))

    @torch.jit.export
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x.mean((2, 3))).half()  # CLIP encodes in half precision on its own


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 6, H', W'): the prior flattens it


@allow_torchscript
def test_torchscript_prior_calls_encode_image(tmp_path):
    torch.manual_seed(0)
    module = torch.jit.script(_ClipLike())
    path = tmp_path / "clip.pt"
    module.save(str(path))
    prior = _load(f"torchscript:{path}", prior_size=24)
    images = _images(24)
    with torch.no_grad():
        features = prior.encoder(images)
        expected = module.encode_image(images).float()
    assert features.shape == (2, 5) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected)
    assert (prior.mean, prior.std, prior.input_size) == (CLIP_MEAN, CLIP_STD, 24)
    _assert_frozen(prior.encoder)


@allow_torchscript
def test_torchscript_prior_without_encode_image_calls_forward(tmp_path):
    torch.manual_seed(0)
    module = torch.jit.script(_Plain())
    path = tmp_path / "plain.pt"
    module.save(str(path))
    prior = _load(f"torchscript:{path}")
    images = _images(8)
    with torch.no_grad():
        torch.testing.assert_close(prior.encoder(images), module(images).flatten(1))
    assert (prior.mean, prior.std, prior.input_size) == (IMAGENET_MEAN, IMAGENET_STD, 224)


def _resnet18_features(state: dict) -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(state)
    net.fc = nn.Identity()
    return net.eval()


def _trained_looking(net: nn.Module, seed: int) -> nn.Module:
    """Weights and BatchNorm statistics no fresh build has, so loading buffers is checked too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(tensor + 0.05 * torch.randn(tensor.shape, generator=generator))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)
    return net


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "checkpoint_with_state_dict"])
def test_torchvision_prior_loads_the_weights_file(tmp_path, wrapped):
    net = _trained_looking(torchvision.models.resnet18(weights=None), seed=1)
    state = net.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    loaded, random = _load(f"torchvision:resnet18:{path}", prior_size=32), _load("torchvision:resnet18", prior_size=32)
    images = _images(32)
    with torch.no_grad():
        features = loaded.encoder(images)
        expected = _resnet18_features(state)(images)
        random_features = random.encoder(images)
    assert features.shape == (2, 512)
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, random_features)
    assert loaded.fingerprint != random.fingerprint
    assert (loaded.mean, loaded.std, loaded.input_size) == (IMAGENET_MEAN, IMAGENET_STD, 32)
    _assert_frozen(loaded.encoder)


def _write_run(run_dir: Path, net: nn.Module, arch: str, image_size: int) -> None:
    """RUN/backbone.pt as rela.train writes it at the end of a run."""
    run_dir.mkdir()
    torch.save({"arch": arch, "state_dict": {n: t.detach().clone() for n, t in net.state_dict().items()},
                "image_size": image_size, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
               run_dir / "backbone.pt")


def test_run_prior_loads_the_runs_backbone(tmp_path):
    net = _trained_looking(build_backbone("small_resnet", seed=5), seed=2).eval()
    _write_run(tmp_path / "run", net, "small_resnet", image_size=16)
    # The student's arch differs: a run prior takes the architecture from the run, not from --arch.
    prior = _load(f"run:{tmp_path / 'run'}", arch="resnet18", image_size=64)
    random = _load("rand", arch="small_resnet", seed=5)
    images = _images(16)
    with torch.no_grad():
        features = prior.encoder(images)
        expected = net(images)
        random_features = random.encoder(images)
    assert features.shape == (2, 128)
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, random_features)
    assert (prior.mean, prior.std, prior.input_size) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 16)
    _assert_frozen(prior.encoder)


def test_rand_prior_is_the_seeded_student_architecture():
    prior = _load("rand", arch="small_resnet", seed=3)
    images = _images(16)
    with torch.no_grad():
        torch.testing.assert_close(prior.encoder(images), build_backbone("small_resnet", seed=3).eval()(images))
        assert not torch.allclose(prior.encoder(images), _load("rand", arch="small_resnet", seed=4).encoder(images))
    assert (prior.mean, prior.std, prior.input_size) == (DATA_MEAN, DATA_STD, 16)
