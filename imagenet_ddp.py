"""Train a ResNet on ImageNet (or any ImageFolder data set) with DistributedDataParallel.

CPU smoke run (one process; CIFAR-10 photos with val/ -> test/ as a symlink):
    python imagenet_ddp.py --data data/cifar10-jpg --arch resnet18 --image-size 64 --epochs 1 --batch-size 32
One node, 8 GPUs:
    torchrun --nproc_per_node=8 imagenet_ddp.py --data /data/imagenet
Two nodes, 8 GPUs each (run on both, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        imagenet_ddp.py --data /data/imagenet
Resume after preemption (continues at the exact step), or evaluate a checkpoint:
    torchrun --nproc_per_node=8 imagenet_ddp.py --data /data/imagenet --resume auto
    torchrun --nproc_per_node=8 imagenet_ddp.py --data /data/imagenet --evaluate --resume runs/imagenet-resnet50/best.pt
Input pipeline speed alone (prints JSON):
    python imagenet_ddp.py --data /data/imagenet --benchmark-data 50 --workers 8

Exactness, by construction:
- Each epoch has one global order, a permutation derived from (seed, epoch). Global batch b is
  order[b*G:(b+1)*G] (G = batch size x processes x grad-accum) and rank r takes its r-th share. A resumed
  run skips the consumed batches without loading them, and the split does not depend on the world size.
- Every random choice of an image's augmentation comes from (seed, epoch, image index), so it does not
  depend on workers, ranks or where the run stopped.
- Validation gives each image to exactly one rank (no padding, unlike DistributedSampler) and sums counts.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M
from cifar import (EMA, Metrics, Parser, StopFlag, UserError, autocast, fmt_time, list_image_folder, load_resume,
                   mix_batch, param_groups, pick_amp, pick_device, restore_training_state, seeded, training_state)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_args(argv=None):
    p = Parser(description="DDP ResNet training on an ImageFolder data set (ImageNet).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default="./data/imagenet", help="folder holding train/ and val/ (ImageFolder layout)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank")
    p.add_argument("--image-size", type=int, default=224, help="training/eval crop size")
    p.add_argument("--color-jitter", type=float, default=0.4, help="brightness/contrast/saturation jitter; 0 = off")
    p.add_argument("--min-scale", type=float, default=0.08, help="RandomResizedCrop smallest area fraction")
    p.add_argument("--pipeline", default="fast", choices=["fast", "article"],
                   help="fast = uint8 PIL with reduced-size JPEG decoding; article = plain torchvision Compose")
    # model
    p.add_argument("--arch", default="resnet50", choices=list(M.ARCHS), help="network (ImageNet stem)")
    p.add_argument("--zero-init-residual", action="store_true", help="start every block as identity (Goyal et al. 2017)")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    # optimisation
    p.add_argument("--epochs", type=int, default=90, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=0.1, help="peak LR per 256 images, scaled by the global batch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay (not on BN and bias)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear LR warm-up (Goyal et al. 2017)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle"], help="LR schedule after warm-up")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--mixup", type=float, default=0.0, help="MixUp Beta(alpha, alpha); 0 = off")
    p.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta(alpha, alpha); 0 = off")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of weights, e.g. 0.9999; 0 = off")
    # runtime
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast precision")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="seed for init, order and augmentation")
    p.add_argument("--evaluate", action="store_true", help="only evaluate --resume/--checkpoint and print JSON")
    p.add_argument("--benchmark-data", type=int, default=0, metavar="N", help="time N batches of the train pipeline alone")
    # output
    p.add_argument("--out", default=None, help="run folder (default runs/imagenet-<arch>)")
    p.add_argument("--resume", default=None, help="'auto' (OUT/last.pt if present) or a checkpoint path")
    p.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (same as --resume with --evaluate)")
    p.add_argument("--save-every", type=int, default=1000, help="also write last.pt every N steps (0 = epoch ends only)")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (if installed)")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", f"imagenet-{args.arch}")
    checks = [(args.epochs >= 1, "--epochs must be >= 1"), (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.grad_accum >= 1, "--grad-accum must be >= 1"), (args.workers >= 0, "--workers must be >= 0"),
              (args.lr > 0 and math.isfinite(args.lr), "--lr must be a positive number"), (args.wd >= 0, "--wd must be >= 0"),
              (args.image_size >= 16, "--image-size must be >= 16"), (0 < args.min_scale <= 1, "--min-scale must be in (0, 1]"),
              (0 <= args.warmup_epochs < args.epochs, "--warmup-epochs must be in [0, epochs)"),
              (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"), (args.color_jitter >= 0, "--color-jitter must be >= 0"),
              (args.mixup >= 0 and args.cutmix >= 0, "--mixup/--cutmix alpha must be >= 0"), (0 <= args.ema < 1, "--ema must be in [0, 1)"),
              (args.save_every >= 0 and args.log_every >= 1, "--save-every must be >= 0 and --log-every >= 1"),
              (not args.evaluate or args.resume or args.checkpoint, "--evaluate needs --resume PATH or --checkpoint PATH")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return args


# ---------------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------------
def setup_distributed(device_name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs one process without a process group."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif world > 1:  # share the cores between the processes on this node, unless OMP_NUM_THREADS says otherwise
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // per_node))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    if rank != 0:
        warnings.simplefilter("default")  # other ranks: warnings only, no progress
    return rank, world, device


def all_sum(values, device):
    """Sum a list of numbers over ranks, in float64 so counts stay exact."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def check_data(root):
    """List train/ and val/ and check they agree. Every rank runs this before any collective, so bad data
    makes every rank exit at once instead of leaving the others waiting."""
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"{root} has no {split}/ folder (expected {root}/train/<class>/* and {root}/val/<class>/*)")
    classes, train = list_image_folder(os.path.join(root, "train"))
    val_classes, val = list_image_folder(os.path.join(root, "val"))
    if val_classes != classes:
        diff = sorted(set(classes) ^ set(val_classes))
        raise UserError(f"train/ and val/ have different classes (e.g. {', '.join(diff[:3])})")
    return classes, train, val


def load_rgb(path, draft_size=None):
    """Open an image as RGB (grayscale, CMYK, palette, RGBA converted). draft_size(W, H) -> (w, h), if given,
    is computed from the header alone, before any pixel is decoded, and turns on reduced-size JPEG decoding:
    libjpeg decodes at 1/2, 1/4 or 1/8 scale directly, never below (w, h), skipping most of the IDCT work."""
    from PIL import Image
    try:
        im = Image.open(path)
        size = im.size
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", draft_size(*size))
        return im.convert("RGB"), size
    except Exception as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {str(e)[:80]})") from None


def sample_crop(rng, width, height, min_scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (Szegedy et al. 2015, as in torchvision): area fraction U(min_scale, 1),
    log-uniform aspect ratio, 10 tries, else a center crop clamped to the ratio range."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_r))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainSet(torch.utils.data.Dataset):
    """Items are (epoch, index) pairs, so each image's augmentation is a function of (seed, epoch, index)."""

    def __init__(self, samples, image_size, seed, min_scale, jitter):
        self.samples, self.size, self.seed, self.min_scale, self.jitter = samples, image_size, seed, min_scale, jitter

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        from PIL import Image, ImageEnhance
        epoch, index = item
        path, label = self.samples[index]
        rng = seeded(self.seed, epoch, index, 2)
        crop = []

        def draft(W, H):  # the crop box is chosen from the header; decode at the smallest JPEG scale that
            crop.extend(sample_crop(rng, W, H, self.min_scale))  # leaves the crop >= image_size on both sides
            return max(1, W * self.size // crop[2]), max(1, H * self.size // crop[3])
        im, (W, H) = load_rgb(path, draft)
        if not crop:  # not a JPEG: draft() was not called
            crop.extend(sample_crop(rng, W, H, self.min_scale))
        x0, y0, w, h = crop
        flip = rng.random() < 0.5
        factors = rng.uniform(1 - self.jitter, 1 + self.jitter, size=3) if self.jitter > 0 else None
        order = rng.permutation(3)
        sx, sy = im.size[0] / W, im.size[1] / H
        box = (x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy)
        im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if factors is not None:  # ColorJitter: brightness, contrast, saturation in a random order, as torchvision
            enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
            for i in order:
                im = enhancers[i](im).enhance(float(factors[i]))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()), label


class EvalSet(torch.utils.data.Dataset):
    """Resize the short side to image_size / 0.875, center-crop image_size (the standard 224/256 ratio)."""

    def __init__(self, samples, image_size):
        self.samples, self.size = samples, image_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return eval_transform(path, self.size), label


def eval_transform(image, image_size):
    """Image file (or PIL image) -> uint8 [3, s, s]: short side to s / 0.875, center crop s. Shared with
    predict.py, so predictions see exactly the pixels the trainer evaluated."""
    from PIL import Image
    resize = int(image_size / 0.875)
    if isinstance(image, (str, os.PathLike)):
        im, _ = load_rgb(image, lambda W, H: (max(1, W * resize // min(W, H)), max(1, H * resize // min(W, H))))
    else:
        im = image.convert("RGB")
    W, H = im.size
    scale = resize / min(W, H)
    nw, nh = max(resize, round(W * scale)), max(resize, round(H * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    im = im.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


class EpochBatches(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of (epoch, index) for one epoch, starting at a given global batch.

    Global batch b of an epoch is order[b*G:(b+1)*G] with G = batch x world x accum; micro-batch m of rank r
    is the slice [(m*world + r)*batch : ... + batch] of it. The ragged end of the epoch is dropped.
    """

    def __init__(self, n, batch, world, rank, accum, seed):
        self.n, self.batch, self.world, self.rank, self.accum, self.seed = n, batch, world, rank, accum, seed
        self.global_batch = batch * world * accum
        self.steps = n // self.global_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        order = seeded(self.seed, self.epoch, 0).permutation(self.n)
        for step in range(self.start, self.steps):
            g = order[step * self.global_batch:(step + 1) * self.global_batch]
            for m in range(self.accum):
                lo = (m * self.world + self.rank) * self.batch
                yield [(self.epoch, int(i)) for i in g[lo:lo + self.batch]]


def article_train_set(root, image_size, jitter):
    """The founding article's pipeline, as the baseline: ImageFolder + PIL Compose, float tensors from workers."""
    import torchvision
    import torchvision.transforms as T
    tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ColorJitter(jitter, jitter, jitter),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=tf)


def make_loader(dataset, batch_sampler, workers, device):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def to_device_normalized(x_u8, device, channels_last):
    """uint8 stays uint8 until it reaches the device (4x less to copy), then normalise there."""
    x = x_u8.to(device, non_blocking=True).float()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ---------------------------------------------------------------------------------------------------
def build_schedule(opt, args, steps_per_epoch, peak_lr):
    total = args.epochs * steps_per_epoch
    warm = int(args.warmup_epochs * steps_per_epoch)
    if total < 3:
        raise UserError(f"the schedule has only {total} steps: use more --epochs or a smaller batch")
    if args.schedule == "onecycle":  # (warm-up >= 2 steps: OneCycleLR divides by the warm-up length)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak_lr, total_steps=total + 1,
                                                   pct_start=max(warm, 2) / (total + 1), div_factor=25.0,
                                                   final_div_factor=1e4, cycle_momentum=args.momentum > 0,
                                                   base_momentum=0.85, max_momentum=args.momentum)

    def factor(step):  # linear warm-up from ~0 (Goyal et al. 2017), then half-cosine to 0 (Loshchilov & Hutter 2016)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def rebuild_info(args, classes):
    return dict(arch=args.arch, num_classes=len(classes), stem="imagenet", classes=list(classes),
                mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), image_size=args.image_size, dataset="imagenet")


# Settings that fix the sequence of batches and LRs; a resumed run must use the same.
RESUME_MUST_MATCH = ("arch", "epochs", "seed", "lr", "warmup_epochs", "schedule", "image_size", "min_scale",
                     "color_jitter", "mixup", "cutmix", "ema", "label_smoothing")


# ---------------------------------------------------------------------------------------------------
# Evaluation: every val image exactly once over all ranks
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, samples, args, rank, world, device, amp_dtype):
    model.eval()
    mine = list(range(rank, len(samples), world))  # a strided split, no padding: each image on exactly one rank
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(EvalSet(samples, args.image_size), mine),
                                         batch_size=args.batch_size, num_workers=min(args.workers, 4),
                                         pin_memory=device.type == "cuda")
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    for x, y in loader:
        x, y = to_device_normalized(x, device, args.channels_last), y.to(device)
        with autocast(device, amp_dtype):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double().item()
        pred = logits.topk(min(5, logits.shape[1]), 1).indices
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y[:, None]).any(1).sum().item()
        n += len(y)
    loss_sum, top1, top5, n = all_sum([loss_sum, top1, top5, n], device)
    return dict(val_loss=loss_sum / max(n, 1), val_top1=100.0 * top1 / max(n, 1), val_top5=100.0 * top5 / max(n, 1),
                val_images=int(n))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def train_one_epoch(args, epoch, start_step, ddp, model, ema, opt, sched, scaler, loader, sampler, stop, rank, world,
                    device, amp_dtype, save_last, log, sums):
    """Runs until the epoch ends (returns None) or a signal arrives (returns the step it stopped after)."""
    ddp.train()
    steps = sampler.steps
    it = iter(loader)
    t_run = time.time()
    for step in range(start_step, steps):
        t0 = time.time()
        wait = 0.0
        opt.zero_grad(set_to_none=True)
        loss_acc = 0.0
        r = seeded(args.seed, epoch, step, 3)
        mix = None
        if args.mixup > 0 or args.cutmix > 0:
            kind = "mixup" if args.mixup > 0 and (args.cutmix == 0 or r.random() < 0.5) else "cutmix"
            alpha = args.mixup if kind == "mixup" else args.cutmix
            mix = (kind, float(r.beta(alpha, alpha)), r.integers(0, args.image_size, size=2))
        for m in range(args.grad_accum):
            tw = time.time()
            x_u8, y = next(it)
            wait += time.time() - tw
            x = to_device_normalized(x_u8, device, args.channels_last)
            y = y.to(device, non_blocking=True)
            x, lam = mix_batch(x, mix)
            sync = m == args.grad_accum - 1 or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            with ddp.no_sync() if not sync else contextlib.nullcontext():  # all-reduce once per step
                with autocast(device, amp_dtype):
                    logits = ddp(x)
                logits = logits.float()
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
                if lam < 1.0:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=args.label_smoothing)
                scaler.scale(loss / args.grad_accum).backward()
            loss_acc += loss.detach().float().item() / args.grad_accum
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            ema.update(model)
        # One small all-reduce per step: the global mean loss, and the stop vote. All ranks agree to stop at the
        # same step boundary, since a signal may reach only one of them.
        loss_sum, stop_votes = all_sum([loss_acc, 1.0 if stop else 0.0], device)
        stop_now, loss_acc = stop_votes > 0, loss_sum / world
        n_img = args.batch_size * args.grad_accum * world
        sums["loss"] += loss_acc * n_img
        sums["seen"] += n_img
        sums["time"] += time.time() - t0
        sums["wait"] += wait
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == steps):
            rate = sums["seen"] / max(sums["time"], 1e-9)
            eta = (time.time() - t_run) / max(done - start_step, 1) * ((args.epochs - epoch) * steps - done)
            log(f"epoch {epoch + 1}/{args.epochs} step {done}/{steps} loss {loss_acc:.4f} lr {sched.get_last_lr()[0]:.5f} "
                f"img/s {rate:.1f} data-wait {100 * sums['wait'] / max(sums['time'], 1e-9):.1f}% eta {fmt_time(eta)}")
        if stop_now and done < steps:
            save_last(epoch, done, sums)
            return done
        if args.save_every and done % args.save_every == 0 and done < steps:
            save_last(epoch, done, sums)
    return None


def average_bn_statistics(model, world):
    """Each rank's BN running statistics drift apart during an epoch (DDP syncs gradients, and re-broadcasts
    rank 0's buffers only at the next forward). Averaging them before evaluation and checkpointing makes every
    rank hold identical weights and statistics computed from all the data, as timm's distribute_bn does."""
    if world > 1:
        for b in model.buffers():
            if b.dtype.is_floating_point:
                dist.all_reduce(b)
                b.div_(world)


def weights_fingerprint(model, device):
    """(sum, sum of squares) of all weights in float64: compared across ranks to check they are in sync."""
    s = sum(p.detach().double().sum() for p in model.state_dict().values() if p.dtype.is_floating_point)
    q = sum(p.detach().double().pow(2).sum() for p in model.state_dict().values() if p.dtype.is_floating_point)
    t = torch.stack([s, q]).to(device)
    if not dist.is_initialized():
        return True
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def check_inputs(args):
    """Everything that can fail on bad input (data, checkpoint, batch size), done by every rank before any
    collective. Returns (classes, train samples, val samples, resume state or None, model to evaluate or None)."""
    global_batch = args.batch_size * int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum
    classes, train_samples, val_samples = check_data(args.data)
    resume = eval_model = None
    if args.evaluate:
        path = args.checkpoint or (os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume)
        try:
            ck = M.load_checkpoint(path)
            eval_model = M.model_from_checkpoint(ck, path=path)
        except M.CheckpointError as e:
            raise UserError(str(e)) from None
        if list(ck["classes"]) != list(classes):
            raise UserError(f"{path} was trained on other classes than {args.data}/val")
        args.image_size = int(ck.get("image_size", args.image_size))
    elif not args.benchmark_data:
        resume = load_resume(args, RESUME_MUST_MATCH, "imagenet_ddp.py",
                             also=[("global_batch", global_batch, "a global batch (batch-size x processes x grad-accum) of")])
    if not args.evaluate and not args.benchmark_data and len(train_samples) < global_batch:
        raise UserError(f"the global batch ({global_batch}) is larger than train/ ({len(train_samples)} images)")
    return classes, train_samples, val_samples, resume, eval_model


def run(args, inputs, rank, world, device):
    classes, train_samples, val_samples, resume, eval_model = inputs
    global_batch = args.batch_size * world * args.grad_accum
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    amp_dtype = pick_amp(args.amp, device)
    if args.benchmark_data:
        return benchmark_data(args, train_samples, device, log)
    if args.evaluate:
        eval_model = eval_model.to(device)
        if args.channels_last:
            eval_model = eval_model.to(memory_format=torch.channels_last)
        res = evaluate(eval_model, val_samples, args, rank, world, device, amp_dtype)
        log(json.dumps(res))
        return 0

    torch.manual_seed(args.seed)
    model = M.build_model(args.arch, len(classes), stem="imagenet", zero_init_residual=args.zero_init_residual).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sampler = EpochBatches(len(train_samples), args.batch_size, world, rank, args.grad_accum, args.seed)
    peak_lr = args.lr * global_batch / 256  # linear scaling rule (Goyal et al. 2017)
    opt = torch.optim.SGD(param_groups(model, args.wd), lr=peak_lr, momentum=args.momentum, nesterov=args.nesterov)
    sched = build_schedule(opt, args, sampler.steps, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = EMA(model, args.ema, copy_buffers=True) if args.ema > 0 else None
    start_epoch, start_step, best, sums0 = 0, 0, -1.0, None
    if resume is not None:
        restore_training_state(resume, model, opt, sched, scaler, ema)
        start_epoch, start_step, best, sums0 = resume["epoch"], resume["step"], resume["best_top1"], resume["epoch_sums"]
        log(f"resumed from {args.resume} at epoch {start_epoch + 1} step {start_step}")
    fwd = torch.compile(model) if args.compile else model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = fwd
    loader = make_loader(TrainSet(train_samples, args.image_size, args.seed, args.min_scale, args.color_jitter),
                         sampler, args.workers, device)
    info = rebuild_info(args, classes)
    metrics = Metrics(args.out, start_epoch if resume is not None else 0, args.tensorboard) if rank == 0 else None
    if rank == 0:
        log(f"data: {len(train_samples)} train / {len(val_samples)} val images, {len(classes)} classes; {world} process(es) "
            f"on {device}, amp {amp_dtype or 'fp32'}, global batch {global_batch}, peak lr {peak_lr:.4f}, "
            f"{sampler.steps} steps/epoch")

    def save_last(epoch, step, sums):
        if rank == 0:
            M.save_checkpoint(os.path.join(args.out, "last.pt"), **training_state(model, opt, sched, scaler, ema),
                              epoch=epoch, step=step, best_top1=best, epoch_sums=dict(sums), global_batch=global_batch,
                              world_size=world, args=vars(args), **info)
        if dist.is_initialized():  # nobody exits (and makes torchrun kill the rest) before the file is written
            dist.barrier()

    summary = {}
    with StopFlag((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)) as stop:
        for epoch in range(start_epoch, args.epochs):
            first = start_step if epoch == start_epoch else 0
            sums = dict(sums0) if epoch == start_epoch and sums0 else {"loss": 0.0, "seen": 0, "time": 0.0, "wait": 0.0}
            sampler.set_epoch(epoch, first)
            t_epoch = time.time()
            stopped = train_one_epoch(args, epoch, first, ddp, model, ema, opt, sched, scaler, loader, sampler, stop,
                                      rank, world, device, amp_dtype, save_last, log, sums)
            if stopped is not None:
                log(f"stopped by signal at epoch {epoch + 1} step {stopped}; saved {args.out}/last.pt, "
                    f"continue with --resume auto")
                return 128 + (stop.signum or signal.SIGTERM)
            average_bn_statistics(model, world)
            if ema is not None:
                ema.copy_buffers_from(model)
            res = evaluate(ema.module if ema else model, val_samples, args, rank, world, device, amp_dtype)
            row = dict(epoch=epoch + 1, lr=sched.get_last_lr()[0], train_loss=sums["loss"] / max(sums["seen"], 1),
                       train_img_per_s=sums["seen"] / max(sums["time"], 1e-9),
                       data_wait_pct=100.0 * sums["wait"] / max(sums["time"], 1e-9), **res, time_s=time.time() - t_epoch)
            if res["val_top1"] > best:
                best = res["val_top1"]
                if rank == 0:
                    M.save_checkpoint(os.path.join(args.out, "best.pt"), model=model.state_dict(),
                                      ema=ema.state_dict() if ema else None, epoch=epoch + 1, val_top1=best, **info)
            save_last(epoch + 1, 0, {})
            if rank == 0:
                metrics.write(row)
                log(f"epoch {epoch + 1}/{args.epochs} train_loss {row['train_loss']:.4f} val_top1 {row['val_top1']:.2f} "
                    f"val_top5 {row['val_top5']:.2f} val_images {row['val_images']} img/s {row['train_img_per_s']:.1f} "
                    f"data-wait {row['data_wait_pct']:.1f}% time {fmt_time(row['time_s'])}")
            summary = dict(row, best_val_top1=best)
            if all_sum([1.0 if stop else 0.0], device)[0] > 0 and epoch + 1 < args.epochs:
                log(f"stopped by signal after epoch {epoch + 1}; continue with --resume auto")
                return 128 + (stop.signum or signal.SIGTERM)
    in_sync = weights_fingerprint(model, device)
    if args.json and summary:
        log(json.dumps(dict(summary, world_size=world, weights_in_sync=in_sync)))
    return 0 if in_sync else 1


# ---------------------------------------------------------------------------------------------------
# Input pipeline benchmark
# ---------------------------------------------------------------------------------------------------
def benchmark_data(args, samples, device, log):
    sampler = EpochBatches(len(samples), args.batch_size, 1, 0, 1, args.seed)
    if args.pipeline == "article":
        ds = article_train_set(args.data, args.image_size, args.color_jitter)
        order = seeded(args.seed, 0, 0).permutation(len(samples))
        batches = [order[i:i + args.batch_size].tolist() for i in range(0, len(order) - args.batch_size + 1, args.batch_size)]
    else:
        ds = TrainSet(samples, args.image_size, args.seed, args.min_scale, args.color_jitter)
        batches = sampler
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    it = iter(loader)
    next(it)  # workers started and warm
    n_batches = min(args.benchmark_data, len(loader) - 1)
    t, images = time.time(), 0
    for _ in range(n_batches):
        x, y = next(it)
        images += len(y)
    secs = time.time() - t
    log(json.dumps(dict(pipeline=args.pipeline, images=images, seconds=round(secs, 3), image_size=args.image_size,
                        workers=args.workers, img_per_s=round(images / secs, 1),
                        img_per_s_per_worker=round(images / secs / max(args.workers, 1), 1))))
    return 0


def main(argv=None):
    def fail(msg):
        print(f"imagenet_ddp.py: error: {msg}", file=sys.stderr, flush=True)
        return 2

    args = error = None
    try:
        args = get_args(argv)
        inputs = check_inputs(args)
    except UserError as e:
        error = e
    if error is not None and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return fail(error)
    try:
        if error is not None:
            fail(error)
        # Bad input fails on every rank, but torchrun kills all workers as soon as one exits with an error, which
        # would cut the other ranks' error lines short. So a rank that failed prints first, then every rank votes
        # here: all error lines are out before anyone exits, and ranks whose own checks passed exit too.
        rank, world, device = setup_distributed(args.device if args else "cpu")
        failed = int(all_sum([0.0 if error is None else 1.0], device)[0])
        if failed:
            return 2 if error is not None else fail(f"{failed} of {world} ranks failed their start-up checks (see above)")
        return run(args, inputs, rank, world, device)
    except UserError as e:
        return fail(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
