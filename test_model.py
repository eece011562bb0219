"""The project's test suite: `python -m pytest -q`. CPU only; every test makes its own tiny data."""
import copy
import csv
import math
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


# ------------------------------------------------------------------------------------------------
# Tiny data sets written by the tests
# ------------------------------------------------------------------------------------------------
def toy_images(n, num_classes, seed=0, size=32):
    """Learnable toy images: each class has its own colour, plus noise. Returns uint8 [n,3,s,s], labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    palette = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))  # same colours in every split
    x = palette[labels][:, :, None, None] + rng.normal(0, 20, size=(n, 3, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), labels


def write_tiny_cifar(root, name="cifar10", n_train=128, n_test=40, seed=0):
    """The official python-version layout (pickled dicts of 3072-byte rows), readable by cifar.py."""
    ncls = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    xtr, ytr = toy_images(n_train, ncls, seed)
    xte, yte = toy_images(n_test, ncls, seed + 1)
    if name == "cifar10":
        chunks = np.array_split(np.arange(n_train), 5)
        parts = [(f"data_batch_{i + 1}", xtr[c], ytr[c]) for i, c in enumerate(chunks)] + [("test_batch", xte, yte)]
        meta = ("batches.meta", {"label_names": [f"class{i}" for i in range(ncls)]})
    else:
        parts = [("train", xtr, ytr), ("test", xte, yte)]
        meta = ("meta", {"fine_label_names": [f"class{i}" for i in range(ncls)]})
    for fname, x, y in parts:
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), label_key: [int(v) for v in y]}, f)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return root


def write_image_folder(root, splits=("train", "val"), per_class=(6, 3), classes=("cat", "dog", "fox"), size=40,
                       fmt="JPEG", seed=0):
    from PIL import Image
    for split, n in zip(splits, per_class):
        x, y = toy_images(n * len(classes), len(classes), seed + len(split), size)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)
    return root


def run_script(script, *args, timeout=600, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE, **kw)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def assert_state_equal(a, b):
    """Bit-for-bit equality of two nested structures of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_equal(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------------------------------
# cifar.py
# ------------------------------------------------------------------------------------------------
import cifar  # noqa: E402

CIFAR_FAST = ["--batch-size", "16", "--log-every", "1", "--workers", "1"]


def test_cifar_reads_official_format(tmp_path):
    for name, ncls in (("cifar10", 10), ("cifar100", 100)):
        write_tiny_cifar(tmp_path / name, name, n_train=150, n_test=30)
        x_tr, y_tr, x_te, y_te, classes, mean, std = cifar.load_cifar(name, str(tmp_path / name))
        assert x_tr.shape == (150, 3, 32, 32) and x_tr.dtype == torch.uint8 and y_tr.dtype == torch.int64
        assert x_te.shape == (30, 3, 32, 32) and len(classes) == ncls and classes[1] == "class1"
        ref, ref_y = toy_images(150, ncls, 0)
        assert torch.equal(x_tr, torch.from_numpy(ref)) and y_tr.tolist() == ref_y.tolist()


def test_cifar_folder_loader_resizes_and_converts(tmp_path):
    from PIL import Image
    write_image_folder(tmp_path, splits=("train", "test"), size=48)
    Image.new("L", (20, 30), 7).save(tmp_path / "train" / "cat" / "gray.png")
    Image.new("CMYK", (32, 32)).save(tmp_path / "train" / "dog" / "cmyk.jpg")
    x_tr, y_tr, x_te, y_te, classes, mean, std = cifar.load_folder(str(tmp_path), 1)
    assert classes == ["cat", "dog", "fox"] and x_tr.shape == (20, 3, 32, 32) and len(y_te) == 9
    assert len(mean) == 3 and all(0 < s < 1 for s in std)


def test_batch_augmentation_shapes_dtypes_labels():
    args = cifar.get_args(["--cutout", "8", "--out", "unused"])
    B = 32
    # Image b is filled with value 5 + 7b, so every surviving pixel tells which image it came from.
    x = (torch.arange(B, dtype=torch.uint8) * 7 + 5).view(B, 1, 1, 1).expand(B, 3, 32, 32).contiguous()
    r = cifar.batch_randomness(args, 0, 3, 1, B)
    out = cifar.augment(x, r, (0, 0, 0), (1 / 255,) * 3, 4, 0, True)
    assert out.shape == (B, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    saw_padding = False
    for b in range(B):
        vals = set(out[b].round().unique().tolist())
        assert vals <= {0.0, 5.0 + 7 * b}, vals
        assert 5.0 + 7 * b in vals
        saw_padding |= 0.0 in vals
        dy, dx = r["shift"][b]
        assert (0.0 in vals) == (dy != 4 or dx != 4)
    assert saw_padding
    # The crop is the padded image's window: with shift (dy, dx) the zero rows sit on the expected side.
    x2 = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    r2 = dict(r, shift=np.array([[0, 8]]), flip=np.array([False]))
    o2 = cifar.augment(x2, r2, (0, 0, 0), (1 / 255,) * 3, 4, 0, False)
    assert torch.all(o2[0, :, :4, :] == 0) and torch.all(o2[0, :, 4:, :28] == 100) and torch.all(o2[0, :, :, 28:] == 0)
    # Flip mirrors; CutOut zeroes an 8x8 square (after normalisation) inside the image.
    x3 = torch.arange(32, dtype=torch.uint8).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    r3 = dict(r, flip=np.array([True]), cut_center=np.array([[16, 16]]))
    o3 = cifar.augment(x3, r3, (0, 0, 0), (1 / 255,) * 3, 0, 8, False)
    assert o3[0, 0, 0, 0] == 31 and o3[0, 0, 0, 31] == 0
    assert (o3[0, 0] == 0).sum() == 8 * 8 + 32  # the hole, plus column 31, where the mirrored ramp is 0
    assert torch.all(o3[0, :, 12:20, 12:20] == 0)


def test_mixup_cutmix_weights():
    x = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    mixed, lam = cifar.mix_batch(x, ("mixup", 0.3, None))
    assert lam == 0.3 and torch.allclose(mixed[0], torch.full((3, 32, 32), 0.7))
    mixed, lam = cifar.mix_batch(x, ("cutmix", 0.75, np.array([16, 16])))
    assert abs(mixed[0].mean().item() - (1 - lam)) < 1e-6 and 0.7 < lam < 0.8
    mixed, lam = cifar.mix_batch(x, ("cutmix", 0.5, np.array([0, 0])))  # clipped box: lam follows the real area
    assert abs(mixed[0].mean().item() - (1 - lam)) < 1e-6
    args = cifar.get_args(["--mixup", "0.2", "--cutmix", "1.0", "--out", "unused"])
    kinds = {cifar.batch_randomness(args, 0, 0, s, 8)["mix"][0] for s in range(20)}
    assert kinds == {"mixup", "cutmix"}


def test_matmul_conv_matches_onednn_and_keeps_parameters():
    torch.manual_seed(0)
    plain = M.build_model("resnet18", 10, stem="cifar").to(memory_format=torch.channels_last)
    fast = cifar.use_matmul_conv(copy.deepcopy(plain))
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert type(copy.deepcopy(fast).layer4[1].conv1) is cifar.MatmulConv2d  # EMA / benchmark copies keep it
    assert type(fast.layer4[0].conv1) is cifar.MatmulConv2d and type(fast.layer4[0].downsample[0]) is nn.Conv2d
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
        out = cifar._Conv3x3Matmul.apply(xs, ws, stride)
        assert out.shape == ref_out.shape and torch.allclose(out, ref_out, atol=1e-10)
        ref = torch.autograd.grad(ref_out, (xs, ws), g)
        got = torch.autograd.grad(out, (xs, ws), g)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ref, got)), (stride, size)
    fast.load_state_dict(plain.state_dict())  # (training forward passes left slightly different BN statistics)
    with torch.no_grad():  # evaluation is the plain convolution, bit for bit
        assert torch.equal(plain.eval()(x), fast.eval()(x))


def test_cifar_two_epochs_writes_outputs_and_learns(tmp_path, capsys):
    write_tiny_cifar(tmp_path / "d", n_train=160, n_test=40)
    out = tmp_path / "run"
    rc = cifar.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "d"), "--epochs", "3", "--lr", "0.01",
                     "--out", str(out), "--ema", "0.9", "--json", "--tensorboard", *CIFAR_FAST])
    assert rc == 0
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("lr", "train_loss", "train_top1", "train_img_per_s", "val_loss", "val_top1", "val_top5", "time_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert "val_top1_tta" in rows[-1] and "val_top1_tta" not in rows[0]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_top1"] >= 80.0  # colour-coded classes are easy once the net trains at all
    text = capsys.readouterr().out
    assert "step 10/10" in text and "img/s" in text and "eta" in text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["best_val_top1"] == max(r["val_top1"] for r in rows)
    best = M.load_checkpoint(out / "best.pt")
    assert best["classes"][0] == "class0" and best["stem"] == "cifar" and best["image_size"] == 32
    assert best["val_top1"] == summary["best_val_top1"] and best["ema"] is not None
    # a finished run resumes to "nothing left to do" without touching the checkpoint
    before = (out / "last.pt").read_bytes()
    assert cifar.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "d"), "--epochs", "3", "--lr", "0.01",
                       "--out", str(out), "--ema", "0.9", "--resume", "auto", *CIFAR_FAST]) == 0
    assert (out / "last.pt").read_bytes() == before


def _wait_for_line(proc, needle, timeout=300):
    t0, seen = time.time(), []
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)}")


def test_cifar_sigterm_resume_is_bit_identical(tmp_path):
    data = write_tiny_cifar(tmp_path / "d", n_train=128, n_test=20)
    common = ["--dataset", "cifar10", "--data-dir", data, "--epochs", "2", "--ema", "0.9", "--mixup", "0.2",
              "--cutmix", "1.0", "--cutout", "8", "--label-smoothing", "0.1", "--nesterov", "--lr", "0.05", *CIFAR_FAST]
    ref = run_script("cifar.py", *common, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "cifar.py"), *map(str, common), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE)
    _wait_for_line(proc, "epoch 1/2 step 3/8")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "stopped by signal" in rest and "Traceback" not in rest
    mid = M.load_checkpoint(out / "last.pt")
    assert mid["epoch"] == 0 and 3 <= mid["step"] < 8  # stopped inside epoch 1, at a step boundary
    res = run_script("cifar.py", *common, "--out", out, "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    a, b = M.load_checkpoint(tmp_path / "ref" / "last.pt"), M.load_checkpoint(out / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "ema_updates"):
        assert_state_equal(a[key], b[key])
    ra, rb = read_jsonl(tmp_path / "ref" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-9) and x["val_top1"] == y["val_top1"]


def _cifar_error(capsys, *argv):
    rc = cifar.main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    return err


def test_cifar_bad_flags(capsys, tmp_path):
    assert "--epochs" in _cifar_error(capsys, "--epochs", "0")
    assert "--batch-size" in _cifar_error(capsys, "--batch-size", "-4")
    assert "--lr" in _cifar_error(capsys, "--lr", "-1")
    assert "--lr" in _cifar_error(capsys, "--lr", "nan")
    assert "invalid choice" in _cifar_error(capsys, "--arch", "resnet19")
    assert "unrecognized" in _cifar_error(capsys, "--frobnicate")
    write_tiny_cifar(tmp_path / "d", n_train=10, n_test=10)
    assert "larger than the training set" in _cifar_error(capsys, "--dataset", "cifar10", "--data-dir", tmp_path / "d",
                                                          "--batch-size", "64", "--out", tmp_path / "o")


def test_cifar_bad_data(capsys, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    err = _cifar_error(capsys, "--dataset", "cifar100", "--data-dir", tmp_path / "none", "--out", tmp_path / "o")
    assert "cifar-100-python.tar.gz" in err and "download" in err
    (tmp_path / "empty").mkdir()
    assert "must hold train" in _cifar_error(capsys, "--dataset", "folder", "--data-dir", tmp_path / "empty")
    assert "must hold train" in _cifar_error(capsys, "--dataset", "folder", "--data-dir", tmp_path / "missing")
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "test" / "a").mkdir(parents=True)
    assert "no images" in _cifar_error(capsys, "--dataset", "folder", "--data-dir", tmp_path / "noimg")
    write_image_folder(tmp_path / "mism", splits=("train",))
    write_image_folder(tmp_path / "mism", splits=("test",), classes=("cat", "dog", "owl"))
    assert "different classes" in _cifar_error(capsys, "--dataset", "folder", "--data-dir", tmp_path / "mism")
    write_image_folder(tmp_path / "broken", splits=("train", "test"))
    (tmp_path / "broken" / "train" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert "bad.jpg" in _cifar_error(capsys, "--dataset", "folder", "--data-dir", tmp_path / "broken")
    (tmp_path / "d" / "cifar-10-batches-py").mkdir(parents=True)
    assert "data_batch_1" in _cifar_error(capsys, "--dataset", "cifar10", "--data-dir", tmp_path / "d")


def test_cifar_bad_checkpoints_never_overwrite(capsys, tmp_path):
    data = write_tiny_cifar(tmp_path / "d", n_train=64, n_test=16)
    out = tmp_path / "run"
    base = ["--dataset", "cifar10", "--data-dir", data, "--epochs", "1", "--out", out, *CIFAR_FAST]
    assert cifar.main(list(map(str, base))) == 0
    last, best = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()
    assert "--resume auto" in _cifar_error(capsys, *base)  # a fresh start would clobber the run
    assert "resnet18" in _cifar_error(capsys, *base, "--arch", "resnet34", "--resume", "auto")
    assert "--epochs" in _cifar_error(capsys, *base[:-len(CIFAR_FAST)], "--epochs", "5", "--resume", "auto", *CIFAR_FAST)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(last[: len(last) // 3])
    assert "cannot be read" in _cifar_error(capsys, *base, "--resume", trunc)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert "not a cifar.py training checkpoint" in _cifar_error(capsys, *base, "--resume", tmp_path / "foreign.pt")
    write_evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    assert "refused" in _cifar_error(capsys, *base, "--resume", tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    assert "no such file" in _cifar_error(capsys, *base, "--resume", tmp_path / "nope.pt")
    partial = M.load_checkpoint(out / "last.pt")
    del partial["scheduler"]
    M.save_checkpoint(tmp_path / "partial.pt", **partial)
    assert "missing scheduler" in _cifar_error(capsys, *base, "--resume", tmp_path / "partial.pt")
    assert (out / "last.pt").read_bytes() == last and (out / "best.pt").read_bytes() == best


def test_cifar_benchmark_prints_json(tmp_path, capsys):
    data = write_tiny_cifar(tmp_path / "d", n_train=64, n_test=16)
    assert cifar.main(["--dataset", "cifar10", "--data-dir", str(data), "--benchmark", "2", "--batch-size", "16",
                       "--out", str(tmp_path / "o")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("compute_img_per_s", "pipeline_img_per_s", "pipeline_vs_compute", "train_gflop_per_img", "mfu"):
        assert res[key] > 0, key
    assert 3.0 < res["train_gflop_per_img"] < 3.6  # ResNet-18 CIFAR: 0.56 GMAC = 1.11 GFLOP forward, x3 for training
    assert not (tmp_path / "o").exists()  # a benchmark writes nothing


# ------------------------------------------------------------------------------------------------
# imagenet_ddp.py (CPU, gloo, tiny ImageFolder)
# ------------------------------------------------------------------------------------------------
import imagenet_ddp  # noqa: E402


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, *args, nnodes=1, node_rank=0, port=None, popen=False):
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    cmd += [f"--nproc_per_node={nproc}", os.path.join(HERE, "imagenet_ddp.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE, env=env)


@pytest.fixture(scope="module")
def inet_data(tmp_path_factory):
    # 3 classes x 32 train images; 3 x 3 = 9 val images: not divisible by world size x batch size (2 x 4)
    root = tmp_path_factory.mktemp("inet")
    return write_image_folder(root, per_class=(32, 3), size=40)


DDP_COMMON = ["--arch", "resnet18", "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "1",
              "--warmup-epochs", "1", "--lr", "0.05", "--ema", "0.9", "--mixup", "0.2", "--cutmix", "1.0",
              "--log-every", "1", "--json", "--save-every", "5"]


@pytest.fixture(scope="module")
def ddp_reference(inet_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_ref")
    res = torchrun(2, "--data", inet_data, "--out", out, *DDP_COMMON)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout


def test_ddp_two_processes_train_in_sync_with_exact_val_count(ddp_reference):
    out, stdout = ddp_reference
    summary = json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["weights_in_sync"] is True
    assert summary["val_images"] == 9
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("lr", "train_loss", "train_img_per_s", "data_wait_pct", "val_top1", "val_top5", "val_images", "time_s"):
        assert key in rows[0], key
    assert all(r["val_images"] == 9 for r in rows)
    ck = M.load_checkpoint(out / "last.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert ck["world_size"] == 2 and ck["global_batch"] == 8 and ck["epoch"] == 2 and ck["step"] == 0
    assert "step 12/12" in stdout and "data-wait" in stdout and "eta" in stdout


def test_ddp_sigterm_to_one_rank_then_resume_is_bit_identical(ddp_reference, inet_data, tmp_path):
    ref_out, _ = ddp_reference
    out = tmp_path / "run"
    proc = torchrun(2, "--data", inet_data, "--out", out, *DDP_COMMON, popen=True)
    _wait_for_line(proc, "epoch 1/2 step 2/12")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGTERM)  # a scheduler may signal a single rank
    rest, _ = proc.communicate(timeout=300)
    assert "stopped by signal at epoch 1" in rest, rest[-3000:]
    assert 'imagenet_ddp.py", line' not in rest  # no traceback from our code on any rank
    mid = M.load_checkpoint(out / "last.pt")
    assert mid["epoch"] == 0 and 2 <= mid["step"] < 12
    res = torchrun(2, "--data", inet_data, "--out", out, *DDP_COMMON, "--resume", "auto")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from auto at epoch 1 step" in res.stdout
    a, b = M.load_checkpoint(ref_out / "last.pt"), M.load_checkpoint(out / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "epoch", "step", "ema_updates"):
        assert_state_equal(a[key], b[key])


def test_ddp_two_nodes_equal_one_node_two_processes(ddp_reference, inet_data, tmp_path):
    ref_out, _ = ddp_reference
    port = free_port()
    procs = [torchrun(1, "--data", inet_data, "--out", tmp_path / "n", *DDP_COMMON, nnodes=2, node_rank=r, port=port,
                      popen=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:]
    a, b = M.load_checkpoint(ref_out / "last.pt"), M.load_checkpoint(tmp_path / "n" / "last.pt")
    assert_state_equal(a["model"], b["model"])
    assert_state_equal(a["ema"], b["ema"])


def test_ddp_evaluate_independent_of_world_size(ddp_reference, inet_data):
    ref_out, _ = ddp_reference
    one = run_script("imagenet_ddp.py", "--data", inet_data, "--evaluate", "--resume", ref_out / "best.pt",
                     "--batch-size", "4", "--workers", "0")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "--data", inet_data, "--evaluate", "--resume", ref_out / "best.pt", "--batch-size", "4",
                   "--workers", "0")
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads(one.stdout.strip().splitlines()[-1])
    r2 = json.loads([l for l in two.stdout.splitlines() if l.startswith("{")][-1])
    assert set(r1) == {"val_top1", "val_top5", "val_loss", "val_images"}
    assert r1["val_images"] == r2["val_images"] == 9
    assert r1["val_top1"] == r2["val_top1"] and r1["val_top5"] == r2["val_top5"]
    assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-5)


def test_ddp_bad_data_fails_fast_on_every_rank(tmp_path):
    write_image_folder(tmp_path / "noval", splits=("train",))
    t0 = time.time()
    res = torchrun(2, "--data", tmp_path / "noval", "--out", tmp_path / "o", "--arch", "resnet18")
    assert res.returncode != 0 and time.time() - t0 < 120
    assert res.stderr.count("imagenet_ddp.py: error:") == 2 and "no val/ folder" in res.stderr  # one line per rank
    assert 'imagenet_ddp.py", line' not in res.stderr + res.stdout
    assert not (tmp_path / "o").exists()


def _ddp_error(capsys, *argv):
    rc = imagenet_ddp.main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "error:" in err, err
    return err


def test_ddp_bad_inputs_single_process(capsys, tmp_path, inet_data):
    assert "no train/" in _ddp_error(capsys, "--data", tmp_path / "missing")
    write_image_folder(tmp_path / "mism", splits=("train",))
    write_image_folder(tmp_path / "mism", splits=("val",), classes=("cat", "dog", "owl"))
    assert "different classes" in _ddp_error(capsys, "--data", tmp_path / "mism")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    assert "no images" in _ddp_error(capsys, "--data", tmp_path / "empty")
    assert "--evaluate needs" in _ddp_error(capsys, "--data", inet_data, "--evaluate")
    assert "--epochs" in _ddp_error(capsys, "--data", inet_data, "--epochs", "0")
    trunc = tmp_path / "t.pt"
    trunc.write_bytes(b"PK\x03\x04 truncated")
    assert "cannot be read" in _ddp_error(capsys, "--data", inet_data, "--evaluate", "--resume", trunc)
    write_evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    assert "refused" in _ddp_error(capsys, "--data", inet_data, "--resume", tmp_path / "evil.pt", "--out", tmp_path / "o")
    assert not (tmp_path / "pwned").exists()


def test_ddp_unreadable_image_named(capsys, tmp_path):
    write_image_folder(tmp_path / "d", per_class=(4, 2))
    (tmp_path / "d" / "train" / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    err = _ddp_error(capsys, "--data", tmp_path / "d", "--out", tmp_path / "o", "--arch", "resnet18", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "2", "--workers", "0", "--warmup-epochs", "0")
    assert "zz_broken.jpg" in err


def test_train_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    from PIL import Image
    write_image_folder(tmp_path / "d", per_class=(2, 1), size=64)
    Image.new("L", (50, 70), 100).save(tmp_path / "d" / "train" / "cat" / "gray.png")
    Image.new("CMYK", (64, 48)).save(tmp_path / "d" / "train" / "dog" / "cmyk.jpg")
    classes, train, val = imagenet_ddp.check_data(str(tmp_path / "d"))
    ds = imagenet_ddp.TrainSet(train, 32, 0, 0.08, 0.4)
    for i in range(len(train)):
        x, y = ds[(3, i)]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == train[i][1]
        assert torch.equal(x, ds[(3, i)][0])  # same (seed, epoch, index): same pixels
    assert not torch.equal(ds[(3, 0)][0], ds[(4, 0)][0])  # another epoch: another crop
    x = imagenet_ddp.eval_transform(train[0][0], 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    # the global order splits identically whatever the world size, given the same global batch
    one = list(imagenet_ddp.EpochBatches(50, 8, 1, 0, 1, 0).__iter__())
    two = [list(imagenet_ddp.EpochBatches(50, 4, 2, r, 1, 0).__iter__()) for r in (0, 1)]
    for step, batch in enumerate(one):
        assert batch == two[0][step] + two[1][step]
    s = imagenet_ddp.EpochBatches(50, 8, 1, 0, 1, 0)
    s.set_epoch(0, start_step=4)
    assert list(s) == one[4:] and len(s) == 2


def test_crop_sampler_matches_torchvision_distribution():
    rng = np.random.default_rng(0)
    boxes = [imagenet_ddp.sample_crop(rng, 400, 300, 0.08) for _ in range(2000)]
    areas = np.array([w * h / (400 * 300) for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert all(0 <= x0 and x0 + w <= 400 and 0 <= y0 and y0 + h <= 300 for x0, y0, w, h in boxes)
    assert 0.07 < areas.min() < 0.12 and areas.max() > 0.9
    assert 0.7 < ratios.min() and ratios.max() < 1.4


# ------------------------------------------------------------------------------------------------
# predict.py
# ------------------------------------------------------------------------------------------------
import predict  # noqa: E402


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """A 1-epoch cifar.py run on a folder of lossless 32x32 PNGs."""
    root = tmp_path_factory.mktemp("pred")
    data = write_image_folder(root / "data", splits=("train", "test"), per_class=(32, 10), size=32, fmt="PNG")
    res = run_script("cifar.py", "--dataset", "folder", "--data-dir", data, "--epochs", "1", "--batch-size", "16",
                     "--lr", "0.01", "--ema", "0.5", "--out", root / "run")
    assert res.returncode == 0, res.stderr
    return root, data


def test_predict_agrees_with_trainer_val_top1(cifar_run):
    root, data = cifar_run
    res = run_script("predict.py", data / "test", "--checkpoint", root / "run" / "best.pt", "--json", "--batch-size", "7")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(l) for l in res.stdout.splitlines()]
    assert len(rows) == 30 and all(len(r["top"]) == 3 for r in rows)  # top-5 capped at the 3 classes
    correct = sum(r["top"][0]["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    val_top1 = M.load_checkpoint(root / "run" / "best.pt")["val_top1"]
    assert 100.0 * correct / len(rows) == pytest.approx(val_top1, abs=1e-9)
    assert read_jsonl(root / "run" / "metrics.jsonl")[-1]["val_top1"] == val_top1
    probs = [t["prob"] for t in rows[0]["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_predict_default_checkpoint_text_output_and_globs(cifar_run, tmp_path):
    root, data = cifar_run
    runs = tmp_path / "runs" / "x"
    runs.mkdir(parents=True)
    (runs / "best.pt").write_bytes((root / "run" / "best.pt").read_bytes())
    img = sorted((data / "test" / "cat").iterdir())[0]
    res = subprocess.run([sys.executable, os.path.join(HERE, "predict.py"), str(img), str(data / "test" / "dog" / "*.png"),
                          "--topk", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "using checkpoint runs/x/best.pt" in res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 + 10 and lines[0].startswith(f"{img}: ") and lines[0].count("%)") == 2
    none = subprocess.run([sys.executable, os.path.join(HERE, "predict.py"), str(img)], capture_output=True, text=True,
                          cwd=tmp_path / "runs")
    assert none.returncode == 2 and "--checkpoint" in none.stderr and "Traceback" not in none.stderr


def test_predict_bad_files_and_odd_modes(cifar_run, tmp_path):
    from PIL import Image
    root, _ = cifar_run
    Image.new("L", (50, 40), 90).save(tmp_path / "gray.png")
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (40, 40)).save(tmp_path / "pal.gif")
    Image.new("RGBA", (40, 40), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(tmp_path / "big.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    names = ["gray.png", "cmyk.jpg", "pal.gif", "rgba.png", "big.jpg", "empty.jpg", "text.jpg", "trunc.jpg", "missing.jpg"]
    res = run_script("predict.py", *[tmp_path / n for n in names], "--checkpoint", root / "run" / "best.pt", "--json")
    assert res.returncode == 1
    ok = {os.path.basename(json.loads(l)["path"]) for l in res.stdout.splitlines()}
    assert ok == {"gray.png", "cmyk.jpg", "pal.gif", "rgba.png", "big.jpg"}
    err = res.stderr.strip().splitlines()[1:]  # after "using checkpoint ..."
    assert len(err) == 4 and "Traceback" not in res.stderr
    assert any("empty.jpg: empty file" in l for l in err) and any("missing.jpg: no such file" in l for l in err)
    assert any("text.jpg: cannot read image" in l for l in err) and any("trunc.jpg: cannot read image" in l for l in err)


def test_predict_torchvision_state_dict_gets_imagenet_names(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    from PIL import Image
    torch.manual_seed(0)
    torch.save({"module." + k: v for k, v in tvm.resnet50().state_dict().items()}, tmp_path / "r50.pth")
    Image.new("RGB", (300, 260), (30, 120, 200)).save(tmp_path / "a.jpg")
    res = run_script("predict.py", tmp_path / "a.jpg", "--checkpoint", tmp_path / "r50.pth", "--arch", "resnet50", "--json")
    assert res.returncode == 0, res.stderr
    top = json.loads(res.stdout)["top"]
    cats = predict.imagenet_categories()
    assert len(top) == 5 and len(cats) == 1000 and all(t["label"] == cats[t["index"]] for t in top)
    need = run_script("predict.py", tmp_path / "a.jpg", "--checkpoint", tmp_path / "r50.pth")
    assert need.returncode == 2 and "--arch" in need.stderr
    wrong = run_script("predict.py", tmp_path / "a.jpg", "--checkpoint", tmp_path / "r50.pth", "--arch", "resnet18")
    assert wrong.returncode == 2 and "does not fit resnet18" in wrong.stderr


def test_predict_refuses_pickled_code(tmp_path):
    write_evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    (tmp_path / "a.png").write_bytes(b"")
    res = run_script("predict.py", tmp_path / "a.png", "--checkpoint", tmp_path / "evil.pt")
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "pwned").exists()


def test_predict_serve_without_gradio_says_how(tmp_path, cifar_run, capsys, monkeypatch):
    root, _ = cifar_run
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert predict.main(["--serve", "--checkpoint", str(root / "run" / "best.pt")]) == 2
    assert "pip install gradio" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# lrfind.py
# ------------------------------------------------------------------------------------------------
import lrfind  # noqa: E402


def _toy_problem(seed=0):
    """Noisy linear regression through a small net with BatchNorm: MSE blows up once the LR is too large."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    state = {"i": 0}

    def next_batch():
        i = state["i"] % 8
        state["i"] += 1
        return x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]
    return net, next_batch


def test_lr_range_test_stops_on_divergence_and_restores_everything():
    net, next_batch = _toy_problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = next_batch()
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()  # non-trivial momentum buffers and BN statistics to preserve
    before_model = copy.deepcopy(net.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    torch.manual_seed(123)
    lrs = lrfind.lr_schedule(1e-4, 1e3, 120, "exp")
    records, stopped = lrfind.lr_range_test(net, opt, next_batch, lrs, loss_fn=nn.functional.mse_loss, beta=0.9, diverge=4.0)
    rng_after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(rng_after, torch.rand(3))  # RNG state restored
    assert_state_equal(before_model, net.state_dict())
    assert_state_equal(before_opt, opt.state_dict())
    assert stopped is not None and len(records) < 120  # the loss blew up before the end of the sweep
    sm = [r[2] for r in records]
    assert not math.isfinite(sm[-1]) or sm[-1] > 4.0 * min(sm[:-1])
    sug = lrfind.suggestions(records)
    lrs_done = [r[0] for r in records]
    i_best = int(np.argmin(sm))
    for key in ("min", "valley", "steepest"):
        i = lrs_done.index(sug[key])
        assert i <= i_best and sm[i] < sm[0], key  # on the descending part of the curve, before the minimum
    assert sug["min_div10"] == pytest.approx(lrs_done[i_best] / 10)


def test_lr_schedule_modes():
    exp = lrfind.lr_schedule(1e-6, 1.0, 7, "exp")
    lin = lrfind.lr_schedule(0.0001, 1.0, 5, "linear")
    assert exp[0] == pytest.approx(1e-6) and exp[-1] == pytest.approx(1.0) and exp[3] == pytest.approx(1e-3)
    assert lin == pytest.approx([0.0001, 0.250075, 0.50005, 0.750025, 1.0])


def test_lrfind_script_outputs_and_leaves_checkpoint_alone(tmp_path, capsys, monkeypatch):
    data = write_tiny_cifar(tmp_path / "d", n_train=64, n_test=16)
    out = tmp_path / "lf"
    base = ["--dataset", "cifar10", "--data-dir", str(data), "--batch-size", "16", "--num-iter", "30", "--start-lr", "1e-5",
            "--end-lr", "10", "--json"]
    assert lrfind.main(base + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(text.strip().splitlines()[-1])
    assert set(res) >= {"suggested_lr", "min", "valley", "steepest", "min_div10", "stopped_at"}
    assert res["suggested_by"] == "min" and res["suggested_lr"] == res["min"] and 1e-5 <= res["min"] <= 10
    assert f"python cifar.py --dataset cifar10 --data-dir {data} --arch resnet18 --batch-size 16" in text
    with open(out / "lrfind.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["lr", "loss", "smoothed"] and len(rows) == 1 + res["steps"]
    try:
        import matplotlib
        assert matplotlib and (out / "lrfind.png").stat().st_size > 1000
    except ImportError:
        assert not (out / "lrfind.png").exists()
    # without matplotlib: said once, no picture, everything else written
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert lrfind.main(base + ["--out", str(tmp_path / "nompl")]) == 0
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1
    assert (tmp_path / "nompl" / "lrfind.json").exists() and not (tmp_path / "nompl" / "lrfind.png").exists()
    # sweeping from a checkpoint leaves the file untouched
    run = tmp_path / "run"
    assert cifar.main(["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1", "--out", str(run), *CIFAR_FAST]) == 0
    capsys.readouterr()
    before = ((run / "best.pt").read_bytes(), (run / "best.pt").stat().st_mtime_ns)
    assert lrfind.main(base + ["--out", str(tmp_path / "lf2"), "--checkpoint", str(run / "best.pt")]) == 0
    assert before == ((run / "best.pt").read_bytes(), (run / "best.pt").stat().st_mtime_ns)


def test_lrfind_bad_input(capsys, tmp_path):
    for argv, needle in ((["--start-lr", "1", "--end-lr", "0.1"], "--start-lr"), (["--num-iter", "3"], "--num-iter"),
                         (["--dataset", "folder", "--data-dir", str(tmp_path)], "must hold train"),
                         (["--imagenet", str(tmp_path / "nope")], "no train/")):
        assert lrfind.main(argv + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_cifar_fp32_nchw_trains(tmp_path):
    # (fp16 autocast is for GPUs: on CPU it has no fast kernels and takes minutes per step, so it is not run here)
    data = write_tiny_cifar(tmp_path / "d", n_train=48, n_test=16)
    assert cifar.main(["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "2", "--amp", "off",
                       "--no-channels-last", "--out", str(tmp_path / "o"), *CIFAR_FAST]) == 0
    ck = M.load_checkpoint(tmp_path / "o" / "last.pt")
    assert ck["epoch"] == 2 and ck["args"]["amp"] == "off"
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.dtype.is_floating_point)


def test_ddp_grad_accum_single_process(tmp_path, inet_data):
    res = run_script("imagenet_ddp.py", "--data", inet_data, "--out", tmp_path / "o", "--arch", "resnet18",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--grad-accum", "2", "--workers", "0",
                     "--warmup-epochs", "0", "--schedule", "onecycle", "--json")
    assert res.returncode == 0, res.stderr
    ck = M.load_checkpoint(tmp_path / "o" / "last.pt")
    assert ck["global_batch"] == 8 and ck["world_size"] == 1
    assert "12 steps/epoch" in res.stdout  # 96 images / (4 x 2)
