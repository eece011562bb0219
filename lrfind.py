"""LR range test (Smith 2015, "Cyclical Learning Rates"): raise the learning rate step by step from tiny to huge,
watch the training loss, and read the One Cycle peak LR off the curve. Written by hand, no torch-lr-finder.
--verify then checks the reading: a short One Cycle run from each candidate, same init, same batches.

CPU (CIFAR-10 photos as a folder data set), then the check of its suggestion:
    python lrfind.py --dataset folder --data-dir data/cifar10-jpg --batch-size 128
    python lrfind.py --dataset folder --data-dir data/cifar10-jpg --batch-size 128 --verify 100
One GPU, CIFAR-100 / an ImageNet-style folder (Imagenette here, ImageNet the same way):
    python lrfind.py --dataset cifar100 --device cuda --verify 200
    python lrfind.py --dataset imagenet --data-dir data/imagenette-224 --image-size 128 --arch resnet50 \\
        --batch-size 64 --device cuda

It prints the suggested --lr as a ready command for cifar.py or imagenet_ddp.py, and writes OUT/lrfind.csv,
OUT/lrfind.json and (with matplotlib) OUT/lrfind.png. The model, optimizer state, BN statistics and RNG state are
restored after the sweep, and nothing on disk is modified except OUT.
"""
import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as F

import model as M

CIFAR = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
                    folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", labels="labels", names="label_names",
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
                     folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     labels="fine_labels", names="fine_label_names",
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}
RULES = ("edge", "edge_div3", "edge_div10", "min", "min_div3", "min_div10", "valley", "steepest")
# a third of the edge, one step back from where the loss starts to climb: in bench/README.md's comparison
# (lrfind_compare.py) it beat 0.1x and 10x of itself on every data set; the edge itself won once (c10-1800,
# batch 128): --verify tries both
DEFAULT_RULE = "edge_div3"


class UserError(Exception):
    """Bad flags, data or checkpoints: reported as one line, no traceback."""

    def __str__(self):  # (re-raised from a DataLoader worker, its text holds the worker's traceback: keep our line)
        text = super().__str__().strip()
        return text.splitlines()[-1].split("UserError: ", 1)[-1] if "\n" in text else text


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UserError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every flag's default, and the docstring's launch commands kept as written."""


def build_parser():
    p = Parser(description="LR range test: which --lr to give cifar.py or imagenet_ddp.py.",
               formatter_class=HelpFormatter, epilog="launch commands:\n" + __doc__.split("\n\n")[1])
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=["cifar100", "cifar10", "folder", "imagenet"],
                   help="as in cifar.py (32x32, CIFAR stem); imagenet = an ImageFolder root with train/ and val/, as "
                        "imagenet_ddp.py")
    g.add_argument("--data-dir", default="./data",
                   help="as in cifar.py, or the ImageFolder root with --dataset imagenet")
    g.add_argument("--imagenet", default=None, metavar="DIR", help="same as --dataset imagenet --data-dir DIR")
    g.add_argument("--image-size", type=int, default=224, help="training crop size with --dataset imagenet")
    g.add_argument("--workers", type=int, default=2, help="decoding threads (folder) or DataLoader workers (imagenet)")
    g.add_argument("--min-scale", type=float, default=0.08,
                   help="with --dataset imagenet: imagenet_ddp.py's --min-scale")
    g.add_argument("--color-jitter", type=float, default=0.4,
                   help="with --dataset imagenet: imagenet_ddp.py's --color-jitter")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=list(M.ARCHS), help="network")
    g.add_argument("--checkpoint", default=None, help="sweep from these weights instead of a fresh init")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="images per step (use the training batch size)")
    g.add_argument("--wd", type=float, default=5e-4, help="weight decay (not on BN and bias)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--start-lr", type=float, default=1e-5, help="first LR of the sweep")
    g.add_argument("--end-lr", type=float, default=10.0, help="last LR of the sweep")
    g.add_argument("--num-iter", type=int, default=100, help="sweep steps")
    g.add_argument("--mode", default="exp", choices=["exp", "linear"], help="LR spacing")
    g.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--smooth", type=int, default=0,
                   help="moving-average window of the loss in steps; 0 = 5%% of --num-iter (>= 3)")
    g.add_argument("--diverge", type=float, default=4.0, help="stop once the smoothed loss exceeds this x its minimum")
    g.add_argument("--suggest", default=DEFAULT_RULE, choices=RULES,
                   help="the rule whose LR is printed when --verify is off (bench/README.md: the measured comparison)")
    g.add_argument("--verify", type=int, default=0, metavar="N",
                   help="train N steps of One Cycle from each candidate LR (same init, same batches) and suggest "
                        "the one with the lowest validation loss")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast precision, as in the trainers")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, the order and the augmentation")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default: runs/lrfind-<dataset>-<arch>)")
    g.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.imagenet:
        args.dataset, args.data_dir = "imagenet", args.imagenet
    args.out = args.out or os.path.join("runs", f"lrfind-{args.dataset}-{args.arch}")
    args.smooth = args.smooth or max(3, round(args.num_iter * 0.05))
    checks = [(0 < args.start_lr < args.end_lr, "need 0 < --start-lr < --end-lr"),
              (args.num_iter >= 10, "--num-iter must be >= 10"),
              (args.batch_size >= 1 and args.accum >= 1, "--batch-size and --accum must be >= 1"),
              (args.smooth >= 1, "--smooth must be >= 1"), (args.diverge > 1, "--diverge must be > 1"),
              (args.wd >= 0, "--wd must be >= 0"),
              (args.verify == 0 or args.verify >= 10, "--verify needs >= 10 steps"),
              (args.image_size >= 16, "--image-size must be >= 16"), (args.workers >= 0, "--workers must be >= 0"),
              (0 < args.min_scale <= 1, "--min-scale must be in (0, 1]"),
              (args.color_jitter >= 0, "--color-jitter must be >= 0")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    # cifar.py's default augmentation, read by its batch_randomness() (mixing off: the sweep reads plain labels' loss)
    args.crop_pad, args.no_flip, args.cutout, args.mixup, args.cutmix = 4, False, 0, 0.0, 0.0
    return args


# ---------------------------------------------------------------------------------------------------
# Runtime helpers (the trainers carry their own copies: each script stands alone beside model.py)
# ---------------------------------------------------------------------------------------------------
def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN time its kernels once and keep the best
    return torch.device(name)


def pick_amp(amp, device):
    """Return the autocast dtype (None = fp32). bf16 needs no loss scaling; fp16 does (GradScaler)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        # Measured: bf16 autocast trains ~3x faster than fp32 on a CPU with AMX (Sapphire Rapids), and ~15x slower
        # than fp32 on one without native bf16 (AMD EPYC, AVX2 only), where it is emulated: those stay in fp32.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def param_groups(model, wd):
    """No weight decay on BN parameters and biases: decaying them only fights normalisation."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------
# Data: batches as a function of (seed, epoch, step), so every --verify candidate sees the same ones
# ---------------------------------------------------------------------------------------------------
def list_train_val(root, val_names):
    try:
        return M.list_train_val(root, val_names)
    except M.FolderError as e:
        raise UserError(str(e)) from None


def read_cifar(args):
    """The official archive (downloaded, md5-checked, when missing), as uint8 [N,3,32,32] + labels per split."""
    spec = CIFAR[args.dataset]
    folder = os.path.join(args.data_dir, spec["folder"])
    if not os.path.isdir(folder):
        import socket
        from torchvision.datasets.utils import download_and_extract_archive
        socket.setdefaulttimeout(15)
        try:
            download_and_extract_archive(spec["url"], args.data_dir, filename=spec["archive"], md5=spec["md5"])
        except Exception as e:
            raise UserError(f"cannot get {args.dataset} ({type(e).__name__}): download {spec['url']} and put "
                            f"{spec['archive']} in {os.path.abspath(args.data_dir)}/") from None
    splits = []
    for names in (spec["train"], spec["test"]):
        try:
            ds = [pickle.load(open(os.path.join(folder, n), "rb"), encoding="latin1") for n in names]
        except Exception as e:
            raise UserError(f"{folder} is not a complete CIFAR folder ({type(e).__name__}: {e})") from None
        x = np.concatenate([np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for d in ds])
        splits.append((torch.from_numpy(x), torch.tensor([l for d in ds for l in d[spec["labels"]]])))
    num_classes = 10 if args.dataset == "cifar10" else 100
    return splits, num_classes, spec["mean"], spec["std"]


def read_folder_32(args):
    """A folder data set as cifar.py stores it: every photo squashed to 32x32 (model.py's preprocessing)."""
    from concurrent.futures import ThreadPoolExecutor
    folders = list_train_val(args.data_dir, ("test", "val"))
    classes, train, val = folders["classes"], folders["train"], folders["val"]

    def decode(path):
        try:
            return M.eval_image(path, 32)
        except M.ImageError as e:
            raise UserError(str(e)) from None
    splits = []
    with ThreadPoolExecutor(max(1, args.workers)) as pool:  # PIL releases the GIL while decoding
        for samples in (train, val):
            x = torch.stack(list(pool.map(decode, [p for p, _ in samples])))
            splits.append((x, torch.tensor([label for _, label in samples])))
    x = splits[0][0].float().div_(255)  # the mean and std as cifar.py measures and rounds them
    mean = tuple(round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist())
    return splits, len(classes), mean, tuple(round(v, 4) for v in x.std(dim=(0, 2, 3)).tolist())


class TensorBatches:
    """32x32 data held in memory: batch `step` of `epoch` is cifar.py's, the same images cropped and flipped the same
    way (its epoch_order, batch_randomness and augment, carried here). Restartable: a new call replays the sequence."""

    def __init__(self, x, y, mean, std, args, device):
        self.x, self.y, self.mean, self.std = x.to(device), y.to(device), mean, std
        self.args, self.batch_size, self.device = args, args.batch_size, device

    def __call__(self):
        epoch, args = 0, self.args
        while True:
            order = epoch_order(args.seed, epoch, len(self.y)).to(self.device)
            for step in range(len(self.y) // self.batch_size):
                idx = order[step * self.batch_size:(step + 1) * self.batch_size]
                r = batch_randomness(args, epoch, step, self.batch_size)
                yield augment(self.x[idx], r, self.mean, self.std, args.crop_pad, args.cutout, True), self.y[idx]
            epoch += 1

    def evaluation(self, limit):
        """The first `limit` images, in fixed batches of 250, unaugmented."""
        n = min(limit, len(self.y))
        for i in range(0, n, 250):
            j = min(i + 250, n)
            yield M.normalize(self.x[i:j], self.mean, self.std, channels_last=True), self.y[i:j]


class ImageNetItems(torch.utils.data.Dataset):
    """ImageNet-style training items (epoch, index) -> imagenet_ddp.py's pixels for them (its augmented_photo, carried
    here: RandomResizedCrop, flip, colour jitter drawn from (seed, epoch, index));
    evaluation items: model.py's resize + center crop."""

    def __init__(self, samples, args, train):
        self.samples, self.args, self.size, self.train = samples, args, args.image_size, train

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        epoch, index = item
        path, label = self.samples[index]
        try:
            if not self.train:
                return M.eval_image(path, self.size, int(self.size / M.CROP_RATIO)), label
            return augmented_photo(self.args, epoch, index, path, self.size), label
        except M.ImageError as e:
            raise UserError(str(e)) from None


class LoaderBatches:
    """ImageNet-style folders through a DataLoader; restartable like TensorBatches."""

    def __init__(self, samples, args, device, train=True):
        self.items = ImageNetItems(samples, args, train)
        self.batch_size, self.seed, self.workers, self.device = args.batch_size, args.seed, args.workers, device

    def _loader(self, batches):
        return torch.utils.data.DataLoader(self.items, batch_sampler=batches, num_workers=self.workers,
                                           pin_memory=self.device.type == "cuda")

    def _to_device(self, x, y):
        return M.normalize(x.to(self.device), M.IMAGENET_MEAN, M.IMAGENET_STD, channels_last=True), y.to(self.device)

    def __call__(self):
        epoch = 0
        while True:
            order = M.seeded(self.seed, epoch, M.Stream.ORDER).permutation(len(self.items))
            steps = len(order) // self.batch_size
            b = self.batch_size
            batches = [[(epoch, int(i)) for i in order[s * b:(s + 1) * b]] for s in range(steps)]
            for x, y in self._loader(batches):
                yield self._to_device(x, y)
            epoch += 1

    def evaluation(self, limit):
        idx = list(range(min(limit, len(self.items))))
        for x, y in self._loader([[(0, i) for i in idx[j:j + 100]] for j in range(0, len(idx), 100)]):
            yield self._to_device(x, y)


def make_batches(args, device):
    """(training batch source, validation batch source, number of classes, stem)."""
    if args.dataset == "imagenet":
        folders = list_train_val(args.data_dir, ("val",))
        classes, train, val = folders["classes"], folders["train"], folders["val"]
        if len(train) < args.batch_size:
            raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train)} images)")
        val = [val[i] for i in M.seeded(args.seed, M.Stream.HOLDOUT).permutation(len(val))]  # class-mixed, for --verify
        val_batches = LoaderBatches(val, args, device, train=False)
        return LoaderBatches(train, args, device), val_batches, len(classes), "imagenet"
    read = read_cifar if args.dataset != "folder" else read_folder_32
    ((x_tr, y_tr), (x_va, y_va)), num_classes, mean, std = read(args)
    if len(y_tr) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(y_tr)} images)")
    keep = torch.from_numpy(M.seeded(args.seed, M.Stream.HOLDOUT).permutation(len(y_va)))
    val = TensorBatches(x_va[keep], y_va[keep], mean, std, args, device)
    return TensorBatches(x_tr, y_tr, mean, std, args, device), val, num_classes, "cifar"


def build_model(args, num_classes, stem, device):
    if args.checkpoint:
        try:
            ck = M.load_checkpoint(args.checkpoint)
            net = M.model_from_checkpoint(ck, prefer_ema=False, path=args.checkpoint)
        except M.CheckpointError as e:
            raise UserError(str(e)) from None
        if ck["num_classes"] != num_classes or ck["stem"] != stem:
            raise UserError(f"{args.checkpoint} is a {ck['num_classes']}-class {ck['stem']}-stem model; this data "
                            f"needs {num_classes} classes and the {stem} stem")
    else:
        torch.manual_seed(args.seed)
        net = M.build_model(args.arch, num_classes, stem=stem)
    net = net.to(device).to(memory_format=torch.channels_last)
    return M.use_matmul_conv(net) if stem == "cifar" else net  # each trainer's arithmetic: cifar.py's --matmul-conv


# ---------------------------------------------------------------------------------------------------
# The sweep, usable on any model / optimizer / batch source
# ---------------------------------------------------------------------------------------------------
def lr_schedule(start, end, n, mode):
    if mode == "exp":
        return [start * (end / start) ** (i / (n - 1)) for i in range(n)]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def trailing_mean(values, window):
    """The mean of the last `window` values: the causal smoothing the stop rule can use while the sweep runs."""
    tail = values[-window:]
    return sum(tail) / len(tail)


def centred_mean(values, window):
    """A moving average centred on each point (shorter at the ends): smoothing without lag. An exponential average
    (fastai's and torch-lr-finder's beta=0.98) trails the raw loss by up to ~50 steps, which on a 100-step sweep over
    several decades moves the features of the curve to larger LRs: the minimum of a real sweep (bench/README.md) 4x
    too high."""
    v, half = np.asarray(values, dtype=float), window // 2
    return np.array([np.mean(v[max(0, i - half):i + half + 1]) for i in range(len(v))])


@dataclasses.dataclass
class Sweep:
    """How the range test trains and when it stops."""
    accum: int = 1  # micro-batches per step
    smooth: int = 5  # moving-average window of the loss, in steps
    diverge: float = 4.0  # stop once the smoothed loss exceeds this x its minimum
    device: torch.device = torch.device("cpu")
    amp_dtype: object = None  # autocast dtype, None = fp32
    loss_fn: object = F.cross_entropy


def lr_range_test(model, optimizer, next_batch, lrs, how=Sweep()):
    """Train one step per LR in lrs; returns (records [(lr, loss)], the lr at which the loss diverged or None).

    Stops once the trailing mean of the last `how.smooth` losses exceeds how.diverge x the lowest such mean (or is not
    finite). Everything the sweep touches is restored afterwards: weights, BN buffers, optimizer state, LRs and the
    torch RNG."""
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    saved_rng = torch.get_rng_state()
    scaler = torch.amp.GradScaler(how.device.type, enabled=how.amp_dtype == torch.float16)
    records, losses, best, stopped = [], [], math.inf, None
    was_training = model.training
    model.train()
    try:
        for lr in lrs:
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(how.accum):
                x, y = next_batch()
                with autocast(how.device, how.amp_dtype):
                    out = model(x)
                loss = how.loss_fn(out.float(), y)
                scaler.scale(loss / how.accum).backward()
                loss_sum += loss.item() / how.accum
            scaler.step(optimizer)
            scaler.update()
            records.append((lr, loss_sum))
            losses.append(loss_sum)
            recent = trailing_mean(losses, how.smooth)
            if not math.isfinite(recent) or (len(losses) >= how.smooth and recent > how.diverge * best):
                stopped = lr
                break
            if len(losses) >= how.smooth:
                best = min(best, recent)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        torch.set_rng_state(saved_rng)
        model.train(was_training)
    return records, stopped


def suggestions(records, smooth, skip_start=0.1, rise=0.1):
    """Candidate peak LRs, read off the lag-free smoothed curve without its first 10% (a noisy start):
    - edge: the last LR before the loss climbs `rise` (10%) above its lowest value so far, where training starts to
      fail; Smith (2015) takes that point as the top of the cycle. edge/3 and edge/10 step back from it.
    - min: the lowest loss, and min/3, min/10 (fastai's old advice). On a short sweep from a fresh network the loss is
      often nearly flat until the edge, and then its minimum is noise anywhere on the plateau.
    - valley (fastai's default) and steepest descent look only up to the minimum: past it the loss is diverging, and
      a short dip while it thrashes at a huge LR is no descent."""
    lrs = np.array([r[0] for r in records])
    sm = centred_mean([r[1] for r in records], smooth)
    n = len(sm)
    lrs, sm = lrs[int(n * skip_start):], sm[int(n * skip_start):]
    finite = np.isfinite(sm)
    lrs, sm = lrs[finite], sm[finite]
    if len(sm) < 3:
        raise UserError(f"the sweep stopped after {n} steps, too early to suggest anything: lower --start-lr or raise "
                        f"--diverge")
    climbed = np.nonzero(sm > np.minimum.accumulate(sm) * (1 + rise))[0]
    edge = float(lrs[climbed[0] - 1] if len(climbed) else lrs[-1])
    best = int(np.argmin(sm))
    loss_min = float(lrs[best])
    lrs, sm = lrs[:max(best + 1, 3)], sm[:max(best + 1, 3)]
    steepest = float(lrs[int(np.argmin(np.gradient(sm, np.log10(lrs))))])
    # valley: the longest stretch over which the loss keeps falling (longest decreasing subsequence), and the
    # LR halfway along it: far enough down the slope to train fast, well before the minimum where it blows up.
    length = np.ones(len(sm), dtype=int)
    for i in range(1, len(sm)):
        earlier = length[:i][sm[:i] > sm[i]]
        length[i] = 1 + (earlier.max() if len(earlier) else 0)
    end = int(np.argmax(length))
    start = end - int(length[end]) + 1
    return dict(edge=edge, edge_div3=edge / 3, edge_div10=edge / 10, min=loss_min, min_div3=loss_min / 3,
                min_div10=loss_min / 10, valley=float(lrs[start + (end - start) // 2]), steepest=steepest)


# ---------------------------------------------------------------------------------------------------
# --verify: short One Cycle runs from each candidate
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(net, val_batches, device, amp_dtype, limit=2000):
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in val_batches.evaluation(limit):
        with autocast(device, amp_dtype):
            logits = net(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, 100.0 * correct / n


def short_one_cycle(net, train_batches, lr, steps, args, device, amp_dtype):
    """cifar.py's One Cycle (25% warm-up from lr/25, cosine down to lr/25e4, momentum --momentum -> 0.85 -> back), in
    `steps` steps, from the given weights, on the batch sequence from its start."""
    opt = torch.optim.SGD(param_groups(net, args.wd), lr=lr, momentum=args.momentum)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25,
                                                cycle_momentum=args.momentum > 0, base_momentum=0.85,
                                                max_momentum=args.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net.train()
    batches = train_batches()
    for _ in range(steps):
        for _ in range(args.accum):
            x, y = next(batches)
            with autocast(device, amp_dtype):
                loss = F.cross_entropy(net(x).float(), y)
            scaler.scale(loss / args.accum).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()


def verify(net, train_batches, val_batches, candidates, args, device, amp_dtype):
    """Each candidate (rule, lr) trains args.verify steps from the same weights on the same batches; returns the
    candidates with their validation loss and top-1, best first. The network's weights are restored afterwards."""
    init = copy.deepcopy(net.state_dict())
    results = []
    for rule, lr in candidates:
        net.load_state_dict(init)
        short_one_cycle(net, train_batches, lr, args.verify, args, device, amp_dtype)
        loss, top1 = validation_loss(net, val_batches, device, amp_dtype)
        results.append(dict(rule=rule, lr=lr, val_loss=loss if math.isfinite(loss) else float("inf"), val_top1=top1))
        print(f"verify: {rule} lr {lr:.3g}: validation loss {loss:.4f}, top-1 {top1:.2f}% after {args.verify} steps",
              flush=True)
    net.load_state_dict(init)
    return sorted(results, key=lambda r: r["val_loss"])


VERIFIED_RULES = ("edge", "edge_div3", "edge_div10", "min")  # (valley and steepest land far below: they never win)


def candidate_lrs(sug):
    """The distinct candidates --verify tries (within 10% of each other counts as the same), smallest first."""
    out = []
    for rule, lr in sorted(((r, sug[r]) for r in VERIFIED_RULES), key=lambda t: t[1]):
        if not out or lr > out[-1][1] * 1.1:
            out.append((rule, lr))
    return out


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
def write_outputs(out, records, result, smooth):
    os.makedirs(out, exist_ok=True)
    sm = centred_mean([r[1] for r in records], smooth)
    with open(os.path.join(out, "lrfind.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed"])
        w.writerows((lr, loss, s) for (lr, loss), s in zip(records, sm))
    with open(os.path.join(out, "lrfind.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no lrfind.png", flush=True)
        return
    lrs, losses = zip(*records)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(lrs, losses, color="0.8", lw=1, label="loss")
    ax.plot(lrs, sm, color="C0", lw=2, label=f"smoothed ({smooth}-step centred mean)")
    for key, color, style in (("edge", "C3", "--"), ("edge_div3", "C1", "--"), ("edge_div10", "C5", "--"),
                              ("min", "C6", ":"), ("min_div3", "C7", ":"), ("min_div10", "C8", ":"),
                              ("valley", "C4", "-."), ("steepest", "C2", "-.")):
        ax.axvline(result[key], color=color, ls=style, lw=1, label=f"{key} {result[key]:.2g}")
    ax.axvline(result["suggested_lr"], color="k", lw=2.5, alpha=0.6,
               label=f"chosen {result['suggested_lr']:.2g} ({result['suggested_by']})")
    finite = [s for s in sm if math.isfinite(s)]
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title="LR range test" + ("" if result["diverged"] else " (never diverged: raise --end-lr)"),
           ylim=(min(finite) * 0.9, min(max(finite), 3 * min(finite)) * 1.1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lrfind.png"), dpi=110)
    plt.close(fig)


def next_command(args, lr):
    if args.dataset == "imagenet":
        per_256 = lr * 256 / args.batch_size  # imagenet_ddp.py's --lr is per 256 images, scaled by the global batch
        return (f"python imagenet_ddp.py --data {args.data_dir} --arch {args.arch} --image-size {args.image_size} "
                f"--batch-size {args.batch_size} --lr {per_256:.3g} --schedule onecycle"
                f"  # --lr is per 256 images there")
    data = "" if args.dataset == "cifar100" else f" --dataset {args.dataset}"
    data += "" if args.data_dir == "./data" else f" --data-dir {args.data_dir}"
    return f"python cifar.py{data} --arch {args.arch} --batch-size {args.batch_size} --wd {args.wd:g} --lr {lr:.3g}"


def choose(args, sug, net, batches, device, amp_dtype):
    """The suggestion: the verified winner with --verify, else the --suggest rule. Returns the result's fields."""
    if not args.verify:
        return dict(suggested_lr=sug[args.suggest], suggested_by=args.suggest, verified=False)
    results = verify(net, batches[0], batches[1], candidate_lrs(sug), args, device, amp_dtype)
    return dict(suggested_lr=results[0]["lr"], suggested_by=f"verify ({results[0]['rule']})", verified=True,
                verify_steps=args.verify, verify_steps_total=args.verify * len(results), verify=results)


def run(args):
    device = pick_device(args.device)
    amp_dtype = pick_amp(args.amp, device)
    train_batches, val_batches, num_classes, stem = make_batches(args, device)
    net = build_model(args, num_classes, stem, device)
    opt = torch.optim.SGD(param_groups(net, args.wd), lr=args.start_lr, momentum=args.momentum)
    batch_iter = train_batches()
    how = Sweep(accum=args.accum, smooth=args.smooth, diverge=args.diverge, device=device, amp_dtype=amp_dtype)
    records, stopped = lr_range_test(net, opt, lambda: next(batch_iter),
                                     lr_schedule(args.start_lr, args.end_lr, args.num_iter, args.mode), how)
    sug = suggestions(records, args.smooth)
    result = dict(choose(args, sug, net, (train_batches, val_batches), device, amp_dtype), **sug,
                  diverged=stopped is not None, stopped_at=stopped, steps=len(records), smooth=args.smooth)
    write_outputs(args.out, records, result, args.smooth)
    print(f"swept {len(records)} steps, " + (f"the loss diverged at lr {stopped:.3g}" if stopped else
          f"the loss never diverged up to lr {args.end_lr:g}: the curve may be incomplete (raise --end-lr)") +
          "; suggestions: " + ", ".join(f"{k} {sug[k]:.3g}" for k in RULES), flush=True)
    note = "" if result["verified"] else " (unverified: --verify 100 checks it with short runs from each candidate)"
    print(f"suggested One Cycle peak LR: {result['suggested_lr']:.3g}, by {result['suggested_by']}{note}; next:\n"
          f"    {next_command(args, result['suggested_lr'])}", flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# The trainers' augmentation, carried byte for byte (test_layout.py checks): cifar.py's, then imagenet_ddp.py's
# ---------------------------------------------------------------------------------------------------
def epoch_order(seed, epoch, n):
    return torch.from_numpy(M.seeded(seed, epoch, M.Stream.ORDER).permutation(n))


def batch_randomness(args, epoch, step, batch_size):
    """Everything random about one training batch, from (seed, epoch, step) alone."""
    rng = M.seeded(args.seed, epoch, step, M.Stream.BATCH)
    r = {"shift": rng.integers(0, 2 * args.crop_pad + 1, size=(batch_size, 2)),
         "flip": rng.random(batch_size) < (0.0 if args.no_flip else 0.5),
         "cut_center": rng.integers(0, 32, size=(batch_size, 2)), "mix": None}
    use_mixup, use_cutmix = args.mixup > 0, args.cutmix > 0
    if use_mixup and use_cutmix:  # one of them per batch, as timm does
        use_mixup, use_cutmix = (True, False) if rng.random() < 0.5 else (False, True)
    if use_mixup:
        r["mix"] = ("mixup", float(rng.beta(args.mixup, args.mixup)), None)
    elif use_cutmix:
        lam = float(rng.beta(args.cutmix, args.cutmix))
        r["mix"] = ("cutmix", lam, rng.integers(0, 32, size=2))
    return r


def augment(x_u8, r, mean, std, pad, cutout, channels_last):
    """uint8 [B,3,H,W] -> normalised float [B,3,H,W]: random crop (zero padding), flip, CutOut."""
    B, C, H, W = x_u8.shape
    dev = x_u8.device
    as_dev = lambda a: torch.as_tensor(a, device=dev)
    if pad > 0:
        xp = F.pad(x_u8, (pad, pad, pad, pad))
        shift = as_dev(r["shift"])
        rows = (shift[:, 0:1] + torch.arange(H, device=dev))[:, None, :, None]
        cols = (shift[:, 1:2] + torch.arange(W, device=dev))[:, None, None, :]
        images = torch.arange(B, device=dev)[:, None, None, None]
        x_u8 = xp[images, torch.arange(C, device=dev)[None, :, None, None], rows, cols]
    x_u8 = torch.where(as_dev(r["flip"])[:, None, None, None], x_u8.flip(3), x_u8)
    x = M.normalize(x_u8, mean, std, channels_last)
    if cutout > 0:
        # CutOut (DeVries & Taylor 2017): zero a square after normalisation (0 = the mean colour); the square
        # may hang over the border, as in the paper.
        center = as_dev(r["cut_center"])
        cy, cx = center[:, 0, None, None, None], center[:, 1, None, None, None]
        yy = torch.arange(H, device=dev)[None, None, :, None]
        xx = torch.arange(W, device=dev)[None, None, None, :]
        y0, x0 = cy - cutout // 2, cx - cutout // 2
        hole = (yy >= y0) & (yy < y0 + cutout) & (xx >= x0) & (xx < x0 + cutout)
        x = x.masked_fill(hole, 0.0)
    return x


def draw_augmentation(args, epoch, index, width, height):
    """Everything random about training photo `index` of `epoch` (a width x height photo), from (seed, epoch, index):
    RandomResizedCrop's box (Szegedy et al. 2015, as torchvision draws it: area fraction U(min_scale, 1), log-uniform
    aspect ratio in [3/4, 4/3], 10 tries, else a center crop clamped to that range) as (x0, y0, w, h), the flip, and
    ColorJitter's brightness/contrast/saturation factors (None without jitter) with their order."""
    rng, ratio = M.seeded(args.seed, epoch, index, M.Stream.IMAGE), (3 / 4, 4 / 3)
    for _ in range(10):
        target = width * height * rng.uniform(args.min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
            break
    else:
        w, h = width, height
        if width / height < ratio[0]:
            h = int(round(width / ratio[0]))
        elif width / height > ratio[1]:
            w = int(round(height * ratio[1]))
        box = (width - w) // 2, (height - h) // 2, w, h
    j = args.color_jitter
    flip, factors = bool(rng.random() < 0.5), rng.uniform(1 - j, 1 + j, size=3) if j > 0 else None
    return {"box": box, "flip": flip, "factors": factors, "order": rng.permutation(3)}


def augmented_photo(args, epoch, index, path, size):
    """uint8 [3, size, size]: the photo decoded, its drawn box cropped and resized to size x size, flipped, and
    colour-jittered (brightness, contrast, saturation in a random order, as torchvision's ColorJitter)."""
    from PIL import Image, ImageEnhance
    d = []

    def smallest_size(W, H):  # the crop is drawn from the header; decode at the smallest JPEG scale that
        d.append(draw_augmentation(args, epoch, index, W, H))  # keeps the crop >= size on both sides
        return max(1, W * size // d[0]["box"][2]), max(1, H * size // d[0]["box"][3])
    im, (W, H) = M.open_rgb(path, smallest_size)  # (M.ImageError: the caller replaces or names the photo)
    d = d[0] if d else draw_augmentation(args, epoch, index, W, H)  # not a JPEG: smallest_size() was not called
    x0, y0, w, h = d["box"]
    sx, sy = im.size[0] / W, im.size[1] / H
    im = im.resize((size, size), Image.BILINEAR, box=(x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy))
    if d["flip"]:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if d["factors"] is not None:
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for i in d["order"]:
            im = enhancers[i](im).enhance(float(d["factors"][i]))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


def main(argv=None):
    try:
        return run(get_args(argv))
    except UserError as e:
        print(f"lrfind.py: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
