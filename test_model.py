"""The project's test suite: `python -m pytest -q`. CPU only; every test makes its own tiny data."""
import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


# ------------------------------------------------------------------------------------------------
# model.py
# ------------------------------------------------------------------------------------------------
PARAMS_1000 = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
               "resnet101": 44_549_160, "resnet152": 60_192_808}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("arch", list(PARAMS_1000))
def test_param_counts(arch):
    assert n_params(M.ARCHS[arch]()) == PARAMS_1000[arch]


def test_cifar_stem_param_count_and_shapes():
    m = M.resnet18(100, stem="cifar")
    assert n_params(m) == 11_220_132
    assert isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    feats = {}
    m.layer1.register_forward_hook(lambda mod, i, o: feats.update(l1=o.shape))
    m(torch.randn(1, 3, 32, 32))
    assert feats["l1"] == (1, 64, 32, 32)  # no downsampling before stage 1


def test_imagenet_stem_shapes():
    m = M.resnet50(10).eval()
    feats = {}
    m.layer1.register_forward_hook(lambda mod, i, o: feats.update(l1=o.shape))
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    assert feats["l1"] == (1, 256, 56, 56)


def test_bad_stem_and_arch():
    with pytest.raises(ValueError):
        M.resnet18(stem="tiny")
    with pytest.raises(ValueError):
        M.build_model("resnet19", 10)


@pytest.mark.parametrize("arch", list(PARAMS_1000))
def test_torchvision_equivalence(arch):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    ref = getattr(tvm, arch)().eval()
    ours = M.ARCHS[arch]().eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(ref_sd[k].shape == our_sd[k].shape for k in ref_sd)
    ours.load_state_dict(ref_sd, strict=True)
    # Non-trivial BN statistics so that the comparison exercises them.
    with torch.no_grad():
        ours_mods = dict(ours.named_modules())
        for name, a in ref.named_modules():
            if isinstance(a, nn.BatchNorm2d):
                b = ours_mods[name]
                a.running_mean.uniform_(-0.1, 0.1); a.running_var.uniform_(0.5, 1.5)
                a.weight.uniform_(0.5, 1.5)
                b.running_mean.copy_(a.running_mean); b.running_var.copy_(a.running_var)
                b.weight.copy_(a.weight)
        x = torch.randn(2, 3, 64, 64)
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_blocks_are_identity(arch):
    m = M.build_model(arch, 10, stem="cifar", zero_init_residual=True).eval()
    blocks = [b for b in m.modules() if isinstance(b, (M.BasicBlock, M.Bottleneck))]
    assert blocks
    with torch.no_grad():
        for b in blocks:
            last_bn = b.bn3 if isinstance(b, M.Bottleneck) else b.bn2
            assert torch.all(last_bn.weight == 0)
            cin = b.conv1.in_channels
            x = torch.randn(2, cin, 8, 8)
            ident = x if b.downsample is None else b.downsample(x)
            # relu(0 * F(x) + shortcut): the block is the (rectified) shortcut path.
            assert torch.allclose(b(x.clone()), torch.relu(ident), atol=1e-6)
    # Without the flag the same blocks are not identities.
    m2 = M.resnet18(10, stem="cifar").eval()
    b = m2.layer1[0]
    x = torch.randn(2, 64, 8, 8)
    assert not torch.allclose(b(x.clone()), torch.relu(x), atol=1e-3)


def test_init_scheme():
    m = M.resnet18(10)
    conv = m.layer2[0].conv1
    assert conv.bias is None
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2.0 / fan_out) ** 0.5) < 0.01
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0)
    assert m.layer1[0].downsample is None and m.layer2[0].downsample is not None


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backward_finite_gradients(arch):
    m = M.build_model(arch, 10, stem="cifar")
    loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def _ckpt(m, **extra):
    return dict(model=m.state_dict(), arch="resnet18", num_classes=10, stem="cifar",
                classes=[str(i) for i in range(10)], mean=[0.5] * 3, std=[0.25] * 3, image_size=32, **extra)


def test_checkpoint_round_trip(tmp_path):
    m = M.resnet18(10, stem="cifar").eval()
    p = tmp_path / "sub" / "c.pt"
    M.save_checkpoint(p, **_ckpt(m, epoch=3, rng=torch.get_rng_state()))
    assert not [f for f in os.listdir(p.parent) if f.startswith(".tmp")]
    ck = M.load_checkpoint(p)
    assert ck["epoch"] == 3 and ck["classes"][3] == "3"
    m2 = M.model_from_checkpoint(ck).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m2(x))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])


def test_checkpoint_prefers_ema(tmp_path):
    m, e = M.resnet18(10, stem="cifar"), M.resnet18(10, stem="cifar")
    p = tmp_path / "c.pt"
    M.save_checkpoint(p, **_ckpt(m, ema=e.state_dict()))
    ck = M.load_checkpoint(p)
    assert torch.equal(M.model_from_checkpoint(ck).conv1.weight, e.conv1.weight)
    assert torch.equal(M.model_from_checkpoint(ck, prefer_ema=False).conv1.weight, m.conv1.weight)


def test_truncated_checkpoint_clear_error(tmp_path):
    p = tmp_path / "c.pt"
    M.save_checkpoint(p, **_ckpt(M.resnet18(10, stem="cifar")))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="cannot be read"):
        M.load_checkpoint(p)
    with pytest.raises(M.CheckpointError, match="no such file"):
        M.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(M.CheckpointError):
        M.load_checkpoint(tmp_path / "text.pt")


def test_foreign_checkpoint_rebuild_error(tmp_path):
    p = tmp_path / "c.pt"
    torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(M.CheckpointError, match="missing"):
        M.model_from_checkpoint(M.load_checkpoint(p))
    ck = _ckpt(M.resnet18(10, stem="cifar"))
    ck["arch"] = "resnet34"
    with pytest.raises(M.CheckpointError, match="do not fit"):
        M.model_from_checkpoint(ck)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil_checkpoint(path, marker):
    torch.save({"model": {}, "payload": _Evil(str(marker))}, path)


def test_pickled_code_refused_and_not_run(tmp_path):
    p, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    write_evil_checkpoint(p, marker)
    assert not marker.exists()
    with pytest.raises(M.CheckpointError, match="refused"):
        M.load_checkpoint(p)
    assert not marker.exists()
