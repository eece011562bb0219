"""cifar.py's speed: its input pipeline and training step against pure compute, with the FLOP figures. One JSON line.

    python bench/cifar_speed.py --dataset folder --data-dir data/cifar10-jpg --steps 30

Pure compute is one fixed batch, already augmented, on an LR-0 twin of the run; the pipeline is the real thing
(sampling, augmentation, mixing and the same train step). They alternate in rounds of 2 steps, so that clock drift or a
noisy neighbour hits both alike (the same code swings by 2x over minutes on a shared 2-core VM). Every other flag is
cifar.py's (--batch-size, --amp, --arch, --compile, ...).
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--steps", type=int, default=30, help="timed steps of each")
    own, rest = p.parse_known_args(argv)
    try:
        if own.steps < 1:
            raise cifar.UserError("--steps must be >= 1")
        args = cifar.get_args(rest)
        device = cifar.pick_device(args.device)
        place = cifar.Place(device, cifar.pick_amp(args.amp, device))
        print(json.dumps(measure(args, cifar.load_data(args), place, own.steps)), flush=True)
    except cifar.UserError as e:
        print(f"cifar_speed.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def measure(args, data, place, n):
    steps_per_epoch, B = len(data.y_tr) // args.batch_size, args.batch_size
    if steps_per_epoch < 1:
        raise cifar.UserError(f"--batch-size {B} is larger than the training set ({len(data.y_tr)} images)")
    # (more steps than a short schedule has, and OneCycleLR refuses to step past its end)
    run = cifar.build_run(args, len(data.classes), max(steps_per_epoch, 2 * n + 10), place)
    cifar.to_device(run, data, steps_per_epoch)
    order = cifar.epoch_order(args.seed, 0, len(data.y_tr)).to(place.device)
    draws = cifar.EpochDraws(args, 0, steps_per_epoch, place.device)
    real_batch = lambda i: cifar.training_batch(args, data, order, draws, i % steps_per_epoch)
    fixed = real_batch(0)
    run.model.train()
    contenders = {"compute": (lambda i: fixed, stepper(lr0_twin(run))), "pipeline": (real_batch, stepper(run))}
    for make_batch, step_fn in contenders.values():
        timed_steps(3, make_batch, step_fn, place.device)  # warm-up (and compilation), untimed
    rounds = max(1, n // 2)
    seconds, done = dict.fromkeys(contenders, 0.0), 3
    for k in [n // rounds + (i < n % rounds) for i in range(rounds)]:
        for name, (make_batch, step_fn) in contenders.items():
            seconds[name] += timed_steps(k, make_batch, step_fn, place.device, first=done)
        done += k
    compute, pipeline = (n * B / seconds[k] for k in ("compute", "pipeline"))
    flops = train_flops_per_image(run.model, place.device, args.channels_last)
    peak = matmul_peak_tflops(place.device, place.amp_dtype)
    return dict(arch=args.arch, batch_size=B, device=str(place.device), amp=cifar.amp_name(place.amp_dtype),
                channels_last=args.channels_last, compile=args.compile, steps=n, compute_img_per_s=round(compute, 1),
                pipeline_img_per_s=round(pipeline, 1), pipeline_vs_compute=round(pipeline / compute, 3),
                train_gflop_per_img=round(flops / 1e9, 3), achieved_tflops=round(flops * pipeline / 1e12, 3),
                matmul_peak_tflops=round(peak, 3), mfu=round(flops * pipeline / 1e12 / peak, 3))


def timed_steps(n_steps, make_batch, step_fn, device, first=0):
    """Seconds taken by steps first..first+n_steps, batch making included (the device is synced at both ends)."""
    sync(device)
    t = time.time()
    for i in range(first, first + n_steps):
        step_fn(*make_batch(i))
    sync(device)
    return time.time() - t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def lr0_twin(run):
    """A copy of the run whose LR is 0: the same arithmetic (momentum, weight decay, EMA), but it never fits the
    batch. Fitting one batch over and over would drive gradients into denormal floats, which x86 computes ~100x
    slower: measured on a Sapphire Rapids VM, a learning copy ran 10% *slower* than the real pipeline."""
    args, twin = run.args, copy.deepcopy(run.model).train()
    opt = torch.optim.SGD(cifar.param_groups(twin, args.wd), lr=0.0, momentum=args.momentum, nesterov=args.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    fwd = torch.compile(twin, mode=args.compile) if args.compile else twin
    ema = cifar.M.EMA(twin, args.ema) if args.ema > 0 else None
    return cifar.Run(args, twin, fwd, opt, sched, run.scaler, ema, run.place)


def stepper(run):
    def step(x, y, lam):
        cifar.train_step(run, x, y, lam)
        if run.ema is not None:
            run.ema.update(run.model)
    return step


def train_flops_per_image(model, device, channels_last):
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def matmul_peak_tflops(device, dtype, reps=8):
    n = 4096 if device.type == "cuda" else 2048  # (2048 already runs a CPU at its peak, in an eighth of the time)
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    a @ b
    sync(device)
    t = time.time()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.time() - t) / 1e12


if __name__ == "__main__":
    sys.exit(main())
