"""Train a ResNet on ImageNet (or any ImageFolder data set) with DistributedDataParallel.

CPU smoke run (one process; CIFAR-10 photos with val/ -> test/ as a symlink):
    python imagenet_ddp.py --data data/cifar10-jpg --arch resnet18 --image-size 64 --epochs 1 --batch-size 32
Imagenette (10 ImageNet classes) on a CPU: README's result, 5 epochs, 8 minutes on 2 cores with native bf16:
    python imagenet_ddp.py --data data/imagenette-224 --arch resnet18 --train-size 128 --val-size 128 --epochs 5 \\
        --batch-size 64 --lr 0.3 --min-scale 0.35 --color-jitter 0 --schedule onecycle --workers 1 \\
        --out runs/imagenette-r18-128-cpu
One node, 8 GPUs:
    torchrun --nproc_per_node=8 imagenet_ddp.py --data /data/imagenet
Two nodes, 8 GPUs each (run on both, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        imagenet_ddp.py --data /data/imagenet
FFCV-style fast schedule: low resolution first, rising to the final size (160 -> 192 px over epochs 25-34):
    torchrun --nproc_per_node=8 imagenet_ddp.py --data /data/imagenet --epochs 40 --train-size 192 \\
        --min-train-size 160 --ramp-epochs 25 34 --val-size 224 --out runs/imagenet-ffcv
Resume after preemption (continues at the exact step), or evaluate a checkpoint:
    torchrun --nproc_per_node=8 imagenet_ddp.py --data /data/imagenet --resume auto
    torchrun --nproc_per_node=8 imagenet_ddp.py --data /data/imagenet --evaluate \\
        --checkpoint runs/imagenet-resnet50/best.pt

Exact resume, on any number of processes: the order, batches, crops, flips, jitter and sizes are functions of (seed,
epoch, step or index), never of workers, ranks or where a run stopped (README: Resume).
"""
import argparse
import atexit
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import time
import uuid
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 (before any process group: see below)
import torch.nn.functional as F

import model as M

# torch.distributed.nn's functions take `group=group.WORLD` as a default, evaluated at import. Imported by DDP, they
# would hold the live process group past destroy_process_group(), and gloo's threads would run into interpreter exit,
# where a rank could die with "terminate called without an active exception" (SIGABRT). Imported here, they hold None.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # schedulers and torchrun, Ctrl-C, SLURM's USR1@N
EXIT_DIVERGED = 3  # (2: bad input; 128 + N: stopped by signal N)
EXIT_WRITE_FAILED = 4  # a checkpoint or metrics.jsonl could not be written (disk full, quota, read-only)


class UserError(Exception):
    """Bad flags, data or checkpoints: reported as one line, no traceback."""

    def __str__(self):  # (re-raised from a DataLoader worker, its text holds the worker's traceback: keep our line)
        text = super().__str__().strip()
        return text.splitlines()[-1].split("UserError: ", 1)[-1] if "\n" in text else text


class DataError(UserError):
    """Bad data met during training, by every rank at the same step: rank 0 reports it."""


class Diverged(Exception):
    """The training loss is not finite: the run stops with EXIT_DIVERGED and writes nothing from then on."""


# How each failure ends a rank: its exit code, and who says it: each rank that met it, or rank 0 alone for what every
# rank meets at the same step. (DataError first: a UserError too. Only rank 0 writes, so only it meets WriteError.)
EXITS = {DataError: (2, "rank 0"), UserError: (2, "each"), Diverged: (EXIT_DIVERGED, "rank 0"),
         M.WriteError: (EXIT_WRITE_FAILED, "each")}


# ---- The command line -----------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UserError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every flag's default, and the docstring's launch commands kept as written."""


def build_parser():
    p = Parser(description="DDP ResNet training on an ImageFolder data set (ImageNet).", formatter_class=HelpFormatter,
               epilog="launch commands:\n" + __doc__.split("\n\n")[1])
    g = p.add_argument_group("data")
    g.add_argument("--data", default="./data/imagenet", help="folder holding train/ and val/ (ImageFolder layout)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader worker processes per rank (default: this "
                   "rank's share of the CPU cores less one, for the training loop, at most 16)")
    g.add_argument("--image-size", type=int, default=224, help="default of --train-size and --val-size")
    g.add_argument("--train-size", type=int, default=None, help="training crop size (the last, with --min-train-size)")
    g.add_argument("--min-train-size", type=int, default=None, help="progressive resizing: the first epochs' crop size")
    g.add_argument("--ramp-epochs", type=int, nargs=2, default=None, metavar=("START", "END"), help="progressive "
                   "resizing: the size rises from --min-train-size at epoch START to --train-size at END (FFCV)")
    g.add_argument("--val-size", type=int, default=None, help="validation center crop (larger than training: FixRes)")
    g.add_argument("--val-resize", type=int, default=None, help="validation short-side resize (default: size / 0.875)")
    g.add_argument("--color-jitter", type=float, default=0.4, help="brightness/contrast/saturation jitter; 0 = off")
    g.add_argument("--min-scale", type=float, default=0.08, help="RandomResizedCrop smallest area fraction")
    g.add_argument("--max-broken-images", type=int, default=None, metavar="N", help="stop when more than N training "
                   "photos cannot be decoded (each is replaced and named); default: 0.1%% of them, at least 10")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=list(M.ARCHS), help="network (ImageNet stem)")
    g.add_argument("--zero-init-residual", action="store_true", help="start each block as the identity (Goyal et al.)")
    g.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes (GPUs only)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, help="training epochs")
    g.add_argument("--batch-size", type=int, default=64, help="images per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1; on "
                   "resume, what keeps the checkpoint's global batch)")
    g.add_argument("--global-batch", type=int, default=None, metavar="N", help="images per optimizer step over all "
                   "processes: --grad-accum = N / (batch-size x processes), one batch and LR on any number of GPUs")
    g.add_argument("--lr", type=float, default=0.1, help="peak LR per 256 images, scaled by the global batch")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--wd", type=float, default=1e-4, help="weight decay (not on BN and bias)")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear LR warm-up (Goyal et al. 2017); default 5, capped at a quarter of a short run")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle"], help="LR schedule after warm-up")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="MixUp Beta(alpha, alpha); 0 = off")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta(alpha, alpha); 0 = off")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.9999; 0 = off")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast precision")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format")
    g.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile the DDP-wrapped model (no CUDA graphs: they break under DDP, pytorch#140395)")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, the order and the augmentation")
    g.add_argument("--evaluate", action="store_true", help="only evaluate --checkpoint (or --resume) and print JSON")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default: runs/imagenet-<arch>)")
    g.add_argument("--resume", default=None, help="'auto' (OUT/last.pt if there is one) or a checkpoint path")
    g.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (with --evaluate)")
    g.add_argument("--save-every", type=int, default=1000, help="also write last.pt every N steps (0: epoch ends only)")
    g.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (if installed)")
    g.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    return p


def get_args(argv=None):
    """The flags, checked, with their derived defaults; nothing writes args after this returns."""
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("runs", f"imagenet-{args.arch}")
    if args.workers is None:  # (one worker decodes ~340 ImageNet photos a second: bench/README.md)
        per_rank = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.workers = max(1, min(16, per_rank - 1))
    args.train_size = args.train_size or args.image_size
    args.val_size = args.val_size or args.image_size
    args.val_resize = args.val_resize or int(args.val_size / M.CROP_RATIO)
    explicit_warmup = args.warmup_epochs is not None
    if not explicit_warmup:  # the default: 5 epochs (Goyal et al.), but never most of a short first try
        args.warmup_epochs = min(5.0, args.epochs / 4)
    sizes_ok = all(s >= 16 for s in (args.train_size, args.val_size, args.min_train_size or 16))
    ramp_ok = args.ramp_epochs is None or (0 <= args.ramp_epochs[0] <= args.ramp_epochs[1] <= args.epochs)
    checks = [
        (args.epochs >= 1, "--epochs must be >= 1"), (args.batch_size >= 1, "--batch-size must be >= 1"),
        ((args.grad_accum or 1) >= 1 and (args.global_batch or 1) >= 1, "--grad-accum/--global-batch must be >= 1"),
        (args.grad_accum is None or args.global_batch is None, "give --global-batch or --grad-accum, not both"),
        (args.workers >= 0, "--workers must be >= 0"),
        ((args.max_broken_images or 0) >= 0, "--max-broken-images must be >= 0"),
        (args.lr > 0 and math.isfinite(args.lr), "--lr must be a positive number"), (args.wd >= 0, "--wd must be >= 0"),
        (sizes_ok, "image sizes must be >= 16"),
        (args.val_resize >= args.val_size, "--val-resize must be >= --val-size"),
        ((args.min_train_size is None) == (args.ramp_epochs is None), "--min-train-size and --ramp-epochs go together"),
        (ramp_ok, "--ramp-epochs needs 0 <= START <= END <= epochs"),
        (0 < args.min_scale <= 1, "--min-scale must be in (0, 1]"),
        (0 <= args.warmup_epochs < args.epochs, "--warmup-epochs must be in [0, epochs)"),
        (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (args.color_jitter >= 0, "--color-jitter must be >= 0"),
        (args.mixup >= 0 and args.cutmix >= 0, "--mixup/--cutmix alpha must be >= 0"),
        (0 <= args.ema < 1, "--ema must be in [0, 1)"),
        (args.save_every >= 0 and args.log_every >= 1, "--save-every must be >= 0 and --log-every >= 1"),
        (not args.evaluate or args.resume or args.checkpoint, "--evaluate needs --checkpoint PATH (or --resume PATH)")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    args.warmup_note = None if explicit_warmup or args.warmup_epochs == 5.0 else (
        f"warm-up: {args.warmup_epochs:g} epochs (the default 5, capped at a quarter of this {args.epochs}-epoch run)")
    return args


# ---- main: every rank checks the inputs, they vote, then train (or evaluate) ----------------------------------------
def main(argv=None):
    def fail(msg):
        print(f"imagenet_ddp.py: error: {msg}", file=sys.stderr, flush=True)
        return 2
    atexit.unregister(kill_workers_left_at_exit)  # (registered once, however often main() runs in a process, and
    atexit.register(kill_workers_left_at_exit)  # after torch's import: it runs before multiprocessing's exit handler)
    args = error = None
    try:
        args = get_args(argv)
    except UserError as e:
        error = e
    if error is not None and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return fail(error)
    try:
        place = setup_distributed(args.device if args else "cpu", args.amp if args else "off")
        try:
            inputs = None if error else check_inputs(args, place)
        except UserError as e:
            error = e
        # Bad input usually fails on every rank alike: rank 0 says each different error once (eight GPUs, one line),
        # and the others wait for it, since torchrun ends every rank as soon as one exits with an error.
        errors = [e for e in gathered([None if error is None else str(error)], place.world) if e is not None]
        if errors:
            for msg in dict.fromkeys(errors) if place.rank == 0 else ():
                n = errors.count(msg)
                fail(msg if n == place.world else f"{msg} (on {n} of {place.world} ranks)")
            all_sum([0.0], place.device)
            return 2
        return (evaluate_checkpoint if args.evaluate else fit)(args, inputs, place)
    except tuple(EXITS) as e:
        code, said_by = EXITS[next(kind for kind in EXITS if isinstance(e, kind))]
        if said_by == "each" or int(os.environ.get("RANK", 0)) == 0:
            fail(e)
        return code
    finally:
        if dist.is_initialized():
            gc.collect()  # the run's objects caught in reference cycles (matplotlib's) still hold the process group
            dist.destroy_process_group()  # gloo's threads end here, not in the interpreter's exit (see the imports)


@dataclasses.dataclass
class Inputs:
    """What every rank read and checked before the vote on them (check_inputs)."""
    classes: list
    train_samples: list  # [(path, label)]
    val_samples: list
    grad_accum: int  # micro-batches per optimizer step (grad_accum())
    resume: dict  # the last.pt a training run continues from (None: a fresh start)
    checkpoint: dict  # the checkpoint --evaluate scores (None when training)


def fit(args, inputs, place):
    run, loop = start(args, inputs, place)
    best = inputs.resume["best_top1"] if inputs.resume else -1.0
    metrics = M.Metrics(args.out, loop.start_epoch, args.tensorboard) if place.rank == 0 else None
    summary = {}
    with loop.stop as stop:
        for epoch in range(loop.start_epoch, args.epochs):
            resumed_epoch = epoch == loop.start_epoch
            sums = EpochSums(place.device, loop.carry if resumed_epoch else None)
            end = train_one_epoch(run, loop, epoch, loop.start_step if resumed_epoch else 0, sums, best)
            if end["stopped_at"] is not None:
                if place.rank == 0:
                    print(stop.farewell(args.out, f"at epoch {epoch + 1} step {end['stopped_at']}"), flush=True)
                return 128 + (stop.signum or signal.SIGTERM)
            row = epoch_row(run, loop, epoch, end["sums"])
            if row["val_top1"] > best:
                best = row["val_top1"]
                if place.rank == 0:
                    M.save_checkpoint(os.path.join(args.out, "best.pt"), model=run.model.state_dict(), epoch=epoch + 1,
                                      ema=run.ema.state_dict() if run.ema else None, val_top1=best,
                                      **rebuild_info(args, loop.classes))
            save_last(run, loop, epoch + 1, 0, {}, best)
            if place.rank == 0:
                metrics.write(row)
                print(f"epoch {epoch + 1}/{args.epochs} train_loss {row['train_loss']:.4f} "
                      f"val_top1 {row['val_top1']:.2f} val_top5 {row['val_top5']:.2f} val_images {row['val_images']} "
                      f"img/s {row['train_img_per_s']:.1f} data-wait {row['data_wait_pct']:.1f}% "
                      f"time {fmt_time(row['time_s'])}", flush=True)
            summary = dict(row, best_val_top1=best)
            if all_sum([1.0 if stop else 0.0], place.device)[0] > 0 and epoch + 1 < args.epochs:
                if place.rank == 0:
                    print(stop.farewell(args.out, f"after epoch {epoch + 1}"), flush=True)
                return 128 + (stop.signum or signal.SIGTERM)
    if loop.start_epoch >= args.epochs and place.rank == 0:
        print(f"{args.out}/last.pt already finished all {args.epochs} epochs", flush=True)
    # every rank must hold the same weights and BN statistics, the EMA's included: a difference is a bug, not noise
    nets = [run.model] + ([run.ema.module] if run.ema is not None else [])
    in_sync = all([weights_fingerprint(net, place.device) for net in nets])  # (a list: every rank runs both)
    if args.json and summary and place.rank == 0:
        print(json.dumps(dict(summary, world_size=place.world, weights_in_sync=in_sync)), flush=True)
    return 0 if in_sync else 1


def start(args, inputs, place):
    """Build the run and the loop from the checked inputs, and restore a resumed run. Returns (run, loop)."""
    train, accum = inputs.train_samples, inputs.grad_accum
    sampler = EpochBatches(len(train), args.batch_size, place.world, place.rank, accum, args.seed)
    run = build_run(args, len(inputs.classes), sampler.steps, place, accum)
    train_set = TrainSet(train, args)
    context = worker_start_method() if args.workers > 0 else None  # (before the loop's StopFlag: see there)
    log = (lambda msg: print(msg, flush=True)) if place.rank == 0 else (lambda msg: None)
    log(f"data: {len(train)} train / {len(inputs.val_samples)} val images, {len(inputs.classes)} classes; "
        f"{place.world} process(es) on {place.device}, amp {amp_name(place.amp_dtype)}, "
        f"global batch {sampler.global_batch}, peak lr {args.lr * sampler.global_batch / 256:.4f}, "
        f"{sampler.steps} steps/epoch, train size {train_size_at(args, 0)}, val {args.val_size} "
        f"(resize {args.val_resize}), {args.workers} workers")
    if args.warmup_note:
        log(args.warmup_note)
    resume = inputs.resume or {"epoch": 0, "step": 0, "epoch_sums": None}
    if inputs.resume is not None:
        restore_training_state(resume, run, log)
        log(f"resumed from {resume['path']} at epoch {resume['epoch'] + 1} step {resume['step']}")
    loop = Loop(sampler=sampler, train_set=train_set, context=context, val_samples=inputs.val_samples,
                loader=make_loader(train_set, args.workers, place.device, context, batch_sampler=sampler),
                classes=inputs.classes, stream=torch.cuda.Stream(place.device) if place.device.type == "cuda" else None,
                start_epoch=resume["epoch"], start_step=resume["step"], carry=resume["epoch_sums"], stop=StopFlag(),
                said_broken=set())
    return run, loop


# ---- The epoch loop and the step ------------------------------------------------------------------------------------
def train_one_epoch(run, loop, epoch, start_step, sums, best):
    """Runs until the epoch ends or the ranks agree to stop; returns the step they stopped after (None: the end) and
    the last sums over all ranks. The ranks meet at each step's stop vote, and in meet() at log lines and saves."""
    args, steps = run.args, loop.sampler.steps
    run.ddp.train()
    loop.sampler.set_epoch(epoch, start_step)
    batches = device_batches(loop.loader, run.place.device, loop.stream, sums)
    vote = StopVote(run.place.device)
    try:
        for step in range(start_step, steps):
            train_step(run, batches, step_mix(args, epoch, step, train_size_at(args, epoch)), sums)
            stop_now, done = vote.cast(bool(loop.stop)), step + 1
            if done % args.log_every == 0 or done == steps:
                s = meet(run, loop, sums, epoch, done)
                # img/s and the ETA from this epoch's steps in this session (a resume may run on other hardware)
                took, left = max(time.time() - sums.t0, 1e-9), (args.epochs - epoch) * steps - done
                rate, eta = (s["seen"] - sums.seen0) / took, took / (done - start_step) * left
                if run.place.rank == 0:
                    print(f"epoch {epoch + 1}/{args.epochs} step {done}/{steps} "
                          f"loss {s['loss'] / max(s['seen'], 1):.4f} lr {run.sched.get_last_lr()[0]:.5f} "
                          f"img/s {rate:.1f} data-wait {100 * s['wait'] / max(s['time'], 1e-9):.1f}% "
                          f"eta {fmt_time(eta)}", flush=True)
            if stop_now and done < steps:
                save_last(run, loop, epoch, done, meet(run, loop, sums, epoch, done), best)
                return {"stopped_at": done, "sums": None}
            if args.save_every and done % args.save_every == 0 and done < steps:
                save_last(run, loop, epoch, done, meet(run, loop, sums, epoch, done), best)
        return {"stopped_at": None, "sums": s}
    finally:
        vote.settle()
        batches.close()


def train_step(run, batches, mix, sums):
    """One optimizer step over --grad-accum micro-batches; DDP all-reduces the gradients once, on the last."""
    args, amp = run.args, run.place.amp_dtype
    run.opt.zero_grad(set_to_none=True)
    for m in range(run.accum):
        x_u8, y = next(batches)
        x, lam = mix_batch(M.normalize(x_u8, M.IMAGENET_MEAN, M.IMAGENET_STD, args.channels_last), mix)
        sync = m == run.accum - 1 or run.place.world == 1
        with run.ddp.no_sync() if not sync else contextlib.nullcontext():
            with torch.autocast(run.place.device.type, dtype=amp, enabled=amp is not None):
                logits = run.fwd(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            if lam < 1.0:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=args.label_smoothing)
            run.scaler.scale(loss / run.accum).backward()
        sums.add(loss.detach(), len(y))
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    if run.ema is not None:
        run.ema.update(run.model)
    sums.seen += args.batch_size * run.accum * run.place.world


def step_mix(args, epoch, step, size):
    """The MixUp/CutMix draw of a whole step (all ranks and micro-batches alike), from (seed, epoch, step)."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    r = M.seeded(args.seed, epoch, step, M.Stream.MIX)
    kind = "mixup" if args.mixup > 0 and (args.cutmix == 0 or r.random() < 0.5) else "cutmix"
    alpha = args.mixup if kind == "mixup" else args.cutmix
    return kind, float(r.beta(alpha, alpha)), r.integers(0, size, size=2)


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


class EpochSums:
    """An epoch's running sums on this rank: the loss summed on the device (no step waits for the GPU), images seen over
    all ranks, and what device_batches() records: its data-wait and the broken photos it replaced. Read in meet()."""

    def __init__(self, device, carry=None):
        carry = carry or {"loss": 0.0, "seen": 0, "time": 0.0, "wait": 0.0, "replaced": []}
        self.carried_loss, self.replaced = float(carry["loss"]), list(carry["replaced"])  # (broken photos: all ranks')
        self.local_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = self.seen0 = int(carry["seen"])
        self.t0, self.time_before, self.wait_before = time.time(), carry["time"], carry["wait"]
        self.wait, self.new_replaced = 0.0, []  # this session's data-wait, and the broken photos this rank met

    def add(self, loss, n):
        self.local_loss += loss.double() * n


def meet(run, loop, sums, epoch, step):
    """Where the ranks meet in an epoch (log lines, saves, its end): the sums over all ranks, what last.pt carries. All
    ranks stop here alike, on a non-finite loss (any rank's NaN makes the sum's) or on too many broken photos."""
    loss = sums.carried_loss + all_sum([sums.local_loss.item()], run.place.device)[0]
    replaced = sorted(set(sums.replaced) | set(gathered(sums.new_replaced, run.place.world)))
    loop.train_set.note_broken(replaced, run.place.rank)
    if not math.isfinite(loss):
        raise diverged(run, epoch, step)
    return {"loss": loss, "seen": sums.seen, "time": sums.time_before + time.time() - sums.t0,
            "wait": sums.wait_before + sums.wait, "replaced": replaced}


def diverged(run, epoch, step):
    """The one line for a run whose loss turned non-finite (checked where the loop reads the loss anyway: log lines
    and saves, so no step waits for the GPU), with what to try."""
    amp = amp_name(run.place.amp_dtype)
    hint = {"fp16": ", or --amp bf16 (fp16 overflows above 65504)", "bf16": ", or --amp off to rule out bf16"}
    return Diverged(f"the training loss is not finite by epoch {epoch + 1} step {step} "
                    f"(lr {run.sched.get_last_lr()[0]:.4g}, {amp}): the run diverged and stopped, and "
                    f"{run.args.out}/last.pt was not overwritten (it holds the last finite state, if any). Try a lower "
                    f"--lr (lrfind.py suggests one){hint.get(amp, '')}")


# ---- Evaluation: every validation photo exactly once over all ranks -------------------------------------------------
def epoch_row(run, loop, epoch, s):
    """The epoch's metrics row: BN statistics (live and EMA) made one across ranks, then the validation figures of the
    EMA weights, if any, else the live ones; s is the epoch's sums from meet()."""
    args = run.args
    all_average_(list(run.model.buffers()), run.place.world)  # (DDP copies rank 0's buffers at each forward only)
    if run.ema is not None:
        all_average_(list(run.ema.module.buffers()), run.place.world)
    t_eval, net = time.time(), run.ema.module if run.ema is not None else run.model
    res = evaluate(net, loop.val_samples, args, run.place, args.val_size, args.val_resize, loop.context,
                   loop.said_broken)
    return dict(epoch=epoch + 1, lr=run.sched.get_last_lr()[0], train_loss=s["loss"] / max(s["seen"], 1),
                train_img_per_s=s["seen"] / max(s["time"], 1e-9), data_wait_pct=100 * s["wait"] / max(s["time"], 1e-9),
                train_size=train_size_at(args, epoch), broken_train_images=len(s["replaced"]), **res,
                time_s=s["time"] + time.time() - t_eval)


@torch.no_grad()
def evaluate(net, samples, args, place, size, resize, context, said_broken):
    """Loss, top-1 and top-5 over samples at (size, resize), each photo on exactly one rank; broken photos left out of
    the figures (val_images counts the others) and named once by rank 0 (said_broken holds those already named)."""
    net.eval()
    mine = list(range(place.rank, len(samples), place.world))  # a strided split, no padding: each image on one rank
    loader = make_loader(torch.utils.data.Subset(EvalSet(samples, size, resize), mine), min(args.workers, 4),
                         place.device, context, batch_size=args.batch_size)
    sums = torch.zeros(4, dtype=torch.float64, device=place.device)
    broken, first = [], 0
    with stop_signals_blocked():
        batches = iter(loader)
    for x, y in batches:
        broken += [samples[mine[first + j]][0] for j in (y < 0).nonzero().flatten().tolist()]  # (on the host)
        first += len(y)
        x = M.normalize(x.to(place.device, non_blocking=True), M.IMAGENET_MEAN, M.IMAGENET_STD, args.channels_last)
        y = y.to(place.device, non_blocking=True)
        valid = y >= 0
        with torch.autocast(place.device.type, dtype=place.amp_dtype, enabled=place.amp_dtype is not None):
            logits = net(x).float()
        pred = logits.topk(min(5, logits.shape[1]), 1).indices  # (label -1 matches no prediction)
        loss = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
        sums += torch.stack([(loss * valid).sum().double(), (pred[:, 0] == y).sum().double(),
                             (pred == y[:, None]).any(1).sum().double(), valid.sum().double()])
    loss_sum, top1, top5, n = all_sum(sums.tolist(), place.device)
    for path in gathered(broken, place.world):
        if place.rank == 0 and path not in said_broken:
            print(f"{path}: cannot read image; left out of the validation figures (val_images)", flush=True)
        said_broken.add(path)
    return dict(val_loss=loss_sum / max(n, 1), val_top1=100.0 * top1 / max(n, 1), val_top5=100.0 * top5 / max(n, 1),
                val_images=int(n))


def evaluate_checkpoint(args, inputs, place):
    ckpt = inputs.checkpoint
    pre = M.preprocessing(ckpt)
    net = M.model_from_checkpoint(ckpt, path=ckpt["path"])
    net = net.to(place.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    context = worker_start_method() if args.workers > 0 else None
    res = evaluate(net, inputs.val_samples, args, place, pre["size"], pre["resize"], context, set())
    if place.rank == 0:
        print(json.dumps(dict(res, checkpoint=ckpt["path"], val_size=pre["size"], val_resize=pre["resize"])),
              flush=True)
    return 0


# ---- The run's pieces: network, optimizer, schedule, loss scaler, EMA, built once -----------------------------------
@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    model: torch.nn.Module  # the unwrapped network; checkpoints hold its weights
    ddp: torch.nn.Module  # model wrapped in DistributedDataParallel (or model itself on one process)
    fwd: torch.nn.Module  # what a step calls: ddp, or torch.compile(ddp)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: object  # EMA or None
    place: "Place"  # rank, world, device, autocast precision
    accum: int  # micro-batches per optimizer step (grad_accum())


@dataclasses.dataclass
class Loop:
    """What the epoch loop carries besides the Run, built once by start(): the data, where it starts, the stop flag."""
    sampler: "EpochBatches"
    train_set: "TrainSet"
    loader: torch.utils.data.DataLoader
    context: object  # the loaders' worker start method (worker_start_method())
    val_samples: list
    classes: list
    stream: object  # the CUDA side stream that copies the next batch while this one trains (None on a CPU)
    start_epoch: int
    start_step: int
    carry: dict  # the resumed epoch's running sums (meet()), or None
    stop: "StopFlag"
    said_broken: set  # the validation photos already named as broken


def build_run(args, num_classes, steps_per_epoch, place, accum=1):
    world, device = place.world, place.device
    torch.manual_seed(args.seed)
    model = M.build_model(args.arch, num_classes, stem="imagenet", zero_init_residual=args.zero_init_residual)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.sync_bn and world > 1:  # per-GPU batches of 32 or less give noisy BN statistics: use the global batch's
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (same parameter names as BatchNorm's)
    peak_lr = args.lr * args.batch_size * world * accum / 256  # linear scaling rule (Goyal et al. 2017)
    # no weight decay on BN parameters and biases: decaying them only fights normalisation
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.wd},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=peak_lr, momentum=args.momentum, nesterov=args.nesterov)
    sched = build_schedule(opt, args, steps_per_epoch, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=place.amp_dtype == torch.float16)
    # fp16: GradScaler skips a step whose gradients overflowed (often the first), and the schedule steps on regardless
    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
    ema = M.EMA(model, args.ema) if args.ema > 0 else None
    ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    # Compiling the DDP-wrapped module lets TorchDynamo's DDPOptimizer split the graph at DDP's bucket boundaries,
    # so each bucket's all-reduce starts while the backward pass is still running.
    fwd = torch.compile(ddp, mode=args.compile) if args.compile else ddp
    return Run(args, model, ddp, fwd, opt, sched, scaler, ema, place, accum)


def build_schedule(opt, args, steps_per_epoch, peak_lr):
    total, warm = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    if total < 3:
        raise UserError(f"the schedule has only {total} steps: use more --epochs or a smaller batch")
    if args.schedule == "onecycle":  # (warm-up >= 2 steps: OneCycleLR divides by the warm-up length)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=peak_lr, total_steps=total + 1, pct_start=max(warm, 2) / (total + 1), div_factor=25.0,
            final_div_factor=1e4, cycle_momentum=args.momentum > 0, base_momentum=0.85, max_momentum=args.momentum)

    def factor(step):  # linear warm-up from ~0 (Goyal et al. 2017), then half-cosine to 0 (Loshchilov & Hutter 2016)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---- Data: one global order per epoch, each photo's augmentation drawn from (seed, epoch, index) --------------------
class EpochBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of (epoch, index) for one epoch from a given step (the ragged end dropped): global
    batch b is order[b*G:(b+1)*G], G = batch x world x accum; rank r's micro-batch m starts at (m*world + r)*batch."""

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
        order = M.seeded(self.seed, self.epoch, M.Stream.ORDER).permutation(self.n)
        for step in range(self.start, self.steps):
            g = order[step * self.global_batch:(step + 1) * self.global_batch]
            for m in range(self.accum):
                lo = (m * self.world + self.rank) * self.batch
                yield [(self.epoch, int(i)) for i in g[lo:lo + self.batch]]


class TrainSet(torch.utils.data.Dataset):
    """Items are (epoch, index) pairs, so each image's augmentation is a function of (seed, epoch, index), and its
    size a function of the epoch. The worker does it all with PIL: decode (reduced-size JPEG decoding when the crop
    allows it), crop, resize, flip and colour jitter; the batch travels as uint8."""

    REPLACEMENT_DRAWS = 16

    def __init__(self, samples, args):
        self.samples, self.args = samples, args
        self.broken = set()  # (the main process's) training photos met that cannot be decoded

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        """The photo's pixels or, when it cannot be decoded, those of the first of the others drawn from (seed, epoch,
        index) that can: the same replacement on every rank and after a resume, and a broken file costs the run that
        photo alone (timm's loader skips such files too). `replaced` names the broken photo's index (-1: none)."""
        epoch, index = item
        rng, size = M.seeded(self.args.seed, epoch, index, M.Stream.REPLACEMENT), train_size_at(self.args, epoch)
        for source in [index] + rng.integers(0, len(self.samples), self.REPLACEMENT_DRAWS).tolist():
            try:
                image = augmented_photo(self.args, epoch, source, self.samples[source][0], size)
            except M.ImageError:
                continue
            return {"image": image, "label": self.samples[source][1], "replaced": -1 if source == index else index}
        raise UserError(f"{self.samples[index][0]} cannot be decoded, nor any of the {self.REPLACEMENT_DRAWS} "
                        f"training photos drawn to replace it")

    def note_broken(self, indices, rank):
        """Name each broken training photo once (rank 0), and stop the run (every rank: they all hold the same indices)
        once more than --max-broken-images of them have been met."""
        for i in sorted(indices):
            path = self.samples[i][0]
            if path not in self.broken and rank == 0:
                try:
                    M.open_rgb(path)
                    reason = f"{path}: cannot read image"
                except M.ImageError as e:
                    reason = str(e)
                print(f"{reason}; replaced by another training photo drawn from (seed, epoch, index), the same on "
                      f"every rank and resume ({len(self.broken) + 1} broken so far)", flush=True)
            self.broken.add(path)
        limit = self.args.max_broken_images
        limit = max(10, len(self.samples) // 1000) if limit is None else limit
        if len(self.broken) > limit:
            raise DataError(f"{len(self.broken)} training photos cannot be decoded (more than --max-broken-images "
                            f"{limit}), among them {', '.join(sorted(self.broken)[:3])}: check the copy of the data "
                            f"set, or raise the limit")


def train_size_at(args, epoch):
    """The training crop size of an epoch. Progressive resizing (FFCV's ResNet recipes): --min-train-size until
    epoch START, then linearly up to --train-size at epoch END, in steps of 32 pixels, FFCV's rounding."""
    if args.min_train_size is None:
        return args.train_size
    start, end = args.ramp_epochs
    size = float(np.interp(epoch, [start, end], [args.min_train_size, args.train_size]))
    return int(max(16, round(size / 32) * 32)) if size not in (args.min_train_size, args.train_size) else int(size)


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


class EvalSet(torch.utils.data.Dataset):
    """model.py's evaluation preprocessing: short side to resize, center crop size (what predict.py applies)."""

    def __init__(self, samples, size, resize):
        self.samples, self.size, self.resize = samples, size, resize

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            return M.eval_image(path, self.size, self.resize), label
        except M.ImageError:  # left out of the figures (label -1), and named by evaluate()
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1


def make_loader(dataset, workers, device, context, batch_sampler=None, batch_size=1):
    """Workers start per iterator (not persistent), so every epoch's end shuts them down cleanly."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, batch_sampler=batch_sampler, num_workers=workers,
        worker_init_fn=functools.partial(worker_init, rank_pid=os.getpid()), pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None, multiprocessing_context=context if workers > 0 else None)


def device_batches(loader, device, stream, sums):
    """The loader's micro-batches as (uint8 images, labels) on the device, one batch ahead: on CUDA the next batch is
    copied (pinned, non-blocking) on a side stream while this one trains. The time spent waiting for the workers
    (data-wait) and the broken photos they replaced go to the epoch's sums. Closing it shuts its workers down."""
    def load():
        t, batch = time.time(), next(it, None)
        if batch is None:
            return None
        sums.wait += time.time() - t
        sums.new_replaced += batch["replaced"][batch["replaced"] >= 0].tolist()  # (a CPU tensor: no device sync)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)

    with stop_signals_blocked():
        it = iter(loader)
    ahead = load()
    while ahead is not None:
        if stream is not None:  # the step waits for this batch's copy alone, and keeps its memory until it is done
            torch.cuda.current_stream(device).wait_stream(stream)
            for x in ahead:
                x.record_stream(torch.cuda.current_stream(device))
        batch, ahead = ahead, load()
        yield batch


# ---- Start-up checks and checkpoints: what rebuilds the model (model.py's format) plus what resumes the run ---------
def check_inputs(args, place):
    """Everything that can fail on bad input (data, checkpoint, batch size, flags that cannot run here), done by
    every rank before the vote on it. Returns the Inputs."""
    world, cuda = place.world, place.device.type == "cuda"
    if args.sync_bn and world > 1 and not cuda:
        raise UserError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU/gloo kernels); leave it off on CPU")
    grad_accum(args, world, None)  # (a bad --global-batch is said before the data is listed)
    try:
        data = M.list_train_val(args.data)
    except M.FolderError as e:
        raise UserError(str(e)) from None
    classes, train, val = data["classes"], data["train"], data["val"]
    checkpoint = resume = None
    if args.evaluate:
        path = args.checkpoint or (os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume)
        try:
            ckpt = M.load_checkpoint(path)
            M.model_from_checkpoint(ckpt, path=path)
        except M.CheckpointError as e:
            raise UserError(str(e)) from None
        if list(ckpt["classes"]) != list(classes):
            raise UserError(f"{path} was trained on other classes than {args.data}/val")
        checkpoint = dict(ckpt, path=path)
    else:
        resume = load_resume(args, place)
        if resume is not None and list(resume["classes"]) != list(classes):
            raise UserError(f"{resume['path']} was trained on other classes than those of {args.data}; "
                            f"resume it with its own data, or start a fresh run in another --out")
    accum = grad_accum(args, world, resume)
    if not args.evaluate and len(train) < args.batch_size * world * accum:
        raise UserError(f"the global batch ({args.batch_size * world * accum}) is larger than train/ "
                        f"({len(train)} images)")
    return Inputs(classes, train, val, accum, resume, checkpoint)


def grad_accum(args, world, resume):
    """Micro-batches per optimizer step: --grad-accum; or what makes --global-batch on this many processes; or what
    keeps a resumed run's global batch (on another number of processes: elastic jobs, a requeue elsewhere); or 1."""
    per_micro_batch = args.batch_size * world
    if args.grad_accum is not None:
        return args.grad_accum
    if args.global_batch is not None:
        if args.global_batch % per_micro_batch:
            raise UserError(f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} x "
                            f"{world} process(es) = {per_micro_batch}")
        return args.global_batch // per_micro_batch
    if resume is None:
        return 1
    if not resume.get("global_batch") or resume["global_batch"] % per_micro_batch:
        raise UserError(f"{resume['path']} was trained with a global batch of {resume.get('global_batch')}, which "
                        f"{world} process(es) x --batch-size {args.batch_size} cannot make up: resume with another "
                        f"--batch-size or --global-batch")
    return resume["global_batch"] // per_micro_batch


def rebuild_info(args, classes):
    return dict(arch=args.arch, num_classes=len(classes), stem="imagenet", classes=list(classes),
                class_names=M.readable_class_names(classes), mean=list(M.IMAGENET_MEAN), std=list(M.IMAGENET_STD),
                image_size=args.val_size, eval_resize=args.val_resize, train_size=args.train_size,
                dataset=os.path.basename(os.path.normpath(args.data)))


def save_last(run, loop, epoch, step, sums_state, best):
    """Rank 0 writes last.pt (atomically); every rank waits for it, so that nobody exits (and makes torchrun kill
    the rest) before the file is complete. Between epoch ends each rank's EMA keeps its own BN statistics, so an
    exact resume needs every rank's, gathered here."""
    ema_ranks = None
    if run.ema is not None:
        flat = torch.cat([b.detach().flatten() for b in run.ema.module.buffers() if b.dtype.is_floating_point])
        ema_ranks = [torch.empty_like(flat) for _ in range(run.place.world)] if run.place.world > 1 else [flat]
        if run.place.world > 1:
            dist.all_gather(ema_ranks, flat)
        ema_ranks = [p.cpu() for p in ema_ranks]
    if run.place.rank == 0:
        M.save_checkpoint(os.path.join(run.args.out, "last.pt"), **training_state(run), epoch=epoch, step=step,
                          best_top1=best, epoch_sums=sums_state, global_batch=loop.sampler.global_batch,
                          world_size=run.place.world, ema_rank_buffers=ema_ranks, args=vars(run.args),
                          **rebuild_info(run.args, loop.classes))
    if dist.is_initialized():
        dist.barrier()


def training_state(run):
    """What evolves during training, for last.pt (the unwrapped model's weights: no module./_orig_mod.)."""
    cuda = run.place.device.type == "cuda"
    return dict(model=run.model.state_dict(), ema=run.ema.state_dict() if run.ema else None,
                ema_updates=run.ema.updates if run.ema else 0, optimizer=run.opt.state_dict(),
                scheduler=run.sched.state_dict(), scaler=run.scaler.state_dict(), amp=amp_name(run.place.amp_dtype),
                # all randomness here comes from (seed, epoch, step or index), but code added later may draw from
                # torch's; this process's own device only, so that a machine with fewer GPUs can restore it
                rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state(run.place.device) if cuda else None)


# Settings that fix the sequence of batches, sizes and LRs; a resumed run must use the same.
RESUME_MUST_MATCH = ("arch", "epochs", "seed", "lr", "warmup_epochs", "schedule", "train_size", "min_train_size",
                     "ramp_epochs", "min_scale", "color_jitter", "mixup", "cutmix", "ema", "label_smoothing")


def load_resume(args, place):
    """The checkpoint to resume from, or None for a fresh start. Raises UserError on anything wrong, before anything
    is written."""
    last, resume = os.path.join(args.out, "last.pt"), args.resume
    if resume is None and place.restarts > 0:  # torchelastic's contract: a restarted rank continues from the checkpoint
        resume = "auto"
        if place.rank == 0:
            print(f"torchrun restart {place.restarts}: resuming from {last} (--resume auto, implied)", flush=True)
    if resume is None:
        for f in (last, os.path.join(args.out, "best.pt")):
            if os.path.exists(f):
                raise UserError(f"{f} exists: pass --resume auto to continue that run, or choose another --out")
        return None
    path = last if resume == "auto" else resume
    if resume == "auto" and not os.path.exists(path):
        if place.rank == 0:
            print(f"no {path} yet: starting a fresh run", flush=True)
        return None
    try:
        ckpt = M.load_checkpoint(path)
    except M.CheckpointError as e:
        raise UserError(str(e)) from None
    if "optimizer" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path} is not an imagenet_ddp.py training checkpoint (no optimizer state); "
                        f"use --resume with a last.pt")
    missing = [k for k in ("model", "scheduler", "scaler", "amp", "epoch", "step", "best_top1", "epoch_sums", "ema",
                           "ema_updates", "ema_rank_buffers", "rng_cpu", "rng_cuda", "world_size", "global_batch")
               if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete training checkpoint (missing {', '.join(missing)})")
    if ckpt["arch"] != args.arch:
        raise UserError(f"{path} holds a {ckpt['arch']}, but --arch is {args.arch}")
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    ckpt["path"], world = path, place.world
    global_batch = args.batch_size * world * grad_accum(args, world, ckpt)
    diff = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} (not {getattr(args, k)})" for k in RESUME_MUST_MATCH
            if norm(ckpt["args"].get(k)) != norm(getattr(args, k))]
    if ckpt["global_batch"] != global_batch:
        diff.append(f"a global batch (batch-size x processes x grad-accum) of {ckpt['global_batch']} "
                    f"(now {global_batch})")
    if diff:
        raise UserError(f"{path} was made with different settings; resume with " + ", ".join(diff))
    return ckpt


def restore_training_state(ckpt, run, log):
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    # A job may be requeued on other hardware: fp16 (V100, T4) to bf16 or back, or to fp32. Only fp16 keeps a
    # GradScaler; a run switching to it starts with a fresh loss scale, a run leaving it drops the old one.
    if run.scaler.is_enabled() and ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    if ckpt["amp"] != amp_name(run.place.amp_dtype):
        fresh = ": a fresh GradScaler starts the loss scale" if run.scaler.is_enabled() else ""
        log(f"resuming a {ckpt['amp']} run in {amp_name(run.place.amp_dtype)}{fresh}")
    if ckpt["world_size"] != run.place.world:
        log(f"resuming a {ckpt['world_size']}-process run on {run.place.world} process(es) with --grad-accum "
            f"{run.accum}: the same global batch ({ckpt['global_batch']}), batches and LR (README: Resume)")
    if run.ema is not None:
        run.ema.module.load_state_dict(ckpt["ema"])
        run.ema.updates = ckpt["ema_updates"]
        parts = ckpt["ema_rank_buffers"]  # this rank's EMA BN statistics; on another world size, the average
        flat = parts[run.place.rank] if len(parts) == run.place.world else torch.stack(parts).mean(0)
        buffers = [b for b in run.ema.module.buffers() if b.dtype.is_floating_point]
        for b, chunk in zip(buffers, torch.split(flat, [b.numel() for b in buffers])):
            b.copy_(chunk.view_as(b))
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] is not None and run.place.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng_cuda"], run.place.device)


# ==== Operations: the machinery around the training story ============================================================
# ---- Processes and devices ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Place:
    """Where this process runs: its rank among world processes, its device and autocast precision."""
    rank: int
    world: int
    device: torch.device
    amp_dtype: object  # torch.bfloat16, torch.float16 or None (fp32)
    restarts: int = 0  # how often torchrun has restarted this run


def setup_distributed(device_name, amp):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs one process without a process group."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = pick_device(device_name)
    if device.type == "cuda":  # (a launcher that shows each rank its own GPU alone leaves one visible)
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif world > 1:  # share the cores between the processes on this node, unless OMP_NUM_THREADS says otherwise
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // per_node))
    # torchrun counts restarts per node (a node's healthy ranks restart as 0): the run's is the most any rank was told
    restarts = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))], device=device)
    if world > 1:
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        store = attempt_store(rank) if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None  # or env://
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, device_id=device_id)
        dist.all_reduce(restarts, op=dist.ReduceOp.MAX)
    if rank != 0:
        warnings.simplefilter("ignore")  # rank 0 speaks for all; the others would repeat every warning
    return Place(rank, world, device, pick_amp(amp, device), int(restarts.item()))


def attempt_store(rank, timeout_s=1800):
    """torchrun's store, seen through a namespace of this attempt alone. torchrun keeps one store for all attempts
    (torch 2.14): after a restart a rank could read the address the last attempt's rank 0 left there and fail to
    connect ("connectFullMesh failed", pytorch/pytorch#135712). So rank 0 draws a fresh name, and each other rank takes
    it once rank 0 has echoed the nonce this process drew: a name left by a dead rank 0 never echoes."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    if rank == 0:
        name = uuid.uuid4().hex
        store.set("imagenet_ddp/attempt", name)
        for r in range(1, int(os.environ["WORLD_SIZE"])):  # store.get waits for the key
            store.set(f"{name}/echo/{r}", store.get(f"{name}/nonce/{r}"))
        return dist.PrefixStore(name, store)
    nonce, deadline = uuid.uuid4().hex.encode(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        name = store.get("imagenet_ddp/attempt").decode()
        store.set(f"{name}/nonce/{rank}", nonce)
        if store.check([f"{name}/echo/{rank}"]) and store.get(f"{name}/echo/{rank}") == nonce:
            return dist.PrefixStore(name, store)
        time.sleep(0.05)
    raise RuntimeError(f"rank {rank}: no rank 0 of this attempt answered in {timeout_s} s")


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


def all_sum(values, device):
    """Sum a list of numbers over ranks, in float64 so counts stay exact."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_average_(tensors, world):
    """Average floating-point tensors over ranks, in place."""
    for t in tensors if world > 1 else ():
        if t.dtype.is_floating_point:
            dist.all_reduce(t)
            t.div_(world)


def gathered(items, world):
    """Every rank's list, concatenated in rank order (a collective when world > 1: every rank calls it)."""
    parts = [list(items)] * world
    if world > 1:
        dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def weights_fingerprint(model, device):
    """True when all ranks hold the same weights and buffers, by their (sum, sum of squares) in float64."""
    floats = [p.detach().double() for p in model.state_dict().values() if p.dtype.is_floating_point]
    lo = torch.stack([sum(p.sum() for p in floats), sum(p.pow(2).sum() for p in floats)]).to(device)
    hi = lo.clone()
    if dist.is_initialized():
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


# ---- Stopping: a signal sets a flag, and all ranks agree on the step to stop after ----------------------------------
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


class StopVote:
    """All ranks must stop at the same step, but a signal may reach only some of them. Each step every rank adds
    its flag to an all_reduce started asynchronously, and reads the result one step later. On a GPU the result is
    copied to pinned host memory behind the all_reduce, with an event, before the next step is queued: the read waits
    for that copy alone, never for the step in flight (a plain .item() would wait for everything queued)."""

    def __init__(self, device):
        self.flags = (torch.zeros(1, device=device), torch.ones(1, device=device))
        cuda = device.type == "cuda"
        self.slots = [(torch.zeros(1, pin_memory=True), torch.cuda.Event()) for _ in range(2)] if cuda else None
        self.pending, self.casts = None, 0

    def cast(self, flag):
        """Vote now; return the outcome of the previous step's vote."""
        t = self.flags[bool(flag)].clone()
        done = dist.all_reduce(t, async_op=True) if dist.is_initialized() else None
        if self.slots is not None:
            if done is not None:
                done.wait()  # (NCCL: the stream waits for the all_reduce, the host does not)
            (host, done), voted = self.slots[self.casts % 2], t
            t = host.copy_(voted, non_blocking=True)
            done.record()
        self.casts += 1
        previous, self.pending = self.pending, (t, done)
        return self._outcome(previous)

    def settle(self):
        previous, self.pending = self.pending, None
        return self._outcome(previous)

    @staticmethod
    def _outcome(vote):
        if vote is None:
            return False
        t, done = vote
        if isinstance(done, torch.cuda.Event):
            done.synchronize()
        elif done is not None:
            done.wait()
        return t.item() > 0


# ---- Loader workers: started with the stop signals blocked, ignore them, end with their rank ------------------------
@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals while DataLoader workers start: a worker inherits the blocked mask (fork, spawn and
    forkserver alike) until worker_init() ignores the signals, so a signal to the whole process group (torchrun,
    SLURM, Kubernetes, Ctrl-C) can never kill a worker; the rank gets it when the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_init(worker_id, rank_pid):
    """Workers ignore the stop signals (the rank decides when to stop; a killed worker would make the rank raise
    before last.pt is written) and end with their rank, however it ends: a forkserver's worker's parent only exits
    once every worker has closed the pipe the rank opened, so after a SIGKILL of the rank both would live on, holding
    the launcher's output pipe. A pidfd wakes the watch when the rank exits (Linux 5.3+); else it looks every second."""
    import select
    import threading
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        fd = os.pidfd_open(rank_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None

    def watch():
        if fd is not None:
            select.select([fd], [], [])
        else:
            while os.getppid() != 1 and os.path.exists(f"/proc/{rank_pid}"):
                time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-rank", daemon=True).start()


def kill_workers_left_at_exit():
    """Workers ignore SIGTERM, so multiprocessing's exit handler (terminate(), join()) would wait for ever for any an
    error left running: kill them first, at the interpreter's exit (at main()'s end another caller's may be at work)."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


def worker_start_method():
    """forkserver under a process group, fork otherwise: gloo's threads take Python's thread-state lock, and a child
    forked while one holds it hangs in os.fork() for ever before Python 3.12 (CPython gh-112275). The server forks
    from one thread and imports torch once (bench/README.md, "Loader workers under a process group"); started with
    the stop signals ignored (exec keeps that), it and its resource tracker outlive a signal to the process group, as
    the workers do. Called before the StopFlag, so no stop signal is lost here."""
    if not dist.is_initialized():
        return None
    multiprocessing.set_forkserver_preload(["torch", "numpy", "PIL.Image", "model"])
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return "forkserver"


if __name__ == "__main__":
    sys.exit(main())
