"""ResNet, written out from first principles, plus what every script must agree on.

Deep plain networks train *worse* than shallow ones, even on the training set (the "degradation
problem", He et al. 2015, https://arxiv.org/abs/1512.03385). A residual block computes
``relu(x + F(x))``: when the best thing a block can do is nothing, it only has to drive F to zero,
which SGD finds easily, so extra depth can no longer hurt.

The module layout and every parameter/buffer name match torchvision's ``resnet.py``, so
``model.load_state_dict(torchvision.models.resnet50().state_dict(), strict=True)`` works and both
networks compute the same function.

Besides the networks, this file holds what the scripts must never disagree on, and no training loop:
- the weights' moving average (EMA) both trainers keep, and the checkpoint format (atomic save, safe load, rebuild
  the network from a checkpoint);
- the run records both trainers write (metrics.jsonl, curves.png, TensorBoard scalars);
- the evaluation preprocessing a checkpoint records (stem, mean/std, resize and crop sizes), used by
  both trainers' validation and by predict.py, so a prediction sees exactly the pixels validation saw;
- which files are images and how a class-folder data set is listed;
- the named seed streams every random draw of training comes from, so that lrfind.py draws what the trainers draw;
- the names of the 1,000 ImageNet classes by synset (n01440764 -> tench);
- MatmulConv2d, the CPU bf16 speed-up for 3x3 convs on tiny maps that cifar.py and lrfind.py train with.
"""
import copy
import enum
import errno
import functools
import io
import json
import os
import tempfile

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "ARCHS", "build_model", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "CheckpointError",
           "preprocessing", "eval_image", "open_rgb", "normalize", "ImageError", "readable_class_names",
           "imagenet_class_names", "IMAGE_EXTS", "is_image", "list_image_folder", "list_train_val", "FolderError",
           "Stream", "seeded", "use_matmul_conv", "MatmulConv2d", "EMA", "Metrics", "draw_curves"]


def conv3x3(in_planes, out_planes, stride=1):
    # No bias: the BatchNorm right after subtracts the mean and adds its own shift, so a conv bias
    # would be cancelled exactly and only cost parameters.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the identity: ResNet-18/34."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4): ResNet-50/101/152.

    The 1x1 convs squeeze the expensive 3x3 to a quarter of the width, which is what makes 50+ layers
    affordable. The stride sits on the 3x3 rather than the first 1x1 ("ResNet v1.5", as in torchvision
    and NVIDIA's recipes): a strided 1x1 would simply drop three quarters of its input positions.
    """
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, four stages of residual blocks (widths 64-128-256-512), global pooling, one linear layer.

    stem="imagenet": 7x7/2 conv + 3x3/2 max-pool, for 224x224 inputs (56x56 into stage 1).
    stem="cifar": one 3x3/1 conv and no pooling, so 32x32 inputs keep 32x32 into stage 1; the ImageNet
    stem would shrink them to 8x8 before any residual block saw them.
    """

    def __init__(self, block, layers, num_classes=1000, stem="imagenet", zero_init_residual=False):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.inplanes = 64
        imagenet = stem == "imagenet"
        self.conv1 = (nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False) if imagenet
                      else conv3x3(3, 64))
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if imagenet else nn.Identity()
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init keeps activation variance constant through ReLU layers (He et al. 2015,
                # https://arxiv.org/abs/1502.01852); fan_out matches torchvision.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Zero the last BN gamma of each block so every block starts as the identity map: the network
            # behaves like a shallow one at first, which helps large-batch training (Goyal et al. 2017,
            # "Accurate, Large Minibatch SGD", https://arxiv.org/abs/1706.02677).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        # A projection (1x1 conv + BN) only where the shape changes; elsewhere the shortcut is free.
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=1000, **kwargs):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet34(num_classes=1000, **kwargs):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


def resnet50(num_classes=1000, **kwargs):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


def resnet101(num_classes=1000, **kwargs):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, **kwargs)


def resnet152(num_classes=1000, **kwargs):
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, **kwargs)


ARCHS = {f.__name__: f for f in (resnet18, resnet34, resnet50, resnet101, resnet152)}


def build_model(arch, num_classes, stem="imagenet", zero_init_residual=False):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes, stem=stem, zero_init_residual=zero_init_residual)


# ---------------------------------------------------------------------------------------------------
# The weights' moving average, kept by both trainers; checkpoints store it as "ema", preferred for inference
# ---------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights and BN statistics (Polyak averaging). Evaluating the average rather
    than the last iterate smooths out SGD noise (typically +0.3-1% top-1 on short schedules); the decay ramps up as
    (1+n)/(10+n), so early averages are not dominated by the random init. One foreach kernel per tensor group, not
    one per tensor."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        pairs = list(zip(self.module.buffers(), model.buffers()))
        floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - d)
        for e, m in pairs:
            if not e.dtype.is_floating_point:  # BN's num_batches_tracked
                e.copy_(m)

    def state_dict(self):
        return self.module.state_dict()


# ---------------------------------------------------------------------------------------------------
# Checkpoints. A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:
#   "model": state_dict of the unwrapped, uncompiled model (no "module." / "_orig_mod." prefixes)
#   "arch", "num_classes", "stem", "classes", "mean", "std", "image_size": enough to rebuild it and
#   to preprocess images exactly as the trainer evaluated them;
#   optional "eval_resize" (see preprocessing()), "class_names" (what people read, e.g. "tench" for the
#   folder n01440764), "train_size", "ema" (EMA weights, preferred for inference), "val_top1", and
#   whatever a trainer needs to resume.
# ---------------------------------------------------------------------------------------------------
REBUILD_KEYS = ("model", "arch", "num_classes", "stem", "classes", "mean", "std", "image_size")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, unsafe or not one of ours."""


class WriteError(RuntimeError):
    """A file that could not be written: a full disk, a quota, a read-only or forbidden folder."""


def atomic_write(path, data):
    """Write bytes atomically: a crash, a preemption or a full disk mid-write leaves the previous file intact.

    The bytes go to a temporary file in the same folder (same filesystem, so the rename is atomic), are
    fsync'ed, then replace the target with os.replace. On failure no temporary file is left, and WriteError
    names the file and the error (ENOSPC, EDQUOT, EROFS, EACCES, ...).
    """
    path = os.fspath(path)
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        code = errno.errorcode.get(e.errno, "")
        raise WriteError(f"cannot write {path}: {e.strerror or e}" + (f" ({code})" if code else "")) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, **state):
    """Serialise in memory, then write atomically (atomic_write). (torch.save straight into a file on a full
    disk fails as "unexpected pos 704 vs 598", naming neither the file nor the cause.)"""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getbuffer())


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True: tensors and plain containers only, so a file carrying pickled
    code is refused before any of that code can run."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for bad files; one clear message for all
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds pickled objects other than tensors (refused for safety)"
        raise CheckpointError(f"checkpoint {path} cannot be read: {reason[:200]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is not a dict but {type(ckpt).__name__}")
    return ckpt


def is_full_checkpoint(ckpt):
    return isinstance(ckpt, dict) and all(k in ckpt for k in REBUILD_KEYS)


def model_from_checkpoint(ckpt, prefer_ema=True, path="checkpoint"):
    """Rebuild the network a checkpoint describes and load its weights (EMA ones when present)."""
    missing = [k for k in REBUILD_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a ResNet-from-scratch checkpoint (missing {', '.join(missing)})")
    try:
        model = build_model(ckpt["arch"], int(ckpt["num_classes"]), stem=ckpt["stem"])
        weights = ckpt["ema"] if prefer_ema and ckpt.get("ema") is not None else ckpt["model"]
        model.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        why = str(e).splitlines()[0][:200]
        raise CheckpointError(f"{path}: weights do not fit {ckpt.get('arch')}: {why}") from None
    return model


# ---------------------------------------------------------------------------------------------------
# Run records, one format for both trainers, so their runs compare line for line: OUT/metrics.jsonl, one JSON object
# per epoch, written atomically; OUT/curves.png with matplotlib; TensorBoard scalars with --tensorboard.
# ---------------------------------------------------------------------------------------------------
class Metrics:
    """OUT/metrics.jsonl (one JSON object per epoch), OUT/curves.png (with matplotlib) and, optionally,
    TensorBoard scalars. A resumed run keeps the rows of the epochs it will not redo and redraws them all."""

    def __init__(self, out, keep_until_epoch, tensorboard):
        self.path, self.rows, self.tb, self.curves = os.path.join(out, "metrics.jsonl"), [], None, None
        if keep_until_epoch > 0 and os.path.exists(self.path):  # drop epochs the resumed run will redo
            with open(self.path) as f:
                self.rows = [r for r in map(json.loads, filter(str.strip, f)) if r.get("epoch", 0) <= keep_until_epoch]
        self.save()
        try:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(out)
        except ImportError:
            print("tensorboard is not installed (pip install tensorboard): --tensorboard ignored", flush=True)
        try:
            import matplotlib  # noqa: F401 (the curves need it, the run does not)
            self.curves = os.path.join(out, "curves.png")
        except ImportError:
            print("matplotlib is not installed (pip install matplotlib): no curves.png", flush=True)

    def save(self):  # rewritten whole and atomically: a full disk leaves the last complete file, never half a line
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def write(self, row):
        self.rows.append(row)
        self.save()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        if self.curves:
            draw_curves(self.rows, self.curves)


def draw_curves(rows, path):
    """Loss, top-1/top-5 and learning rate per epoch in one picture, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train (augmented)")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="validation")
    for key, label in (("train_top1", "train top-1"), ("val_top1", "validation top-1"), ("val_top5", "top-5")):
        if all(key in r for r in rows):
            b.plot(ep, [r[key] for r in rows], "o-", label=label)
    c.plot(ep, [r["lr"] for r in rows], "o-", color="C3")
    log = any(r["lr"] > 0 for r in rows)  # (a one-epoch run's only LR is the schedule's final 0)
    a.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    b.set(title="accuracy", xlabel="epoch", ylabel="%")
    c.set(title="learning rate (at the epoch's end)", xlabel="epoch", ylabel="lr", yscale="log" if log else "linear")
    for ax in (a, b):
        ax.legend()
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(path))))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=90, format="png")
    plt.close(fig)
    try:  # a picture, redrawn every epoch from metrics.jsonl: losing one is no reason to end a run
        atomic_write(path, png.getbuffer())
    except WriteError as e:
        print(f"{e}; the run goes on (the next checkpoint or metrics.jsonl write that fails ends it)", flush=True)


# ---------------------------------------------------------------------------------------------------
# Evaluation preprocessing. Both trainers validate with eval_image() and record its settings in every
# checkpoint; predict.py reads them back, so a prediction sees exactly the pixels validation saw.
# ---------------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_RATIO = 0.875  # the standard ImageNet evaluation: resize the short side to 256, center-crop 224


class ImageError(ValueError):
    """An image that cannot be decoded: missing, truncated, not an image, or over PIL's size guard."""


def preprocessing(ckpt):
    """The evaluation preprocessing a checkpoint records: crop `size`, short-side `resize` (None = squash
    the whole image to size x size, the CIFAR convention), `mean`, `std`. Checkpoints written before
    "eval_resize" existed get the defaults their trainer used then."""
    size = int(ckpt["image_size"])
    if "eval_resize" in ckpt:
        resize = None if ckpt["eval_resize"] is None else int(ckpt["eval_resize"])
    else:
        resize = None if ckpt["stem"] == "cifar" else int(size / CROP_RATIO)
    return dict(size=size, resize=resize, mean=tuple(ckpt["mean"]), std=tuple(ckpt["std"]))


def open_rgb(image, smallest_size=None):
    """A path (or PIL image) -> (RGB PIL image, original (W, H)). Grayscale, CMYK, palette and RGBA are
    converted. smallest_size, a function (W, H) -> (w, h) called on the header alone before any pixel is decoded,
    turns on reduced-size JPEG decoding: libjpeg decodes at 1/2, 1/4 or 1/8 scale directly, never below (w, h),
    skipping most of the IDCT work."""
    from PIL import Image
    try:
        im = Image.open(image) if isinstance(image, (str, os.PathLike)) else image
        size = im.size
        if smallest_size is not None and im.format == "JPEG":
            im.draft("RGB", smallest_size(*size))
        if im.mode == "RGB":  # (convert() would decode, then copy: 0.1-0.2 ms of a 500x375 photo's ~1.6 ms)
            im.load()
            return im, size
        return im.convert("RGB"), size
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ImageError(f"{image}: cannot read image ({type(e).__name__}: {str(e)[:80]})") from None


def eval_image(image, size, resize=None):
    """A path (or PIL image) -> uint8 [3, size, size], the pixels a network is evaluated on.

    resize=None: the whole image squashed to size x size (CIFAR's photos are square already).
    resize=R: short side to R, then the central size x size crop (ImageNet's convention, R = size / 0.875).
    """
    import numpy as np
    from PIL import Image
    if resize is None:
        im, _ = open_rgb(image, lambda W, H: (size, size))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
    else:
        resize = max(resize, size)
        im, _ = open_rgb(image, lambda W, H: (max(1, W * resize // min(W, H)), max(1, H * resize // min(W, H))))
        W, H = im.size  # sizes and offsets rounded as torchvision's Resize(R) + CenterCrop(size) round them
        nw, nh = (resize, int(resize * H / W)) if W <= H else (int(resize * W / H), resize)
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


def normalize(x_u8, mean, std, channels_last=False):
    """uint8 [B, 3, H, W] on any device -> float, per channel (x/255 - mean) / std. Images travel as uint8
    until they reach the device: 4x less to copy than float."""
    mean, std = _scaled(tuple(mean), tuple(std), x_u8.device)
    x = (x_u8.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@functools.lru_cache(maxsize=16)
def _scaled(mean, std, device):
    """mean x 255 and std x 255 as [1, 3, 1, 1] tensors on the device, made once: torch.tensor(list, device=cuda)
    copies from pageable memory and makes the CPU wait for the GPU, which every batch would pay."""
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) * 255 for v in (mean, std))


# ---------------------------------------------------------------------------------------------------
# Data sets: which files are images, how a class-folder data set is listed, and the seed streams
# ---------------------------------------------------------------------------------------------------
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class FolderError(ValueError):
    """A data folder that is missing, or holds no class folders or no images."""


def is_image(filename):
    return filename.lower().endswith(IMAGE_EXTS)


def list_image_folder(root):
    """ImageFolder layout: root/<class>/**/<image>, classes sorted (torchvision's class indices), files sorted, links
    followed. Returns (classes, [(path, label)])."""
    if not os.path.isdir(root):
        raise FolderError(f"{root}: no such folder")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FolderError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
    samples = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if is_image(f)]
    if not samples:
        raise FolderError(f"{root} holds no images in its class folders")
    return classes, samples


def list_train_val(root, val_names=("val",)):
    """A data set's two splits: root/train/ and the first of root/<val_names>/ that exists, with the same classes.
    Returns {"classes": [...], "train": [(path, label)], "val": [(path, label)]}."""
    val_dir = next((os.path.join(root, v) for v in val_names if os.path.isdir(os.path.join(root, v))), None)
    if not os.path.isdir(os.path.join(root, "train")) or val_dir is None:
        raise FolderError(f"{root} must hold train/<class>/* and {' or '.join(v + '/' for v in val_names)}<class>/*")
    classes, train = list_image_folder(os.path.join(root, "train"))
    val_classes, val = list_image_folder(val_dir)
    if val_classes != classes:
        diff = ", ".join(sorted(set(classes) ^ set(val_classes))[:3])
        raise FolderError(f"train/ and {os.path.basename(val_dir)}/ of {root} have different classes (e.g. {diff})")
    return {"classes": classes, "train": train, "val": val}


class Stream(enum.IntEnum):
    """The seed streams. Every random draw of training is seeded(seed, <what it is about>, stream): one stream per
    kind of draw, so that no draw depends on how many others were made before it (by other workers, ranks, or the
    part of a run before a resume), and lrfind.py's sweep draws exactly what the trainers draw."""
    ORDER = 0  # seeded(seed, epoch, ORDER): the epoch's permutation of the training set
    BATCH = 1  # seeded(seed, epoch, step, BATCH): cifar.py's crops, flips, CutOut and MixUp/CutMix of one batch
    IMAGE = 2  # seeded(seed, epoch, index, IMAGE): imagenet_ddp.py's crop, flip and colour jitter of one photo
    MIX = 3  # seeded(seed, epoch, step, MIX): imagenet_ddp.py's MixUp/CutMix of one step
    REPLACEMENT = 4  # seeded(seed, epoch, index, REPLACEMENT): the photos that may stand in for a broken one
    HOLDOUT = 5  # seeded(seed, HOLDOUT): lrfind.py's class-mixed validation subset


def seeded(*ints):
    """A numpy Generator that depends only on the given integers (seed, epoch, index, ..., Stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(i) for i in ints]))


# ---------------------------------------------------------------------------------------------------
# Class names. ImageNet-style folders are named by WordNet synset (n01440764); people read "tench".
# ---------------------------------------------------------------------------------------------------
def readable_class_names(classes):
    """Class folder names as people read them: when every name is one of the 1,000 ImageNet synsets, the
    ImageNet category names (torchvision's, the same list its pretrained weights use); otherwise unchanged."""
    index = {wnid: i for i, wnid in enumerate(IMAGENET_SYNSETS)}
    if not classes or not all(c in index for c in classes):
        return list(classes)
    names = imagenet_class_names()
    return [names[index[c]] for c in classes]


def imagenet_class_names():
    """The 1,000 ImageNet-1k category names in class-index order: torchvision's list, the one its pretrained weights
    use (metadata only: nothing is downloaded)."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# The 1,000 ImageNet-1k synsets in class-index order (sorted, as ImageFolder sorts the folders).
IMAGENET_SYNSETS = """
n01440764 n01443537 n01484850 n01491361 n01494475 n01496331 n01498041 n01514668 n01514859 n01518878
n01530575 n01531178 n01532829 n01534433 n01537544 n01558993 n01560419 n01580077 n01582220 n01592084
n01601694 n01608432 n01614925 n01616318 n01622779 n01629819 n01630670 n01631663 n01632458 n01632777
n01641577 n01644373 n01644900 n01664065 n01665541 n01667114 n01667778 n01669191 n01675722 n01677366
n01682714 n01685808 n01687978 n01688243 n01689811 n01692333 n01693334 n01694178 n01695060 n01697457
n01698640 n01704323 n01728572 n01728920 n01729322 n01729977 n01734418 n01735189 n01737021 n01739381
n01740131 n01742172 n01744401 n01748264 n01749939 n01751748 n01753488 n01755581 n01756291 n01768244
n01770081 n01770393 n01773157 n01773549 n01773797 n01774384 n01774750 n01775062 n01776313 n01784675
n01795545 n01796340 n01797886 n01798484 n01806143 n01806567 n01807496 n01817953 n01818515 n01819313
n01820546 n01824575 n01828970 n01829413 n01833805 n01843065 n01843383 n01847000 n01855032 n01855672
n01860187 n01871265 n01872401 n01873310 n01877812 n01882714 n01883070 n01910747 n01914609 n01917289
n01924916 n01930112 n01943899 n01944390 n01945685 n01950731 n01955084 n01968897 n01978287 n01978455
n01980166 n01981276 n01983481 n01984695 n01985128 n01986214 n01990800 n02002556 n02002724 n02006656
n02007558 n02009229 n02009912 n02011460 n02012849 n02013706 n02017213 n02018207 n02018795 n02025239
n02027492 n02028035 n02033041 n02037110 n02051845 n02056570 n02058221 n02066245 n02071294 n02074367
n02077923 n02085620 n02085782 n02085936 n02086079 n02086240 n02086646 n02086910 n02087046 n02087394
n02088094 n02088238 n02088364 n02088466 n02088632 n02089078 n02089867 n02089973 n02090379 n02090622
n02090721 n02091032 n02091134 n02091244 n02091467 n02091635 n02091831 n02092002 n02092339 n02093256
n02093428 n02093647 n02093754 n02093859 n02093991 n02094114 n02094258 n02094433 n02095314 n02095570
n02095889 n02096051 n02096177 n02096294 n02096437 n02096585 n02097047 n02097130 n02097209 n02097298
n02097474 n02097658 n02098105 n02098286 n02098413 n02099267 n02099429 n02099601 n02099712 n02099849
n02100236 n02100583 n02100735 n02100877 n02101006 n02101388 n02101556 n02102040 n02102177 n02102318
n02102480 n02102973 n02104029 n02104365 n02105056 n02105162 n02105251 n02105412 n02105505 n02105641
n02105855 n02106030 n02106166 n02106382 n02106550 n02106662 n02107142 n02107312 n02107574 n02107683
n02107908 n02108000 n02108089 n02108422 n02108551 n02108915 n02109047 n02109525 n02109961 n02110063
n02110185 n02110341 n02110627 n02110806 n02110958 n02111129 n02111277 n02111500 n02111889 n02112018
n02112137 n02112350 n02112706 n02113023 n02113186 n02113624 n02113712 n02113799 n02113978 n02114367
n02114548 n02114712 n02114855 n02115641 n02115913 n02116738 n02117135 n02119022 n02119789 n02120079
n02120505 n02123045 n02123159 n02123394 n02123597 n02124075 n02125311 n02127052 n02128385 n02128757
n02128925 n02129165 n02129604 n02130308 n02132136 n02133161 n02134084 n02134418 n02137549 n02138441
n02165105 n02165456 n02167151 n02168699 n02169497 n02172182 n02174001 n02177972 n02190166 n02206856
n02219486 n02226429 n02229544 n02231487 n02233338 n02236044 n02256656 n02259212 n02264363 n02268443
n02268853 n02276258 n02277742 n02279972 n02280649 n02281406 n02281787 n02317335 n02319095 n02321529
n02325366 n02326432 n02328150 n02342885 n02346627 n02356798 n02361337 n02363005 n02364673 n02389026
n02391049 n02395406 n02396427 n02397096 n02398521 n02403003 n02408429 n02410509 n02412080 n02415577
n02417914 n02422106 n02422699 n02423022 n02437312 n02437616 n02441942 n02442845 n02443114 n02443484
n02444819 n02445715 n02447366 n02454379 n02457408 n02480495 n02480855 n02481823 n02483362 n02483708
n02484975 n02486261 n02486410 n02487347 n02488291 n02488702 n02489166 n02490219 n02492035 n02492660
n02493509 n02493793 n02494079 n02497673 n02500267 n02504013 n02504458 n02509815 n02510455 n02514041
n02526121 n02536864 n02606052 n02607072 n02640242 n02641379 n02643566 n02655020 n02666196 n02667093
n02669723 n02672831 n02676566 n02687172 n02690373 n02692877 n02699494 n02701002 n02704792 n02708093
n02727426 n02730930 n02747177 n02749479 n02769748 n02776631 n02777292 n02782093 n02783161 n02786058
n02787622 n02788148 n02790996 n02791124 n02791270 n02793495 n02794156 n02795169 n02797295 n02799071
n02802426 n02804414 n02804610 n02807133 n02808304 n02808440 n02814533 n02814860 n02815834 n02817516
n02823428 n02823750 n02825657 n02834397 n02835271 n02837789 n02840245 n02841315 n02843684 n02859443
n02860847 n02865351 n02869837 n02870880 n02871525 n02877765 n02879718 n02883205 n02892201 n02892767
n02894605 n02895154 n02906734 n02909870 n02910353 n02916936 n02917067 n02927161 n02930766 n02939185
n02948072 n02950826 n02951358 n02951585 n02963159 n02965783 n02966193 n02966687 n02971356 n02974003
n02977058 n02978881 n02979186 n02980441 n02981792 n02988304 n02992211 n02992529 n02999410 n03000134
n03000247 n03000684 n03014705 n03016953 n03017168 n03018349 n03026506 n03028079 n03032252 n03041632
n03042490 n03045698 n03047690 n03062245 n03063599 n03063689 n03065424 n03075370 n03085013 n03089624
n03095699 n03100240 n03109150 n03110669 n03124043 n03124170 n03125729 n03126707 n03127747 n03127925
n03131574 n03133878 n03134739 n03141823 n03146219 n03160309 n03179701 n03180011 n03187595 n03188531
n03196217 n03197337 n03201208 n03207743 n03207941 n03208938 n03216828 n03218198 n03220513 n03223299
n03240683 n03249569 n03250847 n03255030 n03259280 n03271574 n03272010 n03272562 n03290653 n03291819
n03297495 n03314780 n03325584 n03337140 n03344393 n03345487 n03347037 n03355925 n03372029 n03376595
n03379051 n03384352 n03388043 n03388183 n03388549 n03393912 n03394916 n03400231 n03404251 n03417042
n03424325 n03425413 n03443371 n03444034 n03445777 n03445924 n03447447 n03447721 n03450230 n03452741
n03457902 n03459775 n03461385 n03467068 n03476684 n03476991 n03478589 n03481172 n03482405 n03483316
n03485407 n03485794 n03492542 n03494278 n03495258 n03496892 n03498962 n03527444 n03529860 n03530642
n03532672 n03534580 n03535780 n03538406 n03544143 n03584254 n03584829 n03590841 n03594734 n03594945
n03595614 n03598930 n03599486 n03602883 n03617480 n03623198 n03627232 n03630383 n03633091 n03637318
n03642806 n03649909 n03657121 n03658185 n03661043 n03662601 n03666591 n03670208 n03673027 n03676483
n03680355 n03690938 n03691459 n03692522 n03697007 n03706229 n03709823 n03710193 n03710637 n03710721
n03717622 n03720891 n03721384 n03724870 n03729826 n03733131 n03733281 n03733805 n03742115 n03743016
n03759954 n03761084 n03763968 n03764736 n03769881 n03770439 n03770679 n03773504 n03775071 n03775546
n03776460 n03777568 n03777754 n03781244 n03782006 n03785016 n03786901 n03787032 n03788195 n03788365
n03791053 n03792782 n03792972 n03793489 n03794056 n03796401 n03803284 n03804744 n03814639 n03814906
n03825788 n03832673 n03837869 n03838899 n03840681 n03841143 n03843555 n03854065 n03857828 n03866082
n03868242 n03868863 n03871628 n03873416 n03874293 n03874599 n03876231 n03877472 n03877845 n03884397
n03887697 n03888257 n03888605 n03891251 n03891332 n03895866 n03899768 n03902125 n03903868 n03908618
n03908714 n03916031 n03920288 n03924679 n03929660 n03929855 n03930313 n03930630 n03933933 n03935335
n03937543 n03938244 n03942813 n03944341 n03947888 n03950228 n03954731 n03956157 n03958227 n03961711
n03967562 n03970156 n03976467 n03976657 n03977966 n03980874 n03982430 n03983396 n03991062 n03992509
n03995372 n03998194 n04004767 n04005630 n04008634 n04009552 n04019541 n04023962 n04026417 n04033901
n04033995 n04037443 n04039381 n04040759 n04041544 n04044716 n04049303 n04065272 n04067472 n04069434
n04070727 n04074963 n04081281 n04086273 n04090263 n04099969 n04111531 n04116512 n04118538 n04118776
n04120489 n04125021 n04127249 n04131690 n04133789 n04136333 n04141076 n04141327 n04141975 n04146614
n04147183 n04149813 n04152593 n04153751 n04154565 n04162706 n04179913 n04192698 n04200800 n04201297
n04204238 n04204347 n04208210 n04209133 n04209239 n04228054 n04229816 n04235860 n04238763 n04239074
n04243546 n04251144 n04252077 n04252225 n04254120 n04254680 n04254777 n04258138 n04259630 n04263257
n04264628 n04265275 n04266014 n04270147 n04273569 n04275548 n04277352 n04285008 n04286575 n04296562
n04310018 n04311004 n04311174 n04317175 n04325704 n04326547 n04328186 n04330267 n04332243 n04335435
n04336792 n04344873 n04346328 n04347754 n04350905 n04355338 n04355933 n04356056 n04357314 n04366367
n04367480 n04370456 n04371430 n04371774 n04372370 n04376876 n04380533 n04389033 n04392985 n04398044
n04399382 n04404412 n04409515 n04417672 n04418357 n04423845 n04428191 n04429376 n04435653 n04442312
n04443257 n04447861 n04456115 n04458633 n04461696 n04462240 n04465501 n04467665 n04476259 n04479046
n04482393 n04483307 n04485082 n04486054 n04487081 n04487394 n04493381 n04501370 n04505470 n04507155
n04509417 n04515003 n04517823 n04522168 n04523525 n04525038 n04525305 n04532106 n04532670 n04536866
n04540053 n04542943 n04548280 n04548362 n04550184 n04552348 n04553703 n04554684 n04557648 n04560804
n04562935 n04579145 n04579432 n04584207 n04589890 n04590129 n04591157 n04591713 n04592741 n04596742
n04597913 n04599235 n04604644 n04606251 n04612504 n04613696 n06359193 n06596364 n06785654 n06794110
n06874185 n07248320 n07565083 n07579787 n07583066 n07584110 n07590611 n07613480 n07614500 n07615774
n07684084 n07693725 n07695742 n07697313 n07697537 n07711569 n07714571 n07714990 n07715103 n07716358
n07716906 n07717410 n07717556 n07718472 n07718747 n07720875 n07730033 n07734744 n07742313 n07745940
n07747607 n07749582 n07753113 n07753275 n07753592 n07754684 n07760859 n07768694 n07802026 n07831146
n07836838 n07860988 n07871810 n07873807 n07875152 n07880968 n07892512 n07920052 n07930864 n07932039
n09193705 n09229709 n09246464 n09256479 n09288635 n09332890 n09399592 n09421951 n09428293 n09468604
n09472597 n09835506 n10148035 n10565667 n11879895 n11939491 n12057211 n12144580 n12267677 n12620546
n12768682 n12985857 n12998815 n13037406 n13040303 n13044778 n13052670 n13054560 n13133613 n15075141
""".split()


# ---------------------------------------------------------------------------------------------------
# CPU bf16 speed-up: 3x3 convs on tiny maps as matmuls (ResNet's last stage on 32x32 inputs)
# ---------------------------------------------------------------------------------------------------
class _Conv3x3Matmul(torch.autograd.Function):
    """A 3x3, padding-1 convolution (stride 1 or 2) as matmuls over im2col columns: the forward pass, the input
    gradient and the weight gradient are one matmul each. On 4x4 outputs, under CPU bf16, this trains about twice as
    fast as oneDNN's convolution; on 8x8 the two are even, and the columns (9x the activations) get big (the
    measurements: bench/README.md, "CPU bf16: 3x3 convs on tiny maps")."""

    @staticmethod
    def forward(ctx, x, w, stride):
        n, c, h, wd = x.shape
        ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
        # columns: one row per output pixel, holding its 3x3 neighbourhood in (ky, kx, channel) order
        xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
        cols = torch.stack([xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
                            for i in range(3) for j in range(3)], dim=3).reshape(-1, 9 * c)
        ctx.save_for_backward(cols, w)
        ctx.geometry = (n, c, h, wd, ho, wo, stride)
        w_rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], 9 * c)
        return (cols @ w_rows.t()).view(n, ho, wo, -1).permute(0, 3, 1, 2)  # NCHW view, channels_last strides

    @staticmethod
    def backward(ctx, grad):
        cols, w = ctx.saved_tensors
        n, c, h, wd, ho, wo, s = ctx.geometry
        g = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
        grad_w = (g.t() @ cols).view(-1, 3, 3, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        # input gradient: the columns' gradient, each of its 9 taps added back where that tap read the input
        grad_cols = (g @ w.permute(0, 2, 3, 1).reshape(w.shape[0], 9 * c)).view(n, ho, wo, 3, 3, c)
        grad_xp = grad.new_zeros(n, h + 2, wd + 2, c)
        for i in range(3):
            for j in range(3):
                grad_xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] += grad_cols[:, :, :, i, j]
        grad_x = grad_xp[:, 1:h + 1, 1:wd + 1].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return grad_x, grad_w, None


class MatmulConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state_dict) that trains through _Conv3x3Matmul when its output is at
    most 4x4 under CPU bf16 autocast, and is a plain Conv2d everywhere else (eval, fp32, CUDA, larger maps)."""

    def _conv_forward(self, x, weight, bias):
        s = self.stride[0]
        if (((x.shape[-2] - 1) // s + 1) * ((x.shape[-1] - 1) // s + 1) <= 16 and torch.is_grad_enabled()
                and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            with torch.autocast("cpu", enabled=False):
                return _Conv3x3Matmul.apply(x.to(torch.bfloat16), weight.to(torch.bfloat16), s)
        return super()._conv_forward(x, weight, bias)


def use_matmul_conv(model):
    """The one switch: turn the model's bias-free 3x3 convs (stride 1 or 2, padding 1) into MatmulConv2d in place
    (parameters untouched). It only changes anything when training on a CPU under bf16 autocast, and only for
    outputs of at most 4x4: on ResNet for 32x32 inputs, the convs of the last stage."""
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride in ((1, 1), (2, 2))
                and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.bias is None
                and m.padding_mode == "zeros"):
            m.__class__ = MatmulConv2d
    return model
