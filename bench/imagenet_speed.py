"""imagenet_ddp.py's speed on one process (one JSON line): pure compute against the real pipeline, or the input
pipeline alone.

    python bench/imagenet_speed.py --data /data/imagenet --steps 30 --workers 8
    python bench/imagenet_speed.py --loader-only --data /data/imagenet --steps 50 --workers 8

The first times --steps steps of the real pipeline (loader workers, the copy to the device, the train step), then as
many on one fixed batch with the LR at 0 (the compute ceiling: the same arithmetic, but it never fits the batch). The
second times the loader alone, no model: img_per_s_per_worker says how many workers a GPU needs. Every other flag is
imagenet_ddp.py's (--arch, --batch-size, --amp, --compile, --train-size, ...).
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imagenet_ddp as I  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--steps", type=int, default=30, help="timed steps (batches, with --loader-only)")
    p.add_argument("--loader-only", action="store_true", help="time the input pipeline alone, no model")
    own, rest = p.parse_known_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise I.UserError("this times one process: run it with python, not torchrun")
        if own.steps < 1:
            raise I.UserError("--steps must be >= 1")
        args = I.get_args(rest)
        place = I.setup_distributed(args.device, args.amp)
        folders = I.M.list_train_val(args.data)
        classes, train = folders["classes"], folders["train"]
        measure = loader_alone if own.loader_only else compute_and_pipeline
        print(json.dumps(measure(args, train, len(classes), place, own.steps)), flush=True)
    except (I.UserError, I.M.FolderError) as e:
        print(f"imagenet_speed.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def compute_and_pipeline(args, samples, num_classes, place, n):
    device, accum = place.device, I.grad_accum(args, 1, None)
    sampler = I.EpochBatches(len(samples), args.batch_size, 1, 0, accum, args.seed)
    if sampler.steps < n + 3:
        raise I.UserError(f"train/ has {sampler.steps} steps of {args.batch_size}: too few to time --steps {n}")
    run = I.build_run(args, num_classes, sampler.steps, place, accum)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None  # (as the training loop copies batches)
    sums = I.EpochSums(device)
    loader = I.make_loader(I.TrainSet(samples, args), args.workers, device, None, sampler)
    batches = I.device_batches(loader, device, side, sums)
    pipeline, wait = timed_steps(run, batches, n, sums)
    fixed = itertools.repeat(next(batches))  # (the compute ceiling: one batch over and over)
    batches.close()
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda s: 0.0)  # LR 0 from here on
    compute, _ = timed_steps(run, fixed, n, I.EpochSums(device))
    return dict(arch=args.arch, batch_size=args.batch_size, train_size=I.train_size_at(args, 0), device=str(device),
                amp=I.amp_name(place.amp_dtype), channels_last=args.channels_last, compile=args.compile,
                workers=args.workers, steps=n, compute_img_per_s=round(compute, 1),
                pipeline_img_per_s=round(pipeline, 1),
                pipeline_vs_compute=round(pipeline / compute, 3), data_wait_pct=round(100 * wait, 1))


def loader_alone(args, samples, num_classes, place, n):
    device = place.device
    sampler = I.EpochBatches(len(samples), args.batch_size, 1, 0, 1, args.seed)
    if sampler.steps < n + 1:
        raise I.UserError(f"train/ has {sampler.steps} batches of {args.batch_size}: too few to time --steps {n}")
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    loader = I.make_loader(I.TrainSet(samples, args), args.workers, device, None, sampler)
    batches = I.device_batches(loader, device, side, I.EpochSums(device))
    next(batches)  # workers started and warm
    sync(device)
    t, images = time.time(), 0
    for _ in range(n):
        images += len(next(batches)[1])
    sync(device)
    secs = time.time() - t
    batches.close()
    return dict(images=images, seconds=round(secs, 3), train_size=I.train_size_at(args, 0), workers=args.workers,
                img_per_s=round(images / secs, 1), img_per_s_per_worker=round(images / secs / max(args.workers, 1), 1))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(run, source, n, sums):
    """(img/s, data-wait share) of n train steps fed by source, after 2 untimed warm-up steps (cuDNN autotuning,
    compilation, the workers' first batches); the data-wait is what source recorded in sums."""
    args = run.args
    for i in range(n + 2):
        if i == 2:
            sync(run.place.device)
            t, wait0 = time.time(), sums.wait
        I.train_step(run, source, I.step_mix(args, 0, i, I.train_size_at(args, 0)), sums)
    sync(run.place.device)
    secs = time.time() - t
    return n * args.batch_size * run.accum / secs, (sums.wait - wait0) / secs


if __name__ == "__main__":
    sys.exit(main())
