"""ResNet, written out from first principles, and the checkpoint format every script shares.

Deep plain networks train *worse* than shallow ones, even on the training set (the "degradation
problem", He et al. 2015, https://arxiv.org/abs/1512.03385). A residual block computes
``relu(x + F(x))``: when the best thing a block can do is nothing, it only has to drive F to zero,
which SGD finds easily, so extra depth can no longer hurt.

The module layout and every parameter/buffer name match torchvision's ``resnet.py``, so
``model.load_state_dict(torchvision.models.resnet50().state_dict(), strict=True)`` works and both
networks compute the same function. This file imports only torch and holds no training code.
"""
import os
import tempfile

import torch
import torch.nn as nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "ARCHS", "build_model", "save_checkpoint", "load_checkpoint",
           "model_from_checkpoint", "CheckpointError"]


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
        self.stem = stem
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
# Checkpoints. A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:
#   "model": state_dict of the unwrapped, uncompiled model (no "module." / "_orig_mod." prefixes)
#   "arch", "num_classes", "stem", "classes", "mean", "std", "image_size": enough to rebuild it and
#   to preprocess images exactly as the trainer evaluated them;
#   optional "ema" (EMA weights, preferred for inference) and whatever a trainer needs to resume.
# ---------------------------------------------------------------------------------------------------
REBUILD_KEYS = ("model", "arch", "num_classes", "stem", "classes", "mean", "std", "image_size")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, unsafe or not one of ours."""


def save_checkpoint(path, **state):
    """Write atomically: a crash or preemption mid-write leaves the previous file intact.

    The bytes go to a temporary file in the same folder (same filesystem, so the rename is atomic),
    are fsync'ed, then replace the target with os.replace.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        raise CheckpointError(f"{path}: weights do not fit {ckpt.get('arch')}: {str(e).splitlines()[0][:200]}") from None
    return model
