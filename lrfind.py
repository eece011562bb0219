"""LR range test (Smith 2015, "Cyclical Learning Rates"): sweep the learning rate upward for a short while,
watch the loss, and pick the One Cycle max LR from the curve. Written by hand, no torch-lr-finder.

CPU (CIFAR-10 photos as a folder data set):
    python lrfind.py --dataset folder --data-dir data/cifar10-jpg --num-iter 100
One GPU, CIFAR-100 / an ImageNet folder:
    python lrfind.py --dataset cifar100 --device cuda
    python lrfind.py --imagenet /data/imagenet --arch resnet50 --batch-size 256 --device cuda

It prints the suggested --lr as a ready command, writes OUT/lrfind.csv, OUT/lrfind.json and (with
matplotlib) OUT/lrfind.png. The model, optimizer state, BN statistics and RNG state are restored after the
sweep, and nothing on disk is modified except OUT.
"""
import argparse
import copy
import csv
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import model as M
import cifar
from cifar import Parser, UserError, autocast, param_groups, pick_amp, pick_device, use_matmul_conv


def get_args(argv=None):
    p = Parser(description="LR range test: which --lr to give cifar.py or imagenet_ddp.py.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data (as in cifar.py), or an ImageNet folder
    p.add_argument("--dataset", default="cifar100", choices=["cifar100", "cifar10", "folder"], help="as in cifar.py")
    p.add_argument("--data-dir", default="./data", help="as in cifar.py")
    p.add_argument("--imagenet", default=None, metavar="DIR", help="sweep on an ImageFolder root with ImageNet transforms instead")
    p.add_argument("--image-size", type=int, default=224, help="crop size with --imagenet")
    p.add_argument("--workers", type=int, default=2, help="decode threads (folder) or DataLoader workers (--imagenet)")
    # model
    p.add_argument("--arch", default="resnet18", choices=list(M.ARCHS), help="network (CIFAR stem unless --imagenet)")
    p.add_argument("--checkpoint", default=None, help="sweep from these weights instead of a fresh init")
    # optimisation
    p.add_argument("--batch-size", type=int, default=128, help="images per step (use the training batch size)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (not on BN and bias)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--start-lr", type=float, default=1e-7, help="first LR of the sweep")
    p.add_argument("--end-lr", type=float, default=10.0, help="last LR of the sweep")
    p.add_argument("--num-iter", type=int, default=100, help="sweep steps")
    p.add_argument("--mode", default="exp", choices=["exp", "linear"], help="LR spacing")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--beta", type=float, default=0.98, help="EMA smoothing of the loss (bias-corrected)")
    p.add_argument("--diverge", type=float, default=4.0, help="stop once the smoothed loss exceeds this x its minimum")
    p.add_argument("--suggest", default="min", choices=["min", "valley", "steepest", "min_div10"],
                   help="which suggestion becomes suggested_lr (see README: 'min' measured best for One Cycle here)")
    # runtime
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast precision, as in the trainers")
    p.add_argument("--seed", type=int, default=0, help="seed for init, order and augmentation")
    # output
    p.add_argument("--out", default=None, help="output folder (default runs/lrfind-<dataset>-<arch>)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    name = "imagenet" if args.imagenet else args.dataset
    args.out = args.out or os.path.join("runs", f"lrfind-{name}-{args.arch}")
    checks = [(0 < args.start_lr < args.end_lr, "need 0 < --start-lr < --end-lr"), (args.num_iter >= 10, "--num-iter must be >= 10"),
              (args.batch_size >= 1 and args.accum >= 1, "--batch-size and --accum must be >= 1"),
              (0 <= args.beta < 1, "--beta must be in [0, 1)"), (args.diverge > 1, "--diverge must be > 1"),
              (args.wd >= 0, "--wd must be >= 0")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return args


# ---------------------------------------------------------------------------------------------------
# The sweep, usable on any model / optimizer / batch source
# ---------------------------------------------------------------------------------------------------
def lr_schedule(start, end, n, mode):
    if mode == "exp":
        return [start * (end / start) ** (i / (n - 1)) for i in range(n)]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def lr_range_test(model, optimizer, next_batch, lrs, loss_fn=F.cross_entropy, accum=1, beta=0.98, diverge=4.0,
                  device=torch.device("cpu"), amp_dtype=None):
    """Train one step per LR in lrs; returns (records [(lr, loss, smoothed)], lr at which it stopped or None).

    Everything the sweep touches is restored afterwards: weights, BN buffers, optimizer state, LRs and the
    torch RNG. The smoothed loss is an exponential moving average with bias correction (as in Adam), so
    the first points are not dragged towards zero."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_rng = torch.get_rng_state()
    saved_cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    records, avg, best, stopped = [], 0.0, math.inf, None
    was_training = model.training
    model.train()
    try:
        for i, lr in enumerate(lrs):
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(accum):
                x, y = next_batch()
                with autocast(device, amp_dtype):
                    out = model(x)
                loss = loss_fn(out.float(), y)
                scaler.scale(loss / accum).backward()
                loss_sum += loss.item() / accum
            scaler.step(optimizer)
            scaler.update()
            avg = beta * avg + (1 - beta) * loss_sum
            smoothed = avg / (1 - beta ** (i + 1))
            records.append((lr, loss_sum, smoothed))
            if not math.isfinite(smoothed) or (i > 0 and smoothed > diverge * best):
                stopped = lr
                break
            best = min(best, smoothed)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        torch.set_rng_state(saved_rng)
        if saved_cuda_rng is not None:
            torch.cuda.set_rng_state_all(saved_cuda_rng)
        model.train(was_training)
    return records, stopped


def suggestions(records, skip_start=0.1, skip_end=0.05):
    """valley (fastai's default), steepest descent of the smoothed loss against log LR, and min/10.

    Computed on the curve without its first 10% (noisy start) and last 5% (blow-up) of points, and, for
    valley and steepest, only up to the lowest smoothed loss: past it the loss is diverging, and a short dip
    while it thrashes at a huge LR must not count as a descent."""
    lrs = np.array([r[0] for r in records])
    sm = np.array([r[2] for r in records])
    n = len(sm)
    lo, hi = int(n * skip_start), n - max(1, int(n * skip_end))
    lrs, sm = lrs[lo:hi], sm[lo:hi]
    finite = np.isfinite(sm)
    lrs, sm = lrs[finite], sm[finite]
    if len(sm) < 3:
        raise UserError(f"the sweep stopped after {n} steps, too early to suggest anything: lower --start-lr or raise --diverge")
    best = int(np.argmin(sm))
    min_div10 = float(lrs[best] / 10)
    lrs, sm = lrs[:best + 1], sm[:best + 1]
    if len(sm) < 3:
        raise UserError("the loss never fell during the sweep: lower --start-lr, or check the data and model")
    steepest = float(lrs[int(np.argmin(np.gradient(sm, np.log10(lrs))))])
    loss_min = float(lrs[-1])  # where the smoothed loss stops falling: the top of a One Cycle (Smith & Topin 2017)
    # valley: the longest stretch over which the loss keeps falling (longest decreasing subsequence), and the
    # LR halfway along it: far enough down the slope to train fast, well before the minimum where it blows up.
    length = np.ones(len(sm), dtype=int)
    for i in range(1, len(sm)):
        for j in range(i):
            if sm[i] < sm[j] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
    end = int(np.argmax(length))
    start = end - int(length[end]) + 1
    valley = float(lrs[start + (end - start) // 2])
    return dict(min=loss_min, valley=valley, steepest=steepest, min_div10=min_div10)


# ---------------------------------------------------------------------------------------------------
# Data and model, borrowed from the trainers
# ---------------------------------------------------------------------------------------------------
def cifar_batches(args, device):
    x_tr, y_tr, _, _, classes, mean, std = cifar.load_data(args)
    if len(y_tr) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(y_tr)} images)")
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    aug = cifar.get_args(["--out", "unused"])  # the trainer's default augmentation: crop + flip
    steps = len(y_tr) // args.batch_size
    state = {"epoch": 0, "step": 0, "order": cifar.epoch_order(args.seed, 0, len(y_tr)).to(device)}

    def next_batch():
        if state["step"] == steps:  # ran out: next epoch, new order
            state["epoch"] += 1
            state["step"] = 0
            state["order"] = cifar.epoch_order(args.seed, state["epoch"], len(y_tr)).to(device)
        s = state["step"]
        idx = state["order"][s * args.batch_size:(s + 1) * args.batch_size]
        r = cifar.batch_randomness(aug, args.seed, state["epoch"], s, args.batch_size)
        state["step"] += 1
        return cifar.augment(x_tr[idx], r, mean, std, aug.crop_pad, 0, True), y_tr[idx]
    return next_batch, len(classes), "cifar"


def imagenet_batches(args, device):
    import imagenet_ddp as I
    classes, train, _ = I.check_data(args.imagenet)
    ds = I.TrainSet(train, args.image_size, args.seed, 0.08, 0.4)
    sampler = I.EpochBatches(len(train), args.batch_size, 1, 0, 1, args.seed)
    if sampler.steps == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train)} images)")
    loader = I.make_loader(ds, sampler, args.workers, device)
    state = {"epoch": 0, "it": iter(loader)}

    def next_batch():
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            sampler.set_epoch(state["epoch"])
            state["it"] = iter(loader)
            x, y = next(state["it"])
        return I.to_device_normalized(x, device, True), y.to(device)
    return next_batch, len(classes), "imagenet"


def build(args, num_classes, stem, device):
    if args.checkpoint:
        try:
            ck = M.load_checkpoint(args.checkpoint)
            net = M.model_from_checkpoint(ck, prefer_ema=False, path=args.checkpoint)
        except M.CheckpointError as e:
            raise UserError(str(e)) from None
        if ck["num_classes"] != num_classes or ck["stem"] != stem:
            raise UserError(f"{args.checkpoint} is a {ck['num_classes']}-class {ck['stem']}-stem model; this data needs "
                            f"{num_classes} classes and the {stem} stem")
    else:
        torch.manual_seed(args.seed)
        net = M.build_model(args.arch, num_classes, stem=stem)
    net = use_matmul_conv(net.to(device).to(memory_format=torch.channels_last))  # same arithmetic as cifar.py
    opt = torch.optim.SGD(param_groups(net, args.wd), lr=args.start_lr, momentum=args.momentum)
    return net, opt


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
def write_outputs(out, records, result):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lrfind.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed"])
        w.writerows(records)
    with open(os.path.join(out, "lrfind.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no lrfind.png", flush=True)
        return
    lrs, losses, sm = zip(*records)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="0.8", lw=1, label="loss")
    ax.plot(lrs, sm, color="C0", lw=2, label="smoothed loss")
    for key, color in (("min", "C3"), ("valley", "C4"), ("steepest", "C2"), ("min_div10", "C1")):
        ax.axvline(result[key], color=color, ls="--", lw=1, label=f"{key} {result[key]:.2g}")
    finite = [s for s in sm if math.isfinite(s)]
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test",
           ylim=(min(finite) * 0.9, min(max(finite), 3 * min(finite)) * 1.1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lrfind.png"), dpi=110)
    plt.close(fig)


def next_command(args, lr):
    if args.imagenet:
        per_256 = lr * 256 / args.batch_size  # imagenet_ddp.py's --lr is per 256 images, scaled by the global batch
        return (f"torchrun --nproc_per_node=8 imagenet_ddp.py --data {args.imagenet} --arch {args.arch} "
                f"--lr {per_256:.3g} --schedule onecycle  # --lr per 256 images; swept at batch {args.batch_size}")
    data = "" if args.dataset == "cifar100" else f" --dataset {args.dataset}"
    data += "" if args.data_dir == "./data" else f" --data-dir {args.data_dir}"
    return f"python cifar.py{data} --arch {args.arch} --batch-size {args.batch_size} --wd {args.wd:g} --lr {lr:.3g}"


def main(argv=None):
    try:
        args = get_args(argv)
        device = pick_device(args.device)
        amp_dtype = pick_amp(args.amp, device)
        next_batch, num_classes, stem = (imagenet_batches if args.imagenet else cifar_batches)(args, device)
        net, opt = build(args, num_classes, stem, device)
        lrs = lr_schedule(args.start_lr, args.end_lr, args.num_iter, args.mode)
        records, stopped = lr_range_test(net, opt, next_batch, lrs, accum=args.accum, beta=args.beta,
                                         diverge=args.diverge, device=device, amp_dtype=amp_dtype)
        sug = suggestions(records)
        result = dict(suggested_lr=sug[args.suggest], suggested_by=args.suggest, **sug, stopped_at=stopped, steps=len(records))
        write_outputs(args.out, records, result)
        stop_text = f"stopped at lr {stopped:.3g} (loss diverged)" if stopped else "ran the whole sweep"
        print(f"swept {len(records)} steps, {stop_text}; suggestions: min {sug['min']:.3g}, valley {sug['valley']:.3g}, "
              f"steepest {sug['steepest']:.3g}, min/10 {sug['min_div10']:.3g}", flush=True)
        print(f"suggested One Cycle max LR: {result['suggested_lr']:.3g}; next:\n    {next_command(args, result['suggested_lr'])}", flush=True)
        if args.json:
            print(json.dumps(result), flush=True)
        return 0
    except UserError as e:
        print(f"lrfind.py: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
