"""Train a ResNet on CIFAR-10/100 (or any image folder) with the whole data set in memory.

First run, offline, about a minute on a CPU (1,000 CIFAR-10 photos shipped in samples/):
    python cifar.py --dataset folder --data-dir samples/cifar10-1k --epochs 2 --batch-size 32
Any machine with internet (downloads CIFAR-10, 170 MB, into ./data):
    python cifar.py --dataset cifar10 --epochs 1
CPU smoke run on photos in class folders (DIR/train/<class>/*, DIR/test/<class>/*):
    python cifar.py --dataset folder --data-dir data/cifar10-jpg --epochs 1 --out runs/smoke
One GPU, CIFAR-100, the full recipe:
    python cifar.py --epochs 100 --cutmix 1.0 --label-smoothing 0.1 --ema 0.999
Resume after preemption or Ctrl-C (the same command plus --resume auto; continues at the exact step):
    python cifar.py --epochs 100 --cutmix 1.0 --label-smoothing 0.1 --ema 0.999 --resume auto

The whole split lives on the training device as one uint8 tensor, and augmentation runs on whole batches
with tensor ops (crop, flip, CutOut, MixUp/CutMix), so there is no per-image PIL work and no DataLoader:
this is how the fastest CIFAR trainers keep the input pipeline off the critical path (Page's
"How to train your ResNet" series, Jordan's airbench). All randomness of an epoch is derived from
(seed, epoch) and of a batch from (seed, epoch, step), so a resumed run replays exactly the batches and
augmentations the uninterrupted run would have seen. The loop never waits for the GPU: the epoch's random
draws go to the device in one copy, and losses are summed there and read only at log lines.
"""
import argparse
import dataclasses
import json
import math
import os
import pickle
import signal
import sys
import time
import warnings

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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # schedulers and torchrun, Ctrl-C, SLURM's USR1@N
EXIT_DIVERGED = 3  # (2: bad input; 128 + N: stopped by signal N)
EXIT_WRITE_FAILED = 4  # a checkpoint or metrics.jsonl could not be written (disk full, quota, read-only)


class UserError(Exception):
    """Bad flags, data or checkpoints: reported as one line, no traceback."""

    def __str__(self):  # (re-raised from a DataLoader worker, its text holds the worker's traceback: keep our line)
        text = super().__str__().strip()
        return text.splitlines()[-1].split("UserError: ", 1)[-1] if "\n" in text else text


class Diverged(Exception):
    """The training loss is not finite: the run stops with EXIT_DIVERGED and writes nothing from then on."""


# ---- The command line -----------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UserError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every flag's default, and the docstring's launch commands kept as written."""


def build_parser():
    p = Parser(description="Train a ResNet on CIFAR-10/100 or an image folder.", formatter_class=HelpFormatter,
               epilog="launch commands:\n" + __doc__.split("\n\n")[1])
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=["cifar100", "cifar10", "folder"],
                   help="folder = DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/* (or val/)")
    g.add_argument("--data-dir", default="./data", help="where the CIFAR archives are (or go), or the folder root")
    g.add_argument("--workers", type=int, default=2, help="threads that decode a folder data set, once at start")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=list(M.ARCHS), help="network, CIFAR stem")
    g.add_argument("--zero-init-residual", action="store_true", help="start each block as the identity (Goyal et al.)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=128, help="images per step")
    g.add_argument("--lr", type=float, default=None,
                   help="One Cycle peak LR, for this batch size (default 0.1, lower for a short warm-up: "
                        "--min-warmup-steps); see lrfind.py")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, the top of its cycle")
    g.add_argument("--base-momentum", type=float, default=0.85, help="momentum's cycle bottom, at the peak LR")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--wd", type=float, default=5e-4, help="weight decay, not on BN and biases")
    g.add_argument("--warmup-frac", type=float, default=0.25, help="share of the steps spent raising the LR")
    g.add_argument("--min-warmup-steps", type=int, default=50, metavar="N",
                   help="with the default --lr, the LR climbs to it over no fewer than N steps: a shorter warm-up "
                        "peaks at 0.1 x its steps / N (small data or few epochs; bench/README.md); 0 = off")
    g.add_argument("--div-factor", type=float, default=25.0, help="first LR = lr / div-factor")
    g.add_argument("--final-div-factor", type=float, default=1e4, help="last LR = first LR / final-div-factor")
    g.add_argument("--anneal", default="cos", choices=["cos", "linear"], help="One Cycle annealing shape")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="MixUp Beta(alpha, alpha); 0 = off")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta(alpha, alpha); 0 = off; with MixUp: either")
    g.add_argument("--cutout", type=int, default=0, help="CutOut square side in pixels; 0 = off")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    g.add_argument("--crop-pad", type=int, default=4, help="random-crop padding in pixels; 0 = no crop")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.999; 0 = off")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast precision; auto = bf16 where the hardware has it, else fp32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format, faster convs on tensor cores and oneDNN")
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the model; reduce-overhead and max-autotune add CUDA graphs, which remove "
                        "the launch cost of small steps")
    g.add_argument("--matmul-conv", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU + bf16 only: train 3x3 convs with <= 4x4 outputs as im2col matmuls, faster there")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, the order and the augmentation")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder")
    g.add_argument("--resume", default=None, help="'auto' (OUT/last.pt if there is one) or a checkpoint path")
    g.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (if installed)")
    g.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("runs", f"{args.dataset}-{args.arch}")
    args.default_lr = args.lr is None  # (an LR given by hand, from lrfind.py say, is used as given)
    args.lr = 0.1 if args.lr is None else args.lr
    checks = [(args.epochs >= 1, "--epochs must be >= 1"), (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.lr > 0 and math.isfinite(args.lr), "--lr must be a positive number"),
              (args.wd >= 0, "--wd must be >= 0"),
              (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
              (args.mixup >= 0 and args.cutmix >= 0, "--mixup/--cutmix alpha must be >= 0"),
              (args.cutout >= 0 and args.crop_pad >= 0, "--cutout/--crop-pad must be >= 0"),
              (0 <= args.ema < 1, "--ema must be in [0, 1)"),
              (0 < args.warmup_frac < 1, "--warmup-frac must be in (0, 1)"),
              (args.min_warmup_steps >= 0, "--min-warmup-steps must be >= 0"),
              (args.div_factor > 0 and args.final_div_factor > 0, "--div-factor/--final-div-factor must be > 0"),
              (args.workers >= 1, "--workers must be >= 1"), (args.log_every >= 1, "--log-every must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return args


# ---- main: check and load the inputs, then train --------------------------------------------------------------------
def main(argv=None):
    try:
        args = get_args(argv)
        device = pick_device(args.device)  # (a missing GPU is said before minutes of loading)
        place = Place(device, pick_amp(args.amp, device))
        resume, data = prepare(args)
        return train(args, resume, data, place)
    except (UserError, Diverged, M.WriteError) as e:
        print(f"cifar.py: error: {e}", file=sys.stderr, flush=True)
        return {Diverged: EXIT_DIVERGED, M.WriteError: EXIT_WRITE_FAILED}.get(type(e), 2)


def prepare(args):
    """Check and load everything that can fail on bad input, before anything is written."""
    resume = load_resume(args)
    t0 = time.time()
    data = load_data(args)
    if resume is not None and list(resume["classes"]) != list(data.classes):
        raise UserError(f"{resume['path']} was trained on other classes than those of {args.data_dir}; "
                        f"resume it with its own data, or start a fresh run in another --out")
    if len(data.y_tr) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(data.y_tr)} images)")
    print(f"data: {len(data.y_tr)} train / {len(data.y_te)} test images, {len(data.classes)} classes, "
          f"loaded in {time.time() - t0:.1f}s", flush=True)
    return resume, data


def train(args, resume, data, place):
    steps_per_epoch = len(data.y_tr) // args.batch_size  # (the ragged last batch dropped: fixed-size steps for BN)
    run = build_run(args, len(data.classes), args.epochs * steps_per_epoch, place)
    to_device(run, data, steps_per_epoch)
    start_epoch, start_step, best, carry = 0, 0, -1.0, None
    if resume is not None:
        restore_training_state(resume, run, log=lambda msg: print(msg, flush=True))
        start_epoch, start_step = resume["epoch"], resume["step"]
        best, carry = resume["best_top1"], resume["epoch_sums"]
        print(f"resumed from {resume['path']} at epoch {start_epoch + 1} step {start_step}", flush=True)
    metrics = M.Metrics(args.out, start_epoch if resume is not None else 0, args.tensorboard)
    info = rebuild_info(args, data)
    save_last = lambda epoch, step, sums: M.save_checkpoint(
        os.path.join(args.out, "last.pt"), **training_state(run), epoch=epoch, step=step, best_top1=best,
        epoch_sums=sums, args=vars(args), **info)
    summary = {}
    with StopFlag() as stop:
        for epoch in range(start_epoch, args.epochs):
            sums = EpochSums(run.place.device, carry if epoch == start_epoch else None)
            stopped = train_one_epoch(run, data, epoch, start_step if epoch == start_epoch else 0, stop, sums)
            if stopped is not None:
                save_last(epoch, stopped, finite_sums(run, sums, epoch, stopped))
                print(stop.farewell(args.out, f"at epoch {epoch + 1} step {stopped}"), flush=True)
                return 128 + stop.signum
            row = epoch_report(run, data, epoch, sums)
            metrics.write(row)
            if row["val_top1"] > best:
                best = row["val_top1"]
                M.save_checkpoint(os.path.join(args.out, "best.pt"), model=run.model.state_dict(),
                                  ema=run.ema.state_dict() if run.ema else None, epoch=epoch + 1, val_top1=best, **info)
            save_last(epoch + 1, 0, {})
            summary = dict(row, best_val_top1=best, out=args.out)
            if stop and epoch + 1 < args.epochs:
                print(stop.farewell(args.out, f"after epoch {epoch + 1}"), flush=True)
                return 128 + stop.signum
    if start_epoch >= args.epochs:
        print(f"{args.out}/last.pt already finished all {args.epochs} epochs", flush=True)
    if args.json and summary:
        print(json.dumps(summary), flush=True)
    return 0


def to_device(run, data, steps_per_epoch):
    """The training split goes to the device once, as one uint8 tensor; the run says where and how it trains."""
    args, total = run.args, run.sched.total_steps - 1
    data.x_tr, data.y_tr = data.x_tr.to(run.place.device), data.y_tr.to(run.place.device)
    print(f"device {run.place.device}, amp {amp_name(run.place.amp_dtype)}, channels_last {args.channels_last}, "
          f"{steps_per_epoch} steps/epoch", flush=True)
    if peak_lr(args, total) < args.lr:
        print(f"a warm-up of {args.warmup_frac * total:.0f} steps, under --min-warmup-steps {args.min_warmup_steps}: "
              f"the LR peaks at {peak_lr(args, total):.3g}, not --lr {args.lr:g}", flush=True)


# ---- The epoch loop and the step ------------------------------------------------------------------------------------
def train_one_epoch(run, data, epoch, first, stop, sums):
    """Steps first.. of one epoch. Returns None at the epoch's end, or the step it stopped after on a signal."""
    args = run.args
    run.model.train()
    steps = len(data.y_tr) // args.batch_size
    order = epoch_order(args.seed, epoch, len(data.y_tr)).to(run.place.device)
    draws = EpochDraws(args, epoch, steps, run.place.device)
    for step in range(first, steps):
        x, y, lam = training_batch(args, data, order, draws, step)
        loss, logits = train_step(run, x, y, lam)
        if run.ema is not None:
            run.ema.update(run.model)
        sums.add(loss, logits, y)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            s = finite_sums(run, sums, epoch, step + 1)  # the one place a step waits for the device
            # img/s and the ETA from this epoch's steps in this session (a resume may run on other hardware)
            took, left = max(time.time() - sums.t0, 1e-9), (args.epochs - epoch) * steps - step - 1
            print(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} loss {s['loss'] / s['seen']:.4f} "
                  f"lr {run.sched.get_last_lr()[0]:.5f} img/s {(s['seen'] - sums.seen0) / took:.1f} "
                  f"eta {fmt_time(took / (step + 1 - first) * left)}", flush=True)
        if stop and step + 1 < steps:
            return step + 1
    return None


def train_step(run, x, y, lam):
    """One optimizer step. Returns the loss and logits as device tensors: reading them would wait for the GPU."""
    ls = run.args.label_smoothing
    if run.args.compile in ("reduce-overhead", "max-autotune"):  # (both modes capture CUDA graphs)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten now
    with autocast(run.place.device, run.place.amp_dtype):
        logits = run.fwd(x)
    logits = logits.float()
    loss = F.cross_entropy(logits, y, label_smoothing=ls)
    if lam < 1.0:
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=ls)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    return loss.detach(), logits.detach()


class EpochSums:
    """An epoch's running loss and accuracy, summed on the device (no step waits for the GPU); read at log lines
    and epoch ends. state() is what last.pt carries to finish the epoch's figures after a resume."""

    def __init__(self, device, carry=None):
        carry = carry or {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
        self.loss = torch.tensor(float(carry["loss"]), dtype=torch.float64, device=device)
        self.correct = torch.tensor(int(carry["correct"]), dtype=torch.int64, device=device)
        self.seen = self.seen0 = int(carry["seen"])
        self.time_before, self.t0 = float(carry["time"]), time.time()

    def add(self, loss, logits, y):
        self.loss += loss.double() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)

    def state(self):
        return {"loss": self.loss.item(), "correct": int(self.correct.item()), "seen": self.seen,
                "time": self.time_before + time.time() - self.t0}


def finite_sums(run, sums, epoch, step):
    """The epoch's running sums, read where the loop reads them anyway (log lines, saves): a non-finite loss stops
    the run here."""
    s = sums.state()
    if not math.isfinite(s["loss"]):
        raise diverged(run, epoch, step)
    return s


def diverged(run, epoch, step):
    """The one line for a run whose loss turned non-finite (checked where the loop reads the loss anyway: log lines
    and saves, so no step waits for the GPU), with what to try."""
    amp = amp_name(run.place.amp_dtype)
    hint = {"fp16": ", or --amp bf16 (fp16 overflows above 65504)", "bf16": ", or --amp off to rule out bf16"}
    return Diverged(f"the training loss is not finite by epoch {epoch + 1} step {step} "
                    f"(lr {run.sched.get_last_lr()[0]:.4g}, {amp}): the run diverged and stopped, and "
                    f"{run.args.out}/last.pt was not overwritten (it holds the last finite state, if any). Try a lower "
                    f"--lr (lrfind.py suggests one){hint.get(amp, '')}")


# ---- Evaluation after each epoch ------------------------------------------------------------------------------------
def epoch_report(run, data, epoch, sums):
    """Evaluate after an epoch; returns the metrics.jsonl row (and prints it as one line)."""
    args, s, t_eval = run.args, sums.state(), time.time()
    last = epoch + 1 == args.epochs
    net = run.ema.module if run.ema is not None else run.model
    val_loss, val_top1, val_top5 = evaluate(run, net, data)
    row = dict(epoch=epoch + 1, lr=run.sched.get_last_lr()[0], train_loss=s["loss"] / s["seen"],
               train_top1=100.0 * s["correct"] / s["seen"], train_img_per_s=s["seen"] / s["time"],
               val_loss=val_loss, val_top1=val_top1, val_top5=val_top5)
    if last:
        row["val_top1_tta"] = evaluate(run, net, data, tta=True)[1]
        if run.ema is not None:  # for comparison: the raw weights (best.pt keeps both)
            row["val_top1_raw"] = evaluate(run, run.model, data)[1]
    row["time_s"] = s["time"] + time.time() - t_eval
    print(f"epoch {epoch + 1}/{args.epochs} train_loss {row['train_loss']:.4f} train_top1 {row['train_top1']:.2f} "
          f"val_loss {val_loss:.4f} val_top1 {val_top1:.2f} val_top5 {val_top5:.2f}"
          + (f" val_top1_tta {row['val_top1_tta']:.2f}" if last else "")
          + f" img/s {row['train_img_per_s']:.1f} time {fmt_time(row['time_s'])}", flush=True)
    return row


@torch.no_grad()
def evaluate(run, net, data, tta=False, batch_size=500):
    """Plain (or flip-TTA) evaluation of net on the test split: returns loss, top-1 %, top-5 %."""
    net.eval()
    n = len(data.y_te)
    sums = torch.zeros(3, dtype=torch.float64, device=run.place.device)
    for i in range(0, n, batch_size):
        x = data.x_te[i:i + batch_size].to(run.place.device, non_blocking=True)
        x = M.normalize(x, data.mean, data.std, run.args.channels_last)
        y = data.y_te[i:i + batch_size].to(run.place.device, non_blocking=True)
        with autocast(run.place.device, run.place.amp_dtype):
            logits = net(x).float()
            if tta:  # average the probabilities of the image and its mirror image
                logits = (logits.softmax(1) + net(x.flip(3)).float().softmax(1)).div_(2).log_()
        pred = logits.topk(min(5, logits.shape[1]), 1).indices
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), (pred[:, 0] == y).sum().double(),
                             (pred == y[:, None]).any(1).sum().double()])
    loss, top1, top5 = sums.tolist()
    return loss / n, 100.0 * top1 / n, 100.0 * top5 / n


# ---- The run's pieces: network, optimizer, schedule, loss scaler and EMA, built once --------------------------------
@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    model: torch.nn.Module  # the network; checkpoints hold its weights
    fwd: torch.nn.Module  # what a training step calls: model, or torch.compile(model)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: object  # EMA or None
    place: "Place"  # device and autocast precision


def build_run(args, num_classes, total_steps, place):
    device, amp_dtype = place.device, place.amp_dtype
    torch.manual_seed(args.seed)
    model = M.build_model(args.arch, num_classes, stem="cifar", zero_init_residual=args.zero_init_residual).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.matmul_conv and device.type == "cpu" and amp_dtype == torch.bfloat16 and not args.compile:
        M.use_matmul_conv(model)
    opt = torch.optim.SGD(param_groups(model, args.wd), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    sched = build_schedule(opt, args, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # fp16: GradScaler skips a step whose gradients overflowed (often the first), and the schedule steps on regardless
    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
    ema = M.EMA(model, args.ema) if args.ema > 0 else None
    fwd = torch.compile(model, mode=args.compile) if args.compile else model
    return Run(args, model, fwd, opt, sched, scaler, ema, place)


def peak_lr(args, total_steps):
    """--lr, unless it is the default and the warm-up is shorter than --min-warmup-steps: then the LR climbs as fast
    as it would over those steps and stops there. The default 0.1 is for 100 epochs of 50,000 photos (a ~9,800-step
    warm-up); reached in
    15 steps (4 epochs of 1,000 photos) it blows BN's statistics up (val_loss 8,589 after epoch 1, bench/README.md)."""
    warmup_steps = max(args.warmup_frac, 2 / (total_steps + 1)) * (total_steps + 1)
    if not args.default_lr:
        return args.lr
    return args.lr * min(1.0, warmup_steps / max(args.min_warmup_steps, 1))


def build_schedule(opt, args, total_steps):
    if total_steps < 3:
        raise UserError(f"the schedule has only {total_steps} steps: use more --epochs or a smaller --batch-size")
    # One Cycle (Smith & Topin 2017, "Super-Convergence"): LR warms up to --lr then anneals far below the start,
    # while momentum cycles the other way; it reaches a given accuracy in a fraction of the epochs of a step
    # schedule. Stepped every iteration (+1: after every step, the last included); warm-up >= 2 steps.
    total = total_steps + 1
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=peak_lr(args, total_steps), total_steps=total, pct_start=max(args.warmup_frac, 2 / total),
        anneal_strategy=args.anneal,
        div_factor=args.div_factor, final_div_factor=args.final_div_factor, cycle_momentum=args.momentum > 0,
        base_momentum=args.base_momentum, max_momentum=args.momentum)


def param_groups(model, wd):
    """No weight decay on BN parameters and biases: decaying them only fights normalisation."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# ---- Batch augmentation on the device, a function of (seed, epoch, step) --------------------------------------------
def training_batch(args, data, order, draws, step):
    """Batch `step` of an epoch: its images from the epoch's order, augmented and mixed. Returns (x, y, lam)."""
    idx = order[step * args.batch_size:(step + 1) * args.batch_size]
    r = draws[step]
    x = augment(data.x_tr[idx], r, data.mean, data.std, args.crop_pad, args.cutout, args.channels_last)
    x, lam = mix_batch(x, r["mix"])
    return x, data.y_tr[idx], lam


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


class EpochDraws:
    """The random draws of all batches of one epoch, moved to the device in one copy at the epoch's start, so
    that no training step waits on a host-to-device copy. The mixing draws stay on the host (Python ints)."""

    def __init__(self, args, epoch, steps, device):
        per_step = [batch_randomness(args, epoch, s, args.batch_size) for s in range(steps)]
        table = np.stack([np.concatenate([r["shift"], r["flip"][:, None], r["cut_center"]], 1) for r in per_step])
        self.table = torch.from_numpy(table.astype(np.int64)).to(device)
        self.mix = [r["mix"] for r in per_step]

    def __getitem__(self, step):
        t = self.table[step]
        return {"shift": t[:, 0:2], "flip": t[:, 2].bool(), "cut_center": t[:, 3:5], "mix": self.mix[step]}


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


def mix_batch(x, mix):
    """MixUp (Zhang et al. 2017) or CutMix (Yun et al. 2019) with the batch's mirror image (x.flip(0)), as timm
    does: no extra permutation to store. Returns the mixed batch and the weight of the own label."""
    if mix is None:
        return x, 1.0
    kind, lam, center = mix
    if kind == "mixup":
        return x * lam + x.flip(0) * (1 - lam), lam
    H, W = x.shape[2:]
    cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    y0, y1 = max(int(center[0]) - cut_h // 2, 0), min(int(center[0]) + cut_h // 2, H)
    x0, x1 = max(int(center[1]) - cut_w // 2, 0), min(int(center[1]) + cut_w // 2, W)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
    return x, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted, after clipping


# ---- Data: load once into uint8 tensors [N, 3, 32, 32] --------------------------------------------------------------
@dataclasses.dataclass
class Data:
    x_tr: torch.Tensor  # uint8 [N, 3, 32, 32]
    y_tr: torch.Tensor  # int64 [N]
    x_te: torch.Tensor
    y_te: torch.Tensor
    classes: list
    mean: tuple
    std: tuple


def load_data(args):
    if args.dataset == "folder":
        return load_folder(args.data_dir, args.workers)
    return load_cifar(args.dataset, args.data_dir)


def load_cifar(name, data_dir):
    """The official python-version archive: downloaded (md5-checked) when missing, then read."""
    spec = CIFAR[name]
    folder = os.path.join(data_dir, spec["folder"])
    if not os.path.isdir(folder):
        import socket
        from torchvision.datasets.utils import download_and_extract_archive
        socket.setdefaulttimeout(15)
        try:
            download_and_extract_archive(spec["url"], data_dir, filename=spec["archive"], md5=spec["md5"])
        except Exception as e:
            raise UserError(f"cannot get {name} ({type(e).__name__}): download {spec['url']} and put "
                            f"{spec['archive']} in {os.path.abspath(data_dir)}/ (or extract it there as "
                            f"{spec['folder']}/)") from None
    x_tr, y_tr = _read_cifar_batches(folder, spec["train"], spec["labels"])
    x_te, y_te = _read_cifar_batches(folder, spec["test"], spec["labels"])
    try:
        with open(os.path.join(folder, spec["meta"]), "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")[spec["names"]])
    except Exception as e:
        raise UserError(f"cannot read class names from {os.path.join(folder, spec['meta'])}: {e}") from None
    return Data(x_tr, y_tr, x_te, y_te, classes, spec["mean"], spec["std"])


def _read_cifar_batches(folder, names, label_key):
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        except FileNotFoundError:
            raise UserError(f"{path} is missing: the CIFAR folder is incomplete; delete it and extract the archive "
                            f"again") from None
        except Exception as e:
            raise UserError(f"{path} is not a CIFAR batch file ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_folder(data_dir, workers):
    from concurrent.futures import ThreadPoolExecutor
    try:
        folders = M.list_train_val(data_dir, ("test", "val"))
    except M.FolderError as e:
        raise UserError(str(e)) from None
    out = []
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        for samples in (folders["train"], folders["val"]):
            x = np.stack(list(pool.map(decode_32, [p for p, _ in samples], chunksize=256)))
            out += [torch.from_numpy(x), torch.tensor([l for _, l in samples], dtype=torch.int64)]
    x_tr = out[0].float().div_(255)
    mean = tuple(round(v, 4) for v in x_tr.mean(dim=(0, 2, 3)).tolist())
    std = tuple(round(v, 4) for v in x_tr.std(dim=(0, 2, 3)).tolist())
    return Data(*out, folders["classes"], mean, std)


def decode_32(path):
    """The pixels the folder data set stores: model.py's evaluation preprocessing for a 32x32 CIFAR-stem network
    (the whole photo squashed to 32x32), so predict.py sees what training and validation saw."""
    try:
        return M.eval_image(path, 32).numpy()
    except M.ImageError as e:
        raise UserError(str(e)) from None


# ---- Checkpoints: what rebuilds the model (model.py's format) plus what resumes the run -----------------------------
def rebuild_info(args, data):
    return dict(arch=args.arch, num_classes=len(data.classes), stem="cifar", classes=list(data.classes),
                class_names=M.readable_class_names(data.classes), mean=list(data.mean), std=list(data.std),
                image_size=32, eval_resize=None, train_size=32,
                dataset=os.path.basename(os.path.normpath(args.data_dir)) if args.dataset == "folder" else args.dataset)


# Settings that fix the sequence of batches and LRs: a resumed run must use the same ones.
RESUME_MUST_MATCH = ("arch", "dataset", "epochs", "batch_size", "seed", "lr", "warmup_frac", "div_factor",
                     "final_div_factor", "anneal", "mixup", "cutmix", "cutout", "crop_pad", "no_flip", "ema")


def load_resume(args):
    """The checkpoint to resume from, or None for a fresh start. Raises UserError on anything wrong, before
    anything is written."""
    last = os.path.join(args.out, "last.pt")
    if args.resume is None:
        for f in (last, os.path.join(args.out, "best.pt")):
            if os.path.exists(f):
                raise UserError(f"{f} exists: pass --resume auto to continue that run, or choose another --out")
        return None
    path = last if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.exists(path):
        print(f"no {path} yet: starting a fresh run", flush=True)
        return None
    try:
        ckpt = M.load_checkpoint(path)
    except M.CheckpointError as e:
        raise UserError(str(e)) from None
    if "optimizer" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path} is not a cifar.py training checkpoint (no optimizer state); "
                        f"use --resume with a last.pt")
    missing = [k for k in ("model", "scheduler", "scaler", "amp", "epoch", "step", "best_top1", "epoch_sums", "ema",
                           "ema_updates", "rng_cpu", "rng_cuda") if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete training checkpoint (missing {', '.join(missing)})")
    if ckpt.get("arch") != args.arch:
        raise UserError(f"{path} holds a {ckpt.get('arch')}, but --arch is {args.arch}")
    diff = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} (not {getattr(args, k)})" for k in RESUME_MUST_MATCH
            if ckpt["args"].get(k) != getattr(args, k)]
    if diff:
        raise UserError(f"{path} was made with different settings; resume with " + ", ".join(diff))
    ckpt["path"] = path
    return ckpt


def training_state(run):
    """What evolves during training, for last.pt (the unwrapped model's weights: no module./_orig_mod.)."""
    cuda = run.place.device.type == "cuda"
    return dict(model=run.model.state_dict(), ema=run.ema.state_dict() if run.ema else None,
                ema_updates=run.ema.updates if run.ema else 0, optimizer=run.opt.state_dict(),
                scheduler=run.sched.state_dict(), scaler=run.scaler.state_dict(), amp=amp_name(run.place.amp_dtype),
                # all randomness here comes from (seed, epoch, step or index), but code added later may draw from
                # torch's; this process's own device only, so that a machine with fewer GPUs can restore it
                rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state(run.place.device) if cuda else None)


def restore_training_state(ckpt, run, log):
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    # A job may be requeued on other hardware: fp16 (V100, T4) to bf16 or back, or to fp32. Only fp16 keeps a
    # GradScaler; a run switching to it starts with a fresh loss scale, a run leaving it drops the old one.
    was = ckpt["amp"]
    if run.scaler.is_enabled() and ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    if was != amp_name(run.place.amp_dtype):
        log(f"resuming a {was} run in {amp_name(run.place.amp_dtype)}" + (": a fresh GradScaler starts the loss scale"
                                                                    if run.scaler.is_enabled() else ""))
    if run.ema is not None:
        run.ema.module.load_state_dict(ckpt["ema"])
        run.ema.updates = ckpt["ema_updates"]
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] is not None and run.place.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng_cuda"], run.place.device)


# ==== Operations: the machinery around the training story ============================================================
# ---- Device and precision -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Place:
    """Where this run trains: its device and autocast precision."""
    device: torch.device
    amp_dtype: object  # torch.bfloat16, torch.float16 or None (fp32)


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


def amp_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---- Stopping: a signal sets a flag, the loop saves last.pt and exits 128 + the signal ------------------------------
class StopFlag:
    """SIGTERM, SIGINT and SIGUSR1 set a flag; the loop finishes its step, saves last.pt and exits with 128+signal.
    Launchers repeat the signal (torchrun's agent re-sends it to every rank; SLURM and Kubernetes signal the group):
    repeats only confirm the request, and the launcher's SIGKILL after its grace period (torchrun: 30 s) is the hard
    stop. Run without torchrun, a second Ctrl-C kills at once."""

    def __init__(self):
        self.signum, self.previous = None, {}
        self.launched = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ

    def __enter__(self):
        for s in STOP_SIGNALS:
            self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT and not self.launched:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __bool__(self):
        return self.signum is not None

    def farewell(self, out, where):
        sig = signal.Signals(self.signum or signal.SIGTERM)
        return (f"stopped by {sig.name} {where}; saved {out}/last.pt. The exit code {128 + sig} (128 + {sig.name}) is "
                f"on purpose, so a scheduler sees the job as unfinished (torchrun reports it as ChildFailedError); "
                f"continue with the same command plus --resume auto")


if __name__ == "__main__":
    sys.exit(main())
