"""Tests of model.py: the architectures, torchvision parity, the checkpoint format. Seconds to run:

    python -m pytest -q test_model.py
"""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import model as M


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling it would run open(marker, "w")
        return (open, (self.marker, "w"))


def write_evil_checkpoint(path, marker):
    torch.save({"model": {}, "payload": _Evil(str(marker))}, path)


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
    """Kaiming normal with fan_out (torchvision's choice): std = sqrt(2 / (out_channels x k x k)), within 3%. fan_in
    would be 41% larger here and Xavier 18% smaller, so either fails; BN starts at weight 1, bias 0; convs have no
    bias."""
    torch.manual_seed(0)
    m = M.resnet50(10)
    for conv in (m.layer2[0].conv2, m.layer3[1].conv1, m.layer4[0].conv3, m.conv1):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.bias is None
        assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.03), conv
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0)
    assert m.layer1[0].downsample is not None and m.layer2[1].downsample is None  # projections only where shapes change


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
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
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


def test_pickled_code_refused_and_not_run(tmp_path):
    p, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    write_evil_checkpoint(p, marker)
    assert not marker.exists()
    with pytest.raises(M.CheckpointError, match="refused"):
        M.load_checkpoint(p)
    assert not marker.exists()


def test_preprocessing_recorded_in_checkpoints_and_defaults_of_older_ones():
    ck = _ckpt(M.resnet18(10, stem="cifar"))
    assert M.preprocessing(ck) == dict(size=32, resize=None, mean=(0.5,) * 3, std=(0.25,) * 3)
    old_imagenet = dict(ck, stem="imagenet", image_size=224)
    assert M.preprocessing(old_imagenet)["resize"] == 256  # what imagenet_ddp.py evaluated with before it was recorded
    assert M.preprocessing(dict(old_imagenet, image_size=192, eval_resize=240))["resize"] == 240
    assert M.preprocessing(dict(ck, eval_resize=None))["resize"] is None


def test_eval_image_matches_torchvision_resize_and_center_crop(tmp_path):
    """On lossless files the ImageNet preprocessing is exactly torchvision's Resize(R) + CenterCrop(S), whose
    rounding of odd sizes and offsets it copies; the CIFAR one squashes the whole image to S x S."""
    import torchvision.transforms as T
    from PIL import Image
    rng = np.random.default_rng(0)
    for W, H in ((400, 300), (333, 250), (250, 333), (501, 377)):
        im = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        im.save(tmp_path / "a.png")
        ref = np.asarray(T.CenterCrop(224)(T.Resize(256)(im))).transpose(2, 0, 1)
        assert torch.equal(M.eval_image(tmp_path / "a.png", 224, 256), torch.from_numpy(ref.copy())), (W, H)
        squashed = np.asarray(im.resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
        assert torch.equal(M.eval_image(tmp_path / "a.png", 32), torch.from_numpy(squashed.copy()))
    Image.new("L", (40, 30), 77).save(tmp_path / "g.png")  # grayscale becomes RGB
    assert M.eval_image(tmp_path / "g.png", 16, 20).shape == (3, 16, 16)
    (tmp_path / "t.jpg").write_text("not an image")
    with pytest.raises(M.ImageError, match="cannot read image"):
        M.eval_image(tmp_path / "t.jpg", 32)
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = M.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_imagenet_synsets_become_names():
    syn = M.IMAGENET_SYNSETS
    assert len(syn) == 1000 and syn == sorted(syn) and len(set(syn)) == 1000
    imagenette = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
                  "n03425413", "n03445777", "n03888257"]
    assert M.readable_class_names(imagenette) == ["tench", "English springer", "cassette player", "chain saw", "church",
                                                  "French horn", "garbage truck", "gas pump", "golf ball", "parachute"]
    assert M.readable_class_names(["n01440764", "cat"]) == ["n01440764", "cat"]  # not all synsets: left alone
    assert M.readable_class_names(["cat", "dog"]) == ["cat", "dog"]


def test_matmul_conv_matches_onednn_and_keeps_parameters():
    torch.manual_seed(0)
    plain = M.build_model("resnet18", 10, stem="cifar").to(memory_format=torch.channels_last)
    fast = M.use_matmul_conv(copy.deepcopy(plain))
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert type(copy.deepcopy(fast).layer4[1].conv1) is M.MatmulConv2d  # EMA / benchmark copies keep it
    assert type(fast.layer4[0].conv1) is M.MatmulConv2d and type(fast.layer4[0].downsample[0]) is nn.Conv2d
    exact = copy.deepcopy(plain)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    for net in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.functional.cross_entropy(net(x), y).backward()
    nn.functional.cross_entropy(exact(x), y).backward()  # fp32 reference
    # the matmuls ran where the output is 4x4 (layer4, its stride-2 conv too) and only there
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small = fast.layer4[1].conv1(torch.randn(2, 512, 4, 4, requires_grad=True))
        strided = fast.layer4[0].conv1(torch.randn(2, 256, 8, 8, requires_grad=True))
        large = fast.layer1[0].conv1(torch.randn(2, 64, 32, 32, requires_grad=True))
        large_strided = fast.layer3[0].conv1(torch.randn(2, 128, 16, 16, requires_grad=True))
    assert "Conv3x3Matmul" in small.grad_fn.name() and "Conv3x3Matmul" in strided.grad_fn.name()
    assert "Conv3x3Matmul" not in large.grad_fn.name() and "Conv3x3Matmul" not in large_strided.grad_fn.name()
    assert strided.shape == (2, 512, 4, 4) and strided.is_contiguous(memory_format=torch.channels_last)
    # bf16 gradients as close to the fp32 ones as oneDNN's bf16 gradients are (measured: within 2%)
    for (name, r), p, q in zip(exact.named_parameters(), plain.parameters(), fast.parameters()):
        assert q.grad.dtype == p.grad.dtype and q.grad.shape == p.grad.shape
        err = lambda g: ((g - r.grad).norm() / r.grad.norm()).item()
        assert err(q.grad) <= 1.1 * err(p.grad) + 1e-3, (name, err(q.grad), err(p.grad))
    # exact check of the im2col arithmetic in float64 against autograd's own convolution
    for stride, size in ((1, 4), (2, 8), (2, 7), (1, 3)):
        xs = torch.randn(3, 5, size, size, dtype=torch.float64, requires_grad=True)
        ws = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
        ref_out = nn.functional.conv2d(xs, ws, stride=stride, padding=1)
        g = torch.randn_like(ref_out)
        out = M._Conv3x3Matmul.apply(xs, ws, stride)
        assert out.shape == ref_out.shape and torch.allclose(out, ref_out, atol=1e-10)
        ref = torch.autograd.grad(ref_out, (xs, ws), g)
        got = torch.autograd.grad(out, (xs, ws), g)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ref, got)), (stride, size)
    fast.load_state_dict(plain.state_dict())  # (training forward passes left slightly different BN statistics)
    with torch.no_grad():  # evaluation is the plain convolution, bit for bit
        assert torch.equal(plain.eval()(x), fast.eval()(x))


def test_normalize_makes_its_constants_once_per_device(monkeypatch):
    """Every batch of every script goes through normalize: building mean and std anew would copy them to the GPU
    and wait for it each time. The second batch builds no tensor, and the pixels are (x/255 - mean) / std."""
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = M.normalize(x, [0.5, 0.4, 0.3], (0.2, 0.25, 0.3))
    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(1) or real(*a, **k))
    again = M.normalize(x, (0.5, 0.4, 0.3), [0.2, 0.25, 0.3], channels_last=True)
    assert not made and torch.equal(first, again)
    mean, std = (real(v, dtype=torch.float64).view(1, 3, 1, 1) for v in ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]))
    ref = (x.double() / 255 - mean) / std
    assert torch.allclose(first.double(), ref, atol=1e-5)
